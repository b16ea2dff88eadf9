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

#include "batch_policy.h"
#include "completion.h"
#include "futex.h"
#include "request_queue.h"
#include "row_copy.h"
#include "staging.h"

namespace py = pybind11;

namespace batchserve {
namespace {

struct QueueClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct QueueFullError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A blocking caller re-checks for Python signals (Ctrl-C) this often.
constexpr int64_t kSignalCheckNs = 200'000'000;

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

// GIL held. Releases what a request owns on the Python side.
void release_python_refs(const Request& r) {
  Py_XDECREF(static_cast<PyObject*>(r.payload));
  Py_XDECREF(static_cast<PyObject*>(r.future));
  free_rows(r.rows);
}

// GIL held. Ends one request with `outcome` (a result or an exception).
// Completions that must be woken are appended to `to_wake` (their reference
// is released after the wake-up, outside the GIL).
void settle(const Request& r, PyObject* outcome, bool is_error,
            std::vector<Completion*>& to_wake) {
  if (r.completion != nullptr) {
    Py_INCREF(outcome);
    if (!r.completion->finish(outcome, is_error)) Py_DECREF(outcome);
    to_wake.push_back(r.completion);
  } else if (r.future != nullptr) {
    call_future(static_cast<PyObject*>(r.future),
                is_error ? "set_exception" : "set_result", outcome);
  }
}

// GIL held on entry and exit; wakes callers without it.
void notify_and_release(std::vector<Completion*>& to_wake) {
  for (Completion* c : to_wake) {
    c->notify();
    c->release();
  }
  to_wake.clear();
}

void wake_and_release(std::vector<Completion*>& to_wake) {
  if (to_wake.empty()) return;
  py::gil_scoped_release nogil;
  notify_and_release(to_wake);
}

// Callers whose results the server has published but not yet woken. The
// worker wakes them when it next releases the GIL (collect()): a caller woken
// while the worker still holds the GIL would block on the GIL and need a
// second, much slower wake-up (CPython's GIL hand-off) to go on. Changed
// only with the GIL held.
struct DeferredWakes {
  std::vector<Completion*> pending;

  // GIL held on entry and exit; wakes without it.
  void flush() {
    if (pending.empty()) return;
    std::vector<Completion*> to_wake;
    to_wake.swap(pending);
    wake_and_release(to_wake);
  }
};

// GIL held. Drops a request that will never be served (withdrawn by its
// caller): no outcome, only references to release.
void discard(const Request& r) {
  release_python_refs(r);
  if (r.completion != nullptr) r.completion->release();
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
        std::shared_ptr<DeferredWakes> deferred, uintptr_t prefetched_into)
      : requests_(std::move(requests)),
        rows_(std::move(rows)),
        deferred_(std::move(deferred)),
        prefetched_into_(rows_.empty() ? 0 : prefetched_into) {}
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

  // The general path's requests.
  py::list items() const {
    py::list out(requests_.size());
    for (size_t i = 0; i < requests_.size(); ++i)
      out[i] = py::reinterpret_borrow<py::object>(
          static_cast<PyObject*>(requests_[i].payload));
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
      const auto* leaves = static_cast<const RequestRows*>(rows_[i].rows);
      snapshot.push_back(*leaves);
      for (size_t j = 0; j < leaves->count; ++j)
        held.push_back(py::reinterpret_borrow<py::object>(leaves->tensors[j]));
    }
    std::vector<const RowSource*> sources;
    sources.reserve(snapshot.size());
    for (const RowSource& s : snapshot) sources.push_back(&s);
    {
      py::gil_scoped_release nogil;
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
  void resolve_rows(const std::vector<py::object>& keys, const std::vector<py::object>& columns,
                    const py::object& device) {
    if (rows_.empty()) return;
    const size_t n = rows_.size();
    if (columns.size() != keys.size())
      throw std::invalid_argument("resolve_rows: one column per key expected");
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
  static void wake(std::vector<Completion*>& to_wake, DeferredWakes* deferred) {
    if (deferred == nullptr) {
      wake_and_release(to_wake);
      return;
    }
    deferred->pending.insert(deferred->pending.end(), to_wake.begin(), to_wake.end());
    to_wake.clear();
  }

  // GIL held. Ends each request of `requests` (owned by the caller, no
  // longer reachable from the batch) with outcome_of(i).
  template <typename OutcomeOf>
  static void settle(std::vector<Request> requests, OutcomeOf&& outcome_of,
                     bool is_error, DeferredWakes* deferred = nullptr) {
    std::vector<Completion*> to_wake;
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
};

// The handle of one blocking request handed out by drain() (the transport
// protocol path): it quacks like the Future it replaces.
class Ticket {
 public:
  explicit Ticket(Completion* completion) : completion_(completion) {}
  Ticket(const Ticket&) = delete;
  Ticket& operator=(const Ticket&) = delete;
  ~Ticket() {
    if (completion_ != nullptr) {
      PyObject* err = new_runtime_error(
          "batchserve: a request was dropped before it was resolved");
      end(err, true);
      Py_DECREF(err);
    }
  }

  void set_result(const py::object& result) { end(result.ptr(), false); }
  void set_exception(const py::object& exc) { end(exc.ptr(), true); }
  bool done() const { return completion_ == nullptr; }

 private:
  void end(PyObject* outcome, bool is_error) {
    if (completion_ == nullptr) return;
    Completion* c = std::exchange(completion_, nullptr);
    Py_INCREF(outcome);
    if (!c->finish(outcome, is_error)) Py_DECREF(outcome);
    std::vector<Completion*> to_wake{c};
    wake_and_release(to_wake);
  }

  Completion* completion_;
};

class PyRequestQueue {
 public:
  explicit PyRequestQueue(size_t capacity) : queue_(capacity) {}
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
    result = queue_.push(r, 0);  // first without giving up the GIL
    while (result == PushResult::kTimedOut && monotonic_ns() < deadline) {
      {
        py::gil_scoped_release nogil;
        result = queue_.push(r, std::min(deadline, monotonic_ns() + kSignalCheckNs));
      }
      if (result == PushResult::kTimedOut && PyErr_CheckSignals() != 0) return false;
    }
    return true;
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
    bool done = false;
    for (;;) {
      {
        py::gil_scoped_release nogil;
        pushed = queue_.push(request, std::min(deadline, monotonic_ns() + kSignalCheckNs));
        if (pushed == PushResult::kOk) {
          const int64_t slice = std::min(deadline, monotonic_ns() + kSignalCheckNs);
          done = completion->wait_until(slice, 0);
        }
      }
      if (pushed != PushResult::kTimedOut || monotonic_ns() >= deadline) break;
      if (PyErr_CheckSignals() != 0) break;  // Ctrl-C while the queue is full
    }
    if (pushed != PushResult::kOk) {
      Py_DECREF(item.ptr());
      completion->release();
      completion->release();
      if (PyErr_Occurred()) throw py::error_already_set();
      if (pushed == PushResult::kClosed)
        throw QueueClosedError("the inference server is shut down");
      raise_timeout("no room in the request queue within the timeout");
    }
    rows.release();  // the request owns them now
    while (!done) {
      int64_t now;
      {
        py::gil_scoped_release nogil;
        const int64_t slice = std::min(deadline, monotonic_ns() + kSignalCheckNs);
        done = completion->wait_until(slice, 0);
        now = monotonic_ns();
      }
      if (done) break;
      const bool expired = now >= deadline;
      const bool interrupted = !expired && PyErr_CheckSignals() != 0;
      if (!expired && !interrupted) continue;
      const Completion::State left = completion->give_up();
      if (left == Completion::kDone) {
        if (!interrupted) break;  // the result won the race with the timeout
        // A signal (Ctrl-C) wins over a result that arrived meanwhile.
        Py_DECREF(static_cast<PyObject*>(completion->outcome()));
        completion->release();
        throw py::error_already_set();
      }
      completion->release();
      if (interrupted) throw py::error_already_set();
      raise_timeout(left == Completion::kWithdrawn
                        ? "no result within the timeout; the request was "
                          "withdrawn before it was batched"
                        : "no result within the timeout; the request was "
                          "already being served and its result is discarded");
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
                         std::to_string(queue_.capacity()) + ")");
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
    detail::take_ready(queue_, max_items, popped, unused);
    for (const Request& r : unused) discard(r);
    py::list items, handles, submitted_at;
    for (const Request& r : popped) {
      if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
        discard(r);  // cancelled by its caller
        continue;
      }
      items.append(py::reinterpret_steal<py::object>(static_cast<PyObject*>(r.payload)));
      free_rows(r.rows);  // the protocol path hands out the TensorDict itself
      if (r.completion != nullptr) {
        handles.append(py::cast(new Ticket(r.completion),
                                py::return_value_policy::take_ownership));
      } else {
        handles.append(py::reinterpret_steal<py::object>(static_cast<PyObject*>(r.future)));
      }
      submitted_at.append(static_cast<double>(r.submit_ns) * 1e-9);
    }
    return py::make_tuple(items, handles, submitted_at);
  }

  bool wait_for_work(double timeout_s) {
    py::gil_scoped_release nogil;
    return queue_.wait_for_work(deadline_after(timeout_s));
  }

  // The batching policy's settings; a server sleeping in collect() applies
  // them at once.
  void configure(size_t max_batch_size, size_t min_batch_size, double timeout_s) {
    BatchPolicy policy;
    policy.max_batch_size = max_batch_size;
    policy.min_batch_size = min_batch_size;
    policy.timeout_ns = seconds_to_ns(timeout_s);
    settings_.store(policy, queue_);
  }

  // Fast path: starts gathering the next batch into the staging `columns`
  // while the model runs on the current one (see Prefetcher). Does nothing
  // when no request is waiting (one actor: it is waiting for this batch) or
  // a job is already started. Returns whether it started one.
  bool prefetch(uint64_t schema_id, const std::vector<uintptr_t>& columns,
                const std::vector<size_t>& leaf_bytes, size_t capacity) {
    if (queue_.size() == 0) return false;
    std::lock_guard<std::mutex> lock(prefetch_mutex_);
    if (prefetcher_.started()) return false;
    Prefetcher::Job job;
    job.max_items = settings_.load().max_batch_size;
    job.schema_id = schema_id;
    for (uintptr_t c : columns) job.staging.base.push_back(reinterpret_cast<uint8_t*>(c));
    job.staging.leaf_bytes = leaf_bytes;
    job.staging.rows = capacity;
    prefetcher_.start(std::move(job));
    return true;
  }

  // The server's batch: the C++ batching policy, run without the GIL, going
  // on from what a prefetch took (those rows are already in staging).
  std::unique_ptr<Batch> collect() {
    std::vector<Request> batch, dropped;
    size_t prefetched = 0;  // batch[0, prefetched) are gathered rows
    uintptr_t prefetched_into = 0;
    std::vector<Completion*> to_wake;
    to_wake.swap(deferred_->pending);
    std::vector<Request> carried;  // older than anything still in the ring
    carried.swap(carried_);
    {
      py::gil_scoped_release nogil;
      notify_and_release(to_wake);
      Prefetcher::Taken taken = finish_prefetch();
      prefetched = taken.rows.size();
      prefetched_into = reinterpret_cast<uintptr_t>(taken.staging);
      batch = std::move(taken.rows);  // the policy counts them as collected
      batch.insert(batch.end(), carried.begin(), carried.end());
      batch.insert(batch.end(), taken.others.begin(), taken.others.end());
      dropped = std::move(taken.dropped);
      batch.reserve(std::min(settings_.load().max_batch_size, queue_.capacity()));
      collect_batch(queue_, settings_, batch, dropped);
    }
    // Taking the GIL back can take a while when woken callers hold it; what
    // arrived meanwhile joins this batch rather than wait for the next one.
    const size_t max_batch_size = settings_.load().max_batch_size;
    if (!batch.empty() && batch.size() < max_batch_size)
      detail::take_ready(queue_, max_batch_size - batch.size(), batch, dropped);
    // A prefetch took up to the maximum of its time; one lowered since then
    // holds: the excess waits for the next batch (regathered there).
    if (batch.size() > max_batch_size) {
      carried_.assign(batch.begin() + static_cast<std::ptrdiff_t>(max_batch_size), batch.end());
      batch.resize(max_batch_size);
      prefetched = std::min(prefetched, max_batch_size);
    }
    for (const Request& r : dropped) discard(r);
    // Futures cancelled by their callers are dropped; a prefetched row keeps
    // its staging row (its result then goes nowhere).
    std::vector<Request> rows(batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(prefetched));
    std::vector<Request> others;
    others.reserve(batch.size() - prefetched);
    for (size_t i = prefetched; i < batch.size(); ++i) {
      const Request& r = batch[i];
      if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
        discard(r);
        continue;
      }
      others.push_back(r);
    }
    for (const Request& r : rows)
      if (r.future != nullptr) claim_future(static_cast<PyObject*>(r.future));
    if (rows.empty() && others.empty()) return nullptr;
    adapt_server_spin(rows.size() + others.size());
    return std::make_unique<Batch>(std::move(rows), std::move(others), deferred_, prefetched_into);
  }

  // Ends every queued request (and any a prefetch took) with `exc`; returns
  // how many.
  size_t fail_pending(const py::object& exc) {
    deferred_->flush();
    size_t total = 0;
    std::vector<Completion*> to_wake;
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
      py::gil_scoped_release nogil;
      taken = finish_prefetch();
    }
    for (const Request& r : taken.dropped) discard(r);
    for (const Request& r : taken.rows) fail(r);
    for (const Request& r : taken.others) fail(r);
    std::vector<Request> carried;
    carried.swap(carried_);
    for (const Request& r : carried) fail(r);
    wake_and_release(to_wake);
    std::vector<Request> pending;
    while (queue_.pop_many(pending, 1024) > 0) {
      for (const Request& r : pending) fail(r);
      pending.clear();
      wake_and_release(to_wake);
    }
    return total;
  }

  // Wakes the callers whose results are published (see DeferredWakes) now
  // rather than at the next collect().
  void wake_resolved() { deferred_->flush(); }

  void close() {
    deferred_->flush();
    py::gil_scoped_release nogil;
    queue_.close();
  }
  void reopen() { queue_.reopen(); }
  bool closed() const { return queue_.closed(); }
  size_t size() const { return queue_.size(); }
  size_t capacity() const { return queue_.capacity(); }

 private:
  // The server spins for its next request (instead of sleeping at once)
  // while batches hold one request: then one actor is calling, it sends its
  // next request within microseconds of its result, the other core is free,
  // and a futex wake-up of the server would cost tens of microseconds on a
  // VM. With more actors the server seldom waits, and a spinning server
  // would take the core their Python needs. Measured on the 2-core CI VM:
  // spinning 50 µs always cut one actor's p50 from ~160 to ~105 µs but
  // served 8 and 32 threads ~15-25% slower.
  static constexpr int64_t kLoneActorSpinNs = 50'000;

  void adapt_server_spin(size_t batch_size) {
    // Moving average of batch sizes in 1/16ths, weight 1/8.
    mean_batch_x16_ += (static_cast<int64_t>(batch_size) * 16 - mean_batch_x16_) / 8;
    queue_.set_server_spin_ns(mean_batch_x16_ <= 24 ? kLoneActorSpinNs : 0);
  }

  // GIL released. What the prefetch started last took (nothing if none).
  Prefetcher::Taken finish_prefetch() {
    std::lock_guard<std::mutex> lock(prefetch_mutex_);
    return prefetcher_.finish();
  }

  OwnedRows match(PyObject* item, bool own_copy) {
    if (!schema_) return nullptr;
    std::shared_ptr<const FastSchema> schema = schema_;  // set_schema may run in a callback
    return match_schema(item, *schema, own_copy);
  }

  RequestQueue queue_;
  BatchSettings settings_;
  std::mutex prefetch_mutex_;  // start() and finish() of prefetcher_, never at once
  std::vector<Request> carried_;  // taken beyond a lowered max_batch_size (GIL held)
  int64_t mean_batch_x16_ = 16;  // server thread only
  Prefetcher prefetcher_{queue_};
  std::shared_ptr<DeferredWakes> deferred_ = std::make_shared<DeferredWakes>();
  std::shared_ptr<const FastSchema> schema_;  // GIL held to read or change
  uint64_t last_schema_id_ = 0;
};

}  // namespace
}  // namespace batchserve

PYBIND11_MODULE(_core, m) {
  using namespace batchserve;
  m.doc() = "batchserve's C++ core: request queue, batching policy, parking.";

  py::register_exception<QueueClosedError>(m, "ServerClosedError", PyExc_RuntimeError);
  py::register_exception<QueueFullError>(
      m, "QueueFull", py::module_::import("queue").attr("Full"));

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

      .def("fail_pending", &PyRequestQueue::fail_pending, py::arg("exc"))
      .def("close", &PyRequestQueue::close)
      .def("reopen", &PyRequestQueue::reopen)
      .def_property_readonly("closed", &PyRequestQueue::closed)
      .def_property_readonly("capacity", &PyRequestQueue::capacity)
      .def("__len__", &PyRequestQueue::size);
}
