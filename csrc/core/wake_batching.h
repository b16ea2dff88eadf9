// Wake batching: callers whose results are published are woken in one go,
// after the server has let the GIL go.
//
// A caller woken while the server still holds the GIL would at once block
// on the GIL and need a second, much slower wake-up (CPython's GIL hand-off)
// to go on. So settling a request only records whom to wake (a Wake); the
// bindings wake them (notify_and_release) once they have released the GIL.
// Blocking in-process callers may be deferred further, to the server's next
// collect (DeferredWakes), which releases the GIL anyway; clients of
// shared-memory slots (other processes, not contending for our GIL) are
// woken as soon as the GIL is let go.
//
// Callers waiting in C++ are woken as a chain: the server wakes the first
// of a batch, and each, once it holds the GIL again, wakes the next
// (WakeChainTurn; the link protocol is in completion.h). Woken at once, a
// batch's callers would all block on the GIL together, and CPython hands
// it from one to the next through a contended mutex and condition: on the
// 2-core VM that cost ~5 context switches and ~40 µs of kernel time per
// request at 32 threads. Chained, a caller is woken while the one before
// it runs, and waits for the GIL behind it alone (~1.2 switches and
// ~10 µs); the order they get the GIL in is the batch's either way.
// Clients of shared-memory slots are chained the same way, one chain per
// client process (SharedSlots::wake_chained; the protocol is in
// shared_slots.h): a process's thread actors share its GIL just the same.
// Single file (single_file.h), a caller passes the wake-up on at its next
// call instead, and the server keeps what it handed on (HandedWakes).
//
// Ownership: a Wake of a Completion holds the request's reference to it,
// dropped by whoever notifies it (the caller may free it as soon as it has
// seen the result, so the reference keeps it alive across the notify). A
// link holds the reference of the completion it points to.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "completion.h"
#include "shared_slots.h"
#include "single_file.h"

namespace batchserve {

// A caller to wake: a blocking in-process caller (completion), or the client
// waiting on slot `waiter.slot` of `slots` (another process). Exactly one of
// `completion` and `slots` is set.
struct Wake {
  Completion* completion = nullptr;
  SharedSlots* slots = nullptr;
  SlotWaiter waiter = {};
};

// Wakes the slot clients of `to_wake`, in order, as each segment's
// chains (SharedSlots::wake_chained).
inline void wake_slot_clients(const std::vector<Wake>& to_wake) {
  std::vector<SharedSlots*> segments;  // in practice one: the server's
  for (const Wake& w : to_wake)
    if (w.slots != nullptr &&
        std::find(segments.begin(), segments.end(), w.slots) == segments.end())
      segments.push_back(w.slots);
  std::vector<SlotWaiter> waiters;
  for (SharedSlots* segment : segments) {
    waiters.clear();
    for (const Wake& w : to_wake)
      if (w.slots == segment) waiters.push_back(w.waiter);
    segment->wake_chained(waiters.data(), waiters.size());
  }
}

// Wakes every caller of `to_wake` (the completions' as a chain, in order;
// the slots' as wake_slot_clients does) and drops the completions'
// references; leaves `to_wake` empty. No lock or GIL is needed. Single file,
// `handed` keeps every completion linked behind another, to wake it itself
// if it is not woken in time (single_file.h).
inline void notify_and_release(std::vector<Wake>& to_wake, HandedWakes* handed = nullptr) {
  wake_slot_clients(to_wake);  // other processes' clients first
  size_t place = 0;            // the chain's places, counted from the back
  if (handed != nullptr)
    for (const Wake& w : to_wake) place += w.completion != nullptr;
  const int64_t now = handed != nullptr ? monotonic_ns() : 0;
  // Linked from the back: a completion is touched only before it is linked
  // (after that, the caller before it may wake it, and it may be freed).
  Completion* after = nullptr;  // the chain linked so far
  for (auto w = to_wake.rbegin(); w != to_wake.rend(); ++w) {
    if (w->completion == nullptr) continue;
    if (handed != nullptr && --place > 0) handed->hand_over(w->completion, place, now);
    if (after != nullptr && !w->completion->link_next(after)) notify_and_release(after);
    after = w->completion;
  }
  if (after != nullptr) notify_and_release(after);
  to_wake.clear();
}

// A caller's turn in its batch's wake chain while it waits on `c`: entered
// on construction, left on destruction (with the GIL held: see above),
// passing on the wake-up of the caller after it: at once, or, single file,
// at this thread's next call (HeldWake). The completion must outlive it.
class WakeChainTurn {
 public:
  explicit WakeChainTurn(Completion* c, bool single_file = false) noexcept
      : c_(c), single_file_(single_file) {
    c_->enter_chain();
  }
  ~WakeChainTurn() {
    Completion* next = c_->leave_chain();
    if (next == nullptr) return;
    if (single_file_) {
      HeldWake::hold(next);
    } else {
      notify_and_release(next);
    }
  }
  WakeChainTurn(const WakeChainTurn&) = delete;
  WakeChainTurn& operator=(const WakeChainTurn&) = delete;

 private:
  Completion* c_;
  bool single_file_;
};

// Moves the completions' wake-ups of `to_wake` onto `deferred` (woken
// later) and leaves the slots' in `to_wake` (woken now).
inline void defer_completions(std::vector<Wake>& to_wake, std::vector<Wake>& deferred) {
  size_t now = 0;
  for (const Wake& w : to_wake) {
    if (w.completion != nullptr) {
      deferred.push_back(w);
    } else {
      to_wake[now++] = w;
    }
  }
  to_wake.resize(now);
}

// Callers whose results are published but who are not woken yet; the server
// wakes them when it next lets the GIL go. The owner serialises every use
// (the bindings: with the GIL held).
class DeferredWakes {
 public:
  void defer(std::vector<Wake>& to_wake) { defer_completions(to_wake, pending_); }

  // Hands the pending wake-ups over (to be woken by the caller).
  std::vector<Wake> take() {
    std::vector<Wake> out;
    out.swap(pending_);
    return out;
  }

  bool empty() const { return pending_.empty(); }

 private:
  std::vector<Wake> pending_;
};

}  // namespace batchserve
