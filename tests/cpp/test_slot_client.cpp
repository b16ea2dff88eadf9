// SlotRequester and PendingSlot (csrc/core/slot_client.h): the actor's side
// of the slot protocol against a server played by the test: claim with the
// hint, submit rows, wait for the outcome in slices, and every way of
// leaving (timeout before or after the server took it, kept in flight, a
// signal, a server that shut down or died), each giving the slot back once.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "core/slot_client.h"
#include "core/slot_responses.h"
#include "slot_test_util.h"
#include "test_util.h"

namespace {

using batchserve::kNoDeadline;
using batchserve::PendingSlot;
using batchserve::RowSource;
using batchserve::SlotClaim;
using batchserve::SlotHeader;
using batchserve::SlotOutcome;
using batchserve::SlotRequester;
using batchserve::SlotWait;
using batchserve_test::BackgroundCall;
using batchserve_test::kMs;
using batchserve_test::monotonic_ns;
using batchserve_test::never_interrupted;
using batchserve_test::read_u64;
using batchserve_test::rows_of;
using batchserve_test::Segment;
using batchserve_test::submit;
using batchserve_test::without_gil;
using batchserve_test::write_u64;

uint32_t serve_one(batchserve::SharedSlots& slots) {
  std::vector<uint32_t> taken;
  batchserve_test::poll_until([&] { return slots.take(taken, 1) == 1; });
  const uint32_t s = taken[0];
  write_u64(slots.response_row(s, 0), read_u64(slots.request_row(s, 0)) + 1);
  if (slots.finish(s, false)) slots.wake(s);
  return s;
}

size_t free_slots(batchserve::SharedSlots& slots) {
  size_t n = 0;
  for (uint32_t s = 0; s < slots.num_slots(); ++s) n += slots.slot(s).owner.load() == 0 ? 1 : 0;
  return n;
}

TEST(SlotRequester, ARequestRoundTripsAndTheHintReusesItsSlot) {
  Segment seg(4);
  SlotRequester client(seg.slots);
  const uint64_t value = 41;
  const uint32_t s = submit(client, value);
  BackgroundCall server([&] { serve_one(*seg.slots); });
  PendingSlot pending(seg.slots, s);
  EXPECT_EQ(client.wait_for_outcome(pending, kNoDeadline, false, without_gil, never_interrupted),
            SlotOutcome::kReady);
  server.join();
  EXPECT_FALSE(pending.open);
  EXPECT_FALSE(client.failed(s));
  EXPECT_EQ(read_u64(seg.slots->response_row(s, 0)), 42u);
  seg.slots->release(s);
  uint32_t again = 99;
  ASSERT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, again), SlotClaim::kOk);
  EXPECT_EQ(again, s);  // the hint: the slot used last
  seg.slots->release(again);
}

// A result that arrives after the first slice ended (the server took more
// than kWaitSliceNs) is the wait's outcome: kReady, not the kInFlight the
// end of that slice reported. The server here answers from the slice-end
// check itself, so the answer comes exactly between two slices.
TEST(SlotRequester, AResultAfterTheFirstSliceIsReady) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 41;
  PendingSlot pending(seg.slots, submit(client, value));
  int slice_ends = 0;
  auto serve_at_first_slice_end = [&] {
    if (slice_ends++ == 0) serve_one(*seg.slots);
    return false;
  };
  EXPECT_EQ(
      client.wait_for_outcome(pending, kNoDeadline, false, without_gil, serve_at_first_slice_end),
      SlotOutcome::kReady);
  EXPECT_EQ(slice_ends, 1);
  EXPECT_FALSE(pending.open);
  EXPECT_EQ(read_u64(seg.slots->response_row(pending.slot, 0)), 42u);
  seg.slots->release(pending.slot);
}

TEST(SlotRequester, ClaimTimesOutWhileEverySlotIsHeld) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  uint32_t a = 0, b = 0, c = 0;
  ASSERT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, a), SlotClaim::kOk);
  ASSERT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, b), SlotClaim::kOk);
  EXPECT_EQ(client.claim(monotonic_ns() + 5 * kMs, without_gil, never_interrupted, c),
            SlotClaim::kNoFreeSlot);
  int asked = 0;
  EXPECT_EQ(client.claim(
                kNoDeadline, without_gil, [&] { return ++asked == 2; }, c),
            SlotClaim::kInterrupted);
  EXPECT_EQ(asked, 2);
  seg.slots->release(a);
  seg.slots->release(b);
}

TEST(SlotRequester, ClaimAndSubmitRefuseAClosedServer) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  uint32_t s = 0;
  ASSERT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, s), SlotClaim::kOk);
  seg.slots->close();
  const uint64_t value = 1;
  EXPECT_EQ(client.submit(s, rows_of(value), 0), SlotWait::kClosed);
  EXPECT_EQ(free_slots(*seg.slots), 2u);  // given back
  EXPECT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, s), SlotClaim::kClosed);
}

TEST(SlotRequester, SubmitChecksTheLeafCount) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  uint32_t s = 0;
  ASSERT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, s), SlotClaim::kOk);
  RowSource none;
  EXPECT_THROW(client.submit(s, none, 0), std::invalid_argument);
  seg.slots->release(s);
}

TEST(SlotRequester, ATimeoutBeforeTheServerTookItWithdrawsIt) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 1;
  PendingSlot pending(seg.slots, submit(client, value));
  EXPECT_EQ(client.wait_for_outcome(pending, monotonic_ns() + 5 * kMs, false, without_gil,
                                    never_interrupted),
            SlotOutcome::kWithdrawn);
  EXPECT_FALSE(pending.open);
  EXPECT_EQ(free_slots(*seg.slots), 2u);
  std::vector<uint32_t> taken;
  EXPECT_EQ(seg.slots->take(taken, 2), 0u);  // the server never sees it
}

TEST(SlotRequester, ATimeoutWhileServedAbandonsItAndTheServerFreesTheSlot) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 1;
  PendingSlot pending(seg.slots, submit(client, value));
  std::vector<uint32_t> taken;
  ASSERT_EQ(seg.slots->take(taken, 1), 1u);
  EXPECT_EQ(client.wait_for_outcome(pending, monotonic_ns() + 5 * kMs, false, without_gil,
                                    never_interrupted),
            SlotOutcome::kAbandoned);
  EXPECT_FALSE(pending.open);
  EXPECT_EQ(free_slots(*seg.slots), 1u);
  EXPECT_FALSE(seg.slots->finish(taken[0], false));  // abandoned: freed here
  EXPECT_EQ(free_slots(*seg.slots), 2u);
}

TEST(SlotRequester, KeptOnTimeoutTheRequestStaysInFlight) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 7;
  PendingSlot pending(seg.slots, submit(client, value));
  EXPECT_EQ(client.wait_for_outcome(pending, monotonic_ns() + 5 * kMs, true, without_gil,
                                    never_interrupted),
            SlotOutcome::kInFlight);
  EXPECT_TRUE(pending.open);
  EXPECT_FALSE(client.finished(pending));
  EXPECT_EQ(client.wait_for_outcome(pending, kNoDeadline, true, without_gil, [] { return true; }),
            SlotOutcome::kInterrupted);
  EXPECT_TRUE(pending.open);  // a signal does not end a kept request either
  const uint32_t s = serve_one(*seg.slots);
  EXPECT_TRUE(client.finished(pending));
  EXPECT_EQ(client.wait_for_outcome(pending, kNoDeadline, true, without_gil, never_interrupted),
            SlotOutcome::kReady);
  EXPECT_EQ(read_u64(seg.slots->response_row(s, 0)), 8u);
  seg.slots->release(s);
}

TEST(SlotRequester, ASignalLeavesABlockingCallsRequest) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 1;
  PendingSlot pending(seg.slots, submit(client, value));
  EXPECT_EQ(client.wait_for_outcome(pending, kNoDeadline, false, without_gil, [] { return true; }),
            SlotOutcome::kInterrupted);
  EXPECT_FALSE(pending.open);
  EXPECT_EQ(free_slots(*seg.slots), 2u);
}

TEST(SlotRequester, AServerThatShutDownEndsAQueuedRequest) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 1;
  PendingSlot pending(seg.slots, submit(client, value));
  seg.slots->close();
  EXPECT_EQ(client.wait_for_outcome(pending, kNoDeadline, false, without_gil, never_interrupted),
            SlotOutcome::kClosed);
  EXPECT_FALSE(pending.open);
  EXPECT_EQ(free_slots(*seg.slots), 2u);
}

TEST(SlotRequester, AFailedRequestCarriesItsError) {
  Segment seg(2, 7, {8}, 64);
  SlotRequester client(seg.slots);
  const uint64_t value = 1;
  PendingSlot pending(seg.slots, submit(client, value));
  std::vector<uint32_t> taken;
  ASSERT_EQ(seg.slots->take(taken, 1), 1u);
  const char encoded[] = "\x80\x04pickled";
  batchserve::write_error(*seg.slots, taken[0], encoded, sizeof encoded);
  ASSERT_TRUE(seg.slots->finish(taken[0], true));
  seg.slots->wake(taken[0]);
  ASSERT_EQ(client.wait_for_outcome(pending, kNoDeadline, false, without_gil, never_interrupted),
            SlotOutcome::kReady);
  ASSERT_TRUE(client.failed(taken[0]));
  const batchserve::SlotError e = client.error(taken[0]);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(e.encoded), e.encoded_len),
            std::string(encoded, sizeof encoded));
  seg.slots->release(taken[0]);
}

TEST(PendingSlot, DroppedUnreadItGivesTheSlotBackOnce) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 1;
  {
    PendingSlot pending(seg.slots, submit(client, value));
  }
  EXPECT_EQ(free_slots(*seg.slots), 2u);
  {
    PendingSlot pending(seg.slots, submit(client, value));
    EXPECT_TRUE(client.cancel(pending));
    EXPECT_FALSE(client.cancel(pending));  // already given back
  }
  EXPECT_EQ(free_slots(*seg.slots), 2u);
}

TEST(PendingSlot, ACopyInAForkedChildLeavesTheParentsRequestAlone) {
  Segment seg(2);
  SlotRequester client(seg.slots);
  const uint64_t value = 1;
  auto pending = std::make_unique<PendingSlot>(seg.slots, submit(client, value));
  const pid_t child = ::fork();
  if (child == 0) {
    pending.reset();  // the child's copy
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_EQ(free_slots(*seg.slots), 1u);  // still the parent's
  std::vector<uint32_t> taken;
  EXPECT_EQ(seg.slots->take(taken, 2), 1u);
  EXPECT_TRUE(seg.slots->finish(taken[0], false));
  pending.reset();
  EXPECT_EQ(free_slots(*seg.slots), 2u);
}

// Many client threads share one SlotRequester against a serving thread:
// each gets its own answer, and every slot is free at the end.
TEST(SlotRequester, ClientThreadsShareOneRequester) {
  constexpr int kThreads = 4;
  constexpr int kCalls = 200;
  Segment seg(3);
  SlotRequester client(seg.slots);
  std::atomic<bool> stop{false};
  std::thread server([&] {
    std::vector<uint32_t> taken;
    while (!stop.load()) {
      if (!batchserve::park_until(
              seg.slots->header()->work, [&] { return seg.slots->any_ready() || stop.load(); },
              monotonic_ns() + 10 * kMs))
        continue;
      taken.clear();
      seg.slots->take(taken, 8);
      for (uint32_t s : taken) {
        write_u64(seg.slots->response_row(s, 0), read_u64(seg.slots->request_row(s, 0)) + 1);
        if (seg.slots->finish(s, false)) seg.slots->wake(s);
      }
    }
  });
  std::vector<int> wrong(kThreads, 0);
  std::vector<std::thread> clients;
  for (int t = 0; t < kThreads; ++t)
    clients.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        const uint64_t value = static_cast<uint64_t>(t) * 1000 + i;
        uint32_t s = 0;
        ASSERT_EQ(client.claim(kNoDeadline, without_gil, never_interrupted, s), SlotClaim::kOk);
        ASSERT_EQ(client.submit(s, rows_of(value), monotonic_ns() + 1 * kMs), SlotWait::kOk);
        PendingSlot pending(seg.slots, s);
        ASSERT_EQ(
            client.wait_for_outcome(pending, kNoDeadline, false, without_gil, never_interrupted),
            SlotOutcome::kReady);
        if (read_u64(seg.slots->response_row(s, 0)) != value + 1) ++wrong[t];
        seg.slots->release(s);
      }
    });
  for (auto& c : clients) c.join();
  stop.store(true);
  seg.slots->header()->work.notify_all();
  server.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(wrong[t], 0);
  EXPECT_EQ(free_slots(*seg.slots), 3u);
}

}  // namespace
