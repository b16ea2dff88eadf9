// The server's hand-back through slots (csrc/core/slot_responses.h):
// response rows, the error area's limit, the fast path's scatter waking its
// clients.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/slot_responses.h"
#include "slot_test_util.h"
#include "test_util.h"

namespace {

using batchserve::kNoDeadline;
using batchserve_test::BackgroundCall;
using batchserve_test::read_u64;
using batchserve_test::Segment;
using batchserve_test::write_u64;

// Claims and submits `n` slots, then takes them as the server; their ids.
std::vector<uint32_t> taken_slots(batchserve::SharedSlots& slots, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    int s = -1;
    EXPECT_EQ(slots.claim(0, kNoDeadline, s), batchserve::SlotWait::kOk);
    write_u64(slots.request_row(static_cast<uint32_t>(s), 0), i);
    EXPECT_EQ(slots.submit(static_cast<uint32_t>(s), 0), batchserve::SlotWait::kOk);
  }
  std::vector<uint32_t> taken;
  EXPECT_EQ(slots.take(taken, n), n);
  return taken;
}

TEST(SlotResponses, WriteResponseLeafFillsTheSlotsRow) {
  Segment seg(2);
  const std::vector<uint32_t> taken = taken_slots(*seg.slots, 1);
  const uint64_t value = 1234;
  batchserve::write_response_leaf(*seg.slots, taken[0], 0, &value);
  EXPECT_EQ(read_u64(seg.slots->response_row(taken[0], 0)), 1234u);
}

TEST(SlotResponses, AnEncodingIsWrittenWholeOrNotAtAll) {
  Segment seg(2, 7, {8}, 32);
  const std::vector<uint32_t> taken = taken_slots(*seg.slots, 1);
  const uint32_t s = taken[0];
  const std::string fits(32, 'f');
  batchserve::write_error(*seg.slots, s, fits.data(), fits.size());
  EXPECT_EQ(seg.slots->slot(s).error_len, 32u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(seg.slots->error_area(s)), 32), fits);
  const std::string big(33, 'x');
  batchserve::write_error(*seg.slots, s, big.data(), big.size());
  EXPECT_EQ(seg.slots->slot(s).error_len, 0u);
  batchserve::write_error(*seg.slots, s, "enc", 3);
  EXPECT_EQ(seg.slots->slot(s).error_len, 3u);
  batchserve::write_error(*seg.slots, s, nullptr, 0);
  EXPECT_EQ(seg.slots->slot(s).error_len, 0u);
}

TEST(SlotResponses, ScatterWritesEachRowEndsAndWakesItsClient) {
  Segment seg(4, 7, {8, 16});
  const std::vector<uint32_t> taken = taken_slots(*seg.slots, 3);
  std::vector<int> woke(3, 0);
  std::vector<std::unique_ptr<BackgroundCall>> clients;
  for (size_t i = 0; i < 3; ++i)
    clients.push_back(std::make_unique<BackgroundCall>(
        [&, i] { woke[i] = seg.slots->wait(taken[i], kNoDeadline); }));
  std::vector<uint64_t> first = {10, 11, 12};
  std::vector<uint64_t> second = {20, 21, 22, 23, 24, 25};  // 16-byte rows
  batchserve::scatter_responses(*seg.slots, taken,
                                {reinterpret_cast<const uint8_t*>(first.data()),
                                 reinterpret_cast<const uint8_t*>(second.data())});
  for (auto& c : clients) c->join();
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(woke[i]);
    EXPECT_EQ(seg.slots->slot(taken[i]).state.load(), batchserve::SlotHeader::kDone);
    EXPECT_EQ(read_u64(seg.slots->response_row(taken[i], 0)), 10 + i);
    EXPECT_EQ(read_u64(seg.slots->response_row(taken[i], 1)), 20 + 2 * i);
    EXPECT_EQ(read_u64(seg.slots->response_row(taken[i], 1) + 8), 21 + 2 * i);
    seg.slots->release(taken[i]);
  }
}

TEST(SlotResponses, ScatterSkipsAbandonedSlotsAndFreesThem) {
  Segment seg(2);
  const std::vector<uint32_t> taken = taken_slots(*seg.slots, 1);
  ASSERT_EQ(seg.slots->give_up(taken[0]), batchserve::SlotHeader::kAbandoned);
  const uint64_t row = 5;
  batchserve::scatter_responses(*seg.slots, taken, {reinterpret_cast<const uint8_t*>(&row)});
  EXPECT_EQ(seg.slots->slot(taken[0]).owner.load(), 0u);
}

}  // namespace
