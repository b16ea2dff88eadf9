// InlineGate (csrc/core/inline_gate.h): a caller borrows only while every
// server waits idle, a server leaving its idle wait waits for the borrow to
// end, and the two sides never serve at once; plus RequestCollector's
// try_inline (an empty queue, the only caller known).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "core/collector.h"
#include "core/inline_gate.h"
#include "test_util.h"

namespace {

using batchserve::BatchPolicy;
using batchserve::CollectedBatch;
using batchserve::InlineGate;
using batchserve::kNoDeadline;
using batchserve::PushResult;
using batchserve::RequestCollector;
using batchserve_test::BackgroundCall;
using batchserve_test::interrupt_until_returned;
using batchserve_test::kMs;
using batchserve_test::kSec;
using batchserve_test::make_request;

TEST(InlineGate, BorrowsOnlyWhileEveryServerIsIdle) {
  InlineGate g;
  EXPECT_FALSE(g.try_borrow());  // no server idle
  g.attach_server();
  g.attach_server();
  EXPECT_FALSE(g.try_borrow());
  g.server_idle();
  EXPECT_FALSE(g.try_borrow());  // the other server is busy
  g.server_idle();
  EXPECT_TRUE(g.try_borrow());
  EXPECT_FALSE(g.try_borrow());  // one caller at a time
  g.end_borrow();
  g.server_wake();
  EXPECT_FALSE(g.try_borrow());
  g.server_wake();
  g.detach_server();
  g.detach_server();
  EXPECT_FALSE(g.try_borrow());
}

TEST(InlineGate, AServerThatNeverAttachedKeepsCallersOut) {
  InlineGate g;
  g.server_idle();  // busy goes negative: no borrow
  EXPECT_FALSE(g.try_borrow());
  g.server_wake();
}

TEST(InlineGate, AWakingServerWaitsForTheBorrowToEnd) {
  InlineGate g;
  g.attach_server();
  g.server_idle();
  ASSERT_TRUE(g.try_borrow());
  std::atomic<bool> inline_done{false};
  std::atomic<bool> overlap{false};
  BackgroundCall server([&] {
    g.server_wake();
    if (!inline_done.load(std::memory_order_acquire)) overlap = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // give it the chance to overrun
  EXPECT_FALSE(server.returned());
  inline_done.store(true, std::memory_order_release);
  g.end_borrow();
  server.join();
  EXPECT_FALSE(overlap.load());
}

// A server going idle and waking in a loop, callers borrowing whenever they
// can: no caller runs while the server serves, and both make progress.
TEST(InlineGate, ServerAndCallersNeverServeAtOnce) {
  InlineGate g;
  g.attach_server();
  std::atomic<int> serving{0};
  std::atomic<bool> overlap{false};
  std::atomic<bool> stop{false};
  std::atomic<int> borrowed{0};
  auto serve = [&] {
    if (serving.fetch_add(1) != 0) overlap = true;
    for (volatile int spin = 0; spin < 50; ++spin) {
    }
    serving.fetch_sub(1);
  };
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; ++t)
    callers.emplace_back([&] {
      while (!stop.load()) {
        if (!g.try_borrow()) {
          std::this_thread::yield();
          continue;
        }
        serve();
        ++borrowed;
        g.end_borrow();
      }
    });
  for (int round = 0; round < 5000; ++round) {
    g.server_idle();
    if (round % 2 == 0) std::this_thread::yield();
    g.server_wake();
    serve();
  }
  stop = true;
  for (std::thread& t : callers) t.join();
  g.detach_server();
  EXPECT_FALSE(overlap.load());
}

BatchPolicy one_ms_policy() {
  BatchPolicy p;
  p.max_batch_size = 8;
  p.min_batch_size = 1;
  p.timeout_ns = 1 * kMs;
  return p;
}

// `n` batches, each of one request of `caller`, through the collector.
void serve_alone(RequestCollector& c, uint32_t caller, uint32_t n) {
  for (uint32_t i = 0; i < n; ++i) {
    batchserve::Request r = make_request(i);
    r.caller = caller;
    ASSERT_EQ(c.queue().push(r, 0), PushResult::kOk);
    CollectedBatch batch = c.wait_for_batch(c.take_carried());
    c.complete(batch);
    ASSERT_EQ(batch.size(), 1u);
  }
}

// The collector lets a caller in only while its server waits on an empty
// queue and the caller is the only one it knows, alone in its last batches.
TEST(RequestCollector, InlineOnlyWhileTheServerWaitsIdleForTheOnlyCaller) {
  RequestCollector c(64);
  c.configure(one_ms_policy());
  c.attach_server();
  serve_alone(c, 7, batchserve::FillEstimator::kSoloBatchesBeforeInline);
  EXPECT_FALSE(c.try_inline(7));  // the server is not waiting
  std::atomic<bool> go{false};
  BackgroundCall server([&] {
    while (!go.load()) {
      CollectedBatch batch = c.wait_for_batch(c.take_carried());
      c.complete(batch);
    }
  });
  bool borrowed = false;
  for (int attempt = 0; attempt < 100000 && !borrowed; ++attempt) {
    borrowed = c.try_inline(7);
    if (!borrowed) std::this_thread::yield();
  }
  ASSERT_TRUE(borrowed);
  // Caller 7 is now known: another caller may not go inline, and the queue
  // must be empty.
  c.end_inline();
  EXPECT_FALSE(c.try_inline(8));
  go = true;
  server.join();
  ASSERT_EQ(c.queue().push(make_request(1), 0), PushResult::kOk);
  EXPECT_FALSE(c.try_inline(7));  // a request is waiting for the server
  c.detach_server();
}

// A caller that submitted a request (a future) and then waits for it may
// claim it while the server idles: the request may then still sit in the
// queue. Caller and server race for each request (the claim against the
// server's take); every request is served exactly once, by one side, the
// two sides never at once, and the server drops only its reference to a
// claimed request's completion (TSan, ASan). `gil` stands for the GIL the
// bindings hold around try_inline and complete().
TEST(RequestCollector, ACallerClaimsItsQueuedRequestOrTheServerServesIt) {
  constexpr int kRequests = 3000;
  RequestCollector c(64);
  c.configure(one_ms_policy());
  c.attach_server();
  serve_alone(c, 7, batchserve::FillEstimator::kSoloBatchesBeforeInline);
  std::mutex gil;
  std::atomic<bool> serving{false};
  std::atomic<bool> overlap{false};
  std::atomic<bool> stop{false};
  std::atomic<int> served_by_server{0};
  static int result = 0;
  auto serve = [&](batchserve::Completion* completion) {
    if (serving.exchange(true)) overlap = true;
    std::this_thread::yield();  // the model runs
    serving = false;
    EXPECT_TRUE(completion->finish(&result, false));
  };
  BackgroundCall server([&] {
    while (!stop.load()) {
      CollectedBatch batch = c.wait_for_batch(c.take_carried());
      {
        std::lock_guard<std::mutex> lock(gil);
        c.complete(batch);
      }
      // Served without the GIL (a model releases it), as the caller does below.
      for (const std::vector<batchserve::Request>* part : {&batch.rows, &batch.others})
        for (const batchserve::Request& r : *part) {
          serve(r.completion);
          r.completion->notify();
          r.completion->release();
          ++served_by_server;
        }
      for (const batchserve::Request& r : batch.dropped) r.completion->release();
      EXPECT_TRUE(batch.dropped.empty());  // nothing is withdrawn here
    }
  });
  int claimed = 0;
  for (int i = 0; i < kRequests; ++i) {
    auto* completion = new batchserve::Completion();
    batchserve::Request r = make_request(static_cast<uint64_t>(i), completion);
    r.caller = 7;
    ASSERT_EQ(c.queue().push(r, 0), PushResult::kOk);
    std::unique_lock<std::mutex> lock(gil);
    if (c.try_inline(7, 1)) {
      const bool claim = completion->claim();
      lock.unlock();
      if (claim) {
        serve(completion);
        ++claimed;
      }
      c.end_inline();
    } else {
      lock.unlock();
    }
    ASSERT_TRUE(completion->wait_until(kNoDeadline, 0));
    EXPECT_EQ(completion->state(), batchserve::Completion::kDone);
    EXPECT_EQ(completion->outcome(), &result);
    completion->release();
  }
  stop = true;
  c.queue().interrupt();
  interrupt_until_returned(c.queue(), server);
  server.join();
  c.detach_server();
  EXPECT_FALSE(overlap.load());
  EXPECT_EQ(claimed + served_by_server.load(), kRequests);
  std::printf("claimed %d, served by the server %d\n", claimed, served_by_server.load());
}

// Once a caller claimed, the idle server sleeps no longer than the quiet
// bound at a time: a request pushed quietly (no wake-up) and never claimed
// is found all the same. Before the claim it sleeps out its idle wait (an
// hour here), which a quiet push must then wake.
TEST(RequestCollector, AfterAClaimTheIdleServerFindsAQuietRequestByItself) {
  RequestCollector c(64);
  BatchPolicy policy = one_ms_policy();
  policy.idle_wait_ns = 3600 * kSec;
  c.configure(policy);
  c.attach_server();
  serve_alone(c, 7, batchserve::FillEstimator::kSoloBatchesBeforeInline);
  std::atomic<bool> served{false};
  BackgroundCall server([&] {
    while (!served.load()) {
      CollectedBatch batch = c.wait_for_batch(c.take_carried());
      c.complete(batch);
      if (batch.size() == 1) served = true;  // an interrupted wait returns none
    }
  });
  batchserve_test::poll_until([&] { return c.queue().long_sleepers() == 1; });
  ASSERT_EQ(c.queue().long_sleepers(), 1u);
  // Claim, then have the server choose its next wait after the claim
  // (interrupt); again if a stalled machine let the claim grow old.
  bool ticking = false;
  for (int round = 0; round < 50 && !ticking; ++round) {
    bool borrowed = false;
    for (int attempt = 0; attempt < 100000 && !borrowed; ++attempt) {
      borrowed = c.try_inline(7, 1);
      if (!borrowed) std::this_thread::yield();
    }
    ASSERT_TRUE(borrowed);
    c.end_inline();
    c.queue().interrupt();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // it ticks meanwhile
    ticking = c.queue().long_sleepers() == 0;
  }
  ASSERT_TRUE(ticking);
  batchserve::Request r = make_request(1);
  r.caller = 7;
  ASSERT_EQ(c.queue().push(r, 0, true), PushResult::kOk);  // no wake-up
  server.join();
  EXPECT_TRUE(served.load());
  c.detach_server();
}

TEST(RequestCollector, NoInlineForAnUnknownCaller) {
  RequestCollector c(8);
  EXPECT_FALSE(c.try_inline(0));  // caller 0: unknown
}

// At start-up (nothing observed) and after a batch of two callers, no
// caller is alone long enough to go inline.
TEST(FillEstimator, InlineNeedsARunOfBatchesOfOneCallerAlone) {
  using batchserve::FillEstimator;
  using batchserve::FillOutcome;
  FillEstimator e;
  EXPECT_FALSE(e.sole_caller(3));
  auto batch_of = [](std::vector<uint32_t> callers) {
    std::vector<batchserve::Request> out;
    for (uint32_t c : callers) {
      batchserve::Request r;
      r.caller = c;
      out.push_back(r);
    }
    return out;
  };
  const std::vector<batchserve::Request> none;
  for (uint32_t i = 1; i < FillEstimator::kSoloBatchesBeforeInline; ++i)
    e.observe(batch_of({3}), none, FillOutcome{});
  EXPECT_FALSE(e.sole_caller(3));                    // one batch short
  e.observe(batch_of({3, 3}), none, FillOutcome{});  // two requests, one caller: alone still
  EXPECT_TRUE(e.sole_caller(3));
  EXPECT_FALSE(e.sole_caller(4));
  e.note_caller(3);  // an inline call keeps the run going
  EXPECT_TRUE(e.sole_caller(3));
  e.observe(batch_of({3, 4}), none, FillOutcome{});
  EXPECT_FALSE(e.sole_caller(3));
  EXPECT_FALSE(e.sole_caller(4));
}

}  // namespace
