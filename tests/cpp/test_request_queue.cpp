// RequestQueue: push/pop, full ring, timeouts, close/reopen, interrupt.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "core/request_queue.h"
#include "test_util.h"

namespace {

using namespace batchserve_test;
using batchserve::kNoDeadline;

TEST(RequestQueue, CapacityRoundsUp) {
  RequestQueue q(5);
  EXPECT_EQ(q.capacity(), 8u);
  EXPECT_EQ(q.size(), 0u);
  EXPECT_FALSE(q.closed());
}

TEST(RequestQueue, PushPopFifo) {
  RequestQueue q(8);
  ASSERT_TRUE(push_ids(q, 5));
  EXPECT_EQ(q.size(), 5u);

  Request r;
  ASSERT_TRUE(q.try_pop(r));
  EXPECT_EQ(id_of(r), 0u);

  std::vector<Request> out;
  EXPECT_EQ(q.pop_many(out, 2), 2u);
  EXPECT_EQ(ids(out), (std::vector<uint64_t>{1, 2}));

  EXPECT_EQ(q.pop_many(out, 100), 2u);  // only what is there; appends
  EXPECT_EQ(ids(out), (std::vector<uint64_t>{1, 2, 3, 4}));

  EXPECT_FALSE(q.try_pop(r));
  EXPECT_EQ(q.pop_many(out, 10), 0u);
  EXPECT_EQ(q.size(), 0u);
}

TEST(RequestQueue, RequestFieldsSurvive) {
  RequestQueue q(2);
  int payload = 0;
  Request in;
  in.payload = &payload;
  in.completion = nullptr;
  in.submit_ns = 123456789;
  ASSERT_EQ(q.push(in, 0), PushResult::kOk);
  Request out;
  ASSERT_TRUE(q.try_pop(out));
  EXPECT_EQ(out.payload, &payload);
  EXPECT_EQ(out.completion, nullptr);
  EXPECT_EQ(out.submit_ns, 123456789);
}

TEST(RequestQueue, FullRingWithZeroDeadlineTimesOut) {
  RequestQueue q(4);
  ASSERT_TRUE(push_ids(q, 4));
  EXPECT_EQ(q.push(make_request(99), 0), PushResult::kTimedOut);
  EXPECT_EQ(q.size(), 4u);
  // The rejected request never landed.
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{0, 1, 2, 3}));
}

TEST(RequestQueue, FullRingWithPastDeadlineTimesOutPromptly) {
  RequestQueue q(2);
  ASSERT_TRUE(push_ids(q, 2));
  const int64_t t0 = monotonic_ns();
  EXPECT_EQ(q.push(make_request(2), t0 - 1), PushResult::kTimedOut);
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_EQ(q.size(), 2u);
}

TEST(RequestQueue, BlockedProducerTimesOut) {
  RequestQueue q(2);
  ASSERT_TRUE(push_ids(q, 2));
  constexpr int64_t kTimeout = 50 * kMs;
  const int64_t t0 = monotonic_ns();
  EXPECT_EQ(q.push(make_request(2), t0 + kTimeout), PushResult::kTimedOut);
  EXPECT_TRUE(ran_to_timeout(monotonic_ns() - t0, kTimeout));
  EXPECT_EQ(q.size(), 2u);
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{0, 1}));
}

// Each slice of a caller blocked on a full ring (the bindings push in
// slices to see Ctrl-C) ends at its own deadline: back to back, every one
// returns kTimedOut, never later than its deadline by a hang.
TEST(RequestQueue, PushOnAFullRingReturnsAtEachDeadline) {
  RequestQueue q(2);
  ASSERT_TRUE(push_ids(q, 2));
  for (int slice = 0; slice < 5; ++slice) {
    const int64_t t0 = monotonic_ns();
    EXPECT_EQ(q.push(make_request(9), t0 + 2 * kMs), PushResult::kTimedOut);
    EXPECT_TRUE(ran_to_timeout(monotonic_ns() - t0, 2 * kMs));
  }
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{0, 1}));
}

// A ring kept full by other producers while a consumer pops: room appears
// and is taken again all the time, so a waiting push keeps being woken
// with has_space() true and losing the slot. It must still return by its
// deadline (kOk if it won a slot, kTimedOut otherwise), however often it is
// woken: the churn only stops once it has returned.
TEST(RequestQueue, PushOnARingKeptFullByOthersReturnsByItsDeadline) {
  RequestQueue q(4);
  ASSERT_TRUE(push_ids(q, 4));
  std::atomic<bool> stop{false};
  std::vector<std::thread> churn;
  for (int p = 0; p < 2; ++p)
    churn.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) q.push(make_request(100), monotonic_ns() + kMs);
    });
  churn.emplace_back([&] {
    Request r;
    while (!stop.load(std::memory_order_relaxed)) q.try_pop(r);
  });
  for (int attempt = 0; attempt < 20; ++attempt) {
    const int64_t t0 = monotonic_ns();
    const PushResult result = q.push(make_request(7), t0 + 1 * kMs);
    const int64_t elapsed = monotonic_ns() - t0;
    EXPECT_NE(result, PushResult::kClosed);
    if (result == PushResult::kTimedOut) {
      EXPECT_TRUE(ran_to_timeout(elapsed, 1 * kMs));
    }
  }
  stop.store(true);
  for (auto& t : churn) t.join();
}

TEST(RequestQueue, FullRingBlocksProducerUntilPop) {
  RequestQueue q(2);
  ASSERT_TRUE(push_ids(q, 2));
  std::atomic<bool> pop_started{false};
  PushResult result = PushResult::kTimedOut;
  bool finished_after_pop = false;
  BackgroundCall producer([&] {
    result = q.push(make_request(2), monotonic_ns() + kLongWait);
    finished_after_pop = pop_started.load();
  });
  pause_briefly();  // let the producer block on the full ring
  EXPECT_FALSE(producer.returned());
  pop_started.store(true);
  Request r;
  ASSERT_TRUE(q.try_pop(r));
  EXPECT_EQ(id_of(r), 0u);
  producer.join();

  EXPECT_EQ(result, PushResult::kOk);
  EXPECT_TRUE(finished_after_pop);
  // Woken by the pop, not by its deadline.
  EXPECT_LT(producer.elapsed_ns(), kLongWait);
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{1, 2}));
}

TEST(RequestQueue, CloseRejectsLaterPushesAndKeepsAccepted) {
  RequestQueue q(4);
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(1), kNoDeadline), PushResult::kOk);
  q.close();
  EXPECT_TRUE(q.closed());
  EXPECT_EQ(q.push(make_request(2), 0), PushResult::kClosed);
  EXPECT_EQ(q.push(make_request(3), kNoDeadline), PushResult::kClosed);
  EXPECT_EQ(q.push(make_request(4), monotonic_ns() + kSec), PushResult::kClosed);
  EXPECT_EQ(q.size(), 2u);
  // What was accepted before close() can still be drained.
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{0, 1}));
  q.close();  // idempotent
  EXPECT_TRUE(q.closed());
}

TEST(RequestQueue, CloseWakesProducerBlockedOnFullRing) {
  RequestQueue q(2);
  ASSERT_TRUE(push_ids(q, 2));
  PushResult result = PushResult::kOk;
  BackgroundCall producer([&] { result = q.push(make_request(2), monotonic_ns() + kLongWait); });
  pause_briefly();  // let it park
  q.close();
  producer.join();
  EXPECT_EQ(result, PushResult::kClosed);
  EXPECT_LT(producer.elapsed_ns(), kLongWait);
  EXPECT_EQ(q.size(), 2u);
}

TEST(RequestQueue, CloseWakesManyBlockedProducers) {
  RequestQueue q(2);
  ASSERT_TRUE(push_ids(q, 2));
  constexpr int kProducers = 4;
  std::vector<PushResult> results(kProducers, PushResult::kOk);
  std::vector<std::thread> producers;
  for (int i = 0; i < kProducers; ++i)
    producers.emplace_back(
        [&q, &results, i] { results[i] = q.push(make_request(10 + i), kNoDeadline); });
  pause_briefly();
  q.close();
  for (auto& t : producers) t.join();  // a missed wake-up would hang here
  for (int i = 0; i < kProducers; ++i)
    EXPECT_EQ(results[i], PushResult::kClosed) << "producer " << i;
  EXPECT_EQ(q.size(), 2u);
}

TEST(RequestQueue, WaitForWorkReturnsAtOnceWhenReady) {
  RequestQueue q(4);
  ASSERT_TRUE(push_ids(q, 1));
  const int64_t t0 = monotonic_ns();
  EXPECT_TRUE(q.wait_for_work(kNoDeadline));
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
}

TEST(RequestQueue, WaitForWorkTimesOut) {
  RequestQueue q(4);
  const int64_t t0 = monotonic_ns();
  EXPECT_FALSE(q.wait_for_work(t0 - 1));
  EXPECT_LT(monotonic_ns() - t0, kPromptly);

  EXPECT_TRUE(times_out(50 * kMs, [&](int64_t deadline) { return q.wait_for_work(deadline); }));
}

// Pushes request 7 (quietly or not) while a server waits by `wait()`: what
// the wait returned, and when.
struct WaitedPush {
  bool ready;
  int64_t elapsed_ns;
  int64_t returned_at_ns;
};
template <typename Wait>
WaitedPush push_while_waiting(RequestQueue& q, Wait wait, bool quiet) {
  bool ready = false;
  BackgroundCall server([&] { ready = wait(); });
  pause_briefly();  // let it park
  EXPECT_EQ(q.push(make_request(7), 0, quiet), PushResult::kOk);
  server.join();
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{7}));
  return {ready, server.elapsed_ns(), server.returned_at_ns()};
}

// A push wakes the server; a quiet one too when it sleeps past the quiet
// bound.
TEST(RequestQueue, PushWakesWaitForWork) {
  for (const bool quiet : {false, true}) {
    RequestQueue q(4);
    q.set_quiet_bound_ns(kMs);
    const WaitedPush w =
        push_while_waiting(q, [&] { return q.wait_for_work(monotonic_ns() + kLongWait); }, quiet);
    EXPECT_TRUE(w.ready);
    EXPECT_LT(w.elapsed_ns, kLongWait);
  }
}

// An idle server asleep within the quiet bound is left to wake by itself:
// it finds the request at its deadline, not before.
TEST(RequestQueue, QuietPushLeavesAShortIdleSleeperToWakeByItself) {
  RequestQueue q(4);
  q.set_quiet_bound_ns(kLongWait);
  const int64_t deadline = monotonic_ns() + 200 * kMs;
  const WaitedPush w =
      push_while_waiting(q, [&] { return q.wait_for_work(deadline, q.interrupts(), true); }, true);
  EXPECT_TRUE(w.ready);
  EXPECT_GE(w.returned_at_ns, deadline);
}

// A server waiting for its batch to fill (not idle) is woken by a quiet
// push, however close its deadline: the request may complete the batch.
TEST(RequestQueue, QuietPushWakesAServerWaitingForItsBatchToFill) {
  RequestQueue q(4);
  q.set_quiet_bound_ns(kLongWait);
  const WaitedPush w = push_while_waiting(
      q, [&] { return q.wait_for_work(monotonic_ns() + kLongWait / 2, q.interrupts(), false); },
      true);
  EXPECT_TRUE(w.ready);
  EXPECT_LT(w.elapsed_ns, kLongWait / 2);
}

// Quiet pushes against a server that sleeps without a deadline between
// them: none is lost (a lost wake-up hangs here; ctest's timeout fails it).
// The pushers read the sleeper count as the sleeper reads the ring (TSan).
TEST(RequestQueue, QuietPushesNeverLeaveALongSleeperAsleep) {
  constexpr uint64_t kRequests = 20000;
  RequestQueue q(64);
  q.set_quiet_bound_ns(kMs);
  BackgroundCall server([&] {
    uint64_t popped = 0;
    batchserve::Request r;
    while (popped < kRequests) {
      if (q.try_pop(r)) {
        ++popped;
      } else {
        q.wait_for_work(kNoDeadline);
      }
    }
  });
  for (uint64_t i = 0; i < kRequests; ++i) {
    while (q.push(make_request(i), 0, true) != PushResult::kOk) std::this_thread::yield();
    if (i % 64 == 0) std::this_thread::yield();  // let the server catch up and sleep
  }
  server.join();
  EXPECT_EQ(q.size(), 0u);
}

// pop_if takes the head only when it is the wanted request.
TEST(RequestQueue, PopIfTakesOnlyTheWantedHead) {
  RequestQueue q(4);
  ASSERT_TRUE(push_ids(q, 2));
  batchserve::Request r;
  EXPECT_FALSE(q.pop_if([](const batchserve::Request& x) { return id_of(x) == 1; }, r));
  EXPECT_TRUE(q.pop_if([](const batchserve::Request& x) { return id_of(x) == 0; }, r));
  EXPECT_EQ(id_of(r), 0u);
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{1}));
  EXPECT_FALSE(q.pop_if([](const batchserve::Request&) { return true; }, r));
}

TEST(RequestQueue, CloseWakesWaitForWork) {
  RequestQueue q(4);
  bool ready = true;
  BackgroundCall server([&] { ready = q.wait_for_work(monotonic_ns() + kLongWait); });
  pause_briefly();
  q.close();
  server.join();
  EXPECT_FALSE(ready);
  EXPECT_LT(server.elapsed_ns(), kLongWait);
  // A closed queue does not put the server to sleep.
  const int64_t t0 = monotonic_ns();
  EXPECT_FALSE(q.wait_for_work(kNoDeadline));
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
}

TEST(RequestQueue, ClosedQueueWithLeftoversReportsWork) {
  RequestQueue q(4);
  ASSERT_TRUE(push_ids(q, 1));
  q.close();
  EXPECT_TRUE(q.wait_for_work(kNoDeadline));
}

TEST(RequestQueue, InterruptWakesWaitForWork) {
  RequestQueue q(4);
  bool ready = true;
  BackgroundCall server([&] { ready = q.wait_for_work(monotonic_ns() + kLongWait); });
  interrupt_until_returned(q, server);
  server.join();
  EXPECT_FALSE(ready);  // woken, but nothing to do
  EXPECT_LT(server.elapsed_ns(), kLongWait);
  EXPECT_FALSE(q.closed());
  EXPECT_EQ(q.push(make_request(0), 0), PushResult::kOk);
}

TEST(RequestQueue, InterruptBeforeWaitDoesNotCount) {
  RequestQueue q(4);
  q.interrupt();
  EXPECT_TRUE(times_out(30 * kMs, [&](int64_t deadline) { return q.wait_for_work(deadline); }));
}

TEST(RequestQueue, InterruptCountedSinceSeenValue) {
  RequestQueue q(4);
  const uint32_t seen = q.interrupts();
  q.interrupt();
  EXPECT_EQ(q.interrupts(), seen + 1);
  // An interrupt after `seen` was read ends the wait at once...
  const int64_t t0 = monotonic_ns();
  EXPECT_FALSE(q.wait_for_work(t0 + kLongWait, seen));
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  // ...one before it does not.
  EXPECT_TRUE(times_out(
      30 * kMs, [&](int64_t deadline) { return q.wait_for_work(deadline, q.interrupts()); }));
  // Work that is ready is reported whatever the count says.
  ASSERT_EQ(q.push(make_request(1), 0), PushResult::kOk);
  EXPECT_TRUE(q.wait_for_work(kNoDeadline, seen));
}

TEST(RequestQueue, Reopen) {
  RequestQueue q(4);
  q.close();
  EXPECT_EQ(q.push(make_request(0), 0), PushResult::kClosed);
  q.reopen();
  EXPECT_FALSE(q.closed());
  EXPECT_EQ(q.push(make_request(1), 0), PushResult::kOk);
  EXPECT_EQ(drain_ids(q), (std::vector<uint64_t>{1}));

  // A reopened queue blocks (and is woken) like a fresh one.
  ASSERT_TRUE(push_ids(q, 4));
  EXPECT_EQ(q.push(make_request(9), 0), PushResult::kTimedOut);
  q.close();
  EXPECT_EQ(q.push(make_request(9), kNoDeadline), PushResult::kClosed);
}
// Producers push in a loop (some non-blocking, some blocking on the full
// ring) while a consumer pops and the main thread closes the queue. Once
// close() returns nothing else may land: draining right then yields exactly
// the requests whose push returned kOk, and the ring stays empty afterwards.
TEST(RequestQueue, CloseStressNoPushLandsAfterClose) {
  constexpr int kRounds = 30;
  constexpr uint32_t kProducers = 4;
  for (int round = 0; round < kRounds; ++round) {
    RequestQueue q(16);
    std::atomic<uint64_t> accepted{0};
    std::atomic<bool> stop_consumer{false};
    std::vector<std::vector<uint64_t>> ok_ids(kProducers);
    std::vector<uint64_t> unexpected_result(kProducers, 0);

    std::vector<std::thread> producers;
    for (uint32_t p = 0; p < kProducers; ++p) {
      producers.emplace_back([&, p] {
        const bool blocking = (p % 2) == 1;
        for (uint32_t seq = 0;; ++seq) {
          const uint64_t id = tagged_id(p, seq);
          const int64_t deadline = blocking ? monotonic_ns() + kLongWait : int64_t{0};
          const PushResult res = q.push(make_request(id), deadline);
          if (res == PushResult::kOk) {
            ok_ids[p].push_back(id);
            accepted.fetch_add(1);
          } else if (res == PushResult::kClosed) {
            return;
          } else if (blocking) {
            ++unexpected_result[p];  // a blocking push must not time out
          } else {
            // Full: back off briefly (sched_yield would hand the core to
            // unrelated processes for a whole slice on a loaded machine).
            std::this_thread::sleep_for(std::chrono::microseconds(20));
          }
        }
      });
    }

    std::vector<uint64_t> consumed;
    std::thread consumer([&] {
      Request r;
      while (!stop_consumer.load()) {
        if (q.try_pop(r))
          consumed.push_back(id_of(r));
        else
          q.wait_for_work(monotonic_ns() + kMs);  // close() wakes it
      }
    });

    // Close while the producers are busy, at a different point each round.
    const uint64_t threshold = 50 + 61 * static_cast<uint64_t>(round);
    poll_until([&] { return accepted.load() >= threshold; });
    q.close();

    // Drain right after close() returned, while producers may still be
    // calling push (they all get kClosed from now on).
    stop_consumer.store(true);
    consumer.join();
    const std::vector<uint64_t> drained = drain_ids(q);

    for (auto& t : producers) t.join();
    Request r;
    EXPECT_FALSE(q.try_pop(r)) << "a push landed after close() returned";
    EXPECT_EQ(q.size(), 0u);

    std::vector<uint64_t> got = consumed;
    got.insert(got.end(), drained.begin(), drained.end());
    std::vector<uint64_t> want;
    for (uint32_t p = 0; p < kProducers; ++p) {
      EXPECT_EQ(unexpected_result[p], 0u) << "producer " << p;
      want.insert(want.end(), ok_ids[p].begin(), ok_ids[p].end());
    }
    EXPECT_EQ(got.size(), want.size()) << "round " << round;

    // Per-producer FIFO in the order they came out.
    std::vector<int64_t> last(kProducers, -1);
    uint64_t out_of_order = 0;
    for (uint64_t id : got) {
      const uint32_t p = producer_of(id);
      const int64_t seq = seq_of(id);
      if (p >= kProducers || seq <= last[p]) {
        ++out_of_order;
        continue;
      }
      last[p] = seq;
    }
    EXPECT_EQ(out_of_order, 0u) << "round " << round;

    std::sort(got.begin(), got.end());
    std::sort(want.begin(), want.end());
    EXPECT_TRUE(std::adjacent_find(got.begin(), got.end()) == got.end())
        << "duplicates, round " << round;
    EXPECT_TRUE(got == want) << "round " << round;
    if (::testing::Test::HasFailure()) break;
  }
}

}  // namespace
