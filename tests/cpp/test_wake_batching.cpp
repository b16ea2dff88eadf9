// Wake batching (csrc/core/wake_batching.h): callers recorded while results
// are published are woken later, each once, and a completion's reference is
// dropped only after its caller was notified.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "core/slot_client.h"
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
  std::vector<Wake> to_wake{Wake{a}, Wake{nullptr, seg.slots.get(), {2}}, Wake{b},
                            Wake{nullptr, seg.slots.get(), {3}}};
  std::vector<Wake> deferred;
  batchserve::defer_completions(to_wake, deferred);
  ASSERT_EQ(deferred.size(), 2u);
  EXPECT_EQ(deferred[0].completion, a);
  EXPECT_EQ(deferred[1].completion, b);
  ASSERT_EQ(to_wake.size(), 2u);
  EXPECT_EQ(to_wake[0].waiter.slot, 2u);
  EXPECT_EQ(to_wake[1].waiter.slot, 3u);
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
  const batchserve::SlotWaiter waiter = seg.slots->waiter(s);
  ASSERT_TRUE(seg.slots->finish(s, false));
  std::vector<Wake> to_wake{Wake{nullptr, seg.slots.get(), waiter}};
  notify_and_release(to_wake);
  client.join();
  EXPECT_TRUE(done);
  seg.slots->release(s);
}

// -- slot wake chains (csrc/core/shared_slots.h) ---------------------------

using batchserve::SharedSlots;
using batchserve::SlotWaiter;

// Claims slot `s` (free) for this process.
uint32_t claim(SharedSlots& slots, uint32_t s) {
  const int got = slots.try_claim(s);
  EXPECT_EQ(got, static_cast<int>(s));
  return s;
}

// Claims slots 0 .. count-1, each with its caller waiting in the chain.
void claim_waiting_in_chain(SharedSlots& slots, uint32_t count) {
  for (uint32_t s = 0; s < count; ++s) {
    claim(slots, s);
    ASSERT_TRUE(slots.enter_wake_chain(s));
  }
}

// Whether slot `s`'s clients were woken between its construction and
// woken() (called once).
class WakeWatch {
 public:
  WakeWatch(SharedSlots& slots, uint32_t s)
      : event_(slots.slot(s).done), key_(event_.prepare_wait()) {}
  bool woken() { return event_.wait(key_, 0); }  // a deadline passed long ago: no sleep

 private:
  batchserve::EventCount& event_;
  uint32_t key_;
};

// A single-file segment of `n` slots.
struct SingleFile : Segment {
  explicit SingleFile(uint32_t n) : Segment(n, 7, {8}, 64, true) {}
};

uint64_t link_of(SharedSlots& slots, uint32_t s) {
  return slots.slot(s).wake_link.load(std::memory_order_acquire);
}

// The server links a slot only while its caller waits for the very request
// it ended; the caller leaving wakes what it was handed, once.
TEST(SlotWakeChain, LinksOnlyForTheRequestItsCallerWaitsFor) {
  Segment seg(4);
  SharedSlots& slots = *seg.slots;
  const uint32_t a = claim(slots, 0), b = claim(slots, 1);
  const SlotWaiter wa = slots.waiter(a), wb = slots.waiter(b);
  EXPECT_EQ(wa.owner, static_cast<uint32_t>(::getpid()));
  {
    WakeWatch watch_a(slots, a), watch_b(slots, b);
    const SlotWaiter batch[] = {wa, wb};
    slots.wake_chained(batch, 2);  // nobody waits in the chain: both woken now
    EXPECT_TRUE(watch_a.woken());
    EXPECT_TRUE(watch_b.woken());
  }
  EXPECT_EQ(link_of(slots, a), 0u);

  ASSERT_TRUE(slots.enter_wake_chain(a));
  EXPECT_FALSE(slots.enter_wake_chain(a));  // a second waiter of the same request
  {
    WakeWatch watch_a(slots, a), watch_b(slots, b);
    const SlotWaiter batch[] = {wa, wb};
    slots.wake_chained(batch, 2);
    EXPECT_TRUE(watch_a.woken());   // the chain's first
    EXPECT_FALSE(watch_b.woken());  // left to a's caller
  }
  EXPECT_EQ(link_of(slots, a), (uint64_t{wa.generation} << 32) | (b + 2));
  EXPECT_EQ(slots.leave_wake_chain(a), static_cast<int>(b));  // the caller's to pass on
  EXPECT_EQ(link_of(slots, a), 0u);
  EXPECT_EQ(slots.leave_wake_chain(a), -1);

  // a's caller moved on to its slot's next request: the server, ending the
  // old one late, must not hand it b.
  slots.release(a);
  claim(slots, a);
  ASSERT_NE(slots.waiter(a).generation, wa.generation);
  ASSERT_TRUE(slots.enter_wake_chain(a));
  const uint64_t waiting = link_of(slots, a);
  {
    WakeWatch watch_b(slots, b);
    const SlotWaiter batch[] = {wa, wb};
    slots.wake_chained(batch, 2);
    EXPECT_TRUE(watch_b.woken());
  }
  EXPECT_EQ(link_of(slots, a), waiting);
  EXPECT_EQ(slots.leave_wake_chain(a), -1);
  slots.release(a);
  slots.release(b);
}

// One chain per client process: a link never joins two owners' slots, and
// each process's first slot is woken by the server.
TEST(SlotWakeChain, ChainsStayWithinAClientProcess) {
  Segment seg(4);
  SharedSlots& slots = *seg.slots;
  claim_waiting_in_chain(slots, 3);
  SlotWaiter w0 = slots.waiter(0), w1 = slots.waiter(1), w2 = slots.waiter(2);
  w1.owner = w0.owner + 1;  // as if slot 1's client were another process
  WakeWatch watch0(slots, 0), watch1(slots, 1), watch2(slots, 2);
  const SlotWaiter batch[] = {w0, w1, w2};
  slots.wake_chained(batch, 3);
  EXPECT_TRUE(watch0.woken());
  EXPECT_TRUE(watch1.woken());
  EXPECT_FALSE(watch2.woken());
  EXPECT_EQ(link_of(slots, 0), (uint64_t{w0.generation} << 32) | 4u);  // slot 2
  EXPECT_EQ(static_cast<uint32_t>(link_of(slots, 1)), 1u);             // still waiting, unlinked
  EXPECT_EQ(slots.leave_wake_chain(0), 2);
  EXPECT_EQ(slots.leave_wake_chain(1), -1);
  EXPECT_EQ(slots.leave_wake_chain(2), -1);
  for (uint32_t s = 0; s < 3; ++s) slots.release(s);
}

// A slot freed while it holds a link (its client died mid-chain and was
// reaped) passes the wake on.
TEST(SlotWakeChain, FreeingALinkedSlotWakesTheNext) {
  Segment seg(2);
  SharedSlots& slots = *seg.slots;
  claim(slots, 0);
  claim(slots, 1);
  ASSERT_TRUE(slots.enter_wake_chain(0));
  const SlotWaiter batch[] = {slots.waiter(0), slots.waiter(1)};
  slots.wake_chained(batch, 2);
  WakeWatch watch1(slots, 1);
  slots.release(0);
  EXPECT_TRUE(watch1.woken());
  EXPECT_EQ(link_of(slots, 0), 0u);
  slots.release(1);
}

// The server's link and the caller's leave race: exactly one of them owns
// the linked slot's wake-up (run under TSAN in CI).
TEST(SlotWakeChain, ALinkedSlotIsWokenWhoeverWins) {
  Segment seg(2);
  SharedSlots& slots = *seg.slots;
  claim(slots, 0);
  claim(slots, 1);
  const SlotWaiter batch[] = {slots.waiter(0), slots.waiter(1)};
  for (int round = 0; round < 10000; ++round) {
    ASSERT_TRUE(slots.enter_wake_chain(0));
    WakeWatch watch1(slots, 1);
    std::atomic<int> taken{-1};
    std::thread caller([&] { taken.store(slots.leave_wake_chain(0)); });
    slots.wake_chained(batch, 2);
    caller.join();
    ASSERT_EQ(slots.leave_wake_chain(0), -1);  // nothing was linked after the caller left
    if (taken.load() == 1) {
      ASSERT_FALSE(watch1.woken()) << "round " << round;  // the caller's to wake, not the server's
    } else {
      ASSERT_EQ(taken.load(), -1);
      ASSERT_TRUE(watch1.woken()) << "round " << round;
    }
  }
  slots.release(0);
  slots.release(1);
}

// A batch's clients in one process, woken as a chain: every one wakes and
// reads its own result, whether it waited in the chain, waited outside it,
// or found its result before waiting; in either mode (single file, each
// thread passes the wake-up it holds when it ends).
TEST(SlotWakeChain, EveryClientOfAChainWakes) {
  constexpr uint32_t kClients = 16;
  for (const bool single_file : {false, true}) {
    Segment seg(kClients, 7, {8}, 64, single_file);
    SharedSlots& slots = *seg.slots;
    for (int round = 0; round < 200; ++round) {
      std::vector<uint32_t> slot_of(kClients);
      for (uint32_t i = 0; i < kClients; ++i) {
        slot_of[i] = claim(slots, i);
        ASSERT_EQ(slots.submit(i, 0), batchserve::SlotWait::kOk);
      }
      std::vector<uint64_t> seen(kClients, ~uint64_t{0});
      std::vector<std::thread> clients;
      for (uint32_t i = 0; i < kClients; ++i)
        clients.emplace_back([&, i] {
          const uint32_t s = slot_of[i];
          if (i % 3 == 0) {
            slots.wait(s, kNoDeadline);  // outside the chain
          } else {
            batchserve::SlotWakeTurn turn(seg.slots, s);
            slots.wait(s, kNoDeadline);
          }
          seen[i] = batchserve_test::read_u64(slots.response_row(s, 0));
          slots.release(s);
        });
      std::vector<uint32_t> taken;
      ASSERT_EQ(slots.take(taken, kClients), kClients);
      std::vector<SlotWaiter> ended;
      for (uint32_t s : taken) {
        batchserve_test::write_u64(slots.response_row(s, 0), 1000u * round + s);
        ended.push_back(slots.waiter(s));
        ASSERT_TRUE(slots.finish(s, false));
      }
      slots.wake_chained(ended.data(), ended.size());
      for (auto& t : clients) t.join();
      for (uint32_t i = 0; i < kClients; ++i)
        ASSERT_EQ(seen[i], 1000u * round + slot_of[i])
            << "round " << round << (single_file ? ", single file" : "");
    }
  }
}

// A wake-up a client was handed is held until its thread next lets the
// GIL go in a call (here: submits again) or ends.
TEST(SlotWakeChain, SingleFileAHeldWakeUpIsPassedAtTheNextCallOrWhenTheThreadEnds) {
  SingleFile seg(4);
  batchserve::SlotRequester client(seg.slots);
  SharedSlots& slots = *seg.slots;
  claim(slots, 3);                      // the slot whose wake-up is handed over
  auto handed_over = [&](uint32_t s) {  // s's caller waits in the chain (its turn)
    const SlotWaiter batch[] = {slots.waiter(s), slots.waiter(3)};
    slots.wake_chained(batch, 2);
  };
  WakeWatch watch(slots, 3);
  BackgroundCall ends([&] {
    const uint64_t value = 1;
    const uint32_t s = batchserve_test::submit(client, value);
    {
      batchserve::SlotWakeTurn turn(seg.slots, s);
      handed_over(s);
    }
  });
  ends.join();
  EXPECT_TRUE(watch.woken());  // passed as the thread ended

  WakeWatch watch_early(slots, 3), watch_again(slots, 3);
  bool woken_before_next_call = true;
  BackgroundCall calls_again([&] {
    const uint64_t value = 2;
    const uint32_t s = batchserve_test::submit(client, value);
    {
      batchserve::SlotWakeTurn turn(seg.slots, s);
      handed_over(s);
    }
    woken_before_next_call = watch_early.woken();
    batchserve_test::submit(client, value);  // passes it on
  });
  calls_again.join();
  EXPECT_FALSE(woken_before_next_call);
  EXPECT_TRUE(watch_again.woken());
}

// A thread that holds a wake-up and then waits for a free slot passes it
// on first: the slot it waits for may be the one the next caller frees.
TEST(SlotWakeChain, SingleFileAHeldWakeUpIsPassedBeforeWaitingForASlot) {
  SingleFile seg(2);
  SharedSlots& slots = *seg.slots;
  batchserve::SlotRequester client(seg.slots);
  claim(slots, 1);  // the next caller's: the one whose wake-up is handed over
  batchserve::EventCount& next_done = slots.slot(1).done;
  const uint32_t key = next_done.prepare_wait();
  bool claimed = false;
  BackgroundCall holder([&] {
    const uint64_t value = 1;
    const uint32_t s = batchserve_test::submit(client, value);  // slot 0
    {
      batchserve::SlotWakeTurn turn(seg.slots, s);
      const SlotWaiter batch[] = {slots.waiter(s), slots.waiter(1)};
      slots.wake_chained(batch, 2);
    }
    uint32_t again = 0;  // both slots held: waits until slot 1 is freed
    claimed = client.claim(kNoDeadline, batchserve_test::without_gil,
                           batchserve_test::never_interrupted, again) == batchserve::SlotClaim::kOk;
    slots.release(s);
    slots.release(again);
  });
  // Woken while the holder waits for a slot (a hang guard, not a timing).
  EXPECT_TRUE(next_done.wait(key, batchserve::deadline_after(30.0)));
  slots.release(1);
  holder.join();
  EXPECT_TRUE(claimed);
}

// A handed-over wake-up the caller before does not pass on: the server
// wakes the slot a limit after that caller took it, or, while nobody has
// taken it, a deadline per place after the hand-back; not once its result
// was read.
TEST(SlotWakeChain, SingleFileTheServerWakesAnOverdueHandedSlot) {
  constexpr int64_t kHeld = batchserve::kHeldWakeLimitNs;
  constexpr int64_t kPlace = batchserve::kHandedWakeDeadlineNs;
  static_assert(kHeld < kPlace, "a taken wake-up falls due before an untaken one");
  SingleFile seg(3);
  SharedSlots& slots = *seg.slots;
  auto served = [&](uint32_t s) {  // s: submitted, taken and ended
    claim(slots, s);
    EXPECT_EQ(slots.submit(s, 0), batchserve::SlotWait::kOk);
    std::vector<uint32_t> taken;
    EXPECT_EQ(slots.take(taken, 1), 1u);
    const SlotWaiter w = slots.waiter(s);
    EXPECT_TRUE(slots.finish(s, false));
    return w;
  };
  claim(slots, 0);
  ASSERT_TRUE(slots.enter_wake_chain(0));
  const SlotWaiter batch[] = {slots.waiter(0), served(1)};
  EXPECT_EQ(slots.handed_due_ns(), kNoDeadline);
  const int64_t before = batchserve::monotonic_ns();
  slots.wake_chained(batch, 2);
  const int64_t after = batchserve::monotonic_ns();
  // Untaken: the server looks again a limit later (it may be taken
  // meanwhile, and then falls due a limit after that).
  EXPECT_GE(slots.handed_due_ns(), before + kHeld);
  EXPECT_LE(slots.handed_due_ns(), after + kHeld);
  {
    WakeWatch watch(slots, 1);
    slots.wake_overdue(before);  // not "now": a loaded machine may be a deadline past the hand-back
    EXPECT_FALSE(watch.woken());
  }
  // Taken by slot 0's caller: due a limit after that.
  EXPECT_EQ(slots.leave_wake_chain(0), 1);
  const int64_t held = slots.slot(1).wake_held_since.load();
  ASSERT_GE(held, after);
  EXPECT_LE(slots.handed_due_ns(), held + kHeld);  // the server looks by then
  {
    WakeWatch watch(slots, 1);
    slots.wake_overdue(held + kHeld - 1);
    EXPECT_FALSE(watch.woken());
  }
  {
    WakeWatch watch(slots, 1);
    slots.wake_overdue(held + kHeld);
    EXPECT_TRUE(watch.woken());
  }
  EXPECT_EQ(slots.handed_due_ns(), kNoDeadline);

  // Untaken past its place's deadline: woken.
  ASSERT_TRUE(slots.enter_wake_chain(0));
  const SlotWaiter second[] = {slots.waiter(0), served(2)};
  slots.wake_chained(second, 2);
  {
    WakeWatch watch(slots, 2);
    slots.wake_overdue(batchserve::monotonic_ns() + kPlace);
    EXPECT_TRUE(watch.woken());
  }
  EXPECT_EQ(slots.leave_wake_chain(0), 2);  // the late pass: a spurious wake, harmless

  // Read before it fell due: not woken again.
  ASSERT_TRUE(slots.enter_wake_chain(0));
  slots.wake_chained(second, 2);
  slots.release(2);
  {
    WakeWatch watch(slots, 2);
    slots.wake_overdue(batchserve::monotonic_ns() + kPlace);
    EXPECT_FALSE(watch.woken());
  }
  EXPECT_EQ(slots.leave_wake_chain(0), 2);  // a spurious wake of a freed slot, harmless
  slots.release(0);
  slots.release(1);
}

// The k-th slot after a chain's first, while nobody has taken its
// wake-up, falls due k deadlines after the hand-back: a long chain is not
// woken early by the server.
TEST(SlotWakeChain, SingleFileLaterPlacesInAChainFallDueLater) {
  constexpr int64_t kPlace = batchserve::kHandedWakeDeadlineNs;
  SingleFile seg(3);
  SharedSlots& slots = *seg.slots;
  for (uint32_t s = 0; s < 3; ++s) {
    claim(slots, s);
    ASSERT_EQ(slots.submit(s, 0), batchserve::SlotWait::kOk);
  }
  std::vector<uint32_t> taken;
  ASSERT_EQ(slots.take(taken, 3), 3u);
  std::vector<SlotWaiter> ended;
  for (uint32_t s = 0; s < 3; ++s) {
    ended.push_back(slots.waiter(s));
    ASSERT_TRUE(slots.finish(s, false));
  }
  ASSERT_TRUE(slots.enter_wake_chain(0));
  ASSERT_TRUE(slots.enter_wake_chain(1));
  const int64_t before = batchserve::monotonic_ns();
  slots.wake_chained(ended.data(), ended.size());
  const int64_t after = batchserve::monotonic_ns();
  // A stall of a whole deadline around one call (a loaded machine) makes
  // the places below overlap: nothing to check then.
  if (after - before >= kPlace) GTEST_SKIP() << "stalled " << after - before << " ns";
  {
    WakeWatch watch1(slots, 1), watch2(slots, 2);
    slots.wake_overdue(after + kPlace);
    EXPECT_TRUE(watch1.woken());
    EXPECT_FALSE(watch2.woken());  // one place further: not yet due
  }
  {
    WakeWatch watch2(slots, 2);
    slots.wake_overdue(after + 2 * kPlace);
    EXPECT_TRUE(watch2.woken());
  }
  EXPECT_EQ(slots.handed_due_ns(), kNoDeadline);
  EXPECT_EQ(slots.leave_wake_chain(0), 1);
  EXPECT_EQ(slots.leave_wake_chain(1), 2);
  for (uint32_t s = 0; s < 3; ++s) slots.release(s);
}

// A batch's chain is appended to its process's chain from an earlier batch
// while that chain's last caller still waits; else its first slot is woken.
TEST(SlotWakeChain, SingleFileAChainUnderWayTakesTheNextBatchsSlots) {
  SingleFile seg(4);
  SharedSlots& slots = *seg.slots;
  claim_waiting_in_chain(slots, 4);
  const SlotWaiter first_batch[] = {slots.waiter(0), slots.waiter(1)};
  const SlotWaiter second_batch[] = {slots.waiter(2)};
  const SlotWaiter third_batch[] = {slots.waiter(3)};
  slots.wake_chained(first_batch, 2);
  {
    WakeWatch watch2(slots, 2);
    slots.wake_chained(second_batch, 1);
    EXPECT_FALSE(watch2.woken());  // handed to slot 1's caller, who still waits
  }
  EXPECT_EQ(slots.leave_wake_chain(0), 1);
  EXPECT_EQ(slots.leave_wake_chain(1), 2);
  EXPECT_EQ(slots.leave_wake_chain(2), -1);  // slot 2 ends its process's chain: it left
  {
    WakeWatch watch3(slots, 3);
    slots.wake_chained(third_batch, 1);
    EXPECT_TRUE(watch3.woken());  // no chain under way: woken by the server
  }
  EXPECT_EQ(slots.leave_wake_chain(3), -1);
  for (uint32_t s = 0; s < 4; ++s) slots.release(s);
}

// By default a caller passes the wake-up it was handed as its turn ends
// (the bindings: once it holds the GIL again), and the server keeps no
// chain across batches.
TEST(SlotWakeChain, ByDefaultAWakeUpIsPassedAsTheTurnEnds) {
  Segment seg(3);
  SharedSlots& slots = *seg.slots;
  ASSERT_FALSE(slots.single_file());
  claim(slots, 2);
  const uint64_t value = 1;
  batchserve::SlotRequester client(seg.slots);
  const uint32_t s = batchserve_test::submit(client, value);
  {
    WakeWatch watch(slots, 2);
    {
      batchserve::SlotWakeTurn turn(seg.slots, s);
      const SlotWaiter batch[] = {slots.waiter(s), slots.waiter(2)};
      slots.wake_chained(batch, 2);
    }
    EXPECT_TRUE(watch.woken());
  }
  EXPECT_EQ(slots.handed_due_ns(), kNoDeadline);  // nothing handed over to watch
  slots.release(s);
  slots.release(2);
}

}  // namespace
