// Parking: a short spin, then a futex sleep, with no lost wake-ups.
//
// EventCount lets a thread wait for a condition that other threads make true
// without a lock around the condition (Dekker-style, as in folly's
// EventCount). The waiter announces itself, re-checks the condition, and only
// then sleeps on the epoch it read; a notifier that changes the condition
// bumps the epoch whenever someone has announced itself, so the sleep either
// never starts or is woken:
//
//   waiter:   key = prepare_wait();          notifier:  make condition true;
//             if (condition) cancel_wait();              notify();
//             else wait(key, deadline);
//
// Invariant: a waiter that announced before a notify() sees either the
// condition (its re-check is ordered after the notifier's write by the two
// seq_cst fences) or an epoch different from its key (futex returns at once).
// notify() costs one fence and one load while nobody waits.
//
// An EventCount made with process_shared=true may live in memory mapped by
// several processes (csrc/core/shared_slots.h): it is three plain 32-bit words
// (zero-filled memory is a valid private one), and its futex calls then use
// the shared variant.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "futex.h"

namespace batchserve {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

class EventCount {
 public:
  explicit EventCount(bool process_shared = false) noexcept
      : process_shared_(process_shared ? 1 : 0) {}

  uint32_t prepare_wait() noexcept {
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return epoch_.load(std::memory_order_acquire);
  }

  void cancel_wait() noexcept { waiters_.fetch_sub(1, std::memory_order_seq_cst); }

  // Sleeps until a notify() after prepare_wait() or the deadline. Returns
  // false only when the deadline passed without a notification.
  bool wait(uint32_t key, int64_t deadline_ns) noexcept {
    bool notified = true;
    while (epoch_.load(std::memory_order_acquire) == key) {
      if (deadline_ns != kNoDeadline && monotonic_ns() >= deadline_ns) {
        notified = false;
        break;
      }
      futex_wait_until(&epoch_, key, deadline_ns, process_shared_ != 0);
    }
    waiters_.fetch_sub(1, std::memory_order_seq_cst);
    return notified;
  }

  // Wakes every thread that announced a wait before this call.
  void notify_all() noexcept {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (waiters_.load(std::memory_order_relaxed) == 0) return;
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&epoch_, process_shared_ != 0);
  }

  bool has_waiters() const noexcept { return waiters_.load(std::memory_order_relaxed) != 0; }

 private:
  std::atomic<uint32_t> epoch_{0};
  std::atomic<uint32_t> waiters_{0};
  uint32_t process_shared_;
};

// Sleeps on `event` until `ready()` holds or the deadline passes. Returns
// ready().
template <typename Ready>
bool park_until(EventCount& event, Ready&& ready, int64_t deadline_ns) {
  for (;;) {
    if (ready()) return true;
    const uint32_t key = event.prepare_wait();
    if (ready()) {
      event.cancel_wait();
      return true;
    }
    if (!event.wait(key, deadline_ns)) return ready();
  }
}

// Waits until `ready()` holds or the deadline passes: up to `spin_iterations`
// cheap re-checks first (a result that arrives within a few microseconds costs
// no syscall on either side), then sleeps on `event`. Returns ready().
template <typename Ready>
bool spin_then_park(EventCount& event, Ready&& ready, int64_t deadline_ns, int spin_iterations) {
  for (int i = 0; i < spin_iterations; ++i) {
    if (ready()) return true;
    cpu_relax();
  }
  return park_until(event, ready, deadline_ns);
}

// Like spin_then_park, with the spin bounded in time rather than iterations
// (the clock is read every few re-checks).
template <typename Ready>
bool spin_for_then_park(EventCount& event, Ready&& ready, int64_t deadline_ns, int64_t spin_ns) {
  if (spin_ns > 0) {
    const int64_t until = std::min(deadline_ns, add_saturating(monotonic_ns(), spin_ns));
    do {
      for (int i = 0; i < 32; ++i) {
        if (ready()) return true;
        cpu_relax();
      }
    } while (monotonic_ns() < until);
  }
  return park_until(event, ready, deadline_ns);
}

}  // namespace batchserve
