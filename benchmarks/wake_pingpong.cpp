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
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>

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

}  // namespace

int main() {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  const int cores = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 0;
  std::printf("futex: %.2f us per hand-off (%d cores allowed)\n", hand_off_us(false), cores);
  if (cores > 1) std::printf("spin:  %.2f us per hand-off\n", hand_off_us(true));
  return 0;
}
