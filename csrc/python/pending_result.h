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

}  // namespace bindings
}  // namespace batchserve
