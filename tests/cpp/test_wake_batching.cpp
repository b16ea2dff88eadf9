// Wake batching (csrc/core/wake_batching.h): callers recorded while results
// are published are woken later, each once, and a completion's reference is
// dropped only after its caller was notified.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "core/wake_batching.h"
#include "slot_test_util.h"
#include "test_util.h"

namespace {

using batchserve::Completion;
using batchserve::DeferredWakes;
using batchserve::kNoDeadline;
using batchserve::notify_and_release;
using batchserve::Wake;
using batchserve::WakeChainTurn;
using batchserve_test::BackgroundCall;
using batchserve_test::Segment;

TEST(WakeBatching, DeferCompletionsKeepsSlotsForNowInOrder) {
  Segment seg(4);
  auto* a = new Completion();
  auto* b = new Completion();
  std::vector<Wake> to_wake{Wake{a}, Wake{nullptr, seg.slots.get(), 2}, Wake{b},
                            Wake{nullptr, seg.slots.get(), 3}};
  std::vector<Wake> deferred;
  batchserve::defer_completions(to_wake, deferred);
  ASSERT_EQ(deferred.size(), 2u);
  EXPECT_EQ(deferred[0].completion, a);
  EXPECT_EQ(deferred[1].completion, b);
  ASSERT_EQ(to_wake.size(), 2u);
  EXPECT_EQ(to_wake[0].slot, 2u);
  EXPECT_EQ(to_wake[1].slot, 3u);
  notify_and_release(to_wake);
  notify_and_release(deferred);  // drops the requests' references
  EXPECT_TRUE(deferred.empty());
  a->release();
  b->release();
}

TEST(WakeBatching, DeferredWakesHandsOverEverythingOnce) {
  DeferredWakes deferred;
  EXPECT_TRUE(deferred.empty());
  auto* c = new Completion();
  std::vector<Wake> to_wake{Wake{c}};
  deferred.defer(to_wake);
  EXPECT_TRUE(to_wake.empty());
  EXPECT_FALSE(deferred.empty());
  std::vector<Wake> taken = deferred.take();
  EXPECT_EQ(taken.size(), 1u);
  EXPECT_TRUE(deferred.empty());
  EXPECT_TRUE(deferred.take().empty());
  notify_and_release(taken);
  c->release();
}

// A server publishes results, records the wake-ups, and wakes the callers
// only later, in one go; every caller sees its own result.
TEST(WakeBatching, CallersWokenLaterSeeTheirResults) {
  constexpr int kCallers = 8;
  std::vector<Completion*> completions;
  std::vector<int> values(kCallers);
  for (int i = 0; i < kCallers; ++i) {
    completions.push_back(new Completion());
    values[i] = i;
  }
  std::vector<std::unique_ptr<BackgroundCall>> callers;
  std::vector<int> seen(kCallers, -1);
  for (int i = 0; i < kCallers; ++i)
    callers.push_back(std::make_unique<BackgroundCall>([&, i] {
      Completion* c = completions[i];
      if (c->wait_until(kNoDeadline, 16)) seen[i] = *static_cast<int*>(c->outcome());
      c->release();  // the caller's reference
    }));
  DeferredWakes deferred;
  std::vector<Wake> to_wake;
  for (int i = 0; i < kCallers; ++i) {
    ASSERT_TRUE(completions[i]->take());
    ASSERT_TRUE(completions[i]->finish(&values[i], false));
    to_wake.push_back(Wake{completions[i]});
  }
  deferred.defer(to_wake);
  std::vector<Wake> now = deferred.take();
  notify_and_release(now);
  for (auto& c : callers) c->join();
  for (int i = 0; i < kCallers; ++i) EXPECT_EQ(seen[i], i);
}

// The link word of completion.h: a link holds only while a caller waits,
// and whatever was linked is handed to exactly one side.
TEST(WakeChain, LinksOnlyWhileACallerWaits) {
  auto* c = new Completion();
  auto* next = new Completion();
  EXPECT_FALSE(c->link_next(next));  // nobody entered
  EXPECT_EQ(c->leave_chain(), nullptr);
  c->enter_chain();
  c->enter_chain();  // a second waiter of the same request
  EXPECT_TRUE(c->link_next(next));
  EXPECT_FALSE(c->link_next(next));  // linked once
  EXPECT_EQ(c->leave_chain(), next);
  EXPECT_EQ(c->leave_chain(), nullptr);  // the second waiter: already taken
  c->enter_chain();
  EXPECT_EQ(c->leave_chain(), nullptr);
  EXPECT_FALSE(c->link_next(next));  // left before the server linked
  for (Completion* done : {c, next}) {
    done->release();
    done->release();
  }
}

// The server's link and the caller's leave race; the linked completion is
// woken by exactly one of them (run under TSAN in CI).
TEST(WakeChain, LinkedCompletionIsWokenByExactlyOneSide) {
  for (int round = 0; round < 10000; ++round) {
    auto* c = new Completion();
    auto* next = new Completion();
    std::atomic<int> wakers{0};
    c->enter_chain();
    std::thread caller([&] {
      if (Completion* taken = c->leave_chain()) {
        EXPECT_EQ(taken, next);
        wakers.fetch_add(1);
        batchserve::notify_and_release(taken);
      }
    });
    if (!c->link_next(next)) {
      wakers.fetch_add(1);
      batchserve::notify_and_release(next);
    }
    caller.join();
    ASSERT_EQ(wakers.load(), 1) << "round " << round;
    next->release();  // the caller's reference
    c->release();
    c->release();
  }
}

// A batch's callers woken as a chain: every one wakes and sees its result,
// whether it waited, or saw its result and left before the server linked.
TEST(WakeChain, EveryCallerOfAChainWakes) {
  constexpr int kCallers = 16;
  for (int round = 0; round < 200; ++round) {
    std::vector<Completion*> completions;
    std::vector<int> values(kCallers);
    for (int i = 0; i < kCallers; ++i) {
      completions.push_back(new Completion());
      values[i] = i;
    }
    std::vector<int> seen(kCallers, -1);
    std::vector<std::thread> callers;
    for (int i = 0; i < kCallers; ++i)
      callers.emplace_back([&, i] {
        Completion* c = completions[i];
        {
          WakeChainTurn turn(c);
          if (c->wait_until(kNoDeadline, i % 3 == 0 ? 1000 : 0))
            seen[i] = *static_cast<int*>(c->outcome());
        }
        c->release();  // the caller's reference
      });
    std::vector<Wake> to_wake;
    for (int i = 0; i < kCallers; ++i) {
      ASSERT_TRUE(completions[i]->take());
      ASSERT_TRUE(completions[i]->finish(&values[i], false));
      to_wake.push_back(Wake{completions[i]});
    }
    notify_and_release(to_wake);
    for (auto& t : callers) t.join();
    for (int i = 0; i < kCallers; ++i) ASSERT_EQ(seen[i], i) << "round " << round;
  }
}

TEST(WakeBatching, WakesAClientWaitingOnItsSlot) {
  Segment seg(2);
  int slot = -1;
  ASSERT_EQ(seg.slots->claim(0, kNoDeadline, slot), batchserve::SlotWait::kOk);
  const uint32_t s = static_cast<uint32_t>(slot);
  ASSERT_EQ(seg.slots->submit(s, 0), batchserve::SlotWait::kOk);
  bool done = false;
  BackgroundCall client([&] { done = seg.slots->wait(s, kNoDeadline); });
  std::vector<uint32_t> taken;
  ASSERT_EQ(seg.slots->take(taken, 1), 1u);
  ASSERT_TRUE(seg.slots->finish(s, false));
  std::vector<Wake> to_wake{Wake{nullptr, seg.slots.get(), s}};
  notify_and_release(to_wake);
  client.join();
  EXPECT_TRUE(done);
  seg.slots->release(s);
}

}  // namespace
