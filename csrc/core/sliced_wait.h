// The sliced wait: every blocking call of the bindings waits in slices.
//
// A caller that blocks (for room in the queue, for a free slot, for its
// result) must come back to its own code every so often, holding the GIL:
// to run Python's signal handlers (Ctrl-C) and to look at the server's
// health (a shared-memory server that shut down or died). wait_in_slices is
// the one loop that does this: it runs `step(slice_end)` (the wait proper,
// which the bindings run with the GIL released) with slice_end at most
// kWaitSliceNs ahead and never past the deadline; after a slice that did not
// finish it asks `keep_waiting(expired)`, which may stop the wait (return
// false) or throw.
//
// Invariants: step() always runs at least once (a zero timeout still tries);
// no slice ends after the deadline; keep_waiting(true) is called once the
// deadline has passed, so a wait always returns to its caller by then.
#pragma once

#include <algorithm>
#include <cstdint>

#include "futex.h"

namespace batchserve {

// How long one slice lasts: the bound on how late a blocked caller sees
// Ctrl-C or a server that is gone.
constexpr int64_t kWaitSliceNs = 100'000'000;
static_assert(kWaitSliceNs > 0 && kWaitSliceNs < kNoDeadline / 2,
              "a slice is a positive duration far from the no-deadline sentinel");

// The end of the slice that starts now: kWaitSliceNs ahead, or the deadline.
inline int64_t slice_end(int64_t deadline_ns) noexcept {
  return std::min(deadline_ns, add_saturating(monotonic_ns(), kWaitSliceNs));
}

// Runs step(slice_end) until it returns true (done: returns true), or
// keep_waiting(expired) returns false (returns false). `expired`: the
// deadline has passed.
template <typename Step, typename KeepWaiting>
bool wait_in_slices(int64_t deadline_ns, Step&& step, KeepWaiting&& keep_waiting) {
  for (;;) {
    if (step(slice_end(deadline_ns))) return true;
    if (!keep_waiting(monotonic_ns() >= deadline_ns)) return false;
  }
}

}  // namespace batchserve
