// How long one thread takes to hand a turn to another and see it come back:
// the floor of every hand-off between a caller and a server thread on this
// machine (docs/benchmarks.md, "The hand-off limit").
//
// Built with the C++ tests (tests/cpp/CMakeLists.txt), or alone:
//
//   g++ -O2 -std=c++17 -pthread -I csrc benchmarks/wake_pingpong.cpp -o /tmp/wake_pingpong
//   /tmp/wake_pingpong                   # across cores: futex, then spinning
//   taskset -c 0 /tmp/wake_pingpong      # both threads on one core (futex only)
//
// Two threads pass a turn word back and forth 20 000 times each. "futex":
// the thread whose turn it is not sleeps on the word (csrc/core/futex.h) and
// is woken by the other; "spin": it re-reads the word. Prints µs per hand-off.
//
// Then the waker's side alone ("wake"): how long a FUTEX_WAKE of a thread
// asleep on the word takes to return, the median of 5 000 (each after a
// 200 µs pause, so that the sleeper is asleep), on a private word and on a
// process-shared one (as a SharedMemoryTransport's slots use): what a server
// thread pays for each caller it wakes, before any preemption by the woken.
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "core/futex.h"

namespace {

constexpr int kRounds = 20000;

double hand_off_us(bool spin) {
  std::atomic<uint32_t> turn{0};
  auto player = [&](uint32_t me) {
    for (int i = 0; i < kRounds; ++i) {
      for (uint32_t seen = turn.load(); seen != me; seen = turn.load())
        if (!spin) batchserve::futex_wait_until(&turn, seen, batchserve::kNoDeadline);
      turn.store(1 - me);
      if (!spin) batchserve::futex_wake_all(&turn);
    }
  };
  const auto start = std::chrono::steady_clock::now();
  std::thread a(player, 0), b(player, 1);
  a.join();
  b.join();
  const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - start;
  return took.count() / (2.0 * kRounds);
}

double wake_us(bool process_shared) {
  constexpr uint32_t kWakes = 5000;
  std::atomic<uint32_t> word{0}, woken{0};
  std::thread sleeper([&] {
    for (uint32_t i = 1; i <= kWakes; ++i) {
      for (uint32_t seen = word.load(); seen != i; seen = word.load())
        batchserve::futex_wait_until(&word, seen, batchserve::kNoDeadline, process_shared);
      woken.store(i);
    }
  });
  std::vector<double> took;
  took.reserve(kWakes);
  for (uint32_t i = 1; i <= kWakes; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    word.store(i);
    const auto start = std::chrono::steady_clock::now();
    batchserve::futex_wake_all(&word, process_shared);
    took.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
            .count());
    while (woken.load() != i) {
    }
  }
  sleeper.join();
  std::nth_element(took.begin(), took.begin() + took.size() / 2, took.end());
  return took[took.size() / 2];
}

}  // namespace

int main() {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  const int cores = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 0;
  std::printf("futex: %.2f us per hand-off (%d cores allowed)\n", hand_off_us(false), cores);
  if (cores > 1) std::printf("spin:  %.2f us per hand-off\n", hand_off_us(true));
  std::printf("wake:  %.2f us per FUTEX_WAKE of a sleeper (private), %.2f us (process-shared)\n",
              wake_us(false), wake_us(true));
  return 0;
}
