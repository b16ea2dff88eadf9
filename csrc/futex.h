// Thin wrappers over the Linux futex syscall.
//
// Waits take an absolute CLOCK_MONOTONIC deadline (FUTEX_WAIT_BITSET), so a
// wait that is interrupted and retried never extends its own timeout.
// Deadlines are nanoseconds on the same clock as std::chrono::steady_clock
// (and Python's time.monotonic_ns).
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>

namespace batchserve {

// A deadline that never expires.
constexpr int64_t kNoDeadline = INT64_MAX;

inline int64_t monotonic_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Deadline `timeout_s` seconds from now; a negative timeout means "never".
inline int64_t deadline_after(double timeout_s) noexcept {
  if (timeout_s < 0) return kNoDeadline;
  const double ns = timeout_s * 1e9;
  const int64_t now = monotonic_ns();
  if (ns >= static_cast<double>(kNoDeadline - now)) return kNoDeadline;
  return now + static_cast<int64_t>(ns);
}

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t),
              "futex words must be plain 32-bit integers");

// Sleeps while *word == expected, until woken or `deadline_ns` passes.
// Spurious returns are allowed: callers re-check their condition.
inline void futex_wait_until(std::atomic<uint32_t>* word, uint32_t expected,
                             int64_t deadline_ns) noexcept {
  timespec abs{};
  timespec* abs_ptr = nullptr;
  if (deadline_ns != kNoDeadline) {
    abs.tv_sec = static_cast<time_t>(deadline_ns / 1000000000);
    abs.tv_nsec = static_cast<long>(deadline_ns % 1000000000);
    abs_ptr = &abs;
  }
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word),
          FUTEX_WAIT_BITSET_PRIVATE, expected, abs_ptr, nullptr,
          FUTEX_BITSET_MATCH_ANY);
}

inline void futex_wake_all(std::atomic<uint32_t>* word) noexcept {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE,
          INT_MAX, nullptr, nullptr, 0);
}

}  // namespace batchserve
