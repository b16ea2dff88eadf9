// Ending a request on the Python side: its outcome to its caller (a
// blocking caller's or a QueuedFuture's Completion, a shared-memory slot),
// the watched QueuedFutures to Python, the wake-ups that follow (csrc/core/wake_batching.h: woken
// without the GIL), and the references a request holds.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include "core/request_queue.h"
#include "core/wake_batching.h"
#include "python/pending_result.h"
#include "python/pyutil.h"
#include "python/schema.h"
#include "python/slot_server.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// GIL held. Releases what a request owns on the Python side.
inline void release_python_refs(const Request& r) {
  Py_XDECREF(static_cast<PyObject*>(r.payload));
  if (r.intake == nullptr) free_rows(r.rows);  // a slot's rows are the intake's
}

// GIL held. Appends `future` (a new reference, stolen) to the list
// `futures`, as the pair (index, future) when `index` is given. Never
// throws: out of memory, that future is lost (as when a Future call fails).
inline void append_future(PyObject* futures, PyObject* future, Py_ssize_t index) {
  PyObject* entry = future;
  if (index >= 0) {
    entry = Py_BuildValue("(nO)", index, future);
    Py_DECREF(future);
  }
  if (entry == nullptr || PyList_Append(futures, entry) != 0) PyErr_Clear();
  Py_XDECREF(entry);
}

// GIL held. Drops the watcher a request's completion still holds (a
// QueuedFuture that was cancelled: it notified itself), if any.
inline void drop_watcher(Completion* completion) {
  void* watcher = completion->take_watcher();
  if (watcher != kOrphaned) Py_XDECREF(static_cast<PyObject*>(watcher));
}

// GIL held. Ends one request whose caller waits in C++ (a blocking caller's
// or a QueuedFuture's Completion, a shared-memory slot) with `outcome` (a
// result or an exception). Callers that must be woken are appended to
// `to_wake` (a completion's reference is released after the wake-up,
// outside the GIL). A QueuedFuture that has done callbacks or waiters (its
// completion's watcher) is appended to `futures` (as (index, future) when
// `index` is given), for Python to notify with the same outcome.
inline void settle(const Request& r, PyObject* outcome, bool is_error, std::vector<Wake>& to_wake,
                   PyObject* futures, Py_ssize_t index = -1) {
  if (r.intake != nullptr) {
    SharedSlots& slots = slot_server(r).slots();
    const SlotWaiter waiter = slots.waiter(r.slot);  // before it ends: then it is the client's
    if (slot_server(r).settle(r.slot, outcome, is_error))
      to_wake.push_back(Wake{nullptr, &slots, waiter});
  } else if (r.completion != nullptr) {
    Py_INCREF(outcome);
    if (!r.completion->finish(outcome, is_error)) {
      Py_DECREF(outcome);
      drop_watcher(r.completion);  // withdrawn (a shutdown fails what is queued)
    } else if (void* watcher = r.completion->take_watcher()) {
      if (watcher == kOrphaned) {
        Py_DECREF(outcome);  // its future was dropped
      } else {
        append_future(futures, static_cast<PyObject*>(watcher), index);
      }
    }
    to_wake.push_back(Wake{r.completion});
  }
}

// GIL held, in a destructor: ends each future of `futures` (as settle
// lists them) with `exc`, as Python would have; errors
// (a future already resolved, a callback's BaseException) are dropped.
inline void fail_futures_now(const py::list& futures, PyObject* exc) {
  for (const py::handle entry : futures) {
    PyObject* future = PyTuple_Check(entry.ptr()) ? PyTuple_GET_ITEM(entry.ptr(), 1) : entry.ptr();
    PyObject* done = PyObject_CallMethod(future, "set_exception", "O", exc);
    if (done == nullptr) PyErr_Clear();
    Py_XDECREF(done);
  }
}

// GIL held on entry and exit; wakes callers without it (see
// csrc/core/wake_batching.h; `handed`: a single-file server's, which keeps
// what it hands on).
inline void wake_and_release(std::vector<Wake>& to_wake, HandedWakes* handed = nullptr) {
  if (to_wake.empty()) return;
  GilRelease nogil;
  notify_and_release(to_wake, handed);
}

// GIL held. Has the QueuedFuture `future` run its callbacks and wake its
// waiters for an outcome already in its completion, as Future.set_result
// (set_exception) would. A callback's Exception is logged by the future; a
// BaseException propagates.
inline void notify_future(py::handle future, const py::object& outcome, bool is_error) {
  future.attr(is_error ? "set_exception" : "set_result")(outcome);
}

// GIL held. Ends `r` at once with `outcome` (settle), wakes its caller,
// drops the completion reference the request holds, and notifies its
// QueuedFuture (notify_future).
inline void end_request_now(const Request& r, const py::object& outcome, bool is_error) {
  std::vector<Wake> to_wake;
  py::list to_notify;
  settle(r, outcome.ptr(), is_error, to_wake, to_notify.ptr());
  wake_and_release(to_wake);
  for (const py::handle future : to_notify) notify_future(future, outcome, is_error);
}

// GIL held on entry and exit. Wakes the callers `deferred` holds (results
// the server published but left unwoken, to be woken at its next collect).
inline void flush(DeferredWakes& deferred, HandedWakes* handed = nullptr) {
  if (deferred.empty()) return;
  std::vector<Wake> to_wake = deferred.take();
  wake_and_release(to_wake, handed);
}

// GIL held. Drops a request that will never be served (withdrawn by its
// caller): no outcome, only references to release.
inline void discard(const Request& r) {
  release_python_refs(r);
  if (r.completion != nullptr) {
    drop_watcher(r.completion);
    r.completion->release();
  }
}

}  // namespace bindings
}  // namespace batchserve
