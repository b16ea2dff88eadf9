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

// Seconds as nanoseconds, saturating: NaN and negative durations give 0,
// durations past the int64 range give kNoDeadline.
inline int64_t seconds_to_ns(double seconds) noexcept {
  if (!(seconds > 0)) return 0;
  const double ns = seconds * 1e9;
  if (ns >= static_cast<double>(kNoDeadline)) return kNoDeadline;
  return static_cast<int64_t>(ns);
}

// start + duration without signed overflow, saturating at kNoDeadline: a
// duration as large as kNoDeadline means "no deadline".
inline int64_t add_saturating(int64_t start_ns, int64_t duration_ns) noexcept {
  int64_t deadline;
  if (__builtin_add_overflow(start_ns, duration_ns, &deadline))
    return duration_ns > 0 ? kNoDeadline : INT64_MIN;
  return deadline;
}

// The deadline `timeout_s` seconds from now (see seconds_to_ns).
inline int64_t deadline_after(double timeout_s) noexcept {
  return add_saturating(monotonic_ns(), seconds_to_ns(timeout_s));
}

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t),
              "futex words must be plain 32-bit integers");

// Sleeps while *word == expected, until woken or `deadline_ns` passes.
// Spurious returns are allowed: callers re-check their condition.
// `process_shared`: the word lies in memory shared between processes (the
// kernel then keys the wait by the page, not by this process's address).
// Every waiter and waker of one word must agree on it.
inline void futex_wait_until(std::atomic<uint32_t>* word, uint32_t expected, int64_t deadline_ns,
                             bool process_shared = false) noexcept {
  timespec abs{};
  timespec* abs_ptr = nullptr;
  if (deadline_ns != kNoDeadline) {
    abs.tv_sec = static_cast<time_t>(deadline_ns / 1000000000);
    abs.tv_nsec = static_cast<long>(deadline_ns % 1000000000);
    abs_ptr = &abs;
  }
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word),
          process_shared ? FUTEX_WAIT_BITSET : FUTEX_WAIT_BITSET_PRIVATE, expected, abs_ptr,
          nullptr, FUTEX_BITSET_MATCH_ANY);
}

inline void futex_wake_all(std::atomic<uint32_t>* word, bool process_shared = false) noexcept {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word),
          process_shared ? FUTEX_WAKE : FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace batchserve
