// take_rows and the Prefetcher: which requests take staging rows, and a
// helper thread that gathers them while producers keep pushing (run under
// TSAN and ASan by CI).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "core/staging.h"
#include "test_util.h"

namespace {

using batchserve::Prefetcher;
using batchserve::Request;
using batchserve::RequestQueue;
using batchserve::RowSource;
using batchserve::StagingColumns;
using batchserve::take_rows;

// A request whose one 8-byte leaf holds its id, matching schema `schema`.
struct Leaf {
  uint64_t id;
  RowSource source;
  Leaf(uint64_t i, uint64_t schema) : id(i) {
    source.schema_id = schema;
    source.count = 1;
    source.data[0] = &id;
  }
};

Request request_of(const Leaf& leaf) {
  Request r;
  r.rows = &leaf.source;
  r.submit_ns = static_cast<int64_t>(leaf.id);
  return r;
}

StagingColumns staging_of(uint64_t* column, size_t rows) {
  StagingColumns s;
  s.base = {reinterpret_cast<uint8_t*>(column)};
  s.leaf_bytes = {sizeof(uint64_t)};
  s.rows = rows;
  return s;
}

// A job for schema 1 that takes up to `max_items` into `rows` rows of `column`.
Prefetcher::Job job_for(uint64_t* column, size_t rows, size_t max_items) {
  Prefetcher::Job job;
  job.max_items = max_items;
  job.schema_id = 1;
  job.staging = staging_of(column, rows);
  return job;
}

TEST(TakeRows, TakesMatchingRequestsInOrderUpToRoom) {
  std::vector<std::unique_ptr<Leaf>> leaves;
  std::vector<Request> from;
  for (uint64_t i = 0; i < 10; ++i) {
    leaves.push_back(std::make_unique<Leaf>(i, i % 3 == 0 ? 7 : 8));  // 0,3,6,9 other schema
    from.push_back(request_of(*leaves.back()));
  }
  Request general;  // no rows at all
  from.push_back(general);
  std::vector<Request> rows;
  take_rows(from, 8, 1, 4, rows);
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[0].submit_ns, 1);
  EXPECT_EQ(rows[3].submit_ns, 5);
  ASSERT_EQ(from.size(), 7u);  // 0,3,6,7,8,9 and the general one, in order
  EXPECT_EQ(from[0].submit_ns, 0);
  EXPECT_EQ(from[3].submit_ns, 7);
  EXPECT_EQ(from[6].rows, nullptr);
}

TEST(TakeRows, RequiresEnoughLeaves) {
  Leaf leaf(1, 5);
  std::vector<Request> from{request_of(leaf)};
  std::vector<Request> rows;
  take_rows(from, 5, 2, 10, rows);
  EXPECT_TRUE(rows.empty());
  EXPECT_EQ(from.size(), 1u);
}

TEST(Prefetcher, FinishWithoutStartIsEmpty) {
  RequestQueue queue(8);
  Prefetcher prefetcher(queue);
  EXPECT_FALSE(prefetcher.started());
  Prefetcher::Taken taken = prefetcher.finish();
  EXPECT_TRUE(taken.rows.empty() && taken.others.empty() && taken.dropped.empty());
}

TEST(Prefetcher, GathersWhatIsReadyIntoStaging) {
  RequestQueue queue(64);
  std::vector<std::unique_ptr<Leaf>> leaves;
  for (uint64_t i = 0; i < 12; ++i) {
    leaves.push_back(std::make_unique<Leaf>(100 + i, i % 4 == 3 ? 2 : 1));
    ASSERT_EQ(queue.push(request_of(*leaves.back()), 0), batchserve::PushResult::kOk);
  }
  std::vector<uint64_t> column(8, 0);
  Prefetcher prefetcher(queue);
  const Prefetcher::Job job = job_for(column.data(), column.size(), 10);
  prefetcher.start(job);
  EXPECT_TRUE(prefetcher.started());
  EXPECT_THROW(prefetcher.start(job), std::logic_error);  // one job at a time
  Prefetcher::Taken taken = prefetcher.finish();
  EXPECT_FALSE(prefetcher.started());
  // 10 taken: ids 100..109; 103 and 107 have schema 2.
  ASSERT_EQ(taken.rows.size(), 8u);
  ASSERT_EQ(taken.others.size(), 2u);
  EXPECT_EQ(taken.others[0].submit_ns, 103);
  const uint64_t expected[] = {100, 101, 102, 104, 105, 106, 108, 109};
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(column[i], expected[i]);
    EXPECT_EQ(static_cast<uint64_t>(taken.rows[i].submit_ns), expected[i]);
  }
  EXPECT_EQ(queue.size(), 2u);  // 110 and 111 were left for the server
}

TEST(Prefetcher, NeverWritesPastStagingRows) {
  RequestQueue queue(64);
  std::vector<std::unique_ptr<Leaf>> leaves;
  for (uint64_t i = 0; i < 20; ++i) {
    leaves.push_back(std::make_unique<Leaf>(i, 1));
    queue.push(request_of(*leaves.back()), 0);
  }
  auto column = std::make_unique<uint64_t[]>(4);  // exactly 4 rows: ASan guards the end
  Prefetcher prefetcher(queue);
  prefetcher.start(job_for(column.get(), 4, 64));
  Prefetcher::Taken taken = prefetcher.finish();
  EXPECT_EQ(taken.rows.size(), 4u);
  EXPECT_EQ(taken.others.size(), 16u);  // the rest go to the general path
  EXPECT_EQ(column[3], 3u);
}

TEST(Prefetcher, DropsWithdrawnRequests) {
  RequestQueue queue(8);
  Leaf leaf(1, 1);
  auto* withdrawn = new batchserve::Completion();
  ASSERT_EQ(withdrawn->give_up(), batchserve::Completion::kWithdrawn);
  Request r = request_of(leaf);
  r.completion = withdrawn;
  queue.push(r, 0);
  std::vector<uint64_t> column(4, 0);
  Prefetcher prefetcher(queue);
  prefetcher.start(job_for(column.data(), column.size(), 4));
  Prefetcher::Taken taken = prefetcher.finish();
  EXPECT_TRUE(taken.rows.empty());
  ASSERT_EQ(taken.dropped.size(), 1u);
  withdrawn->release();
  withdrawn->release();
}

// Producers push while the owner runs prefetch jobs back to back, like a
// server: every request is taken exactly once and lands in its own row.
TEST(Prefetcher, JobsRacingProducersLoseNothing) {
  constexpr int kProducers = 4;
  constexpr uint64_t kPerProducer = 2000;
  RequestQueue queue(256);
  std::vector<std::unique_ptr<Leaf>> leaves;
  for (uint64_t i = 0; i < kProducers * kPerProducer; ++i)
    leaves.push_back(std::make_unique<Leaf>(i, 1));
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p)
    producers.emplace_back([&, p] {
      for (uint64_t k = 0; k < kPerProducer; ++k)
        ASSERT_EQ(queue.push(request_of(*leaves[p * kPerProducer + k]),
                             batchserve_test::monotonic_ns() + batchserve_test::kLongWait),
                  batchserve::PushResult::kOk);
    });
  std::vector<int> seen(kProducers * kPerProducer, 0);
  std::vector<uint64_t> column(32, 0);
  Prefetcher prefetcher(queue);
  size_t total = 0;
  const int64_t give_up = batchserve_test::monotonic_ns() + batchserve_test::kLongWait;
  while (total < seen.size() && batchserve_test::monotonic_ns() < give_up) {
    prefetcher.start(job_for(column.data(), column.size(), 32));
    Prefetcher::Taken taken = prefetcher.finish();
    ASSERT_TRUE(taken.others.empty());
    for (size_t i = 0; i < taken.rows.size(); ++i) {
      ASSERT_EQ(column[i], static_cast<uint64_t>(taken.rows[i].submit_ns));
      ++seen[column[i]];
    }
    total += taken.rows.size();
  }
  for (auto& t : producers) t.join();
  EXPECT_EQ(total, seen.size());
  for (int s : seen) EXPECT_EQ(s, 1);
}

TEST(Prefetcher, DestroyedWhileIdleOrAfterAJob) {
  RequestQueue queue(8);
  {
    Prefetcher never_started(queue);
  }
  Leaf leaf(3, 1);
  queue.push(request_of(leaf), 0);
  std::vector<uint64_t> column(2, 0);
  Prefetcher prefetcher(queue);
  prefetcher.start(job_for(column.data(), column.size(), 2));
  EXPECT_EQ(prefetcher.finish().rows.size(), 1u);
}

}  // namespace
