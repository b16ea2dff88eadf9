// SpinBudget: how long the server spins for its next request before it
// sleeps on the futex, learned from the gaps it measured.
//
// A gap is the time from the server starting to wait on an empty queue to
// the submission of the request that ended the wait (the request's own
// submit_ns, so a gap measured while the server slept is not lengthened by
// its wake-up). Spinning pays when the next request comes within the spin:
// the futex wake-up it saves costs tens of microseconds on a VM. It costs a
// core for the whole spin, and a spin that runs out costs both.
//
// The rule, after each batch:
//   - No spin when the callers the server expects back (the FillEstimator's
//     active set) and the server itself outnumber the cores: a spinning
//     server would take a core a runnable caller needs (with 8 actor
//     threads on 2 cores, spinning 50 µs served them ~15-25% slower).
//   - Else, spin for the upper quartile of the last kWindow gaps, plus a
//     quarter for margin, when that fits in kMaxSpinNs: most next requests
//     then arrive during the spin. Gaps mostly longer than that (callers
//     that take their time: an environment step, a pause) mean no spin.
//   - No spin until kMinSamples gaps were measured.
//
// Threads: the owner serialises observe() and budget_ns() (the collector's
// adapt_server_spin).
#pragma once

#include <sched.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <thread>

namespace batchserve {

// The cores this process may run on (its CPU affinity, which a container's
// cpuset narrows; all online cores where that is unknown), at least 1.
inline size_t usable_cores() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    return static_cast<size_t>(std::max(CPU_COUNT(&set), 1));
#endif
  return std::max<size_t>(std::thread::hardware_concurrency(), 1);
}

class SpinBudget {
 public:
  // Past this a sleep and a wake-up (~20-50 µs on a VM) cost less than the
  // spin would, and the core is better left to the callers.
  static constexpr int64_t kMaxSpinNs = 100'000;
  // Gaps remembered (the most recent ones).
  static constexpr size_t kWindow = 16;
  // Gaps measured before any spin.
  static constexpr size_t kMinSamples = 4;

  // After a batch the server waited for on an empty queue: the gap.
  void observe(int64_t gap_ns) {
    gaps_[next_] = std::max<int64_t>(gap_ns, 0);
    next_ = (next_ + 1) % kWindow;
    count_ = std::min(count_ + 1, kWindow);
  }

  size_t samples() const { return count_; }

  // The spin for the next wait: `active_callers` are expected back, the
  // machine has `cores` cores.
  int64_t budget_ns(size_t active_callers, size_t cores) const {
    if (count_ < kMinSamples || active_callers + 1 > cores) return 0;
    std::array<int64_t, kWindow> sorted{};
    std::copy_n(gaps_.begin(), count_, sorted.begin());
    const auto upper_quartile = sorted.begin() + static_cast<std::ptrdiff_t>((count_ * 3) / 4);
    std::nth_element(sorted.begin(), upper_quartile, sorted.begin() + count_);
    const int64_t spin = *upper_quartile + *upper_quartile / 4;
    return spin <= kMaxSpinNs ? spin : 0;
  }

 private:
  std::array<int64_t, kWindow> gaps_{};
  size_t next_ = 0;
  size_t count_ = 0;
};

}  // namespace batchserve
