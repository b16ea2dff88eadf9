// EventCount, spin_then_park and Completion.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "core/completion.h"
#include "core/parking.h"
#include "test_util.h"

namespace {

using namespace batchserve_test;
using batchserve::EventCount;
using batchserve::kNoDeadline;
using batchserve::spin_then_park;

// Waits for `cond` with the plain EventCount protocol. Returns false if the
// long deadline passed first (a lost wake-up).
template <typename Cond>
bool await(EventCount& ec, Cond&& cond) {
  const int64_t deadline = monotonic_ns() + kLongWait;
  while (!cond()) {
    const uint32_t key = ec.prepare_wait();
    if (cond()) {
      ec.cancel_wait();
      return true;
    }
    if (!ec.wait(key, deadline)) return cond();
  }
  return true;
}

// ---------------------------------------------------------------- EventCount

TEST(EventCount, PrepareAndCancelTrackWaiters) {
  EventCount ec;
  EXPECT_FALSE(ec.has_waiters());
  ec.prepare_wait();
  EXPECT_TRUE(ec.has_waiters());
  ec.cancel_wait();
  EXPECT_FALSE(ec.has_waiters());
}

TEST(EventCount, NotifyAfterPrepareIsNotLost) {
  // Single thread: the notification lands between prepare_wait and wait, so
  // wait must return at once, as notified.
  EventCount ec;
  const uint32_t key = ec.prepare_wait();
  ec.notify_all();
  EXPECT_TRUE(ec.wait(key, kNoDeadline));
  EXPECT_FALSE(ec.has_waiters());
}

TEST(EventCount, NotifyBeforePrepareDoesNotCount) {
  EventCount ec;
  ec.notify_all();  // nobody announced: nothing to wake
  const uint32_t key = ec.prepare_wait();
  EXPECT_FALSE(ec.wait(key, monotonic_ns() + 20 * kMs));
  EXPECT_FALSE(ec.has_waiters());
}

TEST(EventCount, DeadlineInThePastReturnsPromptly) {
  EventCount ec;
  const int64_t t0 = monotonic_ns();
  const uint32_t key = ec.prepare_wait();
  EXPECT_FALSE(ec.wait(key, t0 - 1));
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_FALSE(ec.has_waiters());

  const uint32_t key2 = ec.prepare_wait();
  EXPECT_FALSE(ec.wait(key2, 0));
  EXPECT_FALSE(ec.has_waiters());
}

TEST(EventCount, TimedWaitWithoutNotifyTimesOut) {
  EventCount ec;
  EXPECT_TRUE(
      times_out(50 * kMs, [&](int64_t deadline) { return ec.wait(ec.prepare_wait(), deadline); }));
  EXPECT_FALSE(ec.has_waiters());
}

TEST(EventCount, WakesAParkedWaiter) {
  EventCount ec;
  std::atomic<bool> flag{false};
  bool woke = false;
  std::thread waiter([&] { woke = await(ec, [&] { return flag.load(); }); });
  // Make the change only once the waiter has announced itself.
  poll_until([&] { return ec.has_waiters(); });
  flag.store(true);
  ec.notify_all();
  waiter.join();
  EXPECT_TRUE(woke);
  EXPECT_FALSE(ec.has_waiters());
}

// What pass_token saw.
struct TokenRing {
  bool failed;     // a wait timed out: a lost wake-up stalled the ring
  int final_turn;  // whose move is next once every player made its moves
};

// `players` threads pass a token round a circle, `rounds` moves each, all
// sleeping on `ec` until it is their turn: `wait(me, my_turn)` waits for
// my_turn() and returns false if it timed out. A single lost wake-up stalls
// the ring (and shows up as a timed-out wait).
template <typename Wait>
TokenRing pass_token(EventCount& ec, int players, int rounds, Wait wait) {
  std::atomic<int> turn{0};
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int me = 0; me < players; ++me) {
    threads.emplace_back([&, me] {
      for (int i = 0; i < rounds && !failed.load(); ++i) {
        if (!wait(me, [&] { return turn.load() == me || failed.load(); })) {
          failed.store(true);
          ec.notify_all();
          return;
        }
        if (failed.load()) return;
        turn.store((me + 1) % players);
        ec.notify_all();
      }
    });
  }
  for (auto& t : threads) t.join();
  return {failed.load(), turn.load()};
}

// Two threads hand a token back and forth on one EventCount.
TEST(EventCount, PingPongNoLostWakeups) {
  EventCount ec;
  const TokenRing ring =
      pass_token(ec, 2, 10000, [&](int, auto my_turn) { return await(ec, my_turn); });
  EXPECT_FALSE(ring.failed);
  EXPECT_EQ(ring.final_turn, 0);  // pong made the last move
  EXPECT_FALSE(ec.has_waiters());
}

// Four threads on the same EventCount: notify_all must wake every waiter,
// not just one.
TEST(EventCount, TokenRingSharedEventCount) {
  EventCount ec;
  const TokenRing ring =
      pass_token(ec, 4, 1500, [&](int, auto my_turn) { return await(ec, my_turn); });
  EXPECT_FALSE(ring.failed);
  EXPECT_EQ(ring.final_turn, 0);
}

// ------------------------------------------------------------ spin_then_park

TEST(SpinThenPark, ReadyConditionReturnsAtOnce) {
  EventCount ec;
  int calls = 0;
  EXPECT_TRUE(spin_then_park(ec, [&] { return ++calls > 0; }, kNoDeadline, 100));
  EXPECT_EQ(calls, 1);
  EXPECT_FALSE(ec.has_waiters());
}

TEST(SpinThenPark, PastDeadlineReturnsFalsePromptly) {
  EventCount ec;
  const int64_t t0 = monotonic_ns();
  EXPECT_FALSE(spin_then_park(ec, [] { return false; }, t0 - 1, 64));
  EXPECT_LT(monotonic_ns() - t0, kPromptly);
  EXPECT_FALSE(ec.has_waiters());
}

TEST(SpinThenPark, TimesOutWhenNobodyComes) {
  EventCount ec;
  EXPECT_TRUE(times_out(50 * kMs, [&](int64_t deadline) {
    return spin_then_park(ec, [] { return false; }, deadline, 64);
  }));
  EXPECT_FALSE(ec.has_waiters());
}

TEST(SpinThenPark, WokenByNotify) {
  EventCount ec;
  std::atomic<bool> flag{false};
  bool result = false;
  BackgroundCall waiter([&] {
    result = spin_then_park(ec, [&] { return flag.load(); }, monotonic_ns() + kLongWait, 16);
  });
  poll_until([&] { return ec.has_waiters(); });  // parked
  flag.store(true);
  ec.notify_all();
  waiter.join();
  EXPECT_TRUE(result);
  EXPECT_LT(waiter.elapsed_ns(), kLongWait);  // woken, not timed out
  EXPECT_FALSE(ec.has_waiters());
}

TEST(SpinThenPark, ReportsConditionThatBecameTrueWithoutNotify) {
  // Nobody notifies, so the waiter sleeps to its deadline; the condition
  // turned true meanwhile (here: from its third check on), and the final
  // re-check reports it.
  EventCount ec;
  int calls = 0;
  constexpr int64_t kTimeout = 20 * kMs;
  const int64_t t0 = monotonic_ns();
  EXPECT_TRUE(spin_then_park(ec, [&] { return ++calls >= 3; }, t0 + kTimeout, 0));
  EXPECT_EQ(calls, 3);  // before parking, after announcing, after the sleep
  EXPECT_TRUE(ran_to_timeout(monotonic_ns() - t0, kTimeout));
  EXPECT_FALSE(ec.has_waiters());
}

TEST(SpinThenPark, PingPongNoLostWakeups) {
  EventCount ec;
  // One side parks at once, the other spins a little first.
  const TokenRing ring = pass_token(ec, 2, 10000, [&](int me, auto my_turn) {
    return spin_then_park(ec, my_turn, monotonic_ns() + kLongWait, me == 0 ? 0 : 32);
  });
  EXPECT_FALSE(ring.failed);
  EXPECT_EQ(ring.final_turn, 0);
}

// ---------------------------------------------------------------- Completion

TEST(Completion, StartsQueued) {
  auto* c = new Completion();
  EXPECT_EQ(c->state(), Completion::kQueued);
  EXPECT_EQ(c->outcome(), nullptr);
  EXPECT_FALSE(c->is_error());
  release_both(c);
}

TEST(Completion, GiveUpWhileQueuedWithdraws) {
  auto* c = new Completion();
  EXPECT_EQ(c->give_up(), Completion::kWithdrawn);
  EXPECT_EQ(c->state(), Completion::kWithdrawn);
  EXPECT_FALSE(c->take());  // the server must drop the request
  int value = 1;
  EXPECT_FALSE(c->finish(&value, false));
  EXPECT_EQ(c->state(), Completion::kWithdrawn);
  EXPECT_EQ(c->outcome(), nullptr);
  release_both(c);
}

TEST(Completion, GiveUpWhileTakenAbandons) {
  auto* c = new Completion();
  ASSERT_TRUE(c->take());
  EXPECT_EQ(c->state(), Completion::kTaken);
  EXPECT_FALSE(c->take());  // taken once only
  EXPECT_EQ(c->give_up(), Completion::kAbandoned);
  EXPECT_EQ(c->state(), Completion::kAbandoned);
  int value = 1;
  EXPECT_FALSE(c->finish(&value, false));  // the outcome stays the server's
  EXPECT_EQ(c->state(), Completion::kAbandoned);
  EXPECT_EQ(c->outcome(), nullptr);
  release_both(c);
}

TEST(Completion, FinishWinsOverGiveUp) {
  auto* c = new Completion();
  ASSERT_TRUE(c->take());
  int value = 42;
  EXPECT_TRUE(c->finish(&value, false));
  c->notify();
  EXPECT_EQ(c->state(), Completion::kDone);
  EXPECT_EQ(c->give_up(), Completion::kDone);
  EXPECT_EQ(c->state(), Completion::kDone);
  EXPECT_EQ(c->outcome(), &value);
  EXPECT_FALSE(c->is_error());
  release_both(c);
}

TEST(Completion, FinishWhileQueuedForShutdown) {
  auto* c = new Completion();
  int error = 3;
  EXPECT_TRUE(c->finish(&error, true));
  EXPECT_EQ(c->state(), Completion::kDone);
  EXPECT_FALSE(c->take());
  EXPECT_TRUE(c->wait_until(kNoDeadline, 0));  // already done
  EXPECT_EQ(c->outcome(), &error);
  EXPECT_TRUE(c->is_error());
  EXPECT_EQ(c->give_up(), Completion::kDone);
  release_both(c);
}

TEST(Completion, WaitUntilTimesOutThenWithdraws) {
  auto* c = new Completion();
  EXPECT_TRUE(times_out(20 * kMs, [&](int64_t deadline) { return c->wait_until(deadline, 16); }));
  EXPECT_EQ(c->give_up(), Completion::kWithdrawn);
  release_both(c);
}

// Runs `rounds` rounds of a two-party protocol on one completion each: the
// main thread creates it and calls `caller`, a long-lived second thread calls
// `server` on the same completion at about the same time (it spins for the
// hand-over, so on an idle machine the two really overlap), and `check` sees
// both results once both are done.
template <typename Server, typename Caller, typename Check>
void run_rounds(int rounds, Server server, Caller caller, Check check) {
  Progress published;  // rounds handed to the server
  Progress served;     // rounds the server completed
  std::atomic<Completion*> slot{nullptr};
  std::vector<int> server_result(static_cast<size_t>(rounds), 0);
  std::thread server_thread([&] {
    for (int round = 0; round < rounds; ++round) {
      published.wait_for(static_cast<uint64_t>(round) + 1);
      server_result[static_cast<size_t>(round)] = server(slot.load(), round);
      served.advance_to(static_cast<uint64_t>(round) + 1);
    }
  });
  for (int round = 0; round < rounds; ++round) {
    auto* c = new Completion();
    slot.store(c);
    published.advance_to(static_cast<uint64_t>(round) + 1);
    const int caller_result = caller(c, round);
    served.wait_for(static_cast<uint64_t>(round) + 1);
    check(server_result[static_cast<size_t>(round)], caller_result, round);
  }
  server_thread.join();
}

// Busy-waits a little, a different amount each round (0 to `spread` - 1
// pauses), to vary who is first.
void stagger(int round, int spread = 200) {
  for (int i = 0; i < (round * 37) % spread; ++i) batchserve::cpu_relax();
}

// The release order does not matter; whichever is last deletes (ASAN checks
// there is neither a leak nor a double free, TSAN that the delete is ordered
// after the other side's last access).
TEST(Completion, ReleaseFromBothSidesConcurrently) {
  run_rounds(
      5000,
      [](Completion* c, int round) {
        stagger(round);
        c->take();
        c->release();
        return 0;
      },
      [](Completion* c, int) {
        c->give_up();
        c->release();
        return 0;
      },
      [](int, int, int) {});
}

// The caller blocks in wait_until; the result arrives from another thread.
// Even rounds park at once (no spinning), odd rounds spin first.
TEST(Completion, WaitUntilReceivesResultFromAnotherThread) {
  static int values[2];
  int timed_out = 0;
  int wrong_outcome = 0;
  run_rounds(
      3000,
      [](Completion* c, int round) {
        const bool took = c->take();
        stagger(round);
        const bool stored = took && c->finish(&values[round % 2], false);
        c->notify();
        c->release();
        return stored ? 1 : 0;
      },
      [&](Completion* c, int round) {
        const int spin = (round % 2 == 0) ? 0 : 128;
        int ok = 1;
        if (!c->wait_until(monotonic_ns() + kLongWait, spin)) {
          ++timed_out;
          c->give_up();
          ok = 0;
        } else if (c->outcome() != &values[round % 2] || c->is_error()) {
          ++wrong_outcome;
          ok = 0;
        }
        c->release();
        return ok;
      },
      [](int, int, int) {});
  EXPECT_EQ(timed_out, 0);
  EXPECT_EQ(wrong_outcome, 0);
}

// The server (take, finish) and the caller (give_up) race; exactly one of
// them decides the request's fate.
TEST(Completion, TakeFinishGiveUpRaceHasExactlyOneWinner) {
  constexpr int kRounds = 10000;
  static int result_value = 0;
  // Server result bits.
  constexpr int kTook = 1;
  constexpr int kStored = 2;
  // Every seventh round the server finishes straight from kQueued (the
  // shutdown path) instead of take + finish.
  auto shutdown_round = [](int round) { return round % 7 == 3; };

  int withdrawn = 0, abandoned = 0, done = 0, inconsistent = 0;
  run_rounds(
      kRounds,
      [&](Completion* c, int round) {
        stagger(round);
        int bits = 0;
        if (shutdown_round(round)) {
          if (c->finish(&result_value, true)) bits |= kStored;
        } else if (c->take()) {
          bits |= kTook;
          stagger(round * 7, 600);  // the model runs: room to abandon
          if (c->finish(&result_value, false)) bits |= kStored;
        }
        c->notify();
        c->release();
        return bits;
      },
      [&](Completion* c, int round) {
        if (round % 4 == 0) {
          // Give up only once the server has moved: races give_up against
          // finish (kAbandoned or kDone) rather than against take.
          poll_until([c] { return c->state() != Completion::kQueued; });
        } else {
          stagger(round * 3 + 1, 1500);  // the server needs a moment to start
        }
        // Sometimes check for the result first, as a real caller does.
        if (round % 5 == 0) c->wait_until(monotonic_ns(), 8);
        const Completion::State state = c->give_up();
        int code = static_cast<int>(state);
        if (state == Completion::kDone &&
            (c->outcome() != &result_value || c->is_error() != shutdown_round(round)))
          code = -1;  // the winner's outcome did not arrive intact
        c->release();
        return code;
      },
      [&](int server_bits, int caller_code, int) {
        const bool stored = (server_bits & kStored) != 0;
        const bool took = (server_bits & kTook) != 0;
        switch (caller_code) {
          case Completion::kDone:
            ++done;
            if (!stored) ++inconsistent;
            break;
          case Completion::kWithdrawn:
            // Withdrawn before the server claimed it: take() (or the finish
            // straight from kQueued) must have failed.
            ++withdrawn;
            if (stored || took) ++inconsistent;
            break;
          case Completion::kAbandoned:
            // Taken, then abandoned before finish: finish must have failed.
            ++abandoned;
            if (stored || !took) ++inconsistent;
            break;
          default:
            ++inconsistent;
        }
      });
  EXPECT_EQ(inconsistent, 0);
  EXPECT_EQ(withdrawn + abandoned + done, kRounds);
  std::printf("outcomes: withdrawn %d, abandoned %d, done %d\n", withdrawn, abandoned, done);
}

// A caller claims its own request only while it is queued; the server's
// take then fails and sees the claim (not a withdrawal), before and after
// the caller ended it.
TEST(Completion, ClaimOnlyWhileQueued) {
  auto* c = new Completion();
  ASSERT_TRUE(c->claim());
  EXPECT_EQ(c->state(), Completion::kClaimed);
  EXPECT_FALSE(c->ended());
  EXPECT_FALSE(c->claim());     // once
  EXPECT_FALSE(c->take());      // the server skips it
  EXPECT_FALSE(c->withdraw());  // running: too late to cancel
  EXPECT_TRUE(c->claimed_by_caller());
  int value = 5;
  EXPECT_TRUE(c->finish(&value, false));  // the caller ends it
  EXPECT_EQ(c->state(), Completion::kDone);
  EXPECT_EQ(c->outcome(), &value);
  EXPECT_TRUE(c->claimed_by_caller());  // still the caller's, seen from the queue
  release_both(c);

  auto* taken = new Completion();
  ASSERT_TRUE(taken->take());
  EXPECT_FALSE(taken->claim());  // the server has it
  release_both(taken);

  auto* withdrawn = new Completion();
  ASSERT_TRUE(withdrawn->withdraw());
  EXPECT_FALSE(withdrawn->claim());
  EXPECT_FALSE(withdrawn->take());
  EXPECT_FALSE(withdrawn->claimed_by_caller());  // dropped as withdrawn
  release_both(withdrawn);
}

// The server's take and the caller's claim race: exactly one wins, and the
// loser's view agrees (a failed take sees the claim).
TEST(Completion, ClaimTakeRaceHasExactlyOneWinner) {
  constexpr int kRounds = 10000;
  int claimed = 0, taken = 0, inconsistent = 0;
  run_rounds(
      kRounds,
      [&](Completion* c, int round) {
        stagger(round);
        int bits = c->take() ? 1 : 0;
        if (bits == 0 && !c->claimed_by_caller()) bits = -1;  // a claim must show
        c->release();
        return bits;
      },
      [&](Completion* c, int round) {
        stagger(round * 3 + 1);
        const bool won = c->claim();
        if (won) {
          static int value = 0;
          c->finish(&value, false);
        }
        c->release();
        return won ? 1 : 0;
      },
      [&](int server_took, int caller_claimed, int) {
        if (server_took < 0 || server_took + caller_claimed != 1) ++inconsistent;
        claimed += caller_claimed;
        taken += server_took > 0 ? 1 : 0;
      });
  EXPECT_EQ(inconsistent, 0);
  EXPECT_EQ(claimed + taken, kRounds);
  std::printf("outcomes: claimed %d, taken %d\n", claimed, taken);
}

}  // namespace

TEST(Completion, WithdrawOnlyWhileQueuedAndWakesWaiters) {
  auto* c = new Completion();
  EXPECT_TRUE(c->withdraw());
  EXPECT_TRUE(c->withdraw());  // already withdrawn: still true
  EXPECT_TRUE(c->ended());
  EXPECT_TRUE(c->wait_until(kNoDeadline, 0));  // a withdrawn request has ended
  EXPECT_FALSE(c->take());
  release_both(c);

  auto* taken = new Completion();
  ASSERT_TRUE(taken->take());
  EXPECT_FALSE(taken->withdraw());  // being served: a future's cancel() fails
  EXPECT_EQ(taken->state(), Completion::kTaken);
  int value = 5;
  EXPECT_TRUE(taken->finish(&value, false));
  EXPECT_FALSE(taken->withdraw());
  release_both(taken);
}

// A thread waiting in wait_until sees another thread's withdraw (a future
// cancelled while one of its caller's threads waits for its result).
TEST(Completion, WithdrawFromAnotherThreadEndsTheWait) {
  run_rounds(
      2000,
      [](Completion* c, int round) {
        stagger(round);
        const int withdrew = c->withdraw() ? 1 : 0;
        c->release();
        return withdrew;
      },
      [](Completion* c, int round) {
        const bool ended = c->wait_until(monotonic_ns() + kLongWait, round % 2 == 0 ? 0 : 64);
        const int ok = ended && c->state() == Completion::kWithdrawn ? 1 : 0;
        c->release();
        return ok;
      },
      [](int withdrew, int ok, int round) {
        EXPECT_EQ(withdrew, 1) << round;
        EXPECT_EQ(ok, 1) << round;
      });
}

// The watcher hand-over: the caller sets a watcher and then reads the state;
// the server finishes and then takes the watcher. Exactly one of them ends
// up with it (the server, to notify; or the caller, which saw the end and
// takes it back), never both and never neither.
TEST(Completion, WatcherIsTakenByExactlyOneSide) {
  static int watcher = 0;
  static int value = 0;
  int server_took = 0, caller_took = 0, lost_or_twice = 0;
  run_rounds(
      10000,
      [](Completion* c, int round) {
        stagger(round);
        const bool took = c->take();
        const bool stored = took && c->finish(&value, false);
        void* w = stored ? c->take_watcher() : nullptr;
        c->notify();
        c->release();
        return w == &watcher ? 1 : 0;
      },
      [](Completion* c, int round) {
        stagger(round * 5 + 2, 400);
        c->set_watcher(&watcher);
        int took = 0;
        if (c->ended()) took = c->take_watcher() == &watcher ? 1 : 0;
        c->wait_until(kNoDeadline, 0);
        c->release();
        return took;
      },
      [&](int server, int caller, int) {
        server_took += server;
        caller_took += caller;
        if (server + caller != 1) ++lost_or_twice;
      });
  EXPECT_EQ(lost_or_twice, 0);
  EXPECT_EQ(server_took + caller_took, 10000);
}
