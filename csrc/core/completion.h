// Completion: where a blocking caller waits for its own result.
//
// One per blocking request, shared by the caller and the queue/server side
// through a two-party reference count. Its state word decides, exactly once,
// who owns the request's outcome:
//
//   kQueued ──take()──► kTaken ──finish()──► kDone        (normal path)
//      │                  │
//      │ give_up()        │ give_up()
//      ▼                  ▼
//   kWithdrawn         kAbandoned      (caller timed out: the server drops the
//                                       request, or discards its result)
//   kQueued ──finish()──► kDone        (failed before batching, e.g. shutdown)
//   kQueued ──claim()──► kClaimed ──finish()──► kDone   (served by its caller)
//
// A claim: the caller of a submitted request serves it itself, inline (see
// inline_gate.h), while the request still sits in the queue. Its copy in the
// queue is then the server's to skip: a take() that fails on a claimed
// request (claimed_by_caller()) drops only the queue's reference to the
// completion, since the request's other references (its input, its rows)
// went to the caller with the claim.
//
// Every transition is a CAS, so the caller's timeout and the server's result
// can race safely: whichever CAS wins decides. The result pointer is written
// before the release CAS into kDone and read after an acquire load of kDone.
//
// A caller that waits through a future (not a blocking call) may also leave
// a watcher: an opaque pointer the side that ends the request takes after
// finish() and notifies (the bindings: the Python future, for its done
// callbacks). The caller sets it and then reads the state; the server
// finishes and then takes it (both seq_cst), so at least one of them sees
// the other: a watcher left after the end is taken back by the caller.
//
// Wake chains (see wake_batching.h): a caller waiting in C++ may be woken
// by the caller before it in its batch rather than by the server. The link
// to the next caller is one pointer word: `this` while no caller waits
// (the caller left, or never entered), null while one waits, the next
// completion once the server linked it. The server links only a null word
// (CAS); the caller leaving swaps `this` in and wakes whatever it took. So
// exactly one side wakes a linked completion: the caller that took it, or
// the server, whose link failed because the caller had left.
//
// Single file (single_file.h): a server may keep a third reference
// (retain()) to a completion whose wake-up it handed to the caller before,
// to wake it itself if that caller holds the wake-up too long; the holder
// stamps when it took it (mark_held()).
#pragma once

#include <atomic>
#include <cstdint>

#include "parking.h"

namespace batchserve {

class Completion {
 public:
  enum State : uint32_t {
    kQueued = 0,
    kTaken = 1,
    kDone = 2,
    kWithdrawn = 3,
    kAbandoned = 4,
    kClaimed = 5,
  };

  // Created with two references: the caller's and the request's (and a
  // third while a single-file server keeps it: retain()).
  Completion() = default;
  Completion(const Completion&) = delete;
  Completion& operator=(const Completion&) = delete;

  // seq_cst (a plain load on x86, as acquire on ARM): a caller's read after
  // set_watcher() must not be ordered before it.
  State state() const noexcept {
    return static_cast<State>(state_.load(std::memory_order_seq_cst));
  }

  // Server: claims a queued request for a batch. False if it was withdrawn.
  bool take() noexcept {
    uint32_t expected = kQueued;
    return state_.compare_exchange_strong(expected, kTaken, std::memory_order_acq_rel);
  }

  // Caller: claims its own queued request, to serve it itself (see above).
  // False if the server took it first, or it ended (withdrawn, failed).
  bool claim() noexcept {
    uint32_t expected = kQueued;
    return state_.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel);
  }

  // Server, after a take() of a request still in the queue failed: whether
  // its caller claimed it (kClaimed, or kDone once served: nothing but a
  // claim ends a request in the queue) rather than withdrew it.
  bool claimed_by_caller() const noexcept {
    const State s = state();
    return s == kClaimed || s == kDone;
  }

  // Server (or a claiming caller): publishes the outcome (an opaque pointer
  // owned by the bindings). False when the caller already gave up: the
  // outcome was not stored and still belongs to the server. Does not wake
  // the caller; call notify().
  bool finish(void* outcome, bool is_error) noexcept {
    outcome_ = outcome;
    is_error_ = is_error;
    uint32_t expected = state_.load(std::memory_order_relaxed);
    while (expected == kQueued || expected == kTaken || expected == kClaimed) {
      // seq_cst: ordered before the take_watcher() that follows it.
      if (state_.compare_exchange_weak(expected, kDone, std::memory_order_seq_cst)) return true;
    }
    outcome_ = nullptr;
    return false;
  }

  void notify() noexcept { done_.notify_all(); }

  // The event its caller parks on (to watch for a notify(): a test's view).
  EventCount& done_event() noexcept { return done_; }

  // Caller: waits until kDone (or kWithdrawn: a future cancelled by another
  // of its caller's threads) or the deadline. Returns true when ended.
  bool wait_until(int64_t deadline_ns, int spin_iterations) noexcept {
    return spin_then_park(done_, [this] { return ended(); }, deadline_ns, spin_iterations);
  }

  bool ended() const noexcept {
    const State s = state();
    return s == kDone || s == kWithdrawn;
  }

  // Caller: withdraws a request the server has not taken (a future's
  // cancel()), waking the caller's other waiting threads. True if the
  // request is (now or already) withdrawn.
  bool withdraw() noexcept {
    uint32_t expected = kQueued;
    if (state_.compare_exchange_strong(expected, kWithdrawn, std::memory_order_acq_rel)) {
      done_.notify_all();
      return true;
    }
    return expected == kWithdrawn;
  }

  // Caller: leaves `watcher` for the side that ends the request.
  void set_watcher(void* watcher) noexcept { watcher_.store(watcher, std::memory_order_seq_cst); }

  // Either side: the watcher, once (null if none or already taken).
  void* take_watcher() noexcept { return watcher_.exchange(nullptr, std::memory_order_seq_cst); }

  // Caller: leaves after a timeout. Returns the state it left the request in
  // (kWithdrawn or kAbandoned), or kDone if the result won the race.
  State give_up() noexcept {
    uint32_t expected = kQueued;
    if (state_.compare_exchange_strong(expected, kWithdrawn, std::memory_order_acq_rel))
      return kWithdrawn;
    if (expected == kTaken &&
        state_.compare_exchange_strong(expected, kAbandoned, std::memory_order_acq_rel))
      return kAbandoned;
    return static_cast<State>(expected);  // kDone
  }

  // Caller: about to wait (see wake chains above). A second waiter of the
  // same request may find the word null already; it waits in the chain too.
  void enter_chain() noexcept {
    Completion* left = this;
    next_.compare_exchange_strong(left, nullptr, std::memory_order_acq_rel);
  }

  // Server: hands `next` (with its reference) to the waiting caller to
  // wake. False if no caller waits: the server wakes `next` itself.
  bool link_next(Completion* next) noexcept {
    Completion* waiting = nullptr;
    return next_.compare_exchange_strong(waiting, next, std::memory_order_acq_rel);
  }

  // Caller: done waiting. The completion it must wake (with its reference
  // to release), or null.
  Completion* leave_chain() noexcept {
    Completion* next = next_.exchange(this, std::memory_order_acq_rel);
    return next == this ? nullptr : next;
  }

  // Whether a caller waits in the chain (entered and not left; see above).
  bool in_chain() const noexcept { return next_.load(std::memory_order_acquire) != this; }

  // Single file: the caller before stamps when it took this completion's
  // wake-up to hold (monotonic ns; 0: not taken).
  void mark_held(int64_t now_ns) noexcept { held_since_.store(now_ns, std::memory_order_release); }
  int64_t held_since() const noexcept { return held_since_.load(std::memory_order_acquire); }

  // Valid after state() == kDone was observed by the caller.
  void* outcome() const noexcept { return outcome_; }
  bool is_error() const noexcept { return is_error_; }

  // Takes one more reference (a single-file server's).
  void retain() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }

  // Drops one reference; deletes the completion with the last one.
  void release() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

 private:
  ~Completion() = default;

  std::atomic<uint32_t> state_{kQueued};
  std::atomic<uint32_t> refs_{2};
  void* outcome_ = nullptr;
  bool is_error_ = false;
  std::atomic<void*> watcher_{nullptr};
  std::atomic<Completion*> next_{this};  // the wake chain's link (see above)
  std::atomic<int64_t> held_since_{0};   // single file (see above)
  EventCount done_;
};

// Wakes the caller waiting on `c` and drops the reference the waker held.
inline void notify_and_release(Completion* c) noexcept {
  c->notify();
  c->release();
}

}  // namespace batchserve
