// collect_batch and BatchSettings: the batching policy.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <thread>
#include <tuple>
#include <vector>

#include "core/batch_policy.h"
#include "test_util.h"

namespace {

using namespace batchserve_test;
using batchserve::BatchPolicy;
using batchserve::BatchSettings;
using batchserve::collect_batch;
using batchserve::kNoDeadline;

BatchPolicy make_policy(size_t max_size, size_t min_size, int64_t timeout_ns) {
  BatchPolicy p;
  p.max_batch_size = max_size;
  p.min_batch_size = min_size;
  p.timeout_ns = timeout_ns;
  return p;
}

// One collect_batch call under fixed settings (and a fill hint: none by
// default).
batchserve::FillOutcome collect(RequestQueue& q, const BatchPolicy& policy,
                                std::vector<Request>& batch, std::vector<Request>& dropped,
                                const batchserve::FillHint& hint = {}) {
  BatchSettings settings;
  settings.store(policy, q);
  return collect_batch(q, settings, batch, dropped, hint);
}

// For comparing whole policies in one EXPECT_EQ.
std::tuple<size_t, size_t, int64_t> fields(const BatchPolicy& p) {
  return {p.max_batch_size, p.min_batch_size, p.timeout_ns};
}

// collect_batch on a server thread of its own, under fixed settings (with a
// fill hint) or under `settings` that the test changes meanwhile. Read
// batch, dropped and fill only after call.join().
struct ServerThread {
  ServerThread(RequestQueue& q, const BatchPolicy& policy, const batchserve::FillHint& hint = {})
      : call([this, &q, policy, hint] { fill = collect(q, policy, batch, dropped, hint); }) {}
  ServerThread(RequestQueue& q, const BatchSettings& settings)
      : call([this, &q, &settings] { collect_batch(q, settings, batch, dropped); }) {}

  std::vector<Request> batch, dropped;
  batchserve::FillOutcome fill;
  BackgroundCall call;  // last: starts once batch, dropped and fill exist
};

// Waits until the server has taken every queued request (and so waits for
// more, or returns).
void wait_until_taken(RequestQueue& q) {
  poll_until([&] { return q.size() == 0; });
}

TEST(CollectBatch, MaxBatchSizeRespected) {
  RequestQueue q(64);
  ASSERT_TRUE(push_ids(q, 50));
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
  ASSERT_TRUE(push_ids(q, 6));
  std::vector<Request> batch, dropped;
  const int64_t t0 = monotonic_ns();
  collect(q, make_policy(4, 10, 10 * kSec), batch, dropped);
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 1, 2, 3}));
}

TEST(CollectBatch, ZeroMaxBatchSizeMeansOne) {
  RequestQueue q(16);
  ASSERT_TRUE(push_ids(q, 3));
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
  EXPECT_TRUE(ran_to_timeout(monotonic_ns() - t0, kTimeout));
  EXPECT_TRUE(batch.empty());
  EXPECT_TRUE(dropped.empty());
}

TEST(CollectBatch, AnIdleWaitOfItsOwnBoundsTheWaitForAFirstRequest) {
  RequestQueue q(16);
  constexpr int64_t kIdleWait = 60 * kMs;
  BatchPolicy policy = make_policy(8, 1, 1 * kMs);
  policy.idle_wait_ns = kIdleWait;
  std::vector<Request> batch, dropped;
  const int64_t t0 = monotonic_ns();
  collect(q, policy, batch, dropped);
  EXPECT_TRUE(ran_to_timeout(monotonic_ns() - t0, kIdleWait));
  EXPECT_TRUE(batch.empty());
}

// The idle tick runs before the first wait and again whenever the time it
// returned comes, without ending the wait for a request: here its third run
// brings the request the wait ends with (the idle wait, a minute, is never
// reached).
TEST(CollectBatch, AnIdleTickRunsWhenItsTimeComesWithinTheWait) {
  RequestQueue q(16);
  BatchPolicy policy = make_policy(8, 1, 1 * kMs);
  policy.idle_wait_ns = 60'000 * kMs;
  BatchSettings settings;
  settings.store(policy, q);
  int ticks = 0;
  auto tick = [&] {
    if (++ticks == 3) {
      EXPECT_EQ(q.push(make_request(7), 0), PushResult::kOk);
      return kNoDeadline;
    }
    return monotonic_ns() + 1 * kMs;
  };
  std::vector<Request> batch, dropped;
  collect_batch(q, settings, batch, dropped, {}, tick);
  EXPECT_EQ(ticks, 3);
  EXPECT_EQ(ids(batch), std::vector<uint64_t>{7});
}

TEST(BatchSettings, AnIdleWaitUnsetIsTheTimeout) {
  RequestQueue q(4);
  BatchSettings settings;
  settings.store(make_policy(8, 1, 3 * kMs), q);
  EXPECT_EQ(settings.load().idle_wait_ns, 3 * kMs);
  BatchPolicy policy = make_policy(8, 1, 3 * kMs);
  policy.idle_wait_ns = 0;
  settings.store(policy, q);
  EXPECT_EQ(settings.load().idle_wait_ns, 0);
}

TEST(CollectBatch, FirstRequestEndsIdleWait) {
  RequestQueue q(16);
  ServerThread server(q, make_policy(8, 1, kLongWait));
  pause_briefly();
  ASSERT_EQ(q.push(make_request(5), 0), PushResult::kOk);
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{5}));
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
}

// The server keeps collecting until min_batch_size is reached, as long as
// producers supply within the timeout. The producer hands over one request
// at a time, each only after the previous one was taken, so the server must
// wait for more after its first take.
TEST(CollectBatch, WaitsForMinBatchSize) {
  RequestQueue q(16);
  ServerThread server(q, make_policy(16, 4, kLongWait));
  for (uint64_t i = 0; i < 4; ++i) {
    ASSERT_EQ(q.push(make_request(i), 0), PushResult::kOk);
    wait_until_taken(q);
  }
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{0, 1, 2, 3}));
  EXPECT_TRUE(server.dropped.empty());
  // It returned when min was reached.
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
}

TEST(CollectBatch, FewerThanMinReturnsAtOldestDeadline) {
  RequestQueue q(16);
  constexpr int64_t kTimeout = 100 * kMs;
  ASSERT_TRUE(push_ids(q, 2));
  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 4, kTimeout), batch, dropped);
  const int64_t returned_at = monotonic_ns();
  ASSERT_EQ(ids(batch), (std::vector<uint64_t>{0, 1}));
  EXPECT_TRUE(ran_to_timeout(returned_at - batch.front().submit_ns, kTimeout));
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
  ASSERT_TRUE(push_ids(q, 1));
  ServerThread server(q, make_policy(8, 2, kTimeout));
  interrupt_until_returned(q, server.call);
  server.call.join();
  ASSERT_EQ(ids(server.batch), (std::vector<uint64_t>{0}));
  EXPECT_GE(server.call.returned_at_ns(), server.batch.front().submit_ns + kTimeout);
}

TEST(CollectBatch, InterruptEndsIdleWait) {
  RequestQueue q(16);
  ServerThread server(q, make_policy(8, 1, kLongWait));
  interrupt_until_returned(q, server.call);
  server.call.join();
  EXPECT_TRUE(server.batch.empty());
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
}

TEST(BatchSettings, LoadClampsToASanePolicy) {
  RequestQueue q(4);
  BatchSettings settings;
  EXPECT_EQ(fields(settings.load()), fields(BatchPolicy{}));
  settings.store(make_policy(0, 0, -5), q);
  EXPECT_EQ(fields(settings.load()), fields(make_policy(1, 1, 0)));
  settings.store(make_policy(4, 10, 7 * kMs), q);
  EXPECT_EQ(fields(settings.load()), fields(make_policy(4, 4, 7 * kMs)));
}

TEST(BatchSettings, StoreInterruptsTheQueue) {
  RequestQueue q(4);
  BatchSettings settings;
  const uint32_t before = q.interrupts();
  settings.store(make_policy(8, 2, kMs), q);
  EXPECT_NE(q.interrupts(), before);
}

// A settings change reaches a server sleeping for its first request: either
// it is woken, or (if the change came first) it already runs under the new,
// short timeout. One store, no retry loop needed.
TEST(CollectBatch, SettingsChangeEndsIdleWait) {
  RequestQueue q(16);
  BatchSettings settings;
  settings.store(make_policy(8, 1, kLongWait), q);
  ServerThread server(q, settings);
  pause_briefly();  // let it go to sleep under the long timeout
  settings.store(make_policy(8, 1, 10 * kMs), q);
  server.call.join();
  EXPECT_TRUE(server.batch.empty());
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
}

// While collecting towards min_batch_size the server follows a change: the
// deadline becomes the oldest arrival plus the new timeout.
TEST(CollectBatch, SettingsChangeDuringMinWaitMovesDeadline) {
  RequestQueue q(16);
  BatchSettings settings;
  settings.store(make_policy(8, 2, kLongWait), q);
  ASSERT_TRUE(push_ids(q, 1));
  ServerThread server(q, settings);
  wait_until_taken(q);  // it now waits for a second request
  constexpr int64_t kTimeout = 50 * kMs;
  settings.store(make_policy(8, 2, kTimeout), q);
  server.call.join();
  ASSERT_EQ(ids(server.batch), (std::vector<uint64_t>{0}));
  EXPECT_TRUE(
      ran_to_timeout(server.call.returned_at_ns() - server.batch.front().submit_ns, kTimeout));
}

TEST(CollectBatch, LoweringMinDuringMinWaitReturnsAtOnce) {
  RequestQueue q(16);
  BatchSettings settings;
  settings.store(make_policy(8, 4, kLongWait), q);
  ASSERT_TRUE(push_ids(q, 2));
  ServerThread server(q, settings);
  wait_until_taken(q);
  const int64_t stored_at = monotonic_ns();
  settings.store(make_policy(8, 2, kLongWait), q);
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{0, 1}));
  EXPECT_LT(server.call.returned_at_ns() - stored_at, kPromptly);
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

  // The owner releases what the requests held.
  int value = 0;
  EXPECT_TRUE(live->finish(&value, false));
  live->notify();
  release_both(live);
  release_both(withdrawn);
}

// A request its caller claimed is the caller's: the collection skips it
// and drops only the queue's reference to its completion (ASan: neither a
// leak nor a second release).
TEST(CollectBatch, ClaimedRequestsAreSkippedAndOnlyTheirCompletionReleased) {
  RequestQueue q(16);
  auto* claimed = new Completion();
  auto* served = new Completion();
  ASSERT_TRUE(claimed->claim());
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(1, claimed), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(2, served), 0), PushResult::kOk);
  int value = 0;
  ASSERT_TRUE(served->claim());
  ASSERT_TRUE(served->finish(&value, false));  // claimed and ended before the collection

  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 1, 10 * kMs), batch, dropped);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0}));
  EXPECT_TRUE(dropped.empty());
  EXPECT_EQ(q.size(), 0u);
  claimed->release();  // the callers' references: the last ones
  served->release();
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
    ASSERT_EQ(q.push(make_request(10 + i, completions[i]), 0), PushResult::kOk);
  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 2, kTimeout), batch, dropped);
  const int64_t returned_at = monotonic_ns();
  // One live request: min 2 was never reached, so it waited to the deadline.
  ASSERT_EQ(ids(batch), (std::vector<uint64_t>{0}));
  EXPECT_GE(returned_at, batch.front().submit_ns + kTimeout);
  EXPECT_EQ(ids(dropped), (std::vector<uint64_t>{10, 11, 12}));
  for (Completion* c : completions) release_both(c);
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
  release_both(c);
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
  ServerThread server(q, make_policy(8, 1, kLongWait));
  pause_briefly();
  q.close();
  server.call.join();
  EXPECT_TRUE(server.batch.empty());
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
}

TEST(CollectBatch, CloseEndsMinWaitWithPartialBatch) {
  RequestQueue q(16);
  ASSERT_TRUE(push_ids(q, 1));
  ServerThread server(q, make_policy(8, 4, kLongWait));
  wait_until_taken(q);
  q.close();
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{0}));
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
}

// A timeout of kNoDeadline (INT64_MAX) means "no timeout": the deadline
// arithmetic must saturate, not overflow (UBSan) and wrap into the past.
TEST(CollectBatch, UnboundedTimeoutDoesNotOverflow) {
  RequestQueue q(16);
  ASSERT_TRUE(push_ids(q, 2));
  std::vector<Request> batch, dropped;
  collect(q, make_policy(8, 1, kNoDeadline), batch, dropped);
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 1}));
}

TEST(CollectBatch, UnboundedTimeoutWaitsForMinUntilClosed) {
  RequestQueue q(16);
  ASSERT_TRUE(push_ids(q, 1));
  ServerThread server(q, make_policy(8, 4, kNoDeadline));
  wait_until_taken(q);
  pause_briefly();  // "nobody comes": it must keep waiting
  EXPECT_FALSE(server.call.returned());
  q.close();
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{0}));
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
        if (q.push(make_request(tagged_id(p, seq)), kNoDeadline) != PushResult::kOk)
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
      const uint32_t p = producer_of(id_of(r));
      const uint32_t seq = seq_of(id_of(r));
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

// -- the fill step (FillHint) ------------------------------------------------

namespace fill {

using batchserve::FillHint;
using batchserve::FillOutcome;

FillHint hint(size_t target, int64_t budget_ns) {
  FillHint h;
  h.target = target;
  h.budget_ns = budget_ns;
  return h;
}

FillOutcome collect_filling(RequestQueue& q, const BatchPolicy& policy, const FillHint& h,
                            std::vector<Request>& batch) {
  std::vector<Request> dropped;
  return collect(q, policy, batch, dropped, h);
}

// Past min_batch_size the server waits for the target, and returns as soon
// as it is reached. Without the fill step it would return at once with the
// one request queued before it started.
TEST(FillBatch, WaitsForTheTargetAndReturnsWhenReached) {
  RequestQueue q(16);
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  ServerThread server(q, make_policy(16, 1, kLongWait), hint(3, kLongWait));
  wait_until_taken(q);
  pause_briefly();
  EXPECT_FALSE(server.call.returned());  // still waiting for the target
  ASSERT_EQ(q.push(make_request(1), 0), PushResult::kOk);
  ASSERT_EQ(q.push(make_request(2), 0), PushResult::kOk);
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{0, 1, 2}));
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
  // It waited (unless the later requests came before it looked), and got them.
  const FillOutcome& outcome = server.fill;
  EXPECT_TRUE(!outcome.waited || (outcome.reached && outcome.gained == 2));
}

// The budget counts from the latest arrival, not from the start of the wait:
// callers that keep coming one after another are all waited for. (Request 1
// is stamped as arriving 3 s from now, as if it came then, so that the test
// need not time real arrivals; the server may take it before its fill step
// starts or during it.)
TEST(FillBatch, EachArrivalExtendsTheWait) {
  RequestQueue q(16);
  constexpr int64_t kBudget = 1 * kSec;
  ASSERT_EQ(q.push(make_request(0), 0), PushResult::kOk);
  ServerThread server(q, make_policy(16, 1, kLongWait), hint(3, kBudget));
  wait_until_taken(q);
  Request later = make_request(1);
  later.submit_ns = monotonic_ns() + 3 * kSec;
  ASSERT_EQ(q.push(later, 0), PushResult::kOk);
  std::this_thread::sleep_for(std::chrono::nanoseconds(kBudget + kBudget / 2));
  EXPECT_FALSE(server.call.returned());  // past the budget from the start: still waiting
  ASSERT_EQ(q.push(make_request(2), 0), PushResult::kOk);
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{0, 1, 2}));
  EXPECT_TRUE(server.fill.reached);
  EXPECT_GE(server.fill.gain_span_ns, 2 * kSec);  // to request 1's arrival
}

// Short of the target, it gives up at the end of the budget.
TEST(FillBatch, GivesUpAtTheEndOfTheBudget) {
  RequestQueue q(16);
  constexpr int64_t kBudget = 100 * kMs;
  ASSERT_TRUE(push_ids(q, 2));
  std::vector<Request> batch;
  const int64_t t0 = monotonic_ns();
  const FillOutcome outcome =
      collect_filling(q, make_policy(8, 1, kLongWait), hint(5, kBudget), batch);
  EXPECT_TRUE(ran_to_timeout(monotonic_ns() - t0, kBudget));
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0, 1}));
  EXPECT_TRUE(outcome.waited);
  EXPECT_FALSE(outcome.reached);
}

// The fill step never keeps a request past the batch timeout: an old
// request goes out at once, whatever the budget.
TEST(FillBatch, NeverPastTheBatchTimeout) {
  RequestQueue q(16);
  const int64_t pushed = monotonic_ns();
  ASSERT_TRUE(push_ids(q, 1));
  std::vector<Request> batch;
  collect_filling(q, make_policy(8, 1, 50 * kMs), hint(8, kLongWait), batch);
  // Its arrival + timeout, not the hint's budget.
  EXPECT_TRUE(ran_to_timeout(monotonic_ns() - pushed, 50 * kMs));
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0}));
}

// A request that came while the server was busy (long before this
// collection) may wait `timeout` from the collection's start for the
// callers expected back, not from its arrival: the group of actors that
// came during a forward waits for the group the forward served.
TEST(FillBatch, ARequestThatCameDuringAForwardWaitsFromTheCollectionsStart) {
  RequestQueue q(16);
  Request old = make_request(0);
  old.submit_ns = monotonic_ns() - 60 * kSec;
  ASSERT_EQ(q.push(old, 0), PushResult::kOk);
  std::vector<Request> batch;
  const int64_t t0 = monotonic_ns();
  collect_filling(q, make_policy(8, 1, 50 * kMs), hint(8, kLongWait), batch);
  EXPECT_TRUE(ran_to_timeout(monotonic_ns() - t0, 50 * kMs));
  EXPECT_EQ(ids(batch), (std::vector<uint64_t>{0}));
}

// No wait at all when the batch already holds the target, or the target is
// above max_batch_size only up to max_batch_size.
TEST(FillBatch, NoWaitAtTheTargetAndTheTargetIsCappedByMax) {
  RequestQueue q(16);
  ASSERT_TRUE(push_ids(q, 3));
  std::vector<Request> batch;
  const int64_t t0 = monotonic_ns();
  FillOutcome outcome =
      collect_filling(q, make_policy(3, 1, kLongWait), hint(10, kLongWait), batch);
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_EQ(batch.size(), 3u);
  EXPECT_FALSE(outcome.waited);
  batch.clear();
  ASSERT_TRUE(push_ids(q, 2));
  outcome = collect_filling(q, make_policy(8, 1, kLongWait), hint(2, kLongWait), batch);
  EXPECT_EQ(batch.size(), 2u);
  EXPECT_FALSE(outcome.waited);
}

// Closing the queue ends a fill wait with what was collected.
TEST(FillBatch, CloseEndsTheWait) {
  RequestQueue q(16);
  ASSERT_TRUE(push_ids(q, 1));
  ServerThread server(q, make_policy(8, 1, kLongWait), hint(4, kLongWait));
  wait_until_taken(q);
  pause_briefly();
  q.close();
  server.call.join();
  EXPECT_EQ(ids(server.batch), (std::vector<uint64_t>{0}));
  EXPECT_LT(server.call.elapsed_ns(), kLongWait);
  EXPECT_FALSE(server.fill.reached);
}

}  // namespace fill
