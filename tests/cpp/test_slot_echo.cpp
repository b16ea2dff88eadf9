// SlotEcho: every submitted slot answered with the fixed response rows, from
// the echo's own thread; in-flight requests answered at stop, later ones
// refused (the segment is closed).
#include <gtest/gtest.h>

#include <cstdint>
#include <thread>
#include <vector>

#include "core/slot_client.h"
#include "core/slot_echo.h"
#include "slot_test_util.h"
#include "test_util.h"

namespace {

using batchserve::kNoDeadline;
using batchserve::PendingSlot;
using batchserve::SlotClaim;
using batchserve::SlotEcho;
using batchserve::SlotOutcome;
using batchserve::SlotRequester;
using batchserve_test::never_interrupted;
using batchserve_test::read_u64;
using batchserve_test::Segment;
using batchserve_test::submit;
using batchserve_test::without_gil;

std::vector<uint8_t> row_of(uint64_t value) {
  std::vector<uint8_t> row(sizeof value);
  batchserve_test::write_u64(row.data(), value);
  return row;
}

// One request through `client`: its answer's first response leaf.
uint64_t round_trip(SlotRequester& client, const std::shared_ptr<batchserve::SharedSlots>& slots,
                    uint64_t value) {
  PendingSlot pending(slots, submit(client, value));
  EXPECT_EQ(client.wait_for_outcome(pending, kNoDeadline, false, without_gil, never_interrupted),
            SlotOutcome::kReady);
  const uint64_t answer = read_u64(slots->response_row(pending.slot, 0));
  slots->release(pending.slot);
  return answer;
}

TEST(SlotEcho, AnswersEveryRequestWithItsRows) {
  Segment seg(8, 7, {8, 8});
  SlotEcho echo(seg.slots, {row_of(42), row_of(7)});
  echo.start();
  std::vector<std::thread> callers;
  std::vector<uint64_t> wrong(4, 0);
  for (size_t t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      SlotRequester client(seg.slots);
      for (uint64_t i = 0; i < 200; ++i)
        if (round_trip(client, seg.slots, i) != 42) ++wrong[t];
    });
  for (std::thread& c : callers) c.join();
  echo.stop();
  EXPECT_EQ(wrong, std::vector<uint64_t>(4, 0));
  EXPECT_EQ(echo.answered(), 800u);
}

TEST(SlotEcho, AfterStopRequestsAreRefused) {
  Segment seg(2);
  SlotEcho echo(seg.slots, {row_of(1)});
  echo.start();
  SlotRequester client(seg.slots);
  EXPECT_EQ(round_trip(client, seg.slots, 0), 1u);
  echo.stop();
  uint32_t s = 0;
  EXPECT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, s), SlotClaim::kClosed);
  EXPECT_EQ(echo.answered(), 1u);
}

TEST(SlotEcho, RowsMustMatchTheLayout) {
  Segment seg(2, 7, {8, 4});
  EXPECT_THROW(SlotEcho(seg.slots, {row_of(1)}), std::invalid_argument);  // one leaf short
  EXPECT_THROW(SlotEcho(seg.slots, {row_of(1), row_of(2)}),
               std::invalid_argument);  // 8 bytes, not 4
}

}  // namespace
