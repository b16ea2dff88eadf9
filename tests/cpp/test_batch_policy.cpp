// collect_batch: the batching policy.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "batch_policy.h"
#include "completion.h"
#include "futex.h"
#include "request_queue.h"
#include "test_util.h"

namespace {

using batchserve::BatchPolicy;
using batchserve::collect_batch;
using batchserve::Completion;
using batchserve::kNoDeadline;
using batchserve::monotonic_ns;
using batchserve::PushResult;
using batchserve::Request;
using batchserve::RequestQueue;

constexpr int64_t kMs = 1'000'000;
constexpr int64_t kSec = 1'000'000'000;
constexpr int64_t kLongWait = 20 * kSec;  // "would have timed out" bound
constexpr int64_t kPromptly = 5 * kSec;   // "returned at once" bound

Request make_request(uint64_t id, Completion* completion = nullptr) {
  Request r;
  r.payload = reinterpret_cast<void*>(static_cast<uintptr_t>(id));
  r.completion = completion;
  r.submit_ns = monotonic_ns();
  return r;
}

uint64_t id_of(const Request& r) {
  return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(r.payload));
}

std::vector<uint64_t> ids(const std::vector<Request>& batch) {
  std::vector<uint64_t> out;
  for (const Request& r : batch) out.push_back(id_of(r));
  return out;
}

BatchPolicy make_policy(size_t max_size, size_t min_size, int64_t timeout_ns) {
  BatchPolicy p;
  p.max_batch_size = max_size;
  p.min_batch_size = min_size;
  p.timeout_ns = timeout_ns;
  return p;
}

// One collect_batch call by a server that reads the interrupt count at the
// start (as a real server does before reading its settings).
void collect(RequestQueue& q, const BatchPolicy& policy,
             std::vector<Request>& batch, std::vector<Request>& dropped) {
  collect_batch(q, policy, q.interrupts(), batch, dropped);
}

// Only to give another thread the chance to get into a wait; never what a
// test's correctness depends on.
void pause_briefly() {
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
}

TEST(CollectBatch, MaxBatchSizeRespected) {
  RequestQueue q(64);
  for (uint64_t i = 0; i < 50; ++i)
    ASSERT_EQ(q.push(make_request(i), 0), PushResult::kOk);
  const BatchPolicy policy = make_policy(8, 1, 10 * kSec);
  uint64_t next = 0;
  const int64_t t0 = monotonic_ns();
  while (next < 50) {
    std::vector<Request> batch, dropped;
    collect(q, policy, batch, dropped);
    ASSERT_FALSE(batch.empty());
    EXPECT_EQ(batch.size(), std::min<uint64_t>(8, 50 - next));
    EXPECT_TRUE(dropped.empty());
    for (const Request& r : batch) EXPECT_EQ(id_of(r), next++);
  }
  // min_batch_size 1 is met at once: no waiting for the 10 s timeout.
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_EQ(q.size(), 0u);
}

TEST(CollectBatch, MinAboveMaxIsClampedToMax) {
  RequestQueue q(16);
  for (uint64_t i = 0; i < 6; ++i)
    ASSERT_EQ(q.push(make_request(i), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  const int64_t t0 = monotonic_ns();
  collect(q, make_policy(4, 10, 10 * kSec), batch, dropped);
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 1, 2, 3}));
}

TEST(CollectBatch, ZeroMaxBatchSizeMeansOne) {
  RequestQueue q(16);
  for (uint64_t i = 0; i < 3; ++i)
    ASSERT_EQ(q.push(make_request(i), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  collect(q, make_policy(0, 0, 10 * kSec), batch, dropped);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0}));
}

TEST(CollectBatch, IdleTimeoutReturnsEmpty) {
  RequestQueue q(16);
  constexpr int64_t kTimeout = 50 * kMs;
  std::vector<Request> batch, dropped;
  const int64_t t0 = monotonic_ns();
  collect(q, make_policy(8, 1, kTimeout), batch, dropped);
  const int64_t elapsed = monotonic_ns() - t0;
  EXPECT_TRUE(batch.empty());
  EXPECT_TRUE(dropped.empty());
  EXPECT_GE(elapsed, kTimeout);
  EXPECT_LT(elapsed, kLongWait);
}

TEST(CollectBatch, FirstRequestEndsIdleWait) {
  RequestQueue q(16);
  std::vector<Request> batch, dropped;
  int64_t elapsed = 0;
  std::thread server([&] {
    const int64_t t0 = monotonic_ns();
    collect(q, make_policy(8, 1, kLongWait), batch, dropped);
    elapsed = monotonic_ns() - t0;
  });
  pause_briefly();
  ASSERT_EQ(q.push(make_request(5), 0), PushResult::kOk);
  server.join();
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{5}));
  EXPECT_LT(elapsed, kLongWait);
}

// The server keeps collecting until min_batch_size is reached, as long as
// producers supply within the timeout. The producer hands over one request
// at a time, each only after the previous one was taken, so the server must
// wait for more after its first take.
TEST(CollectBatch, WaitsForMinBatchSize) {
  RequestQueue q(16);
  std::vector<Request> batch, dropped;
  int64_t elapsed = 0;
  std::thread server([&] {
    const int64_t t0 = monotonic_ns();
    collect(q, make_policy(16, 4, kLongWait), batch, dropped);
    elapsed = monotonic_ns() - t0;
  });
  for (uint64_t i = 0; i < 4; ++i) {
    ASSERT_EQ(q.push(make_request(i), 0), PushResult::kOk);
    batchserve_test::poll_until([&] { return q.size() == 0; });  // taken
  }
  server.join();
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 1, 2, 3}));
  EXPECT_TRUE(dropped.empty());
  EXPECT_LT(elapsed, kLongWait);  // returned when min was reached
}

TEST(CollectBatch, FewerThanMinReturnsAtOldestDeadline) {
  RequestQueue q(16);
  constexpr int64_t kTimeout = 100 * kMs;
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(1), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 4, kTimeout), batch, dropped);
  const int64_t returned_at = monotonic_ns();
  ASSERT_EQ(ids(batch), (std::vector<uint64_t>{0, 1}));
  EXPECT_GE(returned_at, batch.front().submit_ns + kTimeout);
  EXPECT_LT(returned_at, batch.front().submit_ns + kLongWait);
}

TEST(CollectBatch, OldRequestReturnsAtOnce) {
  // The deadline is the oldest request's arrival + timeout, not "now +
  // timeout": a request that already waited longer goes out at once.
  RequestQueue q(16);
  Request old = make_request(0);
  old.submit_ns = monotonic_ns() - 60 * kSec;
  ASSERT_EQ(q.push(old, 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(1), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  const int64_t t0 = monotonic_ns();
  collect(q, make_policy(8, 4, 10 * kSec), batch, dropped);
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 1}));
}

TEST(CollectBatch, InterruptDuringMinWaitKeepsDeadline) {
  RequestQueue q(16);
  constexpr int64_t kTimeout = 200 * kMs;
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  std::atomic<bool> returned{false};
  int64_t returned_at = 0;
  std::thread server([&] {
    collect(q, make_policy(8, 2, kTimeout), batch, dropped);
    returned_at = monotonic_ns();
    returned.store(true);
  });
  while (!returned.load()) {
    q.interrupt();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  server.join();
  ASSERT_EQ(ids(batch), (std::vector<uint64_t>{0}));
  EXPECT_GE(returned_at, batch.front().submit_ns + kTimeout);
}

TEST(CollectBatch, InterruptEndsIdleWait) {
  RequestQueue q(16);
  std::vector<Request> batch, dropped;
  std::atomic<bool> returned{false};
  int64_t elapsed = 0;
  std::thread server([&] {
    const int64_t t0 = monotonic_ns();
    collect(q, make_policy(8, 1, kLongWait), batch, dropped);
    elapsed = monotonic_ns() - t0;
    returned.store(true);
  });
  while (!returned.load()) {
    q.interrupt();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  server.join();
  EXPECT_TRUE(batch.empty());
  EXPECT_LT(elapsed, kLongWait);
}

// An interrupt that comes after the owner read the count but before
// collect_batch goes to sleep is not lost: the owner gets control back at
// once (to re-read its settings) instead of sleeping out the idle timeout.
TEST(CollectBatch, InterruptAfterReadingCountIsNotLost) {
  RequestQueue q(16);
  const uint32_t seen = q.interrupts();
  q.interrupt();
  EXPECT_NE(q.interrupts(), seen);
  std::vector<Request> batch, dropped;
  const int64_t t0 = monotonic_ns();
  collect_batch(q, make_policy(8, 1, kLongWait), seen, batch, dropped);
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_TRUE(batch.empty());

  // With the current count it sleeps out its (short) idle timeout.
  constexpr int64_t kTimeout = 30 * kMs;
  const int64_t t1 = monotonic_ns();
  collect_batch(q, make_policy(8, 1, kTimeout), q.interrupts(), batch,
                dropped);
  EXPECT_GE(monotonic_ns() - t1, kTimeout);
  EXPECT_TRUE(batch.empty());
}

// A stale count does not cut a batch short once its first request is taken.
TEST(CollectBatch, StaleInterruptCountDoesNotCutMinWait) {
  RequestQueue q(16);
  constexpr int64_t kTimeout = 100 * kMs;
  const uint32_t seen = q.interrupts();
  q.interrupt();
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  collect_batch(q, make_policy(8, 2, kTimeout), seen, batch, dropped);
  const int64_t returned_at = monotonic_ns();
  ASSERT_EQ(ids(batch), (std::vector<uint64_t>{0}));
  EXPECT_GE(returned_at, batch.front().submit_ns + kTimeout);
}

TEST(CollectBatch, WithdrawnRequestsAreDroppedAndNotCounted) {
  RequestQueue q(16);
  auto* withdrawn = new Completion();
  ASSERT_EQ(withdrawn->give_up(), Completion::kWithdrawn);
  auto* live = new Completion();

  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(1, withdrawn), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(2, live), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(3), 0), PushResult::kOk);

  std::vector<Request> batch, dropped;
  collect(q, make_policy(2, 2, 10 * kSec), batch, dropped);
  // The withdrawn request takes no room: the batch is the next two live ones.
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 2}));
  ASSERT_EQ(dropped.size(), 1u);
  EXPECT_EQ(id_of(dropped[0]), 1u);
  EXPECT_EQ(dropped[0].completion, withdrawn);
  EXPECT_EQ(live->state(), Completion::kTaken);
  EXPECT_EQ(withdrawn->state(), Completion::kWithdrawn);
  EXPECT_EQ(q.size(), 1u);

  // The owner releases what the requests held: both references each.
  int value = 0;
  EXPECT_TRUE(live->finish(&value, false));
  live->notify();
  live->release();
  live->release();
  withdrawn->release();
  withdrawn->release();
}

TEST(CollectBatch, WithdrawnRequestsDoNotCountTowardsMin) {
  RequestQueue q(16);
  constexpr int64_t kTimeout = 50 * kMs;
  std::vector<Completion*> completions;
  for (int i = 0; i < 3; ++i) {
    auto* c = new Completion();
    ASSERT_EQ(c->give_up(), Completion::kWithdrawn);
    completions.push_back(c);
  }
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  for (uint64_t i = 0; i < 3; ++i)
    ASSERT_EQ(q.push(make_request(10 + i, completions[i]), 0),
              PushResult::kOk);
  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 2, kTimeout), batch, dropped);
  const int64_t returned_at = monotonic_ns();
  // One live request: min 2 was never reached, so it waited to the deadline.
  ASSERT_EQ(ids(batch), (std::vector<uint64_t>{0}));
  EXPECT_GE(returned_at, batch.front().submit_ns + kTimeout);
  EXPECT_EQ(ids(dropped), (std::vector<uint64_t>{10, 11, 12}));
  for (Completion* c : completions) {
    c->release();
    c->release();
  }
}

TEST(CollectBatch, OnlyWithdrawnRequestsGiveEmptyBatch) {
  RequestQueue q(16);
  auto* c = new Completion();
  ASSERT_EQ(c->give_up(), Completion::kWithdrawn);
  ASSERT_EQ(q.push(make_request(1, c), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 1, 30 * kMs), batch, dropped);
  EXPECT_TRUE(batch.empty());
  EXPECT_EQ(ids(dropped), (std::vector<uint64_t>{1}));
  c->release();
  c->release();
}

TEST(CollectBatch, ClosedQueueReturnsEmptyPromptly) {
  RequestQueue q(16);
  q.close();
  std::vector<Request> batch, dropped;
  const int64_t t0 = monotonic_ns();
  collect(q, make_policy(8, 4, kLongWait), batch, dropped);
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_TRUE(batch.empty());
  EXPECT_TRUE(dropped.empty());
}

TEST(CollectBatch, CloseEndsIdleWait) {
  RequestQueue q(16);
  std::vector<Request> batch, dropped;
  int64_t elapsed = 0;
  std::thread server([&] {
    const int64_t t0 = monotonic_ns();
    collect(q, make_policy(8, 1, kLongWait), batch, dropped);
    elapsed = monotonic_ns() - t0;
  });
  pause_briefly();
  q.close();
  server.join();
  EXPECT_TRUE(batch.empty());
  EXPECT_LT(elapsed, kLongWait);
}

TEST(CollectBatch, CloseEndsMinWaitWithPartialBatch) {
  RequestQueue q(16);
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  int64_t elapsed = 0;
  std::thread server([&] {
    const int64_t t0 = monotonic_ns();
    collect(q, make_policy(8, 4, kLongWait), batch, dropped);
    elapsed = monotonic_ns() - t0;
  });
  // Wait until the server took the first request.
  batchserve_test::poll_until([&] { return q.size() == 0; });
  q.close();
  server.join();
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0}));
  EXPECT_LT(elapsed, kLongWait);
}

// A timeout of kNoDeadline (INT64_MAX) means "no timeout": the deadline
// arithmetic must saturate, not overflow (UBSan) and wrap into the past.
TEST(CollectBatch, UnboundedTimeoutDoesNotOverflow) {
  RequestQueue q(16);
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(1), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 1, kNoDeadline), batch, dropped);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 1}));
}

TEST(CollectBatch, UnboundedTimeoutWaitsForMinUntilClosed) {
  RequestQueue q(16);
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  std::atomic<bool> close_called{false};
  bool returned_after_close = false;
  std::vector<Request> batch, dropped;
  std::thread server([&] {
    collect(q, make_policy(8, 4, kNoDeadline), batch, dropped);
    returned_after_close = close_called.load();
  });
  // Wait until the server took the first request.
  batchserve_test::poll_until([&] { return q.size() == 0; });
  pause_briefly();  // "nobody comes": it must keep waiting
  close_called.store(true);
  q.close();
  server.join();
  EXPECT_TRUE(returned_after_close);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0}));
}

// Producers push requests tagged with (producer, seq) while one server
// thread collects batches until everything arrived: nothing lost, nothing
// duplicated, per-producer order kept, every batch within [1, max].
TEST(CollectBatch, MultiProducerRouting) {
  constexpr uint32_t kProducers = 4;
  constexpr uint32_t kPerProducer = 5000;
  constexpr size_t kMax = 16;
  RequestQueue q(64);
  const BatchPolicy policy = make_policy(kMax, 4, 2 * kMs);

  std::vector<uint64_t> failed_pushes(kProducers, 0);
  std::vector<std::thread> producers;
  for (uint32_t p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (uint32_t seq = 0; seq < kPerProducer; ++seq) {
        const uint64_t id = (uint64_t{p} << 32) | seq;
        if (q.push(make_request(id), kNoDeadline) != PushResult::kOk)
          ++failed_pushes[p];
      }
    });
  }

  const uint64_t total = uint64_t{kProducers} * kPerProducer;
  std::vector<uint32_t> next(kProducers, 0);
  uint64_t received = 0, out_of_order = 0, bad_size = 0, batches = 0;
  uint64_t dropped_count = 0;
  const int64_t give_up_at = monotonic_ns() + 50 * kSec;  // hang guard
  while (received < total && monotonic_ns() < give_up_at) {
    std::vector<Request> batch, dropped;
    collect(q, policy, batch, dropped);
    dropped_count += dropped.size();
    if (batch.empty()) continue;  // idle timeout
    ++batches;
    if (batch.size() > kMax) ++bad_size;
    for (const Request& r : batch) {
      const uint64_t id = id_of(r);
      const uint32_t p = static_cast<uint32_t>(id >> 32);
      const uint32_t seq = static_cast<uint32_t>(id & 0xffffffffu);
      ++received;
      if (p >= kProducers || seq != next[p]) {
        ++out_of_order;  // lost, duplicated or reordered
        continue;
      }
      ++next[p];
    }
  }
  for (auto& t : producers) t.join();

  EXPECT_EQ(received, total);
  EXPECT_EQ(out_of_order, 0u);
  EXPECT_EQ(bad_size, 0u);
  EXPECT_EQ(dropped_count, 0u);
  for (uint32_t p = 0; p < kProducers; ++p) {
    EXPECT_EQ(next[p], kPerProducer) << "producer " << p;
    EXPECT_EQ(failed_pushes[p], 0u) << "producer " << p;
  }
  EXPECT_EQ(q.size(), 0u);
  Request extra;
  EXPECT_FALSE(q.try_pop(extra));
  RecordProperty("batches", static_cast<int>(batches));
}

}  // namespace
