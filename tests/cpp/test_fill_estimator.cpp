// FillEstimator: the fill step's target (the callers expected back) and its
// budget (learned from the gaps between the requests that came during fill
// waits).
#include <gtest/gtest.h>

#include <cstdint>
#include <thread>
#include <vector>

#include "core/fill_estimator.h"
#include "test_util.h"

namespace {

using batchserve::FillEstimator;
using batchserve::FillOutcome;
using batchserve::Request;

std::vector<Request> from_callers(const std::vector<uint32_t>& callers) {
  std::vector<Request> out;
  for (uint32_t c : callers) {
    Request r;
    r.caller = c;
    out.push_back(r);
  }
  return out;
}

// A fill step that waited (or not) and reached its target (or not), having
// taken `gained` requests, the last `gain_span_ns` after it started.
FillOutcome outcome(bool waited, bool reached, size_t gained = 0, int64_t gain_span_ns = 0) {
  FillOutcome o;
  o.waited = waited;
  o.reached = reached;
  o.gained = gained;
  o.gain_span_ns = gain_span_ns;
  return o;
}

TEST(FillEstimator, StartsWithNoTarget) {
  FillEstimator e;
  EXPECT_EQ(e.hint().target, 0u);
  EXPECT_GE(e.hint().budget_ns, FillEstimator::kMinBudgetNs);
}

TEST(FillEstimator, TheTargetCountsTheCallersSeen) {
  FillEstimator e;
  e.observe(from_callers({1, 2}), from_callers({3}), outcome(false, false));
  EXPECT_EQ(e.hint().target, 3u);
  e.observe(from_callers({2, 4}), {}, outcome(false, false));
  EXPECT_EQ(e.hint().target, 4u);  // 1 and 3 are still expected back
}

// Callers in other processes (shared-memory slots) are active (the spin
// budget counts them) but not waited for: the target counts this process's.
TEST(FillEstimator, CallersInOtherProcessesAreNotWaitedFor) {
  using batchserve::kSlotCallerBit;
  FillEstimator e;
  e.observe(from_callers({1, 2, kSlotCallerBit | 0, kSlotCallerBit | 1, kSlotCallerBit | 7}), {},
            outcome(false, false));
  EXPECT_EQ(e.hint().target, 2u);
  EXPECT_EQ(e.active_callers(), 5u);
  e.observe(from_callers({kSlotCallerBit | 3}), {}, outcome(false, false));
  EXPECT_EQ(e.hint().target, 2u);
  EXPECT_EQ(e.active_callers(), 6u);
}

TEST(FillEstimator, UnknownCallersAreNotCounted) {
  FillEstimator e;
  e.observe(from_callers({0, 0, 7}), {}, outcome(false, false));
  EXPECT_EQ(e.hint().target, 1u);
}

TEST(FillEstimator, AWaitThatRanOutForgetsTheMissingCallers) {
  FillEstimator e;
  e.observe(from_callers({1, 2, 3, 4}), {}, outcome(false, false));
  e.observe(from_callers({1, 2}), {}, outcome(true, false, 1, 300'000));
  EXPECT_EQ(e.hint().target, 2u);
}

TEST(FillEstimator, TheBudgetFollowsTheGapsBetweenArrivals) {
  FillEstimator e;
  // 4 requests came 40 µs apart on average (the last 160 µs in).
  for (int i = 0; i < 200; ++i)
    e.observe(from_callers({1, 2, 3, 4, 5}), {}, outcome(true, true, 4, 160'000));
  const double budget = FillEstimator::kGapFactor * 40'000.0;
  EXPECT_NEAR(static_cast<double>(e.hint().budget_ns), budget, budget / 20);
  // A wait that ran out halves the budget; one that reached the target
  // again restores it. Waits that took no request teach no gap.
  e.observe(from_callers({1}), {}, outcome(true, false));
  EXPECT_NEAR(static_cast<double>(e.hint().budget_ns), budget / 2, budget / 40);
  e.observe(from_callers({1, 2}), {}, outcome(true, true, 1, 40'000));
  EXPECT_NEAR(static_cast<double>(e.hint().budget_ns), budget, budget / 20);
}

// Callers that seldom come back together (a pool of threads sending now and
// then): each wait runs out, and the budget falls to its floor.
TEST(FillEstimator, WaitsThatKeepRunningOutCostTheFloor) {
  FillEstimator e;
  for (int i = 0; i < 200; ++i)
    e.observe(from_callers({1, 2}), {}, outcome(true, true, 1, 300'000));
  EXPECT_NEAR(static_cast<double>(e.hint().budget_ns), 900'000.0, 45'000.0);
  for (uint32_t caller = 3; caller < 40; ++caller) {
    e.observe(from_callers({caller}), {}, outcome(false, false));       // no wait: target met
    e.observe(from_callers({caller + 100}), {}, outcome(true, false));  // the other never came
  }
  EXPECT_EQ(e.hint().budget_ns, FillEstimator::kMinBudgetNs);
  EXPECT_EQ(e.hint().target, 1u);
}

TEST(FillEstimator, TheBudgetStaysWithinItsBounds) {
  FillEstimator e;
  for (int i = 0; i < 200; ++i) e.observe(from_callers({1}), {}, outcome(true, true, 1, 0));
  EXPECT_EQ(e.hint().budget_ns, FillEstimator::kMinBudgetNs);
  for (int i = 0; i < 200; ++i)
    e.observe(from_callers({1}), {}, outcome(true, true, 1, 60'000'000));
  EXPECT_EQ(e.hint().budget_ns, FillEstimator::kMaxBudgetNs);
}

// hint() from other threads while the owner observes (run under TSAN).
TEST(FillEstimator, HintIsSafeFromAnyThread) {
  FillEstimator e;
  std::thread reader([&] {
    for (int i = 0; i < 20000; ++i) {
      const auto h = e.hint();
      ASSERT_LE(h.target, 3u);
      ASSERT_GE(h.budget_ns, FillEstimator::kMinBudgetNs);
    }
  });
  for (int i = 0; i < 20000; ++i)
    e.observe(from_callers({1, 2, 3}), {}, outcome(true, i % 2 == 0, 1, 40'000));
  reader.join();
}

}  // namespace
