// RequestCollector (csrc/core/collector.h): the server's two-phase
// collection, the requests carried past a lowered max_batch_size, late
// arrivals joining the batch, withdrawn requests, the prefetch's rows first,
// and the spin adaptation; plus producers racing a collecting server.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/collector.h"
#include "test_util.h"

namespace {

using batchserve::BatchPolicy;
using batchserve::CollectedBatch;
using batchserve::Completion;
using batchserve::PushResult;
using batchserve::Request;
using batchserve::RequestCollector;
using batchserve::RowSource;
using batchserve::SpinBudget;
using batchserve::StagingColumns;
using batchserve_test::BackgroundCall;
using batchserve_test::ids;
using batchserve_test::kMs;
using batchserve_test::make_request;
using batchserve_test::push_ids;

BatchPolicy policy(size_t max_batch_size, size_t min_batch_size = 1,
                   int64_t timeout_ns = 10 * kMs) {
  BatchPolicy p;
  p.max_batch_size = max_batch_size;
  p.min_batch_size = min_batch_size;
  p.timeout_ns = timeout_ns;
  return p;
}

CollectedBatch collect(RequestCollector& c) {
  CollectedBatch batch = c.wait_for_batch(c.take_carried());
  c.complete(batch);
  return batch;
}

// A request whose one 8-byte leaf holds its id, matching schema 1.
struct Leaf {
  uint64_t id;
  RowSource source;
  explicit Leaf(uint64_t i) : id(i) {
    source.schema_id = 1;
    source.count = 1;
    source.data[0] = &id;
  }
  Request request() const {
    Request r = make_request(id);
    r.rows = &source;
    return r;
  }
};

StagingColumns staging_of(std::vector<uint64_t>& column) {
  StagingColumns s;
  s.base = {reinterpret_cast<uint8_t*>(column.data())};
  s.leaf_bytes = {sizeof(uint64_t)};
  s.rows = column.size();
  return s;
}

TEST(RequestCollector, CollectsWhatIsQueuedUpToTheMaximum) {
  RequestCollector c(64);
  c.configure(policy(4));
  ASSERT_TRUE(push_ids(c.queue(), 6));
  CollectedBatch first = collect(c);
  EXPECT_TRUE(first.rows.empty());
  EXPECT_EQ(first.prefetched_into, 0u);
  EXPECT_EQ(ids(first.others), (std::vector<uint64_t>{0, 1, 2, 3}));
  EXPECT_EQ(ids(collect(c).others), (std::vector<uint64_t>{4, 5}));
}

TEST(RequestCollector, AnIdleQueueGivesAnEmptyBatch) {
  RequestCollector c(8);
  c.configure(policy(4, 1, 1 * kMs));
  EXPECT_EQ(collect(c).size(), 0u);
}

TEST(RequestCollector, RequestsThatArriveBeforeCompleteJoinTheBatch) {
  RequestCollector c(64);
  c.configure(policy(8));
  ASSERT_TRUE(push_ids(c.queue(), 2));
  CollectedBatch batch = c.wait_for_batch(c.take_carried());
  for (uint64_t id = 2; id < 12; ++id)
    ASSERT_EQ(c.queue().push(make_request(id), 0), PushResult::kOk);
  c.complete(batch);  // takes the late ones, up to the maximum
  EXPECT_EQ(ids(batch.others), (std::vector<uint64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(c.queue().size(), 4u);
}

TEST(RequestCollector, WithdrawnRequestsAreDroppedNotCounted) {
  RequestCollector c(16);
  c.configure(policy(2));
  auto* withdrawn = new Completion();
  ASSERT_EQ(withdrawn->give_up(), Completion::kWithdrawn);
  ASSERT_EQ(c.queue().push(make_request(0, withdrawn), 0), PushResult::kOk);
  ASSERT_EQ(c.queue().push(make_request(1), 0), PushResult::kOk);
  ASSERT_EQ(c.queue().push(make_request(2), 0), PushResult::kOk);
  CollectedBatch batch = collect(c);
  EXPECT_EQ(ids(batch.others), (std::vector<uint64_t>{1, 2}));
  ASSERT_EQ(batch.dropped.size(), 1u);
  EXPECT_EQ(batch.dropped[0].completion, withdrawn);
  batchserve_test::release_both(withdrawn);
}

// A prefetch took 6 when the maximum was 8; the maximum is lowered to 4
// before the server collects: 4 are served (the prefetched rows first), the
// rest are carried to the next batch, ahead of anything queued later.
TEST(RequestCollector, ALoweredMaximumCarriesTheExcessToTheNextBatch) {
  RequestCollector c(64);
  c.configure(policy(8));
  std::vector<std::unique_ptr<Leaf>> leaves;
  for (uint64_t id = 0; id < 6; ++id) {
    leaves.push_back(std::make_unique<Leaf>(id));
    ASSERT_EQ(c.queue().push(leaves.back()->request(), 0), PushResult::kOk);
  }
  std::vector<uint64_t> column(8, 0);
  ASSERT_TRUE(c.prefetch(1, staging_of(column)));
  EXPECT_FALSE(c.prefetch(1, staging_of(column)));  // one job at a time
  c.configure(policy(4));
  CollectedBatch first = c.wait_for_batch(c.take_carried());
  ASSERT_EQ(c.queue().push(make_request(100), 0), PushResult::kOk);
  c.complete(first);
  EXPECT_EQ(ids(first.rows), (std::vector<uint64_t>{0, 1, 2, 3}));
  EXPECT_TRUE(first.others.empty());
  EXPECT_EQ(first.prefetched_into, reinterpret_cast<uintptr_t>(column.data()));
  for (uint64_t i = 0; i < 4; ++i) EXPECT_EQ(column[i], i);  // row i = rows[i]
  CollectedBatch second = collect(c);
  EXPECT_TRUE(second.rows.empty());  // carried requests are regathered
  EXPECT_EQ(second.prefetched_into, 0u);
  EXPECT_EQ(ids(second.others), (std::vector<uint64_t>{4, 5, 100}));
}

TEST(RequestCollector, APrefetchWithNothingQueuedStartsNothing) {
  RequestCollector c(8);
  std::vector<uint64_t> column(4, 0);
  EXPECT_FALSE(c.prefetch(1, staging_of(column)));
  EXPECT_TRUE(c.finish_prefetch().rows.empty());
}

// Serves `count` batches of one request each: request i comes from caller
// `caller_of(i)`, pushed by a thread of its own `delay` after the server
// starts waiting on the empty queue; the server adapts its spin after each
// (as the bindings do).
template <typename CallerOf>
void serve_one_at_a_time(RequestCollector& c, size_t count, std::chrono::microseconds delay,
                         CallerOf&& caller_of) {
  for (size_t i = 0; i < count; ++i) {
    BackgroundCall producer([&] {
      std::this_thread::sleep_for(delay);
      Request r = batchserve_test::make_request(1000 + i);
      r.caller = caller_of(i);
      ASSERT_EQ(c.queue().push(r, 0), PushResult::kOk);
    });
    CollectedBatch batch = c.wait_for_batch({});
    producer.join();
    c.complete(batch);
    ASSERT_EQ(batch.size(), 1u);
    c.adapt_server_spin(batch);
  }
}

// Callers in other processes are not waited for by the fill step, but they
// still want cores: with more of them than cores, the server never spins,
// however short its waits (the gaps here are as short as a thread start).
TEST(RequestCollector, CallersInOtherProcessesCountAgainstTheCores) {
  RequestCollector c(8);
  c.configure(policy(8, 1, 50 * kMs));
  const size_t callers = RequestCollector::cores() + 1;
  serve_one_at_a_time(
      c, SpinBudget::kMinSamples + callers, std::chrono::microseconds(0),
      [&](size_t i) { return batchserve::kSlotCallerBit | static_cast<uint32_t>(i % callers); });
  EXPECT_EQ(c.queue().server_spin_ns(), 0);
}

// The server learns the gaps it waits on an empty queue; a caller that
// comes back after 200 µs or more is not worth a spin.
TEST(RequestCollector, TheServerDoesNotSpinForCallersThatTakeLonger) {
  RequestCollector c(8);
  c.configure(policy(8, 1, 50 * kMs));
  EXPECT_EQ(c.queue().server_spin_ns(), 0);
  serve_one_at_a_time(c, SpinBudget::kMinSamples + 2, std::chrono::microseconds(200),
                      [](size_t) { return uint32_t{7}; });
  // The gaps were >= 200 µs: longer than any spin is worth.
  EXPECT_EQ(c.queue().server_spin_ns(), 0);
}

TEST(SpinBudget, SpinsForTheUpperQuartileOfShortGaps) {
  SpinBudget b;
  for (int i = 0; i < 3; ++i) b.observe(10'000);
  EXPECT_EQ(b.budget_ns(1, 2), 0);  // too few gaps yet
  b.observe(20'000);
  EXPECT_EQ(b.budget_ns(1, 2), 25'000);  // 20 µs + a quarter
  EXPECT_EQ(b.budget_ns(0, 2), 25'000);  // callers unknown
  for (int i = 0; i < 16; ++i) b.observe(i < 12 ? 8'000 : 1'000'000);
  EXPECT_EQ(b.budget_ns(1, 2), 0);  // a quarter of the gaps are long
  for (int i = 0; i < 16; ++i) b.observe(i % 2 ? 4'000 : 8'000);
  EXPECT_EQ(b.budget_ns(1, 2), 10'000);
}

TEST(SpinBudget, NoSpinWhenCallersAndServerOutnumberTheCores) {
  SpinBudget b;
  for (int i = 0; i < 8; ++i) b.observe(5'000);
  EXPECT_GT(b.budget_ns(1, 2), 0);
  EXPECT_EQ(b.budget_ns(2, 2), 0);
  EXPECT_EQ(b.budget_ns(8, 2), 0);
  EXPECT_GT(b.budget_ns(8, 16), 0);
}

TEST(SpinBudget, NegativeGapsCountAsNone) {
  SpinBudget b;
  for (int i = 0; i < 8; ++i) b.observe(-5);  // submitted just before the wait began
  EXPECT_EQ(b.budget_ns(1, 2), 0);
  EXPECT_EQ(b.samples(), 8u);
}

TEST(SpinBudget, TheMachineHasACore) {
  EXPECT_GE(batchserve::usable_cores(), 1u);
  EXPECT_LE(batchserve::usable_cores(), std::max(std::thread::hardware_concurrency(), 1u));
}

TEST(SpinBudget, ACpuQuotaCountsItsCoresRoundedUp) {
  EXPECT_EQ(batchserve::quota_cores(-1, 100'000), 0u);  // no quota ("max")
  EXPECT_EQ(batchserve::quota_cores(200'000, 100'000), 2u);
  EXPECT_EQ(batchserve::quota_cores(150'000, 100'000), 2u);
  EXPECT_EQ(batchserve::quota_cores(50'000, 100'000), 1u);
  EXPECT_EQ(batchserve::quota_cores(100'000, 0), 0u);
}

// Producers push while the server collects and prefetches back to back,
// with the maximum changing under it: every request is collected exactly
// once, and no batch exceeds the maximum it was completed under.
TEST(RequestCollector, ProducersRacingACollectingServerLoseNothing) {
  constexpr int kProducers = 3;
  constexpr uint64_t kPerProducer = 2000;
  RequestCollector c(32);
  c.configure(policy(8, 1, 1 * kMs));
  std::vector<std::unique_ptr<Leaf>> leaves;
  for (uint64_t id = 0; id < kProducers * kPerProducer; ++id)
    leaves.push_back(std::make_unique<Leaf>(id));
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p)
    producers.emplace_back([&, p] {
      for (uint64_t i = 0; i < kPerProducer; ++i) {
        const Request r = leaves[p * kPerProducer + i]->request();
        ASSERT_EQ(c.queue().push(r, batchserve::kNoDeadline), PushResult::kOk);
      }
    });
  std::vector<int> seen(kProducers * kPerProducer, 0);
  std::vector<uint64_t> column_a(8), column_b(8);
  size_t total = 0;
  bool over_maximum = false;
  for (int round = 0; total < seen.size(); ++round) {
    const size_t max_batch_size = round % 3 == 0 ? 3 : 8;
    c.configure(policy(max_batch_size, 1, 1 * kMs));
    CollectedBatch batch = c.wait_for_batch(c.take_carried());
    c.complete(batch);
    over_maximum = over_maximum || batch.size() > max_batch_size;
    for (const Request& r : batch.rows) ++seen[batchserve_test::id_of(r)];
    for (const Request& r : batch.others) ++seen[batchserve_test::id_of(r)];
    total += batch.size();
    c.prefetch(1, staging_of(round % 2 == 0 ? column_a : column_b));
  }
  for (auto& t : producers) t.join();
  EXPECT_FALSE(over_maximum);
  for (size_t id = 0; id < seen.size(); ++id) ASSERT_EQ(seen[id], 1) << "request " << id;
  EXPECT_TRUE(c.finish_prefetch().rows.empty());
}

// Two servers on one queue (one transport served twice): their phase one
// runs at once, phase two and take_carried under the owner's lock (the
// GIL in the bindings). A collection lives in its CollectedBatch, so every
// request is collected exactly once.
TEST(RequestCollector, TwoServersCollectingAtOnceLoseNothing) {
  constexpr uint64_t kRequests = 6000;
  RequestCollector c(64);
  c.configure(policy(8, 1, 1 * kMs));
  std::vector<std::unique_ptr<Leaf>> leaves;
  for (uint64_t id = 0; id < kRequests; ++id) leaves.push_back(std::make_unique<Leaf>(id));
  std::thread producer([&] {
    for (uint64_t id = 0; id < kRequests; ++id)
      ASSERT_EQ(c.queue().push(leaves[id]->request(), batchserve::kNoDeadline), PushResult::kOk);
  });
  std::mutex owner;  // the GIL's part
  std::vector<std::atomic<int>> seen(kRequests);
  std::atomic<uint64_t> total{0};
  auto server = [&](int which) {
    for (int round = 0; total.load() < kRequests; ++round) {
      std::vector<Request> carried;
      {
        std::lock_guard<std::mutex> lock(owner);
        if (which == 0) c.configure(policy(round % 3 == 0 ? 3 : 8, 1, 1 * kMs));
        carried = c.take_carried();
      }
      CollectedBatch batch = c.wait_for_batch(std::move(carried));
      std::lock_guard<std::mutex> lock(owner);
      c.complete(batch);
      for (const Request& r : batch.rows) seen[batchserve_test::id_of(r)].fetch_add(1);
      for (const Request& r : batch.others) seen[batchserve_test::id_of(r)].fetch_add(1);
      total.fetch_add(batch.size());
      c.adapt_server_spin(batch);
    }
  };
  std::thread first(server, 0), second(server, 1);
  producer.join();
  first.join();
  second.join();
  for (size_t id = 0; id < kRequests; ++id) ASSERT_EQ(seen[id].load(), 1) << "request " << id;
}

}  // namespace
