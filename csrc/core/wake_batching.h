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
// Ownership: a Wake of a Completion holds the request's reference to it,
// dropped by notify_and_release after the notify (the caller may free it as
// soon as it has seen the result, so the reference keeps it alive across
// the notify).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "completion.h"
#include "shared_slots.h"

namespace batchserve {

// A caller to wake: a blocking in-process caller (completion), or the client
// process waiting on slot `slot` of `slots`. Exactly one of the two is set.
struct Wake {
  Completion* completion = nullptr;
  SharedSlots* slots = nullptr;
  uint32_t slot = 0;
};

// Wakes every caller of `to_wake` and drops the completions' references;
// leaves `to_wake` empty. No lock or GIL is needed.
inline void notify_and_release(std::vector<Wake>& to_wake) noexcept {
  for (const Wake& w : to_wake) {
    if (w.completion != nullptr) {
      w.completion->notify();
      w.completion->release();
    } else {
      w.slots->wake(w.slot);
    }
  }
  to_wake.clear();
}

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
