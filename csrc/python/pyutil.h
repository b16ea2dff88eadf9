// The marshalling helpers every binding uses: the GIL, the exceptions the
// module raises, deadlines from Python timeouts, the torch and tensordict
// objects looked up once, attribute and method calls that raise
// as Python does, error objects that always exist, and a blocking call's
// entry without pybind11's dispatcher.
#pragma once

#include <pybind11/detail/exception_translation.h>
#include <pybind11/pybind11.h>
#include <unistd.h>
#ifdef __GLIBCXX__
#include <cxxabi.h>
#endif

#include <optional>
#include <stdexcept>
#include <string>

#include "core/futex.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

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
    } catch (...) {        // the forced unwind of pthread_exit: finalization began meanwhile
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
inline bool signalled() { return PyErr_CheckSignals() != 0; }

// Why a blocking call that timed out has no result, for its TimeoutError.
inline const char* timed_out_because(bool withdrawn) {
  return withdrawn ? "no result within the timeout; the request was withdrawn before it was batched"
                   : "no result within the timeout; the request was already being served and "
                     "its result is discarded";
}

[[noreturn]] inline void raise_timeout(const std::string& message) {
  PyErr_SetString(PyExc_TimeoutError, message.c_str());
  throw py::error_already_set();
}

inline int64_t deadline_from(const std::optional<double>& timeout_s) {
  if (!timeout_s) return kNoDeadline;
  return deadline_after(*timeout_s);
}

// torch / tensordict objects and attribute names the fast path uses. Looked
// up on first use (GIL held) and kept for the life of the process.
struct TorchRefs {
  PyObject* tensor_type;      // torch.Tensor
  PyObject* tensordict_type;  // tensordict.TensorDict
  PyObject* non_tensor_type;  // tensordict.NonTensorData
  PyObject* strided;          // torch.strided
  // An exact TensorDict's own attributes: its dict of entries, and what its
  // batch_size and device properties return, read without running the
  // properties' Python (two frames a request, ~0.5 µs after a forward).
  PyObject* s_tensordict;
  PyObject* s_td_batch_size;
  PyObject* s_td_device;
  PyObject* s_dtype;
  PyObject* s_shape;
  PyObject* s_is_cpu;
  PyObject* s_layout;
  PyObject* s_is_contiguous;
  PyObject* s_data_ptr;
  PyObject* s_is_neg;
  PyObject* s_has;
  // torch._C._dispatch_keys and DispatchKey.Negative: whether a tensor is a
  // lazily negated view, read without releasing the GIL (Tensor.is_neg()
  // releases it, and with many actor threads every release is a GIL
  // hand-off). Null when this torch lacks them: is_neg() is called then.
  PyObject* dispatch_keys;
  PyObject* negative_key;
  PyObject* s_clone;
  PyObject* s_is_complex;
  PyObject* quantized_dtypes;  // a tuple: torch.qint8, torch.quint8, ...
};

// The quantized dtypes this torch has.
inline py::tuple quantized_dtypes(const py::module_& torch) {
  py::list found;
  for (const char* name : {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})
    if (py::hasattr(torch, name)) found.append(torch.attr(name));
  return py::tuple(found);
}

// A new reference to `module.name`, or null when it has no such attribute.
inline PyObject* optional_attr(const py::handle module, const char* name) {
  return py::hasattr(module, name) ? py::object(module.attr(name)).release().ptr() : nullptr;
}

inline PyObject* negative_dispatch_key(const py::handle torch_c) {
  if (!py::hasattr(torch_c, "DispatchKey")) return nullptr;
  return optional_attr(torch_c.attr("DispatchKey"), "Negative");
}

inline const TorchRefs& torch_refs() {
  static const TorchRefs* refs = [] {
    py::module_ torch = py::module_::import("torch");
    py::module_ torch_c = py::module_::import("torch._C");
    py::module_ tensordict = py::module_::import("tensordict");
    auto keep = [](py::object o) { return o.release().ptr(); };
    auto name = [](const char* s) { return PyUnicode_InternFromString(s); };
    return new TorchRefs{
        keep(torch.attr("Tensor")),
        keep(tensordict.attr("TensorDict")),
        keep(tensordict.attr("NonTensorData")),
        keep(torch.attr("strided")),
        name("_tensordict"),
        name("_batch_size"),
        name("_device"),
        name("dtype"),
        name("shape"),
        name("is_cpu"),
        name("layout"),
        name("is_contiguous"),
        name("data_ptr"),
        name("is_neg"),
        name("has"),
        optional_attr(torch_c, "_dispatch_keys"),
        negative_dispatch_key(torch_c),
        name("clone"),
        name("is_complex"),
        keep(quantized_dtypes(torch)),
    };
  }();
  return *refs;
}

inline py::object attr(PyObject* o, PyObject* name) {
  PyObject* r = PyObject_GetAttr(o, name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

inline py::object call_method(PyObject* o, PyObject* name) {
  PyObject* r = PyObject_CallMethodNoArgs(o, name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// GIL held. The address of a CPU tensor's first element.
inline void* data_ptr(PyObject* tensor) {
  py::object p = call_method(tensor, torch_refs().s_data_ptr);
  void* ptr = PyLong_AsVoidPtr(p.ptr());
  if (ptr == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return ptr;
}

inline std::string repr(PyObject* o) {
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

[[noreturn]] inline void raise_spec_error(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw py::error_already_set();
}

// GIL held. A new RuntimeError; MemoryError (never null) if even that
// cannot be allocated, so a request always gets an outcome.
inline PyObject* new_runtime_error(const char* message) {
  PyObject* err = PyObject_CallFunction(PyExc_RuntimeError, "s", message);
  if (err != nullptr) return err;
  PyErr_Clear();
  Py_INCREF(PyExc_MemoryError);
  return PyExc_MemoryError;
}

// GIL held. Sets the Python error a caller raises for `outcome`: the
// exception instance itself, an exception class, or anything else wrapped in
// a RuntimeError.
inline void set_error_from(PyObject* outcome) {
  if (PyExceptionInstance_Check(outcome)) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(outcome)), outcome);
  } else if (PyExceptionClass_Check(outcome)) {
    PyErr_SetNone(outcome);
  } else {
    PyErr_SetObject(PyExc_RuntimeError, outcome);
  }
}

// A SharedMemoryTransport client's timeout: a TimeoutError that is also the
// queue.Empty torchrl's shared-memory client raises. Made at module import.
inline PyObject* g_result_timeout = nullptr;

[[noreturn]] inline void raise_result_timeout(const std::string& message) {
  PyErr_SetString(g_result_timeout != nullptr ? g_result_timeout : PyExc_TimeoutError,
                  message.c_str());
  throw py::error_already_set();
}

// `body()` (a PyObject*, new reference or null with a Python error set),
// as an entry that Python calls without pybind11's dispatcher returns it:
// a C++ exception becomes the Python error pybind11 would raise (its
// registered exception translators; pybind11 >= 2.13.6).
template <class Body>
PyObject* translating_errors(Body&& body) {
  try {
    return body();
#ifdef __GLIBCXX__
  } catch (abi::__forced_unwind&) {
    throw;  // a thread ended by pthread_exit (a daemon thread at exit), as pybind11 lets it
#endif
  } catch (...) {
    py::detail::try_translate_exceptions();
    return nullptr;
  }
}

// A timeout argument in seconds: None (no bound) or a number. False, with
// a Python error set, for anything else.
inline bool seconds_or_none(PyObject* arg, std::optional<double>& seconds) {
  seconds.reset();
  if (arg == nullptr || arg == Py_None) return true;
  const double t = PyFloat_AsDouble(arg);
  if (t == -1.0 && PyErr_Occurred()) return false;
  seconds = t;
  return true;
}

// A blocking call's Python entry, `call(item, timeout=None)` (positional
// arguments only), that runs `Method` of the T a pybind11 instance holds.
// pybind11's dispatcher (argument loaders, keyword matching, two vectors
// allocated per call) cost ~1 µs of a one-actor inline call on the 2-core
// VM, where the call runs with cold caches after each forward; this entry
// converts its two arguments itself and raises what the dispatcher would.
template <class T, py::object (T::*Method)(const py::object&, std::optional<double>)>
PyObject* blocking_call_entry(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 2) {
    PyErr_Format(PyExc_TypeError, "call(item, timeout=None) takes 1 or 2 arguments (%zd given)",
                 nargs);
    return nullptr;
  }
  std::optional<double> timeout_s;
  if (!seconds_or_none(nargs == 2 ? args[1] : nullptr, timeout_s)) return nullptr;
  return translating_errors([&] {
    T* target = static_cast<T*>(PyCapsule_GetPointer(capsule, nullptr));
    return (target->*Method)(py::reinterpret_borrow<py::object>(args[0]), timeout_s)
        .release()
        .ptr();
  });
}

// That entry as a Python callable bound to `owner` (a pybind11 instance of
// T), which it keeps alive.
template <class T, py::object (T::*Method)(const py::object&, std::optional<double>)>
py::object blocking_call_of(const py::object& owner) {
  static PyMethodDef def = {
      "call",
      reinterpret_cast<PyCFunction>(
          reinterpret_cast<void (*)(void)>(&blocking_call_entry<T, Method>)),
      METH_FASTCALL,
      "call(item, timeout=None): the request's result, waited for (see the owner's call)"};
  T* target = owner.cast<T*>();
  auto capsule = py::reinterpret_steal<py::object>(PyCapsule_New(target, nullptr, [](PyObject* c) {
    Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(c)));
  }));
  if (!capsule) throw py::error_already_set();
  if (PyCapsule_SetContext(capsule.ptr(), owner.inc_ref().ptr()) != 0) {
    owner.dec_ref();
    throw py::error_already_set();
  }
  PyObject* fn = PyCFunction_NewEx(&def, capsule.ptr(), nullptr);
  if (fn == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(fn);
}

}  // namespace bindings
}  // namespace batchserve
