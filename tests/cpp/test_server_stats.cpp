// ServerStatsCore: exact counts since the last reset, windows of the most
// recent samples, callers' gaps between a hand-back and their next request.
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/server_stats.h"

namespace {

using batchserve::SampleWindow;
using batchserve::ServerStatsCore;
using batchserve::ServerStatsSnapshot;

constexpr int64_t kMs = 1'000'000;

TEST(SampleWindow, KeepsTheLastValuesOldestFirst) {
  SampleWindow w(3);
  EXPECT_TRUE(w.values().empty());
  for (double v : {1.0, 2.0}) w.push(v);
  EXPECT_EQ(w.values(), (std::vector<double>{1.0, 2.0}));
  for (double v : {3.0, 4.0, 5.0}) w.push(v);
  EXPECT_EQ(w.values(), (std::vector<double>{3.0, 4.0, 5.0}));
  w.clear();
  EXPECT_TRUE(w.values().empty());
}

TEST(ServerStatsCore, RefusesAnEmptyWindow) {
  EXPECT_THROW(ServerStatsCore(0), std::invalid_argument);
}

TEST(ServerStatsCore, CountsRequestsPerForward) {
  ServerStatsCore stats(16);
  // A fast batch of 3 served inline, then a batch split into forwards of 2
  // and 1 by interaction type (queue waits recorded once for its rows).
  stats.record_batch({3}, 0.5, true, true, {0, kMs, 2 * kMs}, 4 * kMs);
  stats.record_batch({2, 1}, 0.25, false, false, {10 * kMs}, 13 * kMs);
  const ServerStatsSnapshot s = stats.snapshot(false);
  EXPECT_EQ(s.requests, 6u);
  EXPECT_EQ(s.fast_path_requests, 3u);
  EXPECT_EQ(s.inline_requests, 3u);
  EXPECT_EQ(s.batches, 3u);
  EXPECT_EQ(s.batch_sizes, (std::vector<std::pair<uint64_t, uint64_t>>{{1, 1}, {2, 1}, {3, 1}}));
  EXPECT_EQ(s.forward_ms, (std::vector<double>{0.5, 0.25, 0.25}));
  EXPECT_EQ(s.queue_ms, (std::vector<double>{4.0, 3.0, 2.0, 3.0}));
}

TEST(ServerStatsCore, ServerTimesAndCallerGaps) {
  ServerStatsCore stats(16);
  // Callers 1 and 2 served together at t=5 ms; caller 1 comes back at
  // t=7 ms (a 2 ms gap), caller 0 (unknown) is never tracked.
  stats.record_hand_back({1 * kMs, 2 * kMs}, {1, 2}, 5 * kMs);
  stats.record_hand_back({7 * kMs, 8 * kMs}, {1, 0}, 9 * kMs);
  // A request sent before its caller's previous result came back (two in
  // flight at once) has no gap.
  stats.record_hand_back({4 * kMs}, {2}, 10 * kMs);
  const ServerStatsSnapshot s = stats.snapshot(false);
  EXPECT_EQ(s.server_ms, (std::vector<double>{4.0, 3.0, 2.0, 1.0, 6.0}));
  EXPECT_EQ(s.client_gap_ms, (std::vector<double>{2.0}));
}

TEST(ServerStatsCore, OneInlineRequestIsABatchOfOneAndItsHandBack) {
  ServerStatsCore stats(16);
  // Caller 3: submitted at 1 ms, dispatched at 2 ms, ended at 5 ms; back at
  // 6 ms and ended at 8 ms. Recorded as record_batch and record_hand_back
  // of a batch of one would record it.
  stats.record_one(1 * kMs, 2 * kMs, 5 * kMs, 3);
  stats.record_one(6 * kMs, 6 * kMs, 8 * kMs, 3);
  ServerStatsCore batched(16);
  batched.record_batch({1}, 3.0, true, true, {1 * kMs}, 2 * kMs);
  batched.record_hand_back({1 * kMs}, {3}, 5 * kMs);
  batched.record_batch({1}, 2.0, true, true, {6 * kMs}, 6 * kMs);
  batched.record_hand_back({6 * kMs}, {3}, 8 * kMs);
  const ServerStatsSnapshot s = stats.snapshot(false);
  const ServerStatsSnapshot b = batched.snapshot(false);
  EXPECT_EQ(s.requests, 2u);
  EXPECT_EQ(s.fast_path_requests, b.fast_path_requests);
  EXPECT_EQ(s.inline_requests, b.inline_requests);
  EXPECT_EQ(s.batches, b.batches);
  EXPECT_EQ(s.batch_sizes, b.batch_sizes);
  EXPECT_EQ(s.forward_ms, b.forward_ms);
  EXPECT_EQ(s.queue_ms, b.queue_ms);
  EXPECT_EQ(s.server_ms, b.server_ms);
  EXPECT_EQ(s.client_gap_ms, (std::vector<double>{1.0}));
  EXPECT_EQ(s.client_gap_ms, b.client_gap_ms);
}

TEST(ServerStatsCore, HandBackNeedsOneCallerPerRequest) {
  ServerStatsCore stats(4);
  EXPECT_THROW(stats.record_hand_back({1, 2}, {1}, 3), std::invalid_argument);
}

TEST(ServerStatsCore, WindowsKeepTheMostRecentSamples) {
  ServerStatsCore stats(2);
  for (int i = 0; i < 5; ++i) stats.record_batch({1}, i, true, false, {0}, i * kMs);
  const ServerStatsSnapshot s = stats.snapshot(false);
  EXPECT_EQ(s.requests, 5u);  // counts stay exact
  EXPECT_EQ(s.forward_ms, (std::vector<double>{3.0, 4.0}));
  EXPECT_EQ(s.queue_ms, (std::vector<double>{3.0, 4.0}));
}

TEST(ServerStatsCore, SnapshotWithResetStartsOver) {
  ServerStatsCore stats(8);
  stats.record_batch({2}, 1.0, true, false, {0, 0}, kMs);
  stats.record_hand_back({0}, {1}, kMs);
  EXPECT_EQ(stats.snapshot(true).requests, 2u);
  const ServerStatsSnapshot s = stats.snapshot(false);
  EXPECT_EQ(s.requests, 0u);
  EXPECT_TRUE(s.batch_sizes.empty() && s.queue_ms.empty() && s.server_ms.empty());
  // The callers' last hand-backs are forgotten too: no gap across a reset.
  stats.record_hand_back({2 * kMs}, {1}, 3 * kMs);
  EXPECT_TRUE(stats.snapshot(false).client_gap_ms.empty());
}

// The worker records while other threads read and reset (run under TSAN).
TEST(ServerStatsCore, RecordsWhileOthersReadAndReset) {
  ServerStatsCore stats(64);
  constexpr int kBatches = 20000;
  std::thread worker([&] {
    for (int i = 0; i < kBatches; ++i) {
      stats.record_batch({2}, 0.1, true, false, {i * kMs, i * kMs}, (i + 1) * kMs);
      stats.record_hand_back({i * kMs, i * kMs}, {1, 2}, (i + 2) * kMs);
    }
  });
  for (int i = 0; i < 200; ++i) {
    const ServerStatsSnapshot s = stats.snapshot(i % 50 == 49);
    EXPECT_EQ(s.requests, 2 * s.batches);
    EXPECT_LE(s.queue_ms.size(), 64u);
  }
  worker.join();
  const ServerStatsSnapshot last = stats.snapshot(false);
  EXPECT_EQ(last.requests, 2 * last.batches);
  EXPECT_LE(last.requests, 2u * kBatches);
}

}  // namespace
