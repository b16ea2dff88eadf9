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
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>

namespace batchserve {

// The cores a CPU quota of `quota` per `period` microseconds amounts to,
// rounded up (0: no quota). The cgroup files' formats: v2 `cpu.max` holds
// "max 100000" or "200000 100000"; v1 `cpu.cfs_quota_us` holds -1 or the
// quota, `cpu.cfs_period_us` the period.
inline size_t quota_cores(int64_t quota, int64_t period) {
  if (quota <= 0 || period <= 0) return 0;
  return static_cast<size_t>((quota + period - 1) / period);
}

namespace detail {

// The first two numbers of file `path` (a missing one, or "max": -1).
inline std::pair<int64_t, int64_t> read_two_numbers(const char* path) {
  std::pair<int64_t, int64_t> out{-1, -1};
  if (FILE* f = std::fopen(path, "r")) {
    char first[32] = {0};
    long long second = -1;
    if (std::fscanf(f, "%31s %lld", first, &second) >= 1) {
      char* end = nullptr;
      const long long value = std::strtoll(first, &end, 10);
      if (end != first && *end == '\0') out.first = value;
      out.second = second;
    }
    std::fclose(f);
  }
  return out;
}

// The cores this process's cgroup CPU quota allows (0: none set or known).
inline size_t cgroup_quota_cores() {
  const auto v2 = read_two_numbers("/sys/fs/cgroup/cpu.max");
  if (v2.first > 0) return quota_cores(v2.first, v2.second);
  const auto quota = read_two_numbers("/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
  const auto period = read_two_numbers("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
  return quota_cores(quota.first, period.first);
}

}  // namespace detail

// The cores this process may run on: its CPU affinity (a container's cpuset
// narrows it; all online cores where it is unknown), at most what its
// cgroup's CPU quota allows (`docker --cpus`, a Kubernetes limit), at
// least 1.
inline size_t usable_cores() {
  size_t n = std::max<size_t>(std::thread::hardware_concurrency(), 1);
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    n = static_cast<size_t>(std::max(CPU_COUNT(&set), 1));
  const size_t quota = detail::cgroup_quota_cores();
  if (quota > 0) n = std::min(n, quota);
#endif
  return n;
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
