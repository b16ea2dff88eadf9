// Helpers shared by the C++ tests: time bounds, request builders, a thread
// for a call that blocks, and waits that do not depend on the code under test.
//
// Waits spin briefly (so two threads on idle cores still meet within
// microseconds, which is what the race tests want), then block or back off
// with short sleeps instead of sched_yield(): on an oversubscribed CI machine
// yield hands the core to unrelated busy processes for a whole time slice.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/completion.h"
#include "core/futex.h"    // monotonic_ns
#include "core/parking.h"  // cpu_relax
#include "core/request_queue.h"

namespace batchserve_test {

using batchserve::Completion;
using batchserve::monotonic_ns;
using batchserve::PushResult;
using batchserve::Request;
using batchserve::RequestQueue;

constexpr int64_t kMs = 1'000'000;
constexpr int64_t kSec = 1'000'000'000;
// Generous bounds for "was woken, did not time out" and "returned at once":
// a wait that should end at once must not take anywhere near this long, even
// on a loaded machine under a sanitizer.
constexpr int64_t kLongWait = 20 * kSec;
constexpr int64_t kPromptly = 5 * kSec;

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

// Only to create a "nobody comes" window (or give a thread the chance to get
// into a wait); never what a test's correctness depends on.
inline void pause_briefly() { std::this_thread::sleep_for(std::chrono::milliseconds(20)); }

// A counter that only grows; threads wait for it to reach a value. Built on
// std::mutex/std::condition_variable, independent of csrc/core/.
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

// Runs `fn` once on a thread of its own, timing it. Read what `fn` wrote,
// and the times, only after join().
class BackgroundCall {
 public:
  template <typename Fn>
  explicit BackgroundCall(Fn fn)
      : thread_([this, fn = std::move(fn)]() mutable {
          started_ns_ = monotonic_ns();
          fn();
          returned_ns_ = monotonic_ns();
          returned_.store(true, std::memory_order_release);
        }) {}

  // Joins, so that a test ended early by a failed ASSERT reports its failure
  // instead of calling std::terminate (a call that never returns then runs
  // into ctest's timeout).
  ~BackgroundCall() {
    if (thread_.joinable()) thread_.join();
  }

  BackgroundCall(const BackgroundCall&) = delete;
  BackgroundCall& operator=(const BackgroundCall&) = delete;

  void join() { thread_.join(); }
  bool returned() const { return returned_.load(std::memory_order_acquire); }
  int64_t elapsed_ns() const { return returned_ns_ - started_ns_; }
  int64_t returned_at_ns() const { return returned_ns_; }

 private:
  int64_t started_ns_ = 0;
  int64_t returned_ns_ = 0;
  std::atomic<bool> returned_{false};
  std::thread thread_;  // last: starts once the fields above exist
};

// Passes for a wait that ran to its `timeout`: no sooner (it was not woken
// early), and well within kLongWait (it did not oversleep or hang).
inline ::testing::AssertionResult ran_to_timeout(int64_t elapsed_ns, int64_t timeout_ns) {
  if (elapsed_ns >= timeout_ns && elapsed_ns < kLongWait) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "took " << elapsed_ns << " ns, expected at least "
                                       << timeout_ns << " and less than " << kLongWait;
}

// Passes if `wait(deadline)`, given a deadline `timeout_ns` from now, returns
// false (nothing woke it) after running to that deadline.
template <typename Wait>
::testing::AssertionResult times_out(int64_t timeout_ns, Wait&& wait) {
  const int64_t t0 = monotonic_ns();
  const bool woken = wait(t0 + timeout_ns);
  const int64_t elapsed_ns = monotonic_ns() - t0;
  if (woken)
    return ::testing::AssertionFailure() << "the wait returned true after " << elapsed_ns << " ns";
  return ran_to_timeout(elapsed_ns, timeout_ns);
}

// ---------------------------------------------------------------- processes

// A shared-memory name of this process's own ("/bs-cpptest-<pid>-<n>"), so
// parallel ctest runs never meet.
inline std::string unique_name() {
  static std::atomic<int> counter{0};
  return "/bs-cpptest-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

// Forks a child that runs `body`, then waits to be killed (or `body` calls
// _exit itself). Fork while no other thread of the test runs, or keep `body`
// to async-signal-safe work.
template <typename Body>
pid_t fork_child(Body&& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    body();
    for (;;) ::pause();
  }
  return pid;
}

// ---------------------------------------------------------------- requests

// A request whose payload pointer carries `id`.
inline Request make_request(uint64_t id, Completion* completion = nullptr) {
  Request r;
  r.payload = reinterpret_cast<void*>(static_cast<uintptr_t>(id));
  r.completion = completion;
  r.submit_ns = monotonic_ns();
  return r;
}

inline uint64_t id_of(const Request& r) {
  return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(r.payload));
}

inline std::vector<uint64_t> ids(const std::vector<Request>& requests) {
  std::vector<uint64_t> out;
  for (const Request& r : requests) out.push_back(id_of(r));
  return out;
}

// Pushes requests 0 .. count - 1 without blocking; for ASSERT_TRUE.
inline ::testing::AssertionResult push_ids(RequestQueue& q, uint64_t count) {
  for (uint64_t id = 0; id < count; ++id) {
    if (q.push(make_request(id), 0) != PushResult::kOk)
      return ::testing::AssertionFailure() << "push of request " << id;
  }
  return ::testing::AssertionSuccess();
}

// Pops until the queue is empty; the ids in the order they came out.
inline std::vector<uint64_t> drain_ids(RequestQueue& q) {
  std::vector<uint64_t> out;
  Request r;
  while (q.try_pop(r)) out.push_back(id_of(r));
  return out;
}

// Ids that name their producer and its sequence number, so a consumer can
// check each producer's order.
constexpr uint64_t tagged_id(uint32_t producer, uint32_t seq) {
  return (uint64_t{producer} << 32) | seq;
}
constexpr uint32_t producer_of(uint64_t id) { return static_cast<uint32_t>(id >> 32); }
constexpr uint32_t seq_of(uint64_t id) { return static_cast<uint32_t>(id & 0xffffffffu); }

// Interrupts `q` until `waiter` returns: only an interrupt issued after the
// waiter started waiting counts, and that moment is not observable.
inline void interrupt_until_returned(RequestQueue& q, const BackgroundCall& waiter) {
  while (!waiter.returned()) {
    q.interrupt();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// Drops both references of a completion (the caller's and the request's),
// as the two sides do when neither hands it on.
inline void release_both(Completion* c) {
  c->release();
  c->release();
}

}  // namespace batchserve_test
