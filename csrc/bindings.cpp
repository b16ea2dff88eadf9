// Python bindings of the C++ core: the only file that knows about Python.
//
// Ownership across the C++ boundary: a Request's `payload` and `future` are
// owned references (PyObject*, incref'd when the request is made) and are
// released, with the GIL held, by whoever ends the request: a Batch or Ticket
// when it is resolved, or collect()/fail_pending() for requests that were
// withdrawn or rejected. A Completion's outcome is an owned reference handed
// from the server to the caller. Every wait runs with the GIL released.
//
// The fast path (requests of one fixed schema): the caller matches its
// TensorDict against the schema and the request carries its leaves
// (RequestRows: owned tensor references and their data pointers). The server
// copies them into staging columns (Batch::gather, csrc/row_copy.h) without
// creating any Python object per request, runs the model on the batch, and
// resolves each request with its row of the output (Batch::resolve_rows).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/batch_policy.h"
#include "core/collector.h"
#include "core/completion.h"
#include "core/futex.h"
#include "core/request_queue.h"
#include "core/row_copy.h"
#include "core/shared_slots.h"
#include "core/sliced_wait.h"
#include "core/slot_client.h"
#include "core/slot_responses.h"
#include "core/staging.h"
#include "core/wake_batching.h"
#include "core/weight_banks.h"

namespace py = pybind11;

namespace batchserve {
namespace {

struct QueueClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct QueueFullError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Releases the GIL for a scope, like py::gil_scoped_release, but safe in a
// daemon thread still inside the scope when the interpreter exits (a server
// worker past its shutdown timeout, a client thread waiting): CPython ends
// such a thread when it retakes the GIL, with pthread_exit, whose forced
// unwinding out of a (noexcept) destructor is std::terminate. Such a thread
// parks instead, without the GIL, until the process is gone. The thread
// that runs the finalization retakes the GIL as usual.
class GilRelease {
 public:
  GilRelease() : state_(PyEval_SaveThread()) {}
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;
  ~GilRelease() {
    try {
      PyEval_RestoreThread(state_);
    } catch (...) {  // the forced unwind of pthread_exit: finalization began meanwhile
      for (;;) ::pause();  // never leaves the handler, so the unwind never completes
    }
  }

 private:
  PyThreadState* state_;
};

// The hooks of the core's sliced waits (csrc/core/sliced_wait.h): run a
// wait without the GIL; after a slice, run Python's signal handlers.
struct WithoutGil {
  template <typename F>
  auto operator()(F&& f) const {
    GilRelease nogil;
    return f();
  }
};

// GIL held. True when a signal handler raised (the Python error is set).
bool signalled() { return PyErr_CheckSignals() != 0; }

// Why a blocking call that timed out has no result, for its TimeoutError.
const char* timed_out_because(bool withdrawn) {
  return withdrawn ? "no result within the timeout; the request was withdrawn before it was batched"
                   : "no result within the timeout; the request was already being served and "
                     "its result is discarded";
}

[[noreturn]] void raise_timeout(const std::string& message) {
  PyErr_SetString(PyExc_TimeoutError, message.c_str());
  throw py::error_already_set();
}

int64_t deadline_from(const std::optional<double>& timeout_s) {
  if (!timeout_s) return kNoDeadline;
  return deadline_after(*timeout_s);
}

// Calls a method of a concurrent.futures.Future, ignoring the errors of a
// future that was already resolved or cancelled: the caller has left.
void call_future(PyObject* future, const char* method, PyObject* arg) {
  PyObject* r = PyObject_CallMethod(future, method, "O", arg);
  if (r == nullptr) {
    PyErr_Clear();
  } else {
    Py_DECREF(r);
  }
}

// GIL held. Decides whether a drained future-backed request is still wanted
// (Future.set_running_or_notify_cancel, as executors do).
bool claim_future(PyObject* future) {
  PyObject* r = PyObject_CallMethod(future, "set_running_or_notify_cancel", nullptr);
  if (r == nullptr) {
    PyErr_Clear();
    return false;
  }
  const bool claimed = PyObject_IsTrue(r) == 1;
  Py_DECREF(r);
  return claimed;
}

// ---------------------------------------------------------------------------
// Fast path: Python objects looked up once, the schema, a request's leaves.

// torch / tensordict objects and attribute names the fast path uses. Looked
// up on first use (GIL held) and kept for the life of the process.
struct TorchRefs {
  PyObject* tensor_type;      // torch.Tensor
  PyObject* tensordict_type;  // tensordict.TensorDict
  PyObject* strided;          // torch.strided
  PyObject* new_unsafe;       // TensorDict._new_unsafe
  PyObject* empty_size;       // torch.Size([])
  PyObject* s_tensordict;
  PyObject* s_batch_size;
  PyObject* s_dtype;
  PyObject* s_shape;
  PyObject* s_is_cpu;
  PyObject* s_layout;
  PyObject* s_is_contiguous;
  PyObject* s_data_ptr;
  PyObject* s_unbind;
  PyObject* s_is_neg;
  PyObject* s_clone;
  PyObject* s_device;
};

const TorchRefs& torch_refs() {
  static const TorchRefs* refs = [] {
    py::module_ torch = py::module_::import("torch");
    py::object td_class = py::module_::import("tensordict").attr("TensorDict");
    auto keep = [](py::object o) { return o.release().ptr(); };
    auto name = [](const char* s) { return PyUnicode_InternFromString(s); };
    return new TorchRefs{
        keep(torch.attr("Tensor")),
        keep(td_class),
        keep(torch.attr("strided")),
        keep(td_class.attr("_new_unsafe")),
        keep(torch.attr("Size")(py::tuple())),
        name("_tensordict"),
        name("batch_size"),
        name("dtype"),
        name("shape"),
        name("is_cpu"),
        name("layout"),
        name("is_contiguous"),
        name("data_ptr"),
        name("unbind"),
        name("is_neg"),
        name("clone"),
        name("device"),
    };
  }();
  return *refs;
}

py::object attr(PyObject* o, PyObject* name) {
  PyObject* r = PyObject_GetAttr(o, name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

py::object call_method(PyObject* o, PyObject* name) {
  PyObject* r = PyObject_CallMethodNoArgs(o, name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// GIL held. The address of a CPU tensor's first element.
void* data_ptr(PyObject* tensor) {
  py::object p = call_method(tensor, torch_refs().s_data_ptr);
  void* ptr = PyLong_AsVoidPtr(p.ptr());
  if (ptr == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return ptr;
}

// One fixed request schema: flat keys, each a CPU tensor of one dtype and
// shape. Immutable once made; requests refer to it by id.
struct FastSchema {
  uint64_t id = 0;
  bool strict = false;  // given by request_spec: a mismatch is the caller's error
  std::vector<py::object> keys;
  std::vector<py::object> dtypes;
  std::vector<py::object> shapes;  // torch.Size
  std::vector<size_t> leaf_bytes;
  py::object device;               // the requests' TensorDict device (None or cpu)
  std::vector<py::object> general_keys;  // a request holding one takes the general path
};

// A fast request's leaves, in schema order: the data pointers the C++ core
// copies from (RowSource) and owned references to their tensors, so that a
// caller that replaces a key of its TensorDict cannot free memory the server
// is about to read.
struct RequestRows : RowSource {
  PyObject* tensors[kMaxLeaves] = {};
};

// GIL held. Every RowSource of a Request is a RequestRows.
void free_rows(const RowSource* p) {
  const auto* rows = static_cast<const RequestRows*>(p);
  if (rows == nullptr) return;
  for (size_t j = 0; j < rows->count; ++j) Py_DECREF(rows->tensors[j]);
  delete rows;
}

struct RowsDeleter {
  void operator()(RequestRows* rows) const { free_rows(rows); }
};
using OwnedRows = std::unique_ptr<RequestRows, RowsDeleter>;

std::string repr(PyObject* o) {
  PyObject* r = PyObject_Repr(o);
  if (r == nullptr) {
    PyErr_Clear();
    return "?";
  }
  const char* utf8 = PyUnicode_AsUTF8(r);
  std::string out = utf8 != nullptr ? utf8 : "?";
  if (utf8 == nullptr) PyErr_Clear();
  Py_DECREF(r);
  return out;
}

[[noreturn]] void raise_spec_error(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw py::error_already_set();
}

// GIL held. The request's leaves when `item` matches `schema`; null when it
// does not (it then takes the general path). Against a strict schema
// (request_spec=), a TensorDict with a missing key raises KeyError and one
// with a leaf of the wrong dtype, shape or device raises ValueError, naming
// the key; other differences (non-contiguous or negated-view leaves, a
// batched request, another TensorDict device, a key that asks for the general
// path such as torchrl's interaction type) fall back to the general path,
// which serves them correctly. With `own_copy` the leaves are cloned (a
// submit() caller goes on and may resize or refill its tensors); a blocking
// caller's own tensors are read in place while it waits.
OwnedRows match_schema(PyObject* item, const FastSchema& schema, bool own_copy) {
  const TorchRefs& t = torch_refs();
  if (Py_TYPE(item) != reinterpret_cast<PyTypeObject*>(t.tensordict_type)) return nullptr;
  if (PyObject_Length(attr(item, t.s_batch_size).ptr()) != 0) {
    PyErr_Clear();
    return nullptr;
  }
  py::object leaves = attr(item, t.s_tensordict);
  if (!PyDict_Check(leaves.ptr())) return nullptr;
  const size_t n = schema.keys.size();
  if (n > RequestRows::kMaxLeaves) return nullptr;
  if (!schema.strict && static_cast<size_t>(PyDict_Size(leaves.ptr())) != n) return nullptr;
  for (const py::object& key : schema.general_keys) {
    const int has = PyDict_Contains(leaves.ptr(), key.ptr());
    if (has < 0) throw py::error_already_set();
    if (has == 1) return nullptr;
  }
  {
    py::object device = attr(item, t.s_device);
    const int same = PyObject_RichCompareBool(device.ptr(), schema.device.ptr(), Py_EQ);
    if (same < 0) throw py::error_already_set();
    if (same == 0) return nullptr;
  }
  OwnedRows rows(new RequestRows());
  rows->schema_id = schema.id;
  PyObject* tensors[RequestRows::kMaxLeaves];  // borrowed until all match
  for (size_t j = 0; j < n; ++j) {
    PyObject* key = schema.keys[j].ptr();
    PyObject* v = PyDict_GetItemWithError(leaves.ptr(), key);  // borrowed
    if (v == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      if (!schema.strict) return nullptr;
      PyErr_SetObject(PyExc_KeyError,
                      py::str("request is missing key {!r} of request_spec")
                          .format(py::handle(key))
                          .ptr());
      throw py::error_already_set();
    }
    if (Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(t.tensor_type)) {
      const int is_tensor = PyObject_IsInstance(v, t.tensor_type);
      if (is_tensor < 0) throw py::error_already_set();
      if (!schema.strict || is_tensor == 1) return nullptr;
      raise_spec_error(PyExc_ValueError, "request key " + repr(key) +
                                             " must be a tensor (request_spec); got " +
                                             repr(reinterpret_cast<PyObject*>(Py_TYPE(v))));
    }
    py::object dtype = attr(v, t.s_dtype);
    if (dtype.ptr() != schema.dtypes[j].ptr()) {
      if (!schema.strict) return nullptr;
      raise_spec_error(PyExc_ValueError, "request key " + repr(key) + " has dtype " +
                                             repr(dtype.ptr()) + "; request_spec declares " +
                                             repr(schema.dtypes[j].ptr()));
    }
    py::object shape = attr(v, t.s_shape);
    const int same_shape = PyObject_RichCompareBool(shape.ptr(), schema.shapes[j].ptr(), Py_EQ);
    if (same_shape < 0) throw py::error_already_set();
    if (same_shape == 0) {
      if (!schema.strict) return nullptr;
      raise_spec_error(PyExc_ValueError, "request key " + repr(key) + " has shape " +
                                             repr(shape.ptr()) + "; request_spec declares " +
                                             repr(schema.shapes[j].ptr()));
    }
    if (attr(v, t.s_is_cpu).ptr() != Py_True) {
      if (!schema.strict) return nullptr;
      raise_spec_error(PyExc_ValueError,
                       "request key " + repr(key) +
                           " is not on the CPU; requests matching request_spec carry CPU "
                           "tensors (the server moves the batch to its device)");
    }
    if (attr(v, t.s_layout).ptr() != t.strided ||
        call_method(v, t.s_is_contiguous).ptr() != Py_True ||
        call_method(v, t.s_is_neg).ptr() != Py_False)  // a lazily negated view
      return nullptr;
    tensors[j] = v;
  }
  for (size_t j = 0; j < n; ++j) {
    PyObject* tensor = tensors[j];
    if (own_copy) {
      tensor = PyObject_CallMethodNoArgs(tensor, t.s_clone);
      if (tensor == nullptr) throw py::error_already_set();
    } else {
      Py_INCREF(tensor);
    }
    rows->tensors[j] = tensor;
    rows->count = j + 1;  // owned from here on, released with `rows`
    rows->data[j] = data_ptr(tensor);
  }
  return rows;
}

// GIL held. A new RuntimeError; MemoryError (never null) if even that
// cannot be allocated, so a request always gets an outcome.
PyObject* new_runtime_error(const char* message) {
  PyObject* err = PyObject_CallFunction(PyExc_RuntimeError, "s", message);
  if (err != nullptr) return err;
  PyErr_Clear();
  Py_INCREF(PyExc_MemoryError);
  return PyExc_MemoryError;
}

// GIL held. Sets the Python error a caller raises for `outcome`: the
// exception instance itself, an exception class, or anything else wrapped in
// a RuntimeError.
void set_error_from(PyObject* outcome) {
  if (PyExceptionInstance_Check(outcome)) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(outcome)), outcome);
  } else if (PyExceptionClass_Check(outcome)) {
    PyErr_SetNone(outcome);
  } else {
    PyErr_SetObject(PyExc_RuntimeError, outcome);
  }
}

// ---------------------------------------------------------------------------
// Shared-memory slots (csrc/shared_slots.h), the Python side of both ends.

// GIL held. `value` as a contiguous CPU tensor of `dtype` (converted when it
// is not), checked to hold `rows` rows of `shape` (rows < 0: exactly
// `shape`). Raises ValueError naming `key` otherwise.
py::object slot_leaf(PyObject* value, const py::object& key, const py::object& dtype,
                     const py::object& shape, Py_ssize_t rows) {
  const TorchRefs& t = torch_refs();
  const int is_tensor = PyObject_IsInstance(value, t.tensor_type);
  if (is_tensor < 0) throw py::error_already_set();
  if (is_tensor == 0)
    raise_spec_error(PyExc_ValueError, "response key " + repr(key.ptr()) +
                                           " must be a tensor (response_spec); got " +
                                           repr(reinterpret_cast<PyObject*>(Py_TYPE(value))));
  py::object v = py::reinterpret_borrow<py::object>(value);
  if (attr(v.ptr(), t.s_is_cpu).ptr() != Py_True || attr(v.ptr(), t.s_dtype).ptr() != dtype.ptr() ||
      call_method(v.ptr(), t.s_is_contiguous).ptr() != Py_True) {
    v = v.attr("to")(py::arg("device") = "cpu", py::arg("dtype") = dtype).attr("contiguous")();
  }
  py::object got = attr(v.ptr(), t.s_shape);
  py::object want = shape;
  if (rows >= 0) {
    if (PyObject_Length(got.ptr()) < 1 || PyLong_AsSsize_t(PyTuple_GET_ITEM(got.ptr(), 0)) != rows) {
      PyErr_Clear();
      raise_spec_error(PyExc_ValueError, "model output key " + repr(key.ptr()) + " has shape " +
                                             repr(got.ptr()) + " for a batch of " +
                                             std::to_string(rows) + " requests");
    }
    got = py::reinterpret_steal<py::object>(PySequence_GetSlice(got.ptr(), 1, PY_SSIZE_T_MAX));
    if (!got) throw py::error_already_set();
  }
  const int same = PyObject_RichCompareBool(got.ptr(), want.ptr(), Py_EQ);
  if (same < 0) throw py::error_already_set();
  if (same == 0)
    raise_spec_error(PyExc_ValueError, "response key " + repr(key.ptr()) + " has shape " +
                                           repr(got.ptr()) + " per request; response_spec declares " +
                                           repr(want.ptr()));
  return v;
}

// The server process's end of a SharedMemoryTransport: the intake its
// RequestQueue takes slots from, plus what turns a slot into Python objects
// (a request TensorDict for the general path) and results and exceptions into
// slot bytes.
class SlotServer final : public SlotIntake, public std::enable_shared_from_this<SlotServer> {
 public:
  SlotServer(std::shared_ptr<SharedSlots> slots, uint64_t schema_id,
             std::vector<py::object> request_keys, std::vector<py::object> request_banks,
             py::object request_device, std::vector<py::object> response_keys,
             std::vector<py::object> response_dtypes, std::vector<py::object> response_shapes)
      : SlotIntake(slots, schema_id),
        request_keys_(std::move(request_keys)),
        request_banks_(std::move(request_banks)),
        request_device_(std::move(request_device)),
        response_keys_(std::move(response_keys)),
        response_dtypes_(std::move(response_dtypes)),
        response_shapes_(std::move(response_shapes)),
        dumps_(py::module_::import("pickle").attr("dumps")) {
    if (request_keys_.size() != slots->request_leaves() ||
        request_banks_.size() != request_keys_.size() ||
        response_keys_.size() != slots->response_leaves() ||
        response_dtypes_.size() != response_keys_.size() ||
        response_shapes_.size() != response_keys_.size())
      throw std::invalid_argument("SlotServer: keys do not match the segment's layout");
  }

  // GIL held. The request in slot `s` as a TensorDict of views of its rows.
  py::object item(uint32_t s) const {
    py::dict leaves;
    py::int_ index(s);
    for (size_t j = 0; j < request_keys_.size(); ++j)
      leaves[request_keys_[j]] = request_banks_[j][index];
    PyObject* td = PyObject_CallFunctionObjArgs(torch_refs().new_unsafe, leaves.ptr(),
                                                torch_refs().empty_size, request_device_.ptr(),
                                                nullptr);
    if (td == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(td);
  }

  // GIL held. Writes `outcome` into slot `s` and ends it (kDone, or kFailed
  // with its exception, or the error of writing it). True when its client
  // waits for it (wake it).
  bool settle(uint32_t s, PyObject* outcome, bool is_error) {
    if (!is_error) {
      try {
        write_result(s, outcome);
      } catch (py::error_already_set& e) {
        write_error(s, e.value().ptr());
        is_error = true;
      }
    } else {
      write_error(s, outcome);
    }
    return slots().finish(s, is_error);
  }

  // The output columns the response rows take, matched to response_spec
  // by key (output keys it does not declare are dropped), each as a
  // contiguous CPU tensor of the declared dtype holding `n` rows. Raises
  // when a declared key is missing or its column does not fit.
  std::vector<py::object> response_columns(const std::vector<py::object>& keys,
                                           const std::vector<py::object>& columns, Py_ssize_t n) {
    std::vector<py::object> held;
    for (size_t j = 0; j < response_keys_.size(); ++j) {
      const py::object* column = nullptr;
      for (size_t k = 0; k < keys.size() && column == nullptr; ++k) {
        const int same = PyObject_RichCompareBool(keys[k].ptr(), response_keys_[j].ptr(), Py_EQ);
        if (same < 0) throw py::error_already_set();
        if (same == 1) column = &columns[k];
      }
      if (column == nullptr) {
        PyErr_SetObject(PyExc_KeyError,
                        py::str("the model output has no key {!r} (declared by response_spec)")
                            .format(response_keys_[j])
                            .ptr());
        throw py::error_already_set();
      }
      held.push_back(slot_leaf(column->ptr(), response_keys_[j], response_dtypes_[j],
                               response_shapes_[j], n));
    }
    return held;
  }

  // The fast path's hand-back, for requests the caller has taken out of
  // their batch (so no shutdown can end them meanwhile): row i of each
  // response column goes to the response rows of slots[i], then each
  // request ends (kDone) and its client is woken; all without the GIL.
  void scatter(const std::vector<uint32_t>& slots_of_rows,
               const std::vector<py::object>& response_columns) {
    std::vector<const uint8_t*> source;
    for (const py::object& column : response_columns)
      source.push_back(static_cast<const uint8_t*>(data_ptr(column.ptr())));
    GilRelease nogil;  // the caller's `response_columns` keep the columns alive
    scatter_responses(slots(), slots_of_rows, source);
  }

 private:
  void write_result(uint32_t s, PyObject* result) {
    SharedSlots& sh = slots();
    for (size_t j = 0; j < response_keys_.size(); ++j) {
      py::object value = py::reinterpret_steal<py::object>(
          PyObject_CallMethod(result, "get", "O", response_keys_[j].ptr()));
      if (!value) throw py::error_already_set();
      py::object leaf = slot_leaf(value.ptr(), response_keys_[j], response_dtypes_[j],
                                  response_shapes_[j], -1);
      write_response_leaf(sh, s, j, data_ptr(leaf.ptr()));
    }
  }

  // The exception, pickled, followed by its repr: a client that cannot
  // unpickle it (a class only the server has, a pickle too large for the
  // area) raises a RuntimeError with that text instead.
  void write_error(uint32_t s, PyObject* exc) {
    std::string text = repr(exc);
    PyObject* blob = PyObject_CallOneArg(dumps_.ptr(), exc);
    if (blob == nullptr) {
      PyErr_Clear();
      batchserve::write_error(slots(), s, nullptr, 0, std::move(text));
      return;
    }
    const Py_ssize_t len = PyBytes_Size(blob);
    batchserve::write_error(slots(), s, len >= 0 ? PyBytes_AS_STRING(blob) : nullptr,
                            len >= 0 ? static_cast<size_t>(len) : 0, std::move(text));
    Py_DECREF(blob);
  }

  std::vector<py::object> request_keys_, request_banks_;
  py::object request_device_;
  std::vector<py::object> response_keys_, response_dtypes_, response_shapes_;
  py::object dumps_;
};

SlotServer& slot_server(const Request& r) { return *static_cast<SlotServer*>(r.intake); }

// The SlotServer a request from slots came from, kept alive by who holds this.
std::shared_ptr<SlotServer> keep_slot_server(const Request& r) {
  return r.intake == nullptr ? nullptr
                             : std::static_pointer_cast<SlotServer>(slot_server(r).shared_from_this());
}

// GIL held. Releases what a request owns on the Python side.
void release_python_refs(const Request& r) {
  Py_XDECREF(static_cast<PyObject*>(r.payload));
  Py_XDECREF(static_cast<PyObject*>(r.future));
  if (r.intake == nullptr) free_rows(r.rows);  // a slot's rows are the intake's
}

// GIL held. Ends one request with `outcome` (a result or an exception).
// Callers that must be woken are appended to `to_wake` (a completion's
// reference is released after the wake-up, outside the GIL).
void settle(const Request& r, PyObject* outcome, bool is_error, std::vector<Wake>& to_wake) {
  if (r.intake != nullptr) {
    if (slot_server(r).settle(r.slot, outcome, is_error))
      to_wake.push_back(Wake{nullptr, &slot_server(r).slots(), r.slot});
  } else if (r.completion != nullptr) {
    Py_INCREF(outcome);
    if (!r.completion->finish(outcome, is_error)) Py_DECREF(outcome);
    to_wake.push_back(Wake{r.completion});
  } else if (r.future != nullptr) {
    call_future(static_cast<PyObject*>(r.future),
                is_error ? "set_exception" : "set_result", outcome);
  }
}

// GIL held on entry and exit; wakes callers without it (see
// csrc/core/wake_batching.h).
void wake_and_release(std::vector<Wake>& to_wake) {
  if (to_wake.empty()) return;
  GilRelease nogil;
  notify_and_release(to_wake);
}

// GIL held on entry and exit. Wakes the callers `deferred` holds (results
// the server published but left unwoken, to be woken at its next collect).
void flush(DeferredWakes& deferred) {
  if (deferred.empty()) return;
  std::vector<Wake> to_wake = deferred.take();
  wake_and_release(to_wake);
}

// GIL held. Drops a request that will never be served (withdrawn by its
// caller): no outcome, only references to release.
void discard(const Request& r) {
  release_python_refs(r);
  if (r.completion != nullptr) r.completion->release();
}

// A set of requests taken from the queue together. gather() moves those of
// the server's fast-path schema into staging rows (`rows_`, served by one
// forward over the staging columns); the others (`requests_`) take the
// general path (items, collate_fn, resolve).
//
// Every method that ends requests first takes them out of the batch (plain
// C++, no Python call), then settles them. Settling runs Python code
// (Future callbacks) during which another thread may take the GIL and call
// into the same batch, e.g. a shutdown failing the batch of a worker that
// overran its timeout: it then finds only requests nobody has taken yet.
class Batch {
 public:
  // Staging bytes above which gather() copies with the GIL released.
  static constexpr size_t kGilFreeGatherBytes = 256 * 1024;

  // Results are handed out through `deferred` (see DeferredWakes) when
  // given; failures always wake at once.
  // `rows` were gathered ahead into rows 0.. of the staging buffer whose
  // first column is at `prefetched_into` (see Prefetcher).
  Batch(std::vector<Request> rows, std::vector<Request> requests,
        std::shared_ptr<DeferredWakes> deferred, uintptr_t prefetched_into,
        std::shared_ptr<SlotServer> slots = nullptr)
      : requests_(std::move(requests)),
        rows_(std::move(rows)),
        deferred_(std::move(deferred)),
        prefetched_into_(rows_.empty() ? 0 : prefetched_into),
        slots_(std::move(slots)) {}
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;

  ~Batch() {
    if (!requests_.empty() || !rows_.empty()) {
      PyObject* err = new_runtime_error(
          "batchserve: a batch was dropped before it was resolved");
      settle(take_all(), [err](size_t) { return err; }, true);
      Py_DECREF(err);
    }
  }

  // Requests not yet ended, on both paths.
  size_t size() const { return requests_.size() + rows_.size(); }
  size_t rows() const { return rows_.size(); }

  // The general path's requests (a slot's: a TensorDict of views of its rows).
  py::list items() const {
    py::list out(requests_.size());
    for (size_t i = 0; i < requests_.size(); ++i) {
      const Request& r = requests_[i];
      out[i] = r.intake != nullptr
                   ? slot_server(r).item(r.slot)
                   : py::reinterpret_borrow<py::object>(static_cast<PyObject*>(r.payload));
    }
    return out;
  }

  std::vector<int64_t> submitted_ns() const { return arrivals(requests_); }
  std::vector<int64_t> rows_submitted_ns() const { return arrivals(rows_); }

  // Moves the requests whose leaves match schema `schema_id` to the fast
  // path, after the rows it already has (taken ahead by the Prefetcher), up
  // to `capacity` rows in all, and copies their leaves into staging: leaf j
  // of row i to columns[j] + i * leaf_bytes[j]. Returns the number of rows.
  // Large copies run with the GIL released.
  size_t gather(uint64_t schema_id, const std::vector<uintptr_t>& columns,
                const std::vector<size_t>& leaf_bytes, size_t capacity) {
    const StagingColumns staging = staging_columns(columns, leaf_bytes, capacity);
    const size_t first = rows_.size();
    if (first >= capacity) return first;
    take_rows(requests_, schema_id, columns.size(), capacity - first, rows_);
    if ((rows_.size() - first) * staging.row_bytes() < kGilFreeGatherBytes) {
      gather_from(rows_, first, staging);
      return rows_.size();
    }
    // Without the GIL a shutdown may end these requests (and free their
    // leaves) meanwhile: copy from a snapshot of the sources, holding the
    // tensors they point into.
    std::vector<RowSource> snapshot;
    std::vector<py::object> held;
    snapshot.reserve(rows_.size() - first);
    held.reserve((rows_.size() - first) * columns.size());
    for (size_t i = first; i < rows_.size(); ++i) {
      if (rows_[i].intake != nullptr) {  // shared memory, mapped for the process's life
        snapshot.push_back(*rows_[i].rows);
        continue;
      }
      const auto* leaves = static_cast<const RequestRows*>(rows_[i].rows);
      snapshot.push_back(*leaves);
      for (size_t j = 0; j < leaves->count; ++j)
        held.push_back(py::reinterpret_borrow<py::object>(leaves->tensors[j]));
    }
    std::vector<const RowSource*> sources;
    sources.reserve(snapshot.size());
    for (const RowSource& s : snapshot) sources.push_back(&s);
    {
      GilRelease nogil;
      gather_rows(sources, first, staging);
    }
    return rows_.size();  // a shutdown may have failed them meanwhile
  }

  // Gives the fast path's rows back to the general path (their staging was
  // filled for a schema or buffer that is gone, or another server's).
  void ungather() {
    requests_.insert(requests_.begin(), rows_.begin(), rows_.end());
    rows_.clear();
    prefetched_into_ = 0;
  }

  // The first staging column the prefetched rows are in (0: none).
  uintptr_t prefetched_into() const { return prefetched_into_; }

  // General path: results has one entry per request, in request order.
  void resolve(const py::sequence& results) { resolve_each(requests_, results, "resolve"); }

  // Fast path: the i-th gathered request's result is a TensorDict of batch
  // size [] holding row i of each column (keys[j] -> columns[j][i], views
  // made by one unbind per column) on `device`. Every result is built here,
  // with the GIL the server holds anyway, before any caller is woken:
  // building them in the callers' threads was measured 2x slower at 8
  // actor threads (36 k vs 18-20 k req/s, p99 0.4 vs 3.8 ms), as freshly
  // woken callers contend with the server for the GIL.
  //
  // Requests from shared-memory slots get their rows copied into their
  // response slots instead (SlotServer::scatter): no Python object per
  // request at all.
  void resolve_rows(const std::vector<py::object>& keys, const std::vector<py::object>& columns,
                    const py::object& device) {
    if (rows_.empty()) return;
    const size_t n = rows_.size();
    if (columns.size() != keys.size())
      throw std::invalid_argument("resolve_rows: one column per key expected");
    if (rows_.front().intake != nullptr) {
      std::vector<uint32_t> slots_of_rows;
      for (const Request& r : rows_) {
        if (r.intake != rows_.front().intake)
          throw std::logic_error("resolve_rows: rows from two sources in one batch");
        slots_of_rows.push_back(r.slot);
      }
      std::shared_ptr<SlotServer> server = keep_slot_server(rows_.front());
      std::vector<py::object> response = server->response_columns(keys, columns, n);
      // From here these requests are the hand-back's alone: a shutdown
      // that fails this batch meanwhile finds none of them, so nothing but
      // this copy ends or writes their slots (the copy cannot stall). Their
      // clients are other processes: woken without our GIL.
      take(rows_);
      server->scatter(slots_of_rows, response);
      return;
    }
    const TorchRefs& t = torch_refs();
    std::vector<py::object> rows_of;  // per column: its n row views
    rows_of.reserve(columns.size());
    py::int_ zero(0);
    for (const py::object& column : columns) {
      // unbind makes n views in one call; for one row, indexing is cheaper.
      if (PyObject_Length(column.ptr()) != static_cast<Py_ssize_t>(n)) {
        if (PyErr_Occurred()) throw py::error_already_set();
        throw std::invalid_argument("resolve_rows: every column must have " +
                                    std::to_string(n) + " rows");
      }
      py::object views = n == 1 ? py::make_tuple(column[zero])
                                : call_method(column.ptr(), t.s_unbind);
      if (!PyTuple_Check(views.ptr()) || static_cast<size_t>(PyTuple_GET_SIZE(views.ptr())) != n)
        throw std::invalid_argument("resolve_rows: unbind gave no tuple of rows");
      rows_of.push_back(std::move(views));
    }
    std::vector<py::object> results;
    results.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      py::dict source;
      for (size_t j = 0; j < keys.size(); ++j)
        if (PyDict_SetItem(source.ptr(), keys[j].ptr(), PyTuple_GET_ITEM(rows_of[j].ptr(), i)) != 0)
          throw py::error_already_set();
      PyObject* td = PyObject_CallFunctionObjArgs(t.new_unsafe, source.ptr(), t.empty_size,
                                                  device.ptr(), nullptr);
      if (td == nullptr) throw py::error_already_set();
      results.push_back(py::reinterpret_steal<py::object>(td));
    }
    if (rows_.size() != n) return;  // failed meanwhile
    settle(take(rows_), [&results](size_t i) { return results[i].ptr(); }, false,
           deferred_.get());
  }

  // Fast path, with one result object per gathered request (used when the
  // output cannot be handed back by columns: nested or non-tensor entries,
  // more than one batch dimension).
  void resolve_rows_with(const py::sequence& results) {
    resolve_each(rows_, results, "resolve_rows_with");
  }

  // Ends every request still in the batch, on both paths.
  void fail(const py::object& exc) {
    PyObject* outcome = exc.ptr();
    settle(take_all(), [outcome](size_t) { return outcome; }, true);
  }

  // Ends the fast path's requests.
  void fail_rows(const py::object& exc) {
    PyObject* outcome = exc.ptr();
    settle(take(rows_), [outcome](size_t) { return outcome; }, true);
  }

  // Fails general requests [i] for i in `indices` with `exc`, leaving the
  // rest to a later resolve() of the remaining ones (malformed inputs).
  void fail_some(const std::vector<size_t>& indices, const py::object& exc) {
    std::vector<bool> drop(requests_.size(), false);
    for (size_t i : indices) {
      if (i >= requests_.size()) throw std::out_of_range("fail_some: index");
      drop[i] = true;
    }
    std::vector<Request> kept, failed;
    for (size_t i = 0; i < requests_.size(); ++i)
      (drop[i] ? failed : kept).push_back(requests_[i]);
    requests_.swap(kept);
    PyObject* outcome = exc.ptr();
    settle(std::move(failed), [outcome](size_t) { return outcome; }, true);
  }

 private:
  // Ends each request of `which` (requests_ or rows_) with its entry of
  // `results`, in order.
  void resolve_each(std::vector<Request>& which, const py::sequence& results, const char* name) {
    if (which.empty()) return;  // already failed (e.g. by a shutdown)
    const size_t n = which.size();
    if (static_cast<size_t>(py::len(results)) != n)
      throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(n) +
                                  " results, got " + std::to_string(py::len(results)));
    std::vector<py::object> held;  // keep every result alive while settling
    held.reserve(n);
    for (size_t i = 0; i < n; ++i) held.push_back(results[i]);
    if (which.size() != n) return;  // failed while results were read
    settle(take(which), [&held](size_t i) { return held[i].ptr(); }, false, deferred_.get());
  }

  static StagingColumns staging_columns(const std::vector<uintptr_t>& columns,
                                        const std::vector<size_t>& leaf_bytes, size_t capacity) {
    if (leaf_bytes.size() != columns.size())
      throw std::invalid_argument("gather: one size per column expected");
    StagingColumns staging;
    for (uintptr_t c : columns) staging.base.push_back(reinterpret_cast<uint8_t*>(c));
    staging.leaf_bytes = leaf_bytes;
    staging.rows = capacity;
    return staging;
  }

  static std::vector<int64_t> arrivals(const std::vector<Request>& requests) {
    std::vector<int64_t> out;
    out.reserve(requests.size());
    for (const Request& r : requests) out.push_back(r.submit_ns);
    return out;
  }

  static std::vector<Request> take(std::vector<Request>& from) {
    std::vector<Request> taken;
    taken.swap(from);
    return taken;
  }

  std::vector<Request> take_all() {
    std::vector<Request> taken = take(rows_);
    for (const Request& r : requests_) taken.push_back(r);
    requests_.clear();
    return taken;
  }

  // GIL held. Wakes now, or leaves the wake-ups to `deferred`.
  // Slots' clients (other processes) are woken now either way.
  static void wake(std::vector<Wake>& to_wake, DeferredWakes* deferred) {
    if (deferred != nullptr) deferred->defer(to_wake);
    wake_and_release(to_wake);
  }

  // GIL held. Ends each request of `requests` (owned by the caller, no
  // longer reachable from the batch) with outcome_of(i).
  template <typename OutcomeOf>
  static void settle(std::vector<Request> requests, OutcomeOf&& outcome_of,
                     bool is_error, DeferredWakes* deferred = nullptr) {
    std::vector<Wake> to_wake;
    to_wake.reserve(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      batchserve::settle(requests[i], outcome_of(i), is_error, to_wake);
      release_python_refs(requests[i]);
    }
    wake(to_wake, deferred);
  }

  std::vector<Request> requests_;  // general path
  std::vector<Request> rows_;      // fast path: row i of the staging batch
  std::shared_ptr<DeferredWakes> deferred_;
  uintptr_t prefetched_into_ = 0;
  std::shared_ptr<SlotServer> slots_;  // where requests from slots go back (kept alive)
};

// The handle of a request handed out by drain() (the transport protocol
// path) whose caller is not waiting on a Future (a blocking in-process call,
// a shared-memory slot): it quacks like the Future it replaces.
class Ticket {
 public:
  explicit Ticket(const Request& request)
      : request_(request), slots_(keep_slot_server(request)) {}
  Ticket(const Ticket&) = delete;
  Ticket& operator=(const Ticket&) = delete;
  ~Ticket() {
    if (!done_) {
      PyObject* err = new_runtime_error(
          "batchserve: a request was dropped before it was resolved");
      end(err, true);
      Py_DECREF(err);
    }
  }

  void set_result(const py::object& result) { end(result.ptr(), false); }
  void set_exception(const py::object& exc) { end(exc.ptr(), true); }
  bool done() const { return done_; }

 private:
  void end(PyObject* outcome, bool is_error) {
    if (done_) return;
    done_ = true;
    std::vector<Wake> to_wake;
    settle(request_, outcome, is_error, to_wake);
    wake_and_release(to_wake);
  }

  Request request_;  // owns no Python reference (drain handed them out)
  std::shared_ptr<SlotServer> slots_;  // keeps request_.intake alive
  bool done_ = false;
};

class PyRequestQueue {
 public:
  explicit PyRequestQueue(size_t capacity) : collector_(capacity) {}
  // GIL held (Python frees the queue). Requests still here (Futures whose
  // transport was dropped) end with an error rather than never.
  ~PyRequestQueue() {
    try {
      fail_pending(py::reinterpret_steal<py::object>(
          new_runtime_error("batchserve: the request queue was destroyed")));
    } catch (...) {  // a destructor must not throw; Python reports none here
      PyErr_Clear();
    }
  }
  PyRequestQueue(const PyRequestQueue&) = delete;
  PyRequestQueue& operator=(const PyRequestQueue&) = delete;

  // GIL held. Pushes `r`, waiting for room until `deadline` with the GIL
  // released, in slices so that a signal (Ctrl-C) is seen. Returns false
  // when a signal handler raised (the Python error is set).
  bool push_checking_signals(const Request& r, int64_t deadline, PushResult& result) {
    result = queue().push(r, 0);  // first without giving up the GIL
    if (result != PushResult::kTimedOut || monotonic_ns() >= deadline) return true;
    bool interrupted = false;
    wait_in_slices(
        deadline,
        [&](int64_t until) {
          GilRelease nogil;
          result = queue().push(r, until);
          return result != PushResult::kTimedOut;
        },
        [&](bool expired) { return !expired && !(interrupted = signalled()); });
    return !interrupted;
  }

  // The blocking client call: enqueue, wait for the result with the GIL
  // released, return it or raise the server's exception.
  py::object call(const py::object& item, std::optional<double> timeout_s) {
    const int64_t deadline = deadline_from(timeout_s);
    OwnedRows rows = match(item.ptr(), false);
    auto* completion = new Completion();
    const int64_t submit_ns = monotonic_ns();
    const Request request{item.ptr(), nullptr, completion, submit_ns, rows.get()};
    Py_INCREF(item.ptr());
    // Push and first wait in one GIL-free stretch: a caller that took the
    // GIL back in between would hold it just when the server wakes up for
    // this very request, and the server would sleep on the GIL. The caller
    // sleeps at once: on a small machine a spinning caller takes the core
    // the server and torch's threads need (measured: 1-actor latency
    // 85 µs parked, 150-165 µs spinning, on the 2-core CI VM).
    PushResult pushed = PushResult::kTimedOut;
    bool interrupted = false;
    const bool done = wait_in_slices(
        deadline,
        [&](int64_t until) {
          GilRelease nogil;
          if (pushed != PushResult::kOk) {
            pushed = queue().push(request, until);
            if (pushed == PushResult::kClosed) return true;  // ends the wait: see below
            if (pushed != PushResult::kOk) return false;
            until = slice_end(deadline);  // the first wait gets a whole slice
          }
          return completion->wait_until(until, 0);
        },
        [&](bool expired) { return !expired && !(interrupted = signalled()); });
    if (pushed != PushResult::kOk) {
      Py_DECREF(item.ptr());
      completion->release();
      completion->release();
      if (interrupted) throw py::error_already_set();  // Ctrl-C while the queue is full
      if (pushed == PushResult::kClosed)
        throw QueueClosedError("the inference server is shut down");
      raise_timeout("no room in the request queue within the timeout");
    }
    rows.release();  // the request owns them now
    if (!done) {
      const Completion::State left = completion->give_up();
      if (left == Completion::kDone && interrupted) {
        // A signal (Ctrl-C) wins over a result that arrived meanwhile.
        Py_DECREF(static_cast<PyObject*>(completion->outcome()));
        completion->release();
        throw py::error_already_set();
      }
      if (left != Completion::kDone) {
        completion->release();
        if (interrupted) throw py::error_already_set();
        raise_timeout(timed_out_because(left == Completion::kWithdrawn));
      }
      // else the result won the race with the timeout
    }
    py::object outcome = py::reinterpret_steal<py::object>(
        static_cast<PyObject*>(completion->outcome()));
    const bool is_error = completion->is_error();
    completion->release();
    if (is_error) {
      set_error_from(outcome.ptr());
      throw py::error_already_set();
    }
    return outcome;
  }

  // Enqueues a request resolved through `future` (a concurrent Future).
  // block=False raises QueueFull at once when the queue is full.
  void submit(const py::object& item, const py::object& future, bool block,
              std::optional<double> timeout_s) {
    const int64_t deadline = block ? deadline_from(timeout_s) : 0;
    OwnedRows rows = match(item.ptr(), true);
    const Request request{item.ptr(), future.ptr(), nullptr, monotonic_ns(), rows.get()};
    Py_INCREF(item.ptr());
    Py_INCREF(future.ptr());
    PushResult pushed;
    const bool uninterrupted = push_checking_signals(request, deadline, pushed);
    if (uninterrupted && pushed == PushResult::kOk) {
      rows.release();
      return;
    }
    Py_DECREF(item.ptr());
    Py_DECREF(future.ptr());
    if (!uninterrupted) throw py::error_already_set();
    if (pushed == PushResult::kClosed)
      throw QueueClosedError("the inference server is shut down");
    throw QueueFullError("the request queue is full (capacity " +
                         std::to_string(queue().capacity()) + ")");
  }

  // The fast path's schema: requests that match it carry their leaves to the
  // server. Returns its id. `strict` (a request_spec) makes a mismatching
  // TensorDict an error at submission.
  uint64_t set_schema(const std::vector<py::object>& keys, const std::vector<py::object>& dtypes,
                      const std::vector<py::object>& shapes,
                      const std::vector<size_t>& leaf_bytes, bool strict,
                      const py::object& device, const std::vector<py::object>& general_keys) {
    if (dtypes.size() != keys.size() || shapes.size() != keys.size() ||
        leaf_bytes.size() != keys.size())
      throw std::invalid_argument("set_schema: one dtype, shape and size per key");
    if (keys.empty() || keys.size() > RequestRows::kMaxLeaves)
      throw std::invalid_argument("set_schema: the fast path takes 1 to " +
                                  std::to_string(RequestRows::kMaxLeaves) + " leaves");
    torch_refs();
    auto schema = std::make_shared<FastSchema>();
    schema->id = ++last_schema_id_;
    schema->strict = strict;
    schema->keys = keys;
    schema->dtypes = dtypes;
    schema->shapes = shapes;
    schema->leaf_bytes = leaf_bytes;
    schema->device = device;
    schema->general_keys = general_keys;
    schema_ = std::move(schema);
    return schema_->id;
  }

  bool schema_strict() const { return schema_ && schema_->strict; }

  // Transport protocol: up to max_items requests, without waiting.
  py::tuple drain(size_t max_items) {
    std::vector<Request> popped;
    std::vector<Request> unused;
    detail::take_ready(queue(), max_items, popped, unused);
    for (const Request& r : unused) discard(r);
    py::list items, handles, submitted_at;
    for (const Request& r : popped) {
      if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
        discard(r);  // cancelled by its caller
        continue;
      }
      if (r.intake != nullptr) {
        items.append(slot_server(r).item(r.slot));
      } else {
        items.append(py::reinterpret_steal<py::object>(static_cast<PyObject*>(r.payload)));
        free_rows(r.rows);  // the protocol path hands out the TensorDict itself
      }
      if (r.completion != nullptr || r.intake != nullptr) {
        Request bare = r;  // its references were handed out above
        bare.payload = nullptr;
        bare.rows = nullptr;
        handles.append(py::cast(new Ticket(bare), py::return_value_policy::take_ownership));
      } else {
        handles.append(py::reinterpret_steal<py::object>(static_cast<PyObject*>(r.future)));
      }
      submitted_at.append(static_cast<double>(r.submit_ns) * 1e-9);
    }
    return py::make_tuple(items, handles, submitted_at);
  }

  bool wait_for_work(double timeout_s) {
    GilRelease nogil;
    return queue().wait_for_work(deadline_after(timeout_s));
  }

  // The batching policy's settings; a server sleeping in collect() applies
  // them at once.
  void configure(size_t max_batch_size, size_t min_batch_size, double timeout_s) {
    BatchPolicy policy;
    policy.max_batch_size = max_batch_size;
    policy.min_batch_size = min_batch_size;
    policy.timeout_ns = seconds_to_ns(timeout_s);
    collector_.configure(policy);
  }

  // Fast path: starts gathering the next batch into the staging `columns`
  // while the model runs on the current one (see Prefetcher). Does nothing
  // when no request is waiting (one actor: it is waiting for this batch) or
  // a job is already started. Returns whether it started one.
  bool prefetch(uint64_t schema_id, const std::vector<uintptr_t>& columns,
                const std::vector<size_t>& leaf_bytes, size_t capacity) {
    if (queue().size() == 0) return false;  // without building the staging description
    StagingColumns staging;
    for (uintptr_t c : columns) staging.base.push_back(reinterpret_cast<uint8_t*>(c));
    staging.leaf_bytes = leaf_bytes;
    staging.rows = capacity;
    return collector_.prefetch(schema_id, std::move(staging));
  }

  // The server's batch (csrc/core/collector.h): the C++ batching policy, run
  // without the GIL, going on from what a prefetch took (those rows are
  // already in staging). Here only the Python side: wake the callers left
  // from the last batch, claim futures, build the Batch.
  std::unique_ptr<Batch> collect() {
    std::vector<Wake> to_wake = deferred_->take();
    std::vector<Request> carried = collector_.take_carried();
    CollectedBatch collected;
    {
      GilRelease nogil;
      notify_and_release(to_wake);
      collected = collector_.wait_for_batch(std::move(carried));
    }
    // Taking the GIL back can take a while when woken callers hold it; what
    // arrived meanwhile joins this batch (complete()).
    collector_.complete(collected);
    for (const Request& r : collected.dropped) discard(r);
    // Futures cancelled by their callers are dropped; a prefetched row keeps
    // its staging row (its result then goes nowhere).
    std::vector<Request> others;
    others.reserve(collected.others.size());
    for (const Request& r : collected.others) {
      if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
        discard(r);
        continue;
      }
      others.push_back(r);
    }
    for (const Request& r : collected.rows)
      if (r.future != nullptr) claim_future(static_cast<PyObject*>(r.future));
    if (collected.rows.empty() && others.empty()) return nullptr;
    collector_.adapt_server_spin(collected.rows.size() + others.size());
    return std::make_unique<Batch>(std::move(collected.rows), std::move(others), deferred_,
                                   collected.prefetched_into, slots_);
  }

  // Ends every queued request (and any a prefetch took) with `exc`; returns
  // how many.
  size_t fail_pending(const py::object& exc) {
    flush(*deferred_);
    size_t total = 0;
    std::vector<Wake> to_wake;
    auto fail = [&](const Request& r) {
      if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
        discard(r);
        return;
      }
      settle(r, exc.ptr(), true, to_wake);
      release_python_refs(r);
      ++total;
    };
    Prefetcher::Taken taken;
    {
      GilRelease nogil;
      taken = collector_.finish_prefetch();
    }
    for (const Request& r : taken.dropped) discard(r);
    for (const Request& r : taken.rows) fail(r);
    for (const Request& r : taken.others) fail(r);
    for (const Request& r : collector_.take_carried()) fail(r);
    wake_and_release(to_wake);
    std::vector<Request> pending;
    while (queue().pop_many(pending, 1024) > 0) {
      for (const Request& r : pending) fail(r);
      pending.clear();
      wake_and_release(to_wake);
    }
    return total;
  }

  // Wakes the callers whose results are published (see DeferredWakes) now
  // rather than at the next collect().
  void wake_resolved() { flush(*deferred_); }

  void close() {
    flush(*deferred_);
    GilRelease nogil;
    queue().close();
  }
  void reopen() { queue().reopen(); }
  bool closed() const { return queue().closed(); }

  // Requests also come from shared-memory slots (a SharedMemoryTransport's
  // server end). Once, before the queue is used.
  void attach_slots(std::shared_ptr<SlotServer> slots) {
    if (slots_) throw std::logic_error("attach_slots: the queue already has slots");
    slots_ = std::move(slots);
    queue().attach_intake(slots_.get());
  }
  size_t reaped_slots() const { return slots_ ? slots_->reaped() : 0; }
  size_t size() const { return queue().size(); }
  size_t capacity() const { return queue().capacity(); }

 private:
  RequestQueue& queue() { return collector_.queue(); }
  const RequestQueue& queue() const { return collector_.queue(); }

  OwnedRows match(PyObject* item, bool own_copy) {
    if (!schema_) return nullptr;
    std::shared_ptr<const FastSchema> schema = schema_;  // set_schema may run in a callback
    return match_schema(item, *schema, own_copy);
  }

  std::shared_ptr<SlotServer> slots_;  // the intake of the queue, if any (outlives the prefetcher)
  RequestCollector collector_;         // the queue, the settings, the prefetcher
  std::shared_ptr<DeferredWakes> deferred_ = std::make_shared<DeferredWakes>();
  std::shared_ptr<const FastSchema> schema_;  // GIL held to read or change
  uint64_t last_schema_id_ = 0;
};

// A SharedMemoryTransport client's timeout: a TimeoutError that is also the
// queue.Empty torchrl's shared-memory client raises. Made at module import.
PyObject* g_result_timeout = nullptr;

[[noreturn]] void raise_result_timeout(const std::string& message) {
  PyErr_SetString(g_result_timeout != nullptr ? g_result_timeout : PyExc_TimeoutError,
                  message.c_str());
  throw py::error_already_set();
}

// The actor's end of a SharedMemoryTransport, in any process: it copies a
// request's leaves into a free slot, publishes it, and waits on the slot's
// futex for the server to write the result; all without the GIL (the
// protocol is SlotRequester's, csrc/core/slot_client.h). A client object
// may be used from several threads (each call takes its own slot).
class SlotClient {
 public:
  SlotClient(std::shared_ptr<SharedSlots> segment, std::vector<py::object> request_keys,
             std::vector<py::object> request_dtypes, std::vector<py::object> request_shapes,
             py::object request_device, std::vector<py::object> response_keys,
             std::vector<py::object> response_banks, py::object response_device,
             bool copy_result, py::object normalise)
      : requester_(std::move(segment)),
        response_keys_(std::move(response_keys)),
        response_banks_(std::move(response_banks)),
        response_device_(std::move(response_device)),
        copy_result_(copy_result),
        normalise_(std::move(normalise)),
        loads_(py::module_::import("pickle").attr("loads")) {
    torch_refs();
    schema_.strict = true;
    schema_.keys = std::move(request_keys);
    schema_.dtypes = std::move(request_dtypes);
    schema_.shapes = std::move(request_shapes);
    schema_.device = std::move(request_device);
    if (schema_.keys.size() != slots().request_leaves() ||
        response_keys_.size() != slots().response_leaves() ||
        response_banks_.size() != response_keys_.size())
      throw std::invalid_argument("SlotClient: keys do not match the segment's layout");
    if (schema_.keys.size() > RequestRows::kMaxLeaves)
      throw std::invalid_argument("SlotClient: at most " + std::to_string(RequestRows::kMaxLeaves) +
                                  " request leaves");
  }

  // The blocking call: submit, wait, return the result or raise the server's
  // exception. On timeout the request is withdrawn if the server has not
  // taken it yet, else its result is discarded; ResultTimeout either way.
  py::object call(const py::object& item, std::optional<double> timeout_s) {
    const int64_t deadline = deadline_from(timeout_s);
    PendingSlot pending(requester_.shared_slots(), submit_until(item, deadline, true));
    return finish_wait(pending, deadline, false);
  }

  // Submits; the returned PendingSlot owns the slot (for a future). Blocks
  // while every slot is in flight, until `timeout` (ResultTimeout).
  std::unique_ptr<PendingSlot> submit(const py::object& item, std::optional<double> timeout_s) {
    return std::make_unique<PendingSlot>(requester_.shared_slots(),
                                         submit_until(item, deadline_from(timeout_s), false));
  }

  // The result of a submitted request, or None when `timeout` passes first:
  // the request then stays in flight (ask again), as torchrl's future does.
  py::object result(PendingSlot& pending, std::optional<double> timeout_s) {
    if (!pending.open) throw std::logic_error("SlotClient.result: this request was already read");
    return finish_wait(pending, deadline_from(timeout_s), true);
  }

  bool done(const PendingSlot& pending) const { return requester_.finished(pending); }

  // Withdraws a request the server has not taken yet (true). A request being
  // served or already answered stays as it is (false): its result can still
  // be read.
  bool cancel(PendingSlot& pending) { return requester_.cancel(pending); }

 private:
  SharedSlots& slots() const { return requester_.slots(); }

  // GIL held. The request's leaves, after the Python-side normaliser for
  // inputs the C++ matcher does not take as they are (a TensorDict subclass,
  // non-contiguous leaves, a TensorDict device): raises what it raises.
  OwnedRows match(const py::object& item, py::object& normalised) {
    OwnedRows rows = match_schema(item.ptr(), schema_, false);
    if (rows) return rows;
    normalised = normalise_(item);
    rows = match_schema(normalised.ptr(), schema_, false);
    if (!rows) raise_spec_error(PyExc_ValueError, "request does not match request_spec: " +
                                                      repr(normalised.ptr()));
    return rows;
  }

  // GIL held. A slot holding `item`, published to the server; with
  // `and_wait`, also waits for the result for up to one slice in the same
  // GIL-free stretch.
  uint32_t submit_until(const py::object& item, int64_t deadline, bool and_wait) {
    py::object normalised;
    OwnedRows rows = match(item, normalised);
    uint32_t s = 0;
    switch (requester_.claim(deadline, WithoutGil(), signalled, s)) {
      case SlotClaim::kOk:
        break;
      case SlotClaim::kClosed:
        raise_unservable(SlotOutcome::kClosed);
      case SlotClaim::kServerDead:
        raise_unservable(SlotOutcome::kServerDead);
      case SlotClaim::kNoFreeSlot:
        raise_result_timeout("no free slot within the timeout: all " +
                             std::to_string(slots().num_slots()) +
                             " slots hold requests in flight (num_slots)");
      case SlotClaim::kInterrupted:
        throw py::error_already_set();
    }
    SlotWait submitted;
    {
      GilRelease nogil;
      submitted = requester_.submit(s, *rows, and_wait ? slice_end(deadline) : 0);
    }
    if (submitted != SlotWait::kOk) throw QueueClosedError("the inference server is shut down");
    return s;
  }

  [[noreturn]] void raise_unservable(SlotOutcome why) const {
    if (why == SlotOutcome::kClosed) throw QueueClosedError("the inference server is shut down");
    throw QueueClosedError("the inference server process (pid " +
                           std::to_string(slots().server_pid()) +
                           ") is gone; no request can be served");
  }

  // GIL held. Waits for the outcome, reads it, frees the slot. With
  // `keep_on_timeout`, a timeout returns None and leaves the request in
  // flight; otherwise it raises ResultTimeout.
  py::object finish_wait(PendingSlot& pending, int64_t deadline, bool keep_on_timeout) {
    const SlotOutcome outcome =
        requester_.wait_for_outcome(pending, deadline, keep_on_timeout, WithoutGil(), signalled);
    switch (outcome) {
      case SlotOutcome::kReady:
        return read_outcome(pending.slot);
      case SlotOutcome::kInFlight:
        return py::none();
      case SlotOutcome::kWithdrawn:
      case SlotOutcome::kAbandoned:
        raise_result_timeout(timed_out_because(outcome == SlotOutcome::kWithdrawn));
      case SlotOutcome::kClosed:
      case SlotOutcome::kServerDead:
        raise_unservable(outcome);
      case SlotOutcome::kInterrupted:
        break;
    }
    throw py::error_already_set();
  }

  // GIL held. The finished slot's result (or raises its exception); frees it.
  py::object read_outcome(uint32_t s) {
    struct Release {
      SharedSlots& slots;
      uint32_t s;
      ~Release() { slots.release(s); }
    } release{slots(), s};
    if (requester_.failed(s)) {
      const SlotError error = requester_.error(s);
      py::object exc;
      if (error.encoded_len > 0) {
        py::bytes blob(reinterpret_cast<const char*>(error.encoded), error.encoded_len);
        PyObject* e = PyObject_CallOneArg(loads_.ptr(), blob.ptr());
        if (e == nullptr) PyErr_Clear();
        exc = py::reinterpret_steal<py::object>(e);
      }
      if (!exc) {  // not picklable there, or not unpicklable here: its text
        PyObject* message =
            PyUnicode_DecodeUTF8(error.text, static_cast<Py_ssize_t>(error.text_len), "replace");
        if (message == nullptr) throw py::error_already_set();
        PyObject* prefixed = PyUnicode_FromFormat("the server raised %U", message);
        Py_DECREF(message);
        if (prefixed == nullptr) throw py::error_already_set();
        exc = py::reinterpret_steal<py::object>(
            PyObject_CallOneArg(PyExc_RuntimeError, prefixed));
        Py_DECREF(prefixed);
        if (!exc) throw py::error_already_set();
      }
      set_error_from(exc.ptr());
      throw py::error_already_set();
    }
    const TorchRefs& t = torch_refs();
    py::dict leaves;
    py::int_ index(s);
    for (size_t j = 0; j < response_keys_.size(); ++j) {
      py::object view = response_banks_[j][index];
      if (copy_result_) view = call_method(view.ptr(), t.s_clone);
      leaves[response_keys_[j]] = view;
    }
    PyObject* td = PyObject_CallFunctionObjArgs(t.new_unsafe, leaves.ptr(), t.empty_size,
                                                response_device_.ptr(), nullptr);
    if (td == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(td);
  }

  SlotRequester requester_;
  FastSchema schema_;
  std::vector<py::object> response_keys_, response_banks_;
  py::object response_device_;
  bool copy_result_;
  py::object normalise_, loads_;
};

}  // namespace
}  // namespace batchserve

PYBIND11_MODULE(_core, m) {
  using namespace batchserve;
  m.doc() = "batchserve's C++ core: request queue, batching policy, parking.";

  py::register_exception<QueueClosedError>(m, "ServerClosedError", PyExc_RuntimeError);
  py::register_exception<QueueFullError>(
      m, "QueueFull", py::module_::import("queue").attr("Full"));

  {
    py::tuple bases = py::make_tuple(py::handle(PyExc_TimeoutError),
                                     py::module_::import("queue").attr("Empty"));
    g_result_timeout = PyErr_NewExceptionWithDoc(
        "batchserve._core.ResultTimeout",
        "A SharedMemoryTransport request ran out of time: a TimeoutError, and the "
        "queue.Empty torchrl's shared-memory client raises.",
        bases.ptr(), nullptr);
    if (g_result_timeout == nullptr) throw py::error_already_set();
    m.add_object("ResultTimeout", py::handle(g_result_timeout));
  }

  m.def("monotonic_ns", &monotonic_ns,
        "Nanoseconds on the clock the core stamps requests with "
        "(CLOCK_MONOTONIC, as time.monotonic_ns).");

  py::class_<Batch>(m, "Batch")
      .def_property_readonly("size", &Batch::size)
      .def("__len__", &Batch::size)
      .def_property_readonly("rows", &Batch::rows)
      .def_property_readonly("items", &Batch::items)
      .def_property_readonly("submitted_ns", &Batch::submitted_ns)
      .def_property_readonly("rows_submitted_ns", &Batch::rows_submitted_ns)
      .def("gather", &Batch::gather, py::arg("schema_id"), py::arg("columns"),
           py::arg("leaf_bytes"), py::arg("capacity"))
      .def("resolve", &Batch::resolve, py::arg("results"))
      .def("resolve_rows", &Batch::resolve_rows, py::arg("keys"), py::arg("columns"),
           py::arg("device"))
      .def("resolve_rows_with", &Batch::resolve_rows_with, py::arg("results"))
      .def("ungather", &Batch::ungather)
      .def_property_readonly("prefetched_into", &Batch::prefetched_into)
      .def("fail", &Batch::fail, py::arg("exc"))
      .def("fail_rows", &Batch::fail_rows, py::arg("exc"))
      .def("fail_some", &Batch::fail_some, py::arg("indices"), py::arg("exc"));

  py::class_<Ticket>(m, "Ticket")
      .def("set_result", &Ticket::set_result, py::arg("result"))
      .def("set_exception", &Ticket::set_exception, py::arg("exc"))
      .def("done", &Ticket::done);

  py::class_<PyRequestQueue>(m, "RequestQueue")
      .def(py::init<size_t>(), py::arg("capacity"))
      .def("call", &PyRequestQueue::call, py::arg("item"),
           py::arg("timeout") = py::none())
      .def("submit", &PyRequestQueue::submit, py::arg("item"), py::arg("future"),
           py::arg("block") = true, py::arg("timeout") = py::none())
      .def("drain", &PyRequestQueue::drain, py::arg("max_items"))
      .def("wait_for_work", &PyRequestQueue::wait_for_work, py::arg("timeout"))
      .def("configure", &PyRequestQueue::configure, py::arg("max_batch_size"),
           py::arg("min_batch_size"), py::arg("timeout"))
      .def("collect", &PyRequestQueue::collect)
      .def("wake_resolved", &PyRequestQueue::wake_resolved)
      .def("prefetch", &PyRequestQueue::prefetch, py::arg("schema_id"), py::arg("columns"),
           py::arg("leaf_bytes"), py::arg("capacity"))
      .def("set_schema", &PyRequestQueue::set_schema, py::arg("keys"), py::arg("dtypes"),
           py::arg("shapes"), py::arg("leaf_bytes"), py::arg("strict") = false,
           py::arg("device") = py::none(),
           py::arg("general_keys") = std::vector<py::object>{})
      .def_property_readonly("schema_strict", &PyRequestQueue::schema_strict)

      .def("attach_slots", &PyRequestQueue::attach_slots, py::arg("slots"))
      .def_property_readonly("reaped_slots", &PyRequestQueue::reaped_slots)
      .def("fail_pending", &PyRequestQueue::fail_pending, py::arg("exc"))
      .def("close", &PyRequestQueue::close)
      .def("reopen", &PyRequestQueue::reopen)
      .def_property_readonly("closed", &PyRequestQueue::closed)
      .def_property_readonly("capacity", &PyRequestQueue::capacity)
      .def("__len__", &PyRequestQueue::size);

  py::class_<SharedSlots, std::shared_ptr<SharedSlots>>(m, "SharedSegment", py::buffer_protocol())
      .def_static(
          "create",
          [](const std::string& name, uint32_t num_slots, std::vector<size_t> request_leaf_bytes,
             std::vector<size_t> response_leaf_bytes, size_t error_bytes, uint64_t fingerprint) {
            SlotLayout layout;
            layout.num_slots = num_slots;
            layout.request_leaf_bytes = std::move(request_leaf_bytes);
            layout.response_leaf_bytes = std::move(response_leaf_bytes);
            layout.error_bytes = error_bytes;
            layout.fingerprint = fingerprint;
            return SharedSlots::create(name, layout);
          },
          py::arg("name"), py::arg("num_slots"), py::arg("request_leaf_bytes"),
          py::arg("response_leaf_bytes"), py::arg("error_bytes"), py::arg("fingerprint"))
      .def_static("attach", &SharedSlots::attach, py::arg("name"), py::arg("fingerprint"))
      .def_buffer([](SharedSlots& s) {
        return py::buffer_info(s.base(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.size())}, {1});
      })
      .def("unlink", &SharedSlots::unlink)
      .def_property_readonly("name", &SharedSlots::name)
      .def_property_readonly("size", &SharedSlots::size)
      .def_property_readonly("num_slots", &SharedSlots::num_slots)
      .def("request_offset", &SharedSlots::request_offset, py::arg("leaf"))
      .def("response_offset", &SharedSlots::response_offset, py::arg("leaf"))
      .def_property_readonly("closed", &SharedSlots::closed)
      .def_property_readonly("server_pid", &SharedSlots::server_pid)
      .def_property_readonly("server_dead", &SharedSlots::server_dead)
      .def_property_readonly("owned_slots", &SharedSlots::owned_slots)
      .def_property_readonly("ready_count", &SharedSlots::ready_count);

  py::class_<SlotServer, std::shared_ptr<SlotServer>>(m, "SlotServer")
      .def(py::init<std::shared_ptr<SharedSlots>, uint64_t, std::vector<py::object>,
                    std::vector<py::object>, py::object, std::vector<py::object>,
                    std::vector<py::object>, std::vector<py::object>>(),
           py::arg("segment"), py::arg("schema_id"), py::arg("request_keys"),
           py::arg("request_banks"), py::arg("request_device"), py::arg("response_keys"),
           py::arg("response_dtypes"), py::arg("response_shapes"));

  py::class_<SlotClient>(m, "SlotClient")
      .def(py::init<std::shared_ptr<SharedSlots>, std::vector<py::object>, std::vector<py::object>,
                    std::vector<py::object>, py::object, std::vector<py::object>,
                    std::vector<py::object>, py::object, bool, py::object>(),
           py::arg("segment"), py::arg("request_keys"), py::arg("request_dtypes"),
           py::arg("request_shapes"), py::arg("request_device"), py::arg("response_keys"),
           py::arg("response_banks"), py::arg("response_device"), py::arg("copy_result"),
           py::arg("normalise"))
      .def("call", &SlotClient::call, py::arg("item"), py::arg("timeout") = py::none())
      .def("submit", &SlotClient::submit, py::arg("item"), py::arg("timeout") = py::none())
      .def("result", &SlotClient::result, py::arg("pending"), py::arg("timeout") = py::none())
      .def("done", &SlotClient::done, py::arg("pending"))
      .def("cancel", &SlotClient::cancel, py::arg("pending"));

  // Weight banks (csrc/weight_banks.h): the shared-memory segment that
  // WeightPublisher and SharedMemoryWeightReceiver (python/batchserve/
  // _weight_banks.py) share. The tensor copies in and out are torch's.
  static py::exception<WeightLayoutMismatch> layout_mismatch(m, "WeightLayoutMismatch",
                                                             PyExc_ValueError);
  py::register_exception<WeightRoleHeld>(m, "WeightRoleHeld", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const WeightLayoutMismatch& e) {  // args: (message, the segment's layout text)
      PyErr_SetObject(layout_mismatch.ptr(), py::make_tuple(e.what(), e.existing_layout).ptr());
    }
  });
  py::enum_<WeightRole>(m, "WeightRole")
      .value("publisher", WeightRole::kPublisher)
      .value("receiver", WeightRole::kReceiver);
  py::class_<WeightBanks, std::shared_ptr<WeightBanks>>(m, "WeightBanks", py::buffer_protocol())
      .def_static(
          "open",
          [](const std::string& name, const std::string& layout, uint64_t bank_bytes,
             WeightRole role, double timeout) {
            GilRelease released;  // may wait for a creator to finish setting it up
            return WeightBanks::open(name, layout, bank_bytes, role, timeout);
          },
          py::arg("name"), py::arg("layout"), py::arg("bank_bytes"), py::arg("role"),
          py::arg("timeout") = 5.0)
      .def_buffer([](WeightBanks& b) {
        return py::buffer_info(b.base(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1});
      })
      .def("back", &WeightBanks::back)
      .def("publish", &WeightBanks::publish, py::arg("version"))
      .def("acquire", &WeightBanks::acquire)
      .def("newest", &WeightBanks::newest)
      .def(
          "wait_for_publication",
          [](WeightBanks& b, uint64_t seen, std::optional<double> timeout) {
            GilRelease released;
            return b.wait_for_publication(seen, timeout ? *timeout : -1.0);
          },
          py::arg("seen"), py::arg("timeout") = py::none())
      .def("bank_publication", &WeightBanks::bank_publication, py::arg("bank"))
      .def("bank_version", &WeightBanks::bank_version, py::arg("bank"))
      .def("bank_offset", &WeightBanks::bank_offset, py::arg("bank"))
      .def("role_held_elsewhere", &WeightBanks::role_held_elsewhere, py::arg("role"))
      .def("release", &WeightBanks::release)
      .def_property_readonly("bank_bytes", &WeightBanks::bank_bytes)
      .def_property_readonly("published", &WeightBanks::published)
      .def_property_readonly("last_version", &WeightBanks::last_version)
      .def_property_readonly("name", &WeightBanks::name)
      .def_property_readonly("size", &WeightBanks::size);

  py::class_<PendingSlot>(m, "PendingSlot")
      .def_readonly("slot", &PendingSlot::slot)
      .def_readonly("open", &PendingSlot::open);
}
