// Single file for in-process callers (csrc/core/single_file.h): a caller
// holds the wake-up it was handed until its next call or its thread's end;
// the server wakes a handed wake-up that falls due; every caller of a chain
// wakes and each completion is released once, whoever wakes it (run under
// TSAN and ASAN in CI).
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "core/single_file.h"
#include "core/wake_batching.h"
#include "test_util.h"

namespace {

using batchserve::Completion;
using batchserve::HandedWakes;
using batchserve::HeldWake;
using batchserve::kHandedWakeDeadlineNs;
using batchserve::kHeldWakeLimitNs;
using batchserve::kNoDeadline;
using batchserve::monotonic_ns;
using batchserve::Wake;
using batchserve::WakeChainTurn;
using batchserve_test::BackgroundCall;

// Whether `c` was notified since the watch began; ask once (asking ends
// the watch).
class NotifyWatch {
 public:
  explicit NotifyWatch(Completion* c) : event_(c->done_event()), key_(event_.prepare_wait()) {}
  bool notified() { return event_.wait(key_, 0); }  // a deadline passed long ago: no sleep

 private:
  batchserve::EventCount& event_;
  uint32_t key_;
};

// `n` requests taken and ended by the server (their outcome: nothing).
std::vector<Completion*> ended(int n) {
  std::vector<Completion*> out;
  for (int i = 0; i < n; ++i) {
    auto* c = new Completion();
    EXPECT_TRUE(c->take());
    EXPECT_TRUE(c->finish(nullptr, false));
    out.push_back(c);
  }
  return out;
}

std::vector<Wake> wakes_of(const std::vector<Completion*>& cs) {
  std::vector<Wake> out;
  for (Completion* c : cs) out.push_back(Wake{c});
  return out;
}

void release_callers(const std::vector<Completion*>& cs) {
  for (Completion* c : cs) c->release();  // the callers' references
}

// The caller of `first` leaves its turn holding the wake-up of `second`
// (the server linked it behind `first`), on the calling thread.
void take_turn_holding(Completion* first, Completion* second, bool single_file) {
  WakeChainTurn turn(first, single_file);
  std::vector<Wake> batch = wakes_of({first, second});
  batchserve::notify_and_release(batch);
}

TEST(SingleFile, AHeldWakeUpIsPassedAtTheNextCallOrWhenTheThreadEnds) {
  std::vector<Completion*> cs = ended(2);
  NotifyWatch at_end(cs[1]);
  BackgroundCall ends([&] { take_turn_holding(cs[0], cs[1], true); });
  ends.join();
  EXPECT_TRUE(at_end.notified());  // passed as the thread ended
  release_callers(cs);

  cs = ended(2);
  NotifyWatch early(cs[1]), at_call(cs[1]);
  bool notified_before_pass = true;
  BackgroundCall calls_again([&] {
    take_turn_holding(cs[0], cs[1], true);
    notified_before_pass = early.notified();
    HeldWake::pass();  // what its next call does first
  });
  calls_again.join();
  EXPECT_FALSE(notified_before_pass);
  EXPECT_TRUE(at_call.notified());
  EXPECT_GT(cs[1]->held_since(), 0);
  release_callers(cs);
}

TEST(SingleFile, HoldingAnotherPassesTheOneHeldBefore) {
  std::vector<Completion*> cs = ended(4);
  NotifyWatch first_held(cs[1]), second_held(cs[3]), second_at_end(cs[3]);
  bool first_passed = false, second_passed = true;
  BackgroundCall caller([&] {
    take_turn_holding(cs[0], cs[1], true);
    take_turn_holding(cs[2], cs[3], true);
    first_passed = first_held.notified();
    second_passed = second_held.notified();
  });
  caller.join();
  EXPECT_TRUE(first_passed);
  EXPECT_FALSE(second_passed);
  EXPECT_TRUE(second_at_end.notified());
  release_callers(cs);
}

TEST(SingleFile, ByDefaultAWakeUpIsPassedAsTheTurnEnds) {
  std::vector<Completion*> cs = ended(2);
  NotifyWatch watch(cs[1]);
  bool notified = false;
  BackgroundCall caller([&] {
    take_turn_holding(cs[0], cs[1], false);
    notified = watch.notified();
  });
  caller.join();
  EXPECT_TRUE(notified);
  EXPECT_EQ(cs[1]->held_since(), 0);
  release_callers(cs);
}

// The server keeps every completion of a chain but its first: while
// untaken, each is looked at again a limit later and woken at its place's
// deadline, not before.
TEST(SingleFile, TheServerKeepsWhatItHandsOnBehindTheFirst) {
  HandedWakes handed;
  std::vector<Completion*> cs = ended(3);
  for (Completion* c : cs) c->enter_chain();
  std::vector<Wake> batch = wakes_of(cs);
  const int64_t before = monotonic_ns();
  batchserve::notify_and_release(batch, &handed);
  EXPECT_EQ(handed.size(), 2u);
  {
    NotifyWatch second(cs[1]), third(cs[2]);
    // Untaken: looked at again by its deadline, or a limit later if sooner.
    const int64_t now = before + kHandedWakeDeadlineNs - 1;
    const int64_t next = handed.wake_overdue(now);
    EXPECT_GE(next, before + kHandedWakeDeadlineNs);
    EXPECT_LE(next, now + kHeldWakeLimitNs);
    EXPECT_FALSE(second.notified());
    EXPECT_FALSE(third.notified());
  }
  {
    NotifyWatch second(cs[1]), third(cs[2]);
    EXPECT_EQ(handed.wake_overdue(kNoDeadline - 1), kNoDeadline);
    EXPECT_TRUE(second.notified());
    EXPECT_TRUE(third.notified());
    EXPECT_EQ(handed.size(), 0u);
  }
  for (Completion* c : cs)  // each caller leaves, passing what it was linked to
    if (Completion* next_one = c->leave_chain()) batchserve::notify_and_release(next_one);
  release_callers(cs);
}

// The k-th caller after a chain's first falls due k deadlines after the
// hand-back.
TEST(SingleFile, LaterPlacesInAChainFallDueLater) {
  HandedWakes handed;
  std::vector<Completion*> cs = ended(2);
  const int64_t t0 = monotonic_ns();
  for (size_t place = 1; place <= 2; ++place) {
    cs[place - 1]->enter_chain();
    handed.hand_over(cs[place - 1], place, t0);
  }
  {
    NotifyWatch first(cs[0]), second(cs[1]);
    handed.wake_overdue(t0 + kHandedWakeDeadlineNs);
    EXPECT_TRUE(first.notified());
    EXPECT_FALSE(second.notified());
  }
  {
    NotifyWatch second(cs[1]);
    handed.wake_overdue(t0 + 2 * kHandedWakeDeadlineNs);
    EXPECT_TRUE(second.notified());
  }
  for (Completion* c : cs) {
    EXPECT_EQ(c->leave_chain(), nullptr);
    c->release();  // the requests' references
  }
  release_callers(cs);
}

// Taken by the caller before: due a limit after it took it; a caller that
// left is forgotten, not woken.
TEST(SingleFile, TheServerWakesAHeldWakeUpALimitAfterItWasTaken) {
  HandedWakes handed;
  std::vector<Completion*> cs = ended(2);
  cs[1]->enter_chain();
  const int64_t now = monotonic_ns();
  handed.hand_over(cs[1], 1, now);
  const int64_t held = now + 1000;
  cs[1]->mark_held(held);
  EXPECT_EQ(handed.wake_overdue(held), held + kHeldWakeLimitNs);
  {
    NotifyWatch watch(cs[1]);
    handed.wake_overdue(held + kHeldWakeLimitNs - 1);
    EXPECT_FALSE(watch.notified());
  }
  {
    NotifyWatch watch(cs[1]);
    handed.wake_overdue(held + kHeldWakeLimitNs);
    EXPECT_TRUE(watch.notified());
    EXPECT_EQ(handed.size(), 0u);
  }
  EXPECT_EQ(cs[1]->leave_chain(), nullptr);

  handed.hand_over(cs[0], 1, now);  // its caller is not waiting
  NotifyWatch left(cs[0]);
  EXPECT_EQ(handed.wake_overdue(now + 10 * kHandedWakeDeadlineNs), kNoDeadline);
  EXPECT_FALSE(left.notified());
  EXPECT_EQ(handed.size(), 0u);
  for (Completion* c : cs) c->release();  // the requests' references
  release_callers(cs);
}

// A chain's callers in single file, with a server sweeping as if every
// handed wake-up were overdue at once: every caller wakes and reads its
// own result, whoever woke it, and every completion is freed once (ASAN),
// without a race (TSAN).
TEST(SingleFile, EveryCallerOfAChainWakesWhileTheServerSweeps) {
  constexpr int kCallers = 16;
  for (int round = 0; round < 200; ++round) {
    HandedWakes handed;
    std::vector<Completion*> completions;
    std::vector<int> values(kCallers), seen(kCallers, -1);
    for (int i = 0; i < kCallers; ++i) {
      completions.push_back(new Completion());
      values[i] = i;
    }
    std::vector<std::thread> callers;
    for (int i = 0; i < kCallers; ++i)
      callers.emplace_back([&, i] {
        Completion* c = completions[i];
        {
          WakeChainTurn turn(c, true);
          if (c->wait_until(kNoDeadline, i % 3 == 0 ? 1000 : 0))
            seen[i] = *static_cast<int*>(c->outcome());
        }
        c->release();  // the caller's reference; the thread's end passes its held wake-up
      });
    std::atomic<bool> stop{false};
    std::thread sweeper([&] {
      while (!stop.load(std::memory_order_acquire)) handed.wake_overdue(kNoDeadline - 1);
    });
    std::vector<Wake> to_wake;
    for (int i = 0; i < kCallers; ++i) {
      ASSERT_TRUE(completions[i]->take());
      ASSERT_TRUE(completions[i]->finish(&values[i], false));
      to_wake.push_back(Wake{completions[i]});
    }
    batchserve::notify_and_release(to_wake, round % 2 == 0 ? &handed : nullptr);
    for (auto& t : callers) t.join();
    stop.store(true, std::memory_order_release);
    sweeper.join();
    for (int i = 0; i < kCallers; ++i) ASSERT_EQ(seen[i], i) << "round " << round;
  }
}

}  // namespace
