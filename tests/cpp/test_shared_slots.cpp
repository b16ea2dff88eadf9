// SharedSlots (csrc/core/shared_slots.h): the slot life cycle, the server's
// hand-back copy (write_responses), the races between a client's timeout and
// the server's take, many clients against one server, round-robin taking,
// dead-process recovery (with real child processes), and a RequestQueue fed
// by SlotIntake.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/batch_policy.h"
#include "core/shared_slots.h"
#include "core/slot_intake.h"
#include "slot_test_util.h"
#include "test_util.h"

namespace {

using batchserve::Request;
using batchserve::RequestQueue;
using batchserve::SharedSlots;
using batchserve::SlotHeader;
using batchserve::SlotIntake;
using batchserve::SlotLayout;
using batchserve::SlotWait;
using batchserve_test::fork_child;
using batchserve_test::kLongWait;
using batchserve_test::monotonic_ns;
using batchserve_test::poll_until;
using batchserve_test::tagged_id;
using batchserve_test::unique_name;

using batchserve_test::read_u64;
using batchserve_test::Segment;
using batchserve_test::write_u64;

// The server's half of one echo: response row = request row + 1.
void serve_all(SharedSlots& slots, std::vector<uint32_t>& taken) {
  for (uint32_t s : taken) {
    write_u64(slots.response_row(s, 0), read_u64(slots.request_row(s, 0)) + 1);
    slots.finish(s, false);
    slots.wake(s);
  }
  taken.clear();
}

TEST(SharedSlots, AttachSeesTheCreatorsLayoutAndChecksTheFingerprint) {
  Segment seg(10, 42);
  auto other = SharedSlots::attach(seg.name, 42);
  EXPECT_EQ(other->num_slots(), 10u);
  EXPECT_EQ(other->request_leaf_bytes(0), 8u);
  EXPECT_EQ(other->request_offset(0), seg.slots->request_offset(0));
  write_u64(seg.slots->request_row(3, 0), 99);
  EXPECT_EQ(read_u64(other->request_row(3, 0)), 99u);  // the same memory
  EXPECT_THROW(SharedSlots::attach(seg.name, 43), std::runtime_error);
  EXPECT_TRUE(seg.slots->unlink());
  EXPECT_THROW(SharedSlots::attach(seg.name, 42), std::system_error);
  EXPECT_EQ(read_u64(other->request_row(3, 0)), 99u);  // mappings outlive the name
}

TEST(SharedSlots, OneRequestRoundTrip) {
  Segment seg(4);
  SharedSlots& slots = *seg.slots;
  int s = -1;
  ASSERT_EQ(slots.claim(2, kLongWait + monotonic_ns(), s), SlotWait::kOk);
  EXPECT_EQ(s, 2);  // the hint is tried first
  EXPECT_EQ(slots.slot(s).owner.load(), static_cast<uint32_t>(::getpid()));
  write_u64(slots.request_row(s, 0), 41);
  ASSERT_EQ(slots.submit(s, monotonic_ns()), SlotWait::kOk);
  EXPECT_EQ(slots.ready_count(), 1u);
  std::vector<uint32_t> taken;
  EXPECT_EQ(slots.take(taken, 8), 1u);
  EXPECT_EQ(slots.slot(s).state.load(), SlotHeader::kTaken);
  serve_all(slots, taken);
  EXPECT_TRUE(slots.wait(s, monotonic_ns() + kLongWait));
  EXPECT_EQ(read_u64(slots.response_row(s, 0)), 42u);
  slots.release(s);
  EXPECT_EQ(slots.owned_slots(), 0u);
}

TEST(SharedSlots, WriteResponsesRoundTrip) {
  Segment seg(4, 7, {8, 3, 0});  // a zero-byte leaf too
  SharedSlots& slots = *seg.slots;
  int a = -1, b = -1;
  ASSERT_EQ(slots.claim(1, 0, a), SlotWait::kOk);
  ASSERT_EQ(slots.claim(3, 0, b), SlotWait::kOk);
  write_u64(slots.request_row(a, 0), 10);
  write_u64(slots.request_row(b, 0), 20);
  ASSERT_EQ(slots.submit(a, monotonic_ns()), SlotWait::kOk);
  ASSERT_EQ(slots.submit(b, monotonic_ns()), SlotWait::kOk);
  std::vector<uint32_t> taken;
  ASSERT_EQ(slots.take(taken, 8), 2u);
  // The server's batch output: one column per response leaf, row i for
  // taken[i]; leaf 0 echoes the request + 1, leaf 1 is three bytes of i.
  std::vector<uint64_t> echo;
  std::vector<uint8_t> small;
  for (size_t i = 0; i < taken.size(); ++i) {
    echo.push_back(read_u64(slots.request_row(taken[i], 0)) + 1);
    small.insert(small.end(), 3, static_cast<uint8_t>(i + 1));
  }
  slots.write_responses(taken,
                        {reinterpret_cast<const uint8_t*>(echo.data()), small.data(), nullptr});
  for (uint32_t s : taken) {
    EXPECT_TRUE(slots.finish(s, false));
    slots.wake(s);
  }
  for (int s : {a, b}) {
    ASSERT_TRUE(slots.wait(s, monotonic_ns() + kLongWait));
    const uint64_t request = read_u64(slots.request_row(s, 0));
    EXPECT_EQ(read_u64(slots.response_row(s, 0)), request + 1);
    const size_t row =
        static_cast<size_t>(std::find(taken.begin(), taken.end(), s) - taken.begin());
    const uint8_t* leaf1 = slots.response_row(s, 1);
    EXPECT_EQ(leaf1[0], row + 1);
    EXPECT_EQ(leaf1[2], row + 1);
    slots.release(s);
  }
  EXPECT_EQ(read_u64(slots.response_row(0, 0)), 0u);  // slots not in the batch
  EXPECT_EQ(read_u64(slots.response_row(2, 0)), 0u);
  EXPECT_EQ(slots.owned_slots(), 0u);
}

TEST(SharedSlots, WriteResponsesChecksBeforeWriting) {
  Segment seg(4, 7, {8, 3});
  SharedSlots& slots = *seg.slots;
  const std::vector<uint64_t> echo = {1, 2};
  const std::vector<uint8_t> small(6, 9);
  const std::vector<const uint8_t*> columns = {reinterpret_cast<const uint8_t*>(echo.data()),
                                               small.data()};
  // Slot 4 is past the segment's last slot; slot 0 comes first in the batch
  // and must not be written either.
  EXPECT_THROW(slots.write_responses({0, 4}, columns), std::out_of_range);
  EXPECT_THROW(slots.write_responses({0, 1}, {columns[0]}), std::length_error);
  for (uint32_t s = 0; s < 4; ++s) EXPECT_EQ(read_u64(slots.response_row(s, 0)), 0u);
  slots.write_responses({}, columns);  // an empty batch
}

TEST(SharedSlots, FullSlotsTimeOutThenAReleaseWakesAClaimer) {
  Segment seg(2);
  SharedSlots& slots = *seg.slots;
  int a = -1, b = -1, c = -1;
  ASSERT_EQ(slots.claim(0, 0, a), SlotWait::kOk);
  ASSERT_EQ(slots.claim(0, 0, b), SlotWait::kOk);
  EXPECT_EQ(slots.claim(0, monotonic_ns() + 1'000'000, c), SlotWait::kTimedOut);
  std::thread claimer(
      [&] { EXPECT_EQ(slots.claim(0, monotonic_ns() + kLongWait, c), SlotWait::kOk); });
  batchserve_test::pause_briefly();
  slots.release(a);
  claimer.join();
  EXPECT_EQ(c, a);
}

TEST(SharedSlots, TakeIsRoundRobinAcrossWordsAndTheWrap) {
  for (uint32_t n : {10u, 64u, 100u, 130u}) {
    Segment seg(n);
    SharedSlots& slots = *seg.slots;
    for (uint32_t i = 0; i < n; ++i) {
      int s = -1;
      ASSERT_EQ(slots.claim(i, 0, s), SlotWait::kOk);
      ASSERT_EQ(slots.submit(s, monotonic_ns()), SlotWait::kOk);
    }
    std::vector<uint32_t> order, taken;
    while (slots.take(taken, 3) > 0) {
      order.insert(order.end(), taken.begin(), taken.end());
      // resubmit the first of each take: it must not jump the queue
      const uint32_t again = taken.front();
      serve_all(slots, taken);
      if (order.size() < n) {
        ASSERT_EQ(slots.submit(again, monotonic_ns()), SlotWait::kOk);
      }
    }
    std::set<uint32_t> first_lap(order.begin(), order.begin() + n);
    EXPECT_EQ(first_lap.size(), n) << "n=" << n;  // every slot once before any twice
  }
}

TEST(SharedSlots, WithdrawAndTakeRaceEndEachRequestOnce) {
  Segment seg(64);
  SharedSlots& slots = *seg.slots;
  constexpr int kClients = 4, kRequests = 2000;
  std::atomic<int> done{0}, withdrawn{0}, abandoned{0}, served{0};
  std::atomic<bool> stop{false};
  std::thread server([&] {
    std::vector<uint32_t> taken;
    while (!stop.load()) {
      served += static_cast<int>(slots.take(taken, 16));
      for (uint32_t s : taken) {
        write_u64(slots.response_row(s, 0), read_u64(slots.request_row(s, 0)) + 1);
        if (slots.finish(s, false)) slots.wake(s);
      }
      taken.clear();
    }
  });
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (int i = 0; i < kRequests; ++i) {
        int s = -1;
        ASSERT_EQ(slots.claim(static_cast<uint32_t>(c), monotonic_ns() + kLongWait, s),
                  SlotWait::kOk);
        const uint64_t id = static_cast<uint64_t>(c) << 32 | static_cast<uint64_t>(i);
        write_u64(slots.request_row(s, 0), id);
        ASSERT_EQ(slots.submit(s, monotonic_ns()), SlotWait::kOk);
        if (i % 2 == 0 && slots.wait(s, monotonic_ns() + kLongWait)) {
          EXPECT_EQ(read_u64(slots.response_row(s, 0)), id + 1);
          ++done;
          slots.release(s);
          continue;
        }
        switch (slots.give_up(s)) {  // odd ids leave at once
          case SlotHeader::kIdle:
            ++withdrawn;
            slots.release(s);
            break;
          case SlotHeader::kAbandoned:
            ++abandoned;
            break;  // the server frees it
          default:
            EXPECT_EQ(read_u64(slots.response_row(s, 0)), id + 1);
            ++done;
            slots.release(s);
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  poll_until([&] { return slots.owned_slots() == 0 || slots.ready_count() > 0; });
  poll_until([&] { return slots.owned_slots() == 0; });  // abandoned slots freed by finish
  stop = true;
  server.join();
  EXPECT_EQ(done + withdrawn + abandoned, kClients * kRequests);
  // Every completed request was served once; an abandoned one was served
  // or dropped by the server's take (abandoned between its bit and its CAS).
  EXPECT_GE(served, done.load());
  EXPECT_LE(served, done + abandoned);
}

// Many clients, each running claim -> write its id -> submit -> wait ->
// read -> release cycles against one server that echoes ids in batches
// through write_responses. Every eighth request gives up after a moment, so
// withdraw and abandon race the server's take and finish. No request may be
// lost, served twice or answered with another request's response.
TEST(SharedSlots, ManyClientsGetExactlyTheirOwnResponses) {
  constexpr uint32_t kClients = 6, kRequests = 2000;
  constexpr size_t kBatch = 4;
  Segment seg(8);  // fewer slots than clients plus abandoned slots: claims wait too
  SharedSlots& slots = *seg.slots;
  enum Outcome : uint8_t { kNone, kAnswered, kWithdrawn, kAbandoned };
  // outcome[c][i]: how request i of client c ended (written by client c).
  std::vector<std::vector<Outcome>> outcome(kClients, std::vector<Outcome>(kRequests, kNone));
  std::vector<uint64_t> taken_ids, answered_ids;  // the server's; read after join
  std::atomic<bool> stop{false};

  std::thread server([&] {
    std::vector<uint32_t> taken;
    std::vector<uint64_t> echo;
    for (;;) {
      batchserve::park_until(
          slots.header()->work, [&] { return stop.load() || slots.any_ready(); },
          batchserve::kNoDeadline);
      if (stop.load()) return;
      taken.clear();
      slots.take(taken, kBatch);
      echo.clear();
      for (uint32_t s : taken) echo.push_back(read_u64(slots.request_row(s, 0)));
      slots.write_responses(taken, {reinterpret_cast<const uint8_t*>(echo.data())});
      for (size_t i = 0; i < taken.size(); ++i) {
        taken_ids.push_back(echo[i]);
        if (slots.finish(taken[i], false)) {  // false: abandoned, its slot freed
          answered_ids.push_back(echo[i]);
          slots.wake(taken[i]);
        }
      }
    }
  });

  std::vector<std::thread> clients;
  for (uint32_t c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (uint32_t i = 0; i < kRequests; ++i) {
        int s = -1;
        ASSERT_EQ(slots.claim(c, monotonic_ns() + kLongWait, s), SlotWait::kOk);
        const uint64_t id = tagged_id(c, i);
        write_u64(slots.request_row(s, 0), id);
        ASSERT_EQ(slots.submit(s, monotonic_ns()), SlotWait::kOk);
        // An impatient request waits 0, 5 or 10 us: giving up then races
        // the take (withdraw), the finish (abandon) or loses to the response.
        const bool impatient = i % 8 == 7;
        const int64_t deadline = monotonic_ns() + (impatient ? (i / 8 % 3) * 5'000 : kLongWait);
        Outcome& o = outcome[c][i];
        o = kAnswered;
        if (!slots.wait(s, deadline)) {
          switch (slots.give_up(s)) {
            case SlotHeader::kIdle:
              o = kWithdrawn;
              break;
            case SlotHeader::kAbandoned:
              o = kAbandoned;
              break;  // the server frees it
            default:
              break;  // the response won the race
          }
        }
        if (o == kAnswered) {
          EXPECT_EQ(read_u64(slots.response_row(s, 0)), id);
        }
        if (o != kAbandoned) slots.release(s);
      }
    });
  }
  for (auto& t : clients) t.join();
  poll_until([&] { return slots.owned_slots() == 0; });  // abandoned slots, freed by the server
  stop = true;
  slots.header()->work.notify_all();
  server.join();

  // Each request was taken at most once, and answered exactly when its
  // client read a response; a withdrawn one was never taken.
  std::set<uint64_t> taken_set(taken_ids.begin(), taken_ids.end());
  EXPECT_EQ(taken_set.size(), taken_ids.size()) << "a request was taken twice";
  std::set<uint64_t> answered_set(answered_ids.begin(), answered_ids.end());
  size_t counts[4] = {};
  for (uint32_t c = 0; c < kClients; ++c)
    for (uint32_t i = 0; i < kRequests; ++i) {
      const Outcome o = outcome[c][i];
      const uint64_t id = tagged_id(c, i);
      ++counts[o];
      SCOPED_TRACE("request " + std::to_string(i) + " of client " + std::to_string(c));
      if (i % 8 != 7) {
        EXPECT_EQ(o, kAnswered);
      }
      EXPECT_EQ(answered_set.count(id), o == kAnswered ? 1u : 0u);
      if (o == kWithdrawn) {
        EXPECT_EQ(taken_set.count(id), 0u);
      }
    }
  EXPECT_EQ(counts[kNone], 0u);
  EXPECT_EQ(counts[kAnswered] + counts[kWithdrawn] + counts[kAbandoned],
            size_t{kClients} * kRequests);
  EXPECT_EQ(answered_ids.size(), counts[kAnswered]);
  EXPECT_LE(taken_ids.size(), counts[kAnswered] + counts[kAbandoned]);
}

TEST(SharedSlots, SubmitAfterCloseIsWithdrawn) {
  Segment seg(4);
  SharedSlots& slots = *seg.slots;
  slots.close();
  int s = -1;
  EXPECT_EQ(slots.claim(0, monotonic_ns() + kLongWait, s), SlotWait::kClosed);
  slots.open_for(batchserve::self_identity());
  ASSERT_EQ(slots.claim(0, 0, s), SlotWait::kOk);
  slots.close();
  EXPECT_EQ(slots.submit(s, monotonic_ns()), SlotWait::kClosed);
  EXPECT_EQ(slots.ready_count(), 0u);
  EXPECT_EQ(slots.slot(s).state.load(), SlotHeader::kIdle);
}

TEST(SharedSlots, SlotsOfKilledClientsAreReaped) {
  Segment seg(8);
  SharedSlots& slots = *seg.slots;
  auto child_slots = SharedSlots::attach(seg.name, 7);
  // Child A claims a slot and dies holding it (kIdle); child B submits and
  // dies waiting for its result (kQueued, then served).
  const pid_t a = fork_child([&] {
    int s;
    child_slots->claim(0, batchserve::kNoDeadline, s);
    write_u64(child_slots->request_row(static_cast<uint32_t>(s), 0), 1);
  });
  const pid_t b = fork_child([&] {
    int s;
    child_slots->claim(4, batchserve::kNoDeadline, s);
    write_u64(child_slots->request_row(static_cast<uint32_t>(s), 0), 2);
    child_slots->submit(static_cast<uint32_t>(s), monotonic_ns());
  });
  poll_until([&] { return slots.owned_slots() == 2 && slots.ready_count() == 1; });
  ::kill(a, SIGKILL);
  ::kill(b, SIGKILL);
  // Not reaped by waitpid yet: zombies, which count as dead.
  poll_until([&] { return batchserve::process_start_time(static_cast<uint32_t>(a)) == 0; });
  poll_until([&] { return batchserve::process_start_time(static_cast<uint32_t>(b)) == 0; });
  EXPECT_EQ(slots.reap_dead_owners(), 1u);  // A's; B's request is still queued
  std::vector<uint32_t> taken;
  ASSERT_EQ(slots.take(taken, 8), 1u);
  EXPECT_EQ(slots.reap_dead_owners(), 0u);  // being served: left alone
  serve_all(slots, taken);
  EXPECT_EQ(slots.reap_dead_owners(), 1u);
  EXPECT_EQ(slots.owned_slots(), 0u);
  ::waitpid(a, nullptr, 0);
  ::waitpid(b, nullptr, 0);
}

TEST(SharedSlots, ClientsSeeADeadServer) {
  Segment seg(2);
  SharedSlots& slots = *seg.slots;
  EXPECT_FALSE(slots.server_dead());  // no server yet: clients wait for one
  const pid_t server = fork_child([&] { seg.slots->open_for(batchserve::self_identity()); });
  poll_until([&] { return slots.server_pid() == static_cast<uint32_t>(server); });
  EXPECT_FALSE(slots.server_dead());
  ::kill(server, SIGKILL);
  poll_until([&] { return slots.server_dead(); });
  int s = -1, t = -1;
  ASSERT_EQ(slots.claim(0, 0, s), SlotWait::kOk);
  ASSERT_EQ(slots.claim(0, 0, t), SlotWait::kOk);
  int u = -1;
  EXPECT_EQ(slots.claim(0, monotonic_ns() + 1'000'000, u), SlotWait::kServerDead);
  ::waitpid(server, nullptr, 0);
}

TEST(SharedSlots, ANewServerRecoversWhatADeadServerHeld) {
  Segment seg(4);
  SharedSlots& slots = *seg.slots;
  int a = -1, b = -1;
  ASSERT_EQ(slots.claim(0, 0, a), SlotWait::kOk);
  ASSERT_EQ(slots.claim(1, 0, b), SlotWait::kOk);
  ASSERT_EQ(slots.submit(static_cast<uint32_t>(a), monotonic_ns()), SlotWait::kOk);
  ASSERT_EQ(slots.submit(static_cast<uint32_t>(b), monotonic_ns()), SlotWait::kOk);
  // A server process takes both and dies serving them; the client of b
  // gives up meanwhile.
  const pid_t server = fork_child([&] {
    seg.slots->open_for(batchserve::self_identity());
    std::vector<uint32_t> taken;
    seg.slots->take(taken, 8);
  });
  poll_until([&] {
    return slots.slot(static_cast<uint32_t>(b)).state.load() == SlotHeader::kTaken &&
           slots.slot(static_cast<uint32_t>(a)).state.load() == SlotHeader::kTaken;
  });
  ::kill(server, SIGKILL);
  poll_until([&] { return slots.server_dead(); });
  EXPECT_EQ(slots.give_up(static_cast<uint32_t>(b)), SlotHeader::kAbandoned);
  slots.open_for(batchserve::self_identity());
  EXPECT_EQ(slots.ready_count(), 1u);  // a's request, queued again with its rows
  EXPECT_EQ(slots.slot(static_cast<uint32_t>(b)).owner.load(), 0u);  // b's slot freed
  std::vector<uint32_t> taken;
  ASSERT_EQ(slots.take(taken, 8), 1u);
  EXPECT_EQ(taken[0], static_cast<uint32_t>(a));
  ::waitpid(server, nullptr, 0);
}

TEST(SharedSlots, ReapingTakesTheSlotOnlyFromTheDeadOwner) {
  Segment seg(1);
  SharedSlots& slots = *seg.slots;
  // A slot owned by a dead pid, then released and claimed by a live process
  // between the reaper's checks: the owner CAS keeps the live claim.
  const pid_t dead = fork_child([] {});
  ::kill(dead, SIGKILL);
  ::waitpid(dead, nullptr, 0);
  slots.slot(0).owner.store(static_cast<uint32_t>(dead));
  EXPECT_EQ(slots.reap_dead_owners(), 1u);
  int s = -1;
  ASSERT_EQ(slots.claim(0, 0, s), SlotWait::kOk);
  EXPECT_EQ(slots.reap_dead_owners(), 0u);  // alive: kept
  EXPECT_EQ(slots.slot(0).owner.load(), static_cast<uint32_t>(::getpid()));
}

TEST(SlotIntake, FeedsARequestQueueAndItsBatchingPolicy) {
  Segment seg(16);
  SharedSlots& slots = *seg.slots;
  SlotIntake intake(seg.slots, 5);
  RequestQueue queue(8);
  queue.attach_intake(&intake);
  queue.reopen();
  EXPECT_EQ(slots.server_pid(), static_cast<uint32_t>(::getpid()));
  batchserve::BatchSettings settings;
  batchserve::BatchPolicy policy;
  policy.max_batch_size = 4;
  policy.timeout_ns = 1'000'000;
  settings.store(policy, queue);

  std::thread client([&] {  // wakes the server through the segment's event
    for (uint64_t i = 0; i < 6; ++i) {
      int s = -1;
      ASSERT_EQ(slots.claim(static_cast<uint32_t>(i), monotonic_ns() + kLongWait, s),
                SlotWait::kOk);
      write_u64(slots.request_row(static_cast<uint32_t>(s), 0), i);
      ASSERT_EQ(slots.submit(static_cast<uint32_t>(s), monotonic_ns()), SlotWait::kOk);
    }
  });
  std::vector<Request> all;
  while (all.size() < 6) {
    std::vector<Request> batch, dropped;
    batchserve::collect_batch(queue, settings, batch, dropped);
    EXPECT_LE(batch.size(), 4u);
    EXPECT_TRUE(dropped.empty());
    all.insert(all.end(), batch.begin(), batch.end());
  }
  client.join();
  std::set<uint64_t> ids;
  for (const Request& r : all) {
    EXPECT_EQ(r.intake, &intake);
    EXPECT_EQ(r.rows->schema_id, 5u);
    EXPECT_EQ(r.rows->data[0], slots.request_row(r.slot, 0));
    ids.insert(read_u64(static_cast<const uint8_t*>(r.rows->data[0])));
  }
  EXPECT_EQ(ids.size(), 6u);
  queue.close();
  EXPECT_TRUE(slots.closed());
}

}  // namespace

TEST(SlotIntake, AnIdleServerWithALongTimeoutStillReapsDeadClients) {
  Segment seg(4);
  SharedSlots& slots = *seg.slots;
  auto child_slots = SharedSlots::attach(seg.name, 7);
  SlotIntake intake(seg.slots, 1);
  RequestQueue queue(8);
  queue.attach_intake(&intake);
  queue.reopen();
  batchserve::BatchSettings settings;
  batchserve::BatchPolicy policy;
  policy.timeout_ns = 600'000'000'000;  // ten minutes: far past ctest's timeout
  settings.store(policy, queue);
  const pid_t a = fork_child([&] {
    int s;
    child_slots->claim(0, batchserve::kNoDeadline, s);
  });
  poll_until([&] { return slots.owned_slots() == 1; });
  // Nothing to serve: each collect returns when the intake's next look for
  // dead clients is due, not after the timeout (ctest's timeout is the
  // hang guard). The first look finds the client alive.
  std::vector<Request> batch, dropped;
  batchserve::collect_batch(queue, settings, batch, dropped);
  EXPECT_TRUE(batch.empty());
  EXPECT_EQ(intake.reaped(), 0u);
  ::kill(a, SIGKILL);
  ::waitpid(a, nullptr, 0);
  while (intake.reaped() == 0) {
    batchserve::collect_batch(queue, settings, batch, dropped);
    EXPECT_TRUE(batch.empty());
  }
  EXPECT_EQ(slots.owned_slots(), 0u);
  queue.close();
}
