// PendingResult (batchserve._core.PendingResult): the caller's side of a
// request submitted for a future (RequestQueue.submit_pending). The request
// carries a Completion as a blocking call's does, so the server ends it in
// C++ (no Python call, no Future to claim and resolve) and the caller waits
// on the completion's futex with the GIL released. The Python future around
// it (python/batchserve/transports/queued_future.py: QueuedFuture) leaves
// itself as the completion's watcher once it has done callbacks or waiters;
// the server then hands it to Python to notify (python/settle.h: settle).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <optional>

#include "core/completion.h"
#include "core/sliced_wait.h"
#include "core/wake_batching.h"
#include "python/pyutil.h"
#include "python/schema.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// Where the caller of a submitted request may serve it itself (the queue's
// bindings, RequestQueue::serve_claimed): when it waits for the result while
// the server is idle, as a blocking caller goes inline (inline_gate.h).
class ClaimDesk {
 public:
  // GIL held. Claims the queued request of `completion` (its input `item`
  // and `rows`, submitted at `submit_ns`: the request's own references,
  // borrowed until the claim succeeds) and serves it on this thread. True
  // when it did (the completion ended); false when it may not (the server
  // busy or about to take it, another caller active): then the server
  // serves it. Raises what interrupted the caller's forward (Ctrl-C).
  virtual bool serve_claimed(Completion* completion, PyObject* item, RequestRows* rows,
                             int64_t submit_ns) = 0;

  // Wakes the server for a request pushed quietly (RequestQueue::push) that
  // its caller waits for without claiming it.
  virtual void announce() = 0;

 protected:
  ~ClaimDesk() = default;
};

// The desk a PendingResult may claim at: null once the queue is gone.
using ClaimRoute = std::shared_ptr<ClaimDesk*>;

// The watcher a dropped PendingResult leaves on a request still in flight:
// the request is served all the same (as a dropped Future's is), and the
// side that ends it drops the outcome, which no one will read.
inline char orphaned_marker;
inline void* const kOrphaned = &orphaned_marker;

class PendingResult {
 public:
  // Takes the caller's reference to `completion`.
  explicit PendingResult(Completion* completion) : completion_(completion) {}
  PendingResult(const PendingResult&) = delete;
  PendingResult& operator=(const PendingResult&) = delete;

  // GIL held. A request still in flight is served all the same; the side
  // that ends it drops its outcome (kOrphaned). A watched future is never
  // dropped before it is notified (the request holds it).
  ~PendingResult() {
    if (!completion_->ended()) {
      completion_->set_watcher(kOrphaned);
      // Ended meanwhile: the outcome is dropped by whoever takes the marker.
      if (completion_->ended() && completion_->take_watcher() == kOrphaned) drop_outcome();
    } else {
      drop_outcome();
    }
    completion_->release();
  }

  // Its caller may claim the request (ClaimDesk) while it is queued: the
  // request's input and rows (borrowed: dereferenced only once claimed).
  // `quiet`: it was pushed without waking the server.
  void allow_claim(ClaimRoute route, PyObject* item, RequestRows* rows, int64_t submit_ns,
                   bool quiet) {
    claim_route_ = std::move(route);
    claim_item_ = item;
    claim_rows_ = rows;
    claim_submit_ns_ = submit_ns;
    quiet_ = quiet;
  }

  Completion::State state() const { return completion_->state(); }

  // Ended: served (a result or an exception) or withdrawn. A caller polling
  // a request pushed quietly wakes the server for it.
  bool done() {
    if (completion_->ended()) return true;
    announce();
    return false;
  }

  // Withdraws the request if the server has not taken it; True if it is
  // (now or already) withdrawn.
  bool withdraw() { return completion_->withdraw(); }

  // Leaves `future` (a new reference is taken) for the server to notify
  // when it ends the request. Returns False when the request had already
  // ended: nothing is left, and the caller notifies itself.
  bool watch(const py::object& future) {
    Py_INCREF(future.ptr());
    completion_->set_watcher(future.ptr());
    if (!completion_->ended()) return true;
    // Ended meanwhile: whoever takes the watcher drops it (the server, if it
    // saw it, hands it to Python, where notifying it twice does nothing).
    Py_XDECREF(static_cast<PyObject*>(completion_->take_watcher()));
    return false;
  }

  // Waits until the request ended or `timeout` seconds passed (None: no
  // bound), the GIL released, running signal handlers between slices.
  // Returns whether it ended.
  bool wait(std::optional<double> timeout_s) {
    if (completion_->ended()) return true;
    // Served by this thread, as a blocking call goes inline; not under a
    // timeout (the caller could not leave its own forward when it passes).
    if (!timeout_s && claim_route_ && *claim_route_ != nullptr &&
        (*claim_route_)->serve_claimed(completion_, claim_item_, claim_rows_, claim_submit_ns_))
      return true;
    announce();  // waited for without a claim: the server serves it now
    const int64_t deadline = deadline_from(timeout_s);
    bool interrupted = false;
    bool ended = false;
    {
      WakeChainTurn turn(completion_);  // left with the GIL held
      ended = wait_in_slices(
          deadline,
          [&](int64_t until) {
            GilRelease nogil;
            HeldWake::pass();  // single file: the next caller's turn
            return completion_->wait_until(until, 0);
          },
          [&](bool expired) { return !expired && !(interrupted = signalled()); });
    }
    if (interrupted) throw py::error_already_set();
    return ended;
  }

  // The result: waits as wait() does. Raises TimeoutError when `timeout`
  // passes (the request stays in flight), CancelledError when it was
  // withdrawn, or the server's exception.
  py::object result(std::optional<double> timeout_s) {
    ended_or_raise(timeout_s);
    if (completion_->is_error()) {
      set_error_from(outcome());
      throw py::error_already_set();
    }
    return py::reinterpret_borrow<py::object>(outcome());
  }

  // The server's exception, or None; waits and raises as result() does.
  py::object exception(std::optional<double> timeout_s) {
    ended_or_raise(timeout_s);
    if (completion_->is_error()) return py::reinterpret_borrow<py::object>(outcome());
    return py::none();
  }

 private:
  // concurrent.futures' TimeoutError and CancelledError: a Future's (on
  // Python 3.10 its TimeoutError is not the builtin one).
  static PyObject* futures_error(const char* name) {
    return py::object(py::module_::import("concurrent.futures").attr(name)).release().ptr();
  }

  void ended_or_raise(std::optional<double> timeout_s) {
    if (!wait(timeout_s)) {
      static PyObject* timeout_error = futures_error("TimeoutError");
      PyErr_SetString(timeout_error,
                      "no result within the timeout; the request is still in flight");
      throw py::error_already_set();
    }
    if (completion_->state() == Completion::kWithdrawn) {
      static PyObject* cancelled_error = futures_error("CancelledError");
      PyErr_SetNone(cancelled_error);
      throw py::error_already_set();
    }
  }

  PyObject* outcome() const { return static_cast<PyObject*>(completion_->outcome()); }

  void drop_outcome() {
    if (completion_->state() == Completion::kDone) Py_XDECREF(outcome());
  }

  // Wakes the server once for a request pushed quietly.
  void announce() {
    if (!quiet_) return;
    quiet_ = false;
    if (*claim_route_ != nullptr) (*claim_route_)->announce();
  }

  Completion* completion_;
  ClaimRoute claim_route_;  // unset: the request may not be claimed
  bool quiet_ = false;      // pushed without waking the server (see announce)
  PyObject* claim_item_ = nullptr;
  RequestRows* claim_rows_ = nullptr;
  int64_t claim_submit_ns_ = 0;
};

// batchserve._core.PendingResult: the Python object of a PendingResult. A
// plain CPython type, not a pybind11 class: one is made for every submit()
// and it needs no pybind11 instance (registry entry, holder), and its
// methods are entered without pybind11's dispatcher (result() runs once per
// request). A loop of submit_pending, done(), state and two wait(0) took
// 1.02 µs against the class's 1.62 µs on the 2-core VM; a submission after
// a forward gained within its spread. Made by the queue's submit_pending
// only (no constructor); methods and errors are the pybind11 class's were
// (see PendingResult above).
struct PendingResultObject {
  PyObject_HEAD PendingResult* pending;  // owned
};

inline PyTypeObject* g_pending_result_type = nullptr;  // set by add_pending_result_type

// GIL held. `pending` as a new PendingResult object.
inline py::object wrap_pending(std::unique_ptr<PendingResult> pending) {
  auto* self = PyObject_New(PendingResultObject, g_pending_result_type);
  if (self == nullptr) throw py::error_already_set();
  self->pending = pending.release();
  return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(self));
}

namespace pending_result_object {

inline PendingResult& of(PyObject* self) {
  return *reinterpret_cast<PendingResultObject*>(self)->pending;
}

inline void dealloc(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  {
    // The destructor may drop the outcome (arbitrary Python): not with an
    // error of the code that dropped this object set (as pybind11 kept it).
    py::error_scope keep_error;
    delete reinterpret_cast<PendingResultObject*>(self)->pending;  // GIL held, as it needs
  }
  type->tp_free(self);
  Py_DECREF(type);  // a heap type's instances hold a reference to it
}

inline PyObject* state(PyObject* self, void*) {
  return PyLong_FromLong(static_cast<long>(of(self).state()));
}

inline PyObject* done(PyObject* self, PyObject*) {
  return translating_errors([&] { return PyBool_FromLong(of(self).done()); });
}

inline PyObject* withdraw(PyObject* self, PyObject*) {
  return translating_errors([&] { return PyBool_FromLong(of(self).withdraw()); });
}

inline PyObject* watch(PyObject* self, PyObject* future) {
  return translating_errors(
      [&] { return PyBool_FromLong(of(self).watch(py::reinterpret_borrow<py::object>(future))); });
}

// The one argument of wait, result and exception: `timeout=None`, given by
// position or keyword (METH_FASTCALL | METH_KEYWORDS).
inline bool timeout_argument(const char* method, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kwnames, std::optional<double>& timeout_s) {
  const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
  if (nargs + nkw > 1) {
    PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument (%zd given)", method, nargs + nkw);
    return false;
  }
  if (nkw == 1) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, 0);
    if (PyUnicode_CompareWithASCIIString(name, "timeout") != 0) {
      PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", method, name);
      return false;
    }
  }
  return seconds_or_none(nargs + nkw == 1 ? args[0] : nullptr, timeout_s);
}

inline PyObject* wait(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  std::optional<double> timeout_s;
  if (!timeout_argument("wait", args, nargs, kwnames, timeout_s)) return nullptr;
  return translating_errors([&] { return PyBool_FromLong(of(self).wait(timeout_s)); });
}

inline PyObject* result(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                        PyObject* kwnames) {
  std::optional<double> timeout_s;
  if (!timeout_argument("result", args, nargs, kwnames, timeout_s)) return nullptr;
  return translating_errors([&] { return of(self).result(timeout_s).release().ptr(); });
}

inline PyObject* exception(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                           PyObject* kwnames) {
  std::optional<double> timeout_s;
  if (!timeout_argument("exception", args, nargs, kwnames, timeout_s)) return nullptr;
  return translating_errors([&] { return of(self).exception(timeout_s).release().ptr(); });
}

template <class F>
PyCFunction method(F f) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f));
}

}  // namespace pending_result_object

// Makes the PendingResult type and adds it to module `m` (once, at import).
inline void add_pending_result_type(py::module_& m) {
  namespace o = pending_result_object;
  constexpr int kTimeout = METH_FASTCALL | METH_KEYWORDS;
  static PyMethodDef methods[] = {
      {"done", o::method(o::done), METH_NOARGS,
       "done($self, /)\n--\n\nWhether the request ended (a request pushed quietly: wakes the "
       "server)."},
      {"withdraw", o::method(o::withdraw), METH_NOARGS,
       "withdraw($self, /)\n--\n\nWithdraws the request if the server has not taken it; whether it "
       "is."},
      {"watch", o::method(o::watch), METH_O,
       "watch($self, future, /)\n--\n\nLeaves `future` for the server to notify; False if already "
       "ended."},
      {"wait", o::method(o::wait), kTimeout,
       "wait($self, /, timeout=None)\n--\n\nWaits for the request to end, the GIL released; "
       "whether it did."},
      {"result", o::method(o::result), kTimeout,
       "result($self, /, timeout=None)\n--\n\nThe result, waited for as wait() does; raises "
       "TimeoutError, CancelledError or the server's exception."},
      {"exception", o::method(o::exception), kTimeout,
       "exception($self, /, timeout=None)\n--\n\nThe server's exception or None, waited for as "
       "result()."},
      {nullptr, nullptr, 0, nullptr}};
  static PyGetSetDef getset[] = {
      {"state", o::state, nullptr, "the request's Completion::State", nullptr},
      {nullptr, nullptr, nullptr, nullptr, nullptr}};
  static PyType_Slot slots[] = {
      {Py_tp_dealloc, reinterpret_cast<void*>(o::dealloc)},
      {Py_tp_methods, methods},
      {Py_tp_getset, getset},
      {Py_tp_doc, const_cast<char*>("The caller's side of a request submitted for a future "
                                    "(RequestQueue.submit_pending).")},
      {0, nullptr}};
  static PyType_Spec spec = {"batchserve._core.PendingResult",
                             static_cast<int>(sizeof(PendingResultObject)), 0,
                             Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION, slots};
  PyObject* type = PyType_FromSpec(&spec);
  if (type == nullptr) throw py::error_already_set();
  // Its own reference, never dropped: the type outlives anything that
  // rebinds or deletes the module's attribute (a test's mock.patch).
  g_pending_result_type = reinterpret_cast<PyTypeObject*>(type);
  m.add_object("PendingResult", type);
}

}  // namespace bindings
}  // namespace batchserve
