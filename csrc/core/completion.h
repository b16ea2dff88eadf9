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
//
// Every transition is a CAS, so the caller's timeout and the server's result
// can race safely: whichever CAS wins decides. The result pointer is written
// before the release CAS into kDone and read after an acquire load of kDone.
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
  };

  // Created with two references: the caller's and the request's.
  Completion() = default;
  Completion(const Completion&) = delete;
  Completion& operator=(const Completion&) = delete;

  State state() const noexcept {
    return static_cast<State>(state_.load(std::memory_order_acquire));
  }

  // Server: claims a queued request for a batch. False if it was withdrawn.
  bool take() noexcept {
    uint32_t expected = kQueued;
    return state_.compare_exchange_strong(expected, kTaken, std::memory_order_acq_rel);
  }

  // Server: publishes the outcome (an opaque pointer owned by the bindings).
  // False when the caller already gave up: the outcome was not stored and
  // still belongs to the server. Does not wake the caller; call notify().
  bool finish(void* outcome, bool is_error) noexcept {
    outcome_ = outcome;
    is_error_ = is_error;
    uint32_t expected = state_.load(std::memory_order_relaxed);
    while (expected == kQueued || expected == kTaken) {
      if (state_.compare_exchange_weak(expected, kDone, std::memory_order_acq_rel)) return true;
    }
    outcome_ = nullptr;
    return false;
  }

  void notify() noexcept { done_.notify_all(); }

  // Caller: waits until kDone or the deadline. Returns true when done.
  bool wait_until(int64_t deadline_ns, int spin_iterations) noexcept {
    return spin_then_park(done_, [this] { return state() == kDone; }, deadline_ns, spin_iterations);
  }

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

  // Valid after state() == kDone was observed by the caller.
  void* outcome() const noexcept { return outcome_; }
  bool is_error() const noexcept { return is_error_; }

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
  EventCount done_;
};

}  // namespace batchserve
