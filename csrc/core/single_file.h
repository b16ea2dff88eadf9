// Single file: the thread actors of one process take turns between calls.
//
// A wake chain (wake_batching.h in-process, shared_slots.h across
// processes) wakes a batch's callers one after another: each, once it holds
// its GIL again, wakes the next. The next then queues for the GIL while the
// one before runs its loop, and each GIL-releasing call in that loop (torch
// releases it in every op) hands the GIL over: at 32 thread actors on the
// 2-core VM that convoy costs more than the serving does. Single file, a
// caller holds the wake-up it was handed until its next call lets the GIL go
// (or its thread ends), so one caller thread runs its loop between calls at
// a time.
//
// The cost: a caller that sleeps or waits with the GIL released between
// calls holds up the next. So the server keeps the wake-ups it handed on and
// wakes a caller itself when the one before has held its wake-up
// kHeldWakeLimitNs, or, while no caller has taken it yet,
// kHandedWakeDeadlineNs per place in its chain after the hand-back. A caller
// woken twice (by the server, then by the holder) only finds its result
// read: waking is idempotent, and each side drops only its own reference.
//
// This file: the limits, and the in-process side (HeldWake for the caller
// threads, HandedWakes for the server). The shared-memory slots keep theirs
// in the segment (slot_client.h's HeldSlotWake, slot_wake_chains.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "completion.h"
#include "futex.h"

namespace batchserve {

// How long a caller may hold the wake-up it took before the server wakes
// the next caller itself. Several times a thread actor's loop between two
// calls at 32 threads on the 2-core VM (in-process: 86% of holds under 16
// µs for the MLP, 97% of the policy's under 128 µs): a chain woken early
// brings back the GIL contention it avoids, and that feeds itself
// (measured with the policy workload over shared memory: 150 µs let it
// collapse to 5.7 k req/s in one run of three, 300 µs cost a quarter, 500
// µs held 14-21 k over five). A caller that sleeps or waits between calls
// with the GIL released delays the next by up to this.
constexpr int64_t kHeldWakeLimitNs = 500'000;
// The bound on a caller whose wake-up no caller has taken yet (the callers
// before it in its chain are still waking, each within the limit above):
// the k-th caller after a chain's first falls due k times this after the
// hand-back.
constexpr int64_t kHandedWakeDeadlineNs = 2 * kHeldWakeLimitNs;

// When a handed wake-up falls due: at its place's deadline `place_due_ns`,
// or kHeldWakeLimitNs after the caller before took it (`held_since_ns`, 0:
// not taken yet), whichever comes first. Both servers' rule (HandedWakes
// below, slot_wake_chains.h).
inline int64_t handed_wake_due(int64_t place_due_ns, int64_t held_since_ns) {
  return held_since_ns != 0
             ? std::min(place_due_ns, add_saturating(held_since_ns, kHeldWakeLimitNs))
             : place_due_ns;
}

// When a server must look again at a handed wake-up due at `due_ns` (not
// yet, at `now_ns`): then, or, while no caller has taken it, a limit from
// now if sooner (it may be taken any moment, and then falls due a limit
// after that).
inline int64_t handed_wake_next_look(int64_t due_ns, int64_t held_since_ns, int64_t now_ns) {
  return held_since_ns != 0 ? due_ns : std::min(due_ns, add_saturating(now_ns, kHeldWakeLimitNs));
}

// An in-process caller thread's held wake-up: the completion of the caller
// after it in its chain (with the reference its link carried), woken at
// the thread's next GIL-free stretch of a call (pass(): the bindings call it
// at the start of each) or when the thread ends.
class HeldWake {
 public:
  // Holds `next`, after passing on the one held before.
  static void hold(Completion* next) {
    next->mark_held(monotonic_ns());
    Held& h = held();
    h.pass();
    h.completion = next;
  }

  // Wakes the held completion, if any. No GIL needed.
  static void pass() { held().pass(); }

 private:
  struct Held {
    Completion* completion = nullptr;
    void pass() {
      if (completion == nullptr) return;
      Completion* next = completion;
      completion = nullptr;
      notify_and_release(next);
    }
    ~Held() { pass(); }  // the thread ends
  };
  static Held& held() {
    thread_local Held h;
    return h;
  }
};

// A single-file server's wake-ups handed on to in-process callers: each
// completion it linked into a chain behind another (a reference of its own
// kept, retain()), woken by wake_overdue() when it falls due (see the top of
// this file) and its caller still waits. Any server thread may use it.
class HandedWakes {
 public:
  HandedWakes() = default;
  HandedWakes(const HandedWakes&) = delete;
  HandedWakes& operator=(const HandedWakes&) = delete;
  ~HandedWakes() {
    for (const Handed& h : handed_) h.completion->release();
  }

  // Before `c` is linked (linking may let it be freed): keeps it, due
  // `place` (its place after the chain's first, 1-based) deadlines after
  // `now_ns`.
  void hand_over(Completion* c, size_t place, int64_t now_ns) {
    c->retain();
    const int64_t due = add_saturating(now_ns, static_cast<int64_t>(place) * kHandedWakeDeadlineNs);
    std::lock_guard<std::mutex> lock(mutex_);
    handed_.push_back(Handed{c, due});
  }

  // Wakes the kept callers that are due and still wait; forgets those and
  // the ones that left. Returns when the next may fall due (kNoDeadline:
  // none kept): a wake-up not taken yet may be taken any moment, and then
  // falls due a limit later, so it is looked at again by then.
  int64_t wake_overdue(int64_t now_ns) {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t next_due = kNoDeadline;
    size_t kept = 0;
    for (const Handed& h : handed_) {
      Completion* c = h.completion;
      if (!c->in_chain()) {  // its caller has left: nothing to wake
        c->release();
        continue;
      }
      const int64_t held = c->held_since();
      const int64_t due = handed_wake_due(h.due_ns, held);
      if (due <= now_ns) {
        notify_and_release(c);
        continue;
      }
      next_due = std::min(next_due, handed_wake_next_look(due, held, now_ns));
      handed_[kept++] = h;
    }
    handed_.resize(kept);
    return next_due;
  }

  size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return handed_.size();
  }

 private:
  struct Handed {
    Completion* completion;
    int64_t due_ns;
  };
  mutable std::mutex mutex_;
  std::vector<Handed> handed_;
};

}  // namespace batchserve
