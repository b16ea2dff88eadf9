// Helpers shared by the C++ tests: waiting for another thread without
// depending on the code under test, and staying fast on a loaded machine.
//
// Waits spin briefly (so two threads on idle cores still meet within
// microseconds, which is what the race tests want), then block or back off
// with short sleeps instead of sched_yield(): on an oversubscribed CI machine
// yield hands the core to unrelated busy processes for a whole time slice.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "parking.h"  // cpu_relax

namespace batchserve_test {

constexpr int kSpinChecks = 2000;

// Polls `pred` until it holds: a short spin, then sleeps of 50 us. For
// conditions nobody signals (a queue's size, a waiter count).
template <typename Pred>
void poll_until(Pred&& pred) {
  for (int i = 0; i < kSpinChecks; ++i) {
    if (pred()) return;
    batchserve::cpu_relax();
  }
  while (!pred()) std::this_thread::sleep_for(std::chrono::microseconds(50));
}

// A counter that only grows; threads wait for it to reach a value. Built on
// std::mutex/std::condition_variable, independent of csrc/.
class Progress {
 public:
  void advance_to(uint64_t value) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      value_.store(value, std::memory_order_release);
    }
    cv_.notify_all();
  }

  uint64_t get() const { return value_.load(std::memory_order_acquire); }

  void wait_for(uint64_t value) {
    for (int i = 0; i < kSpinChecks; ++i) {
      if (get() >= value) return;
      batchserve::cpu_relax();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return get() >= value; });
  }

 private:
  std::atomic<uint64_t> value_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
};

}  // namespace batchserve_test
