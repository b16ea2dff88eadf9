// wait_in_slices (csrc/core/sliced_wait.h): the one loop every blocking call
// waits in. Each slice ends by the deadline and at most one slice ahead; the
// caller is asked after every unfinished slice, and told when the deadline
// has passed.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "core/completion.h"
#include "core/sliced_wait.h"
#include "test_util.h"

namespace {

using batchserve::kNoDeadline;
using batchserve::kWaitSliceNs;
using batchserve::wait_in_slices;
using batchserve_test::BackgroundCall;
using batchserve_test::kMs;
using batchserve_test::monotonic_ns;

TEST(SlicedWait, APastDeadlineStillTriesOnceThenReportsExpiry) {
  int steps = 0;
  std::vector<bool> asked;
  const bool done = wait_in_slices(
      monotonic_ns() - 1,
      [&](int64_t) {
        ++steps;
        return false;
      },
      [&](bool expired) {
        asked.push_back(expired);
        return !expired;
      });
  EXPECT_FALSE(done);
  EXPECT_EQ(steps, 1);
  EXPECT_EQ(asked, std::vector<bool>{true});
}

TEST(SlicedWait, SlicesEndByTheDeadlineAndAtMostOneSliceAhead) {
  const int64_t deadline = monotonic_ns() + 3 * kMs;
  bool within = true;
  const bool done = wait_in_slices(
      deadline,
      [&](int64_t until) {
        const int64_t now = monotonic_ns();
        within = within && until <= deadline && until <= now + kWaitSliceNs;
        return false;
      },
      [](bool expired) { return !expired; });
  EXPECT_FALSE(done);
  EXPECT_TRUE(within);
  EXPECT_GE(monotonic_ns(), deadline);
}

TEST(SlicedWait, NoDeadlineSlicesAreOneSliceLong) {
  int64_t until_seen = 0;
  int64_t before = monotonic_ns();
  wait_in_slices(
      kNoDeadline,
      [&](int64_t until) {
        until_seen = until;
        return true;
      },
      [](bool) { return true; });
  EXPECT_GE(until_seen, before + kWaitSliceNs);
  EXPECT_LT(until_seen, kNoDeadline);
}

TEST(SlicedWait, AsksTheCallerAfterEachUnfinishedSlice) {
  int steps = 0, asked = 0;
  const bool done = wait_in_slices(
      kNoDeadline, [&](int64_t) { return ++steps == 3; },
      [&](bool expired) {
        EXPECT_FALSE(expired);
        ++asked;
        return true;
      });
  EXPECT_TRUE(done);
  EXPECT_EQ(steps, 3);
  EXPECT_EQ(asked, 2);
}

TEST(SlicedWait, TheCallerStopsTheWait) {
  int steps = 0;
  const bool done = wait_in_slices(
      kNoDeadline,
      [&](int64_t) {
        ++steps;
        return false;
      },
      [&](bool) { return steps < 2; });
  EXPECT_FALSE(done);
  EXPECT_EQ(steps, 2);
}

// A real wait: a caller waits in slices on its Completion while another
// thread publishes the result.
TEST(SlicedWait, SeesAResultPublishedByAnotherThread) {
  auto* completion = new batchserve::Completion();
  bool done = false;
  BackgroundCall waiter([&] {
    done = wait_in_slices(
        kNoDeadline, [&](int64_t until) { return completion->wait_until(until, 0); },
        [](bool) { return true; });
  });
  batchserve_test::pause_briefly();
  ASSERT_TRUE(completion->take());
  ASSERT_TRUE(completion->finish(nullptr, false));
  completion->notify();
  waiter.join();
  EXPECT_TRUE(done);
  batchserve_test::release_both(completion);
}

}  // namespace
