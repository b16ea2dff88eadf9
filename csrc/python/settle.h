// Ending a request on the Python side: its outcome to its caller (a
// blocking caller's Completion, a Future, a shared-memory slot), the wake-ups
// that follow (csrc/core/wake_batching.h: woken without the GIL), and the
// references a request holds.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include "core/request_queue.h"
#include "core/wake_batching.h"
#include "python/pyutil.h"
#include "python/schema.h"
#include "python/slot_server.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// GIL held. Releases what a request owns on the Python side.
inline void release_python_refs(const Request& r) {
  Py_XDECREF(static_cast<PyObject*>(r.payload));
  Py_XDECREF(static_cast<PyObject*>(r.future));
  if (r.intake == nullptr) free_rows(r.rows);  // a slot's rows are the intake's
}

// GIL held. Ends one request with `outcome` (a result or an exception).
// Callers that must be woken are appended to `to_wake` (a completion's
// reference is released after the wake-up, outside the GIL).
inline void settle(const Request& r, PyObject* outcome, bool is_error, std::vector<Wake>& to_wake) {
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
inline void wake_and_release(std::vector<Wake>& to_wake) {
  if (to_wake.empty()) return;
  GilRelease nogil;
  notify_and_release(to_wake);
}

// GIL held on entry and exit. Wakes the callers `deferred` holds (results
// the server published but left unwoken, to be woken at its next collect).
inline void flush(DeferredWakes& deferred) {
  if (deferred.empty()) return;
  std::vector<Wake> to_wake = deferred.take();
  wake_and_release(to_wake);
}

// GIL held. Drops a request that will never be served (withdrawn by its
// caller): no outcome, only references to release.
inline void discard(const Request& r) {
  release_python_refs(r);
  if (r.completion != nullptr) r.completion->release();
}

}  // namespace bindings
}  // namespace batchserve
