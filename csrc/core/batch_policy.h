// The batching policy: when the server stops collecting and runs the model.
//
//  1. Wait up to `idle_wait` for a first request (an idle server wakes up
//     every `idle_wait` so its owner can poll weight updates and look at
//     what it must; settings changes and closing wake it at once).
//  2. Take what is ready, up to `max_batch_size`.
//  3. While fewer than `min_batch_size` are taken, keep collecting until the
//     deadline = arrival of the oldest taken request + `timeout`. Later
//     arrivals never extend it, so no request waits in the queue longer than
//     `timeout` once the server is free.
//  4. Fill (a FillHint from the owner, see fill_estimator.h): while fewer
//     than `hint.target` are taken (the callers expected back soon), keep
//     collecting while they keep coming: until `hint.budget_ns` passes with
//     no new request (counted from the start of this step, then from the
//     latest request's arrival), and never past `timeout` after the later
//     of the oldest taken request's arrival and the start of this
//     collection (when the server was free to serve it; torchrl's server
//     counts its wait from its drain too). Actors that each wait for their
//     own result come back one after another after a hand-back; without
//     this step the server takes the first of them alone and the batches of
//     a steady run settle at about half the actors. Counted from arrival
//     alone, the cap kept the actors that came during a forward longer than
//     `timeout` from waiting for the ones it served, and the two groups took
//     turns in half batches (a 1.5 ms forward, 8 threads: batches of 4.3).
//     A budget for the whole step instead of per arrival settled there too
//     when the actors' own work is slow (thread actors take the GIL in
//     turn: 8 torchrl policy clients, ~60 µs each, came back over ~400 µs
//     and batches held 5-6 of 8).
//
// Requests whose callers withdrew (timed out before batching) are not
// counted; they go to `dropped` so the owner can release what they hold.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "request_queue.h"

namespace batchserve {

struct BatchPolicy {
  size_t max_batch_size = 64;
  size_t min_batch_size = 1;
  int64_t timeout_ns = 10'000'000;
  int64_t idle_wait_ns = -1;  // how long an idle collection waits (step 1); < 0: timeout_ns
};

// collect_batch's idle housekeeping when its owner has none.
struct NoIdleTick {
  int64_t operator()() const noexcept { return kNoDeadline; }
};

// How long collect_batch may wait past min_batch_size for the batch to
// fill: up to `target` requests, for at most `budget_ns` after the start of
// the wait or the latest arrival. The default asks for nothing.
struct FillHint {
  size_t target = 0;
  int64_t budget_ns = 0;
};

// What the fill step did, for its owner to learn from.
struct FillOutcome {
  bool waited = false;       // the batch was short of the target after step 3
  bool reached = false;      // ... and reached it before the fill deadline
  size_t gained = 0;         // requests taken while it waited
  int64_t gain_span_ns = 0;  // from the start of the wait to the latest arrival
};

// The policy of a running server, changeable from any thread. A change is
// stored, then the queue is interrupted; collect_batch reads interrupts()
// before it loads the settings, so it either sees the new settings or is
// woken to reload them.
class BatchSettings {
 public:
  void store(const BatchPolicy& p, RequestQueue& queue) {
    max_batch_size_.store(p.max_batch_size, std::memory_order_release);
    min_batch_size_.store(p.min_batch_size, std::memory_order_release);
    timeout_ns_.store(p.timeout_ns, std::memory_order_release);
    idle_wait_ns_.store(p.idle_wait_ns, std::memory_order_release);
    queue.interrupt();
  }

  BatchPolicy load() const {
    BatchPolicy p;
    p.max_batch_size = std::max<size_t>(max_batch_size_.load(std::memory_order_acquire), 1);
    p.min_batch_size = std::min(
        std::max<size_t>(min_batch_size_.load(std::memory_order_acquire), 1), p.max_batch_size);
    p.timeout_ns = std::max<int64_t>(timeout_ns_.load(std::memory_order_acquire), 0);
    const int64_t idle_wait = idle_wait_ns_.load(std::memory_order_acquire);
    p.idle_wait_ns = idle_wait < 0 ? p.timeout_ns : idle_wait;
    return p;
  }

 private:
  std::atomic<size_t> max_batch_size_{64};
  std::atomic<size_t> min_batch_size_{1};
  std::atomic<int64_t> timeout_ns_{10'000'000};
  std::atomic<int64_t> idle_wait_ns_{-1};
};

namespace detail {

// Moves up to `room` requests from the queue into `batch`; withdrawn ones go
// to `dropped` and do not count. Ones their callers claimed (completion.h)
// are the callers': only the queue's reference to the completion is dropped.
inline void take_ready(RequestQueue& queue, size_t room, std::vector<Request>& batch,
                       std::vector<Request>& dropped) {
  while (room > 0) {
    const size_t start = batch.size();
    if (queue.pop_many(batch, room) == 0) return;
    size_t kept = start;
    for (size_t i = start; i < batch.size(); ++i) {
      const Request r = batch[i];
      if (r.completion != nullptr && !r.completion->take()) {
        if (!release_if_claimed(r)) dropped.push_back(r);
      } else {
        batch[kept++] = r;
      }
    }
    room -= kept - start;
    batch.resize(kept);
  }
}

// The earliest arrival among `batch`'s requests (not empty).
inline int64_t oldest_arrival(const std::vector<Request>& batch) {
  int64_t oldest = batch.front().submit_ns;
  for (const Request& r : batch) oldest = std::min(oldest, r.submit_ns);
  return oldest;
}

// The latest arrival among `batch`'s requests from index `from` on
// (INT64_MIN when there are none).
inline int64_t newest_arrival(const std::vector<Request>& batch, size_t from = 0) {
  int64_t newest = INT64_MIN;
  for (size_t i = from; i < batch.size(); ++i) newest = std::max(newest, batch[i].submit_ns);
  return newest;
}

// The latest a batch holding `batch` may close: its oldest request's
// arrival plus the timeout.
inline int64_t queue_deadline(const std::vector<Request>& batch, const BatchPolicy& policy) {
  return add_saturating(oldest_arrival(batch), policy.timeout_ns);
}

}  // namespace detail

// Collects one batch into `batch`. Requests already in `batch` on entry
// (taken ahead by a Prefetcher) count as collected: only the min_batch_size
// and fill phases run then. Returns with an empty batch when no request came within
// `idle_wait` (or by the time the queue's intake has housekeeping due, see
// RequestIntake::next_take_due_ns), when the queue is closed, or when the
// settings changed while it waited for a first request. `idle_tick()` runs
// first, and again whenever the time it returned (kNoDeadline: none) comes
// before a request: its owner's housekeeping (single file: waking overdue
// handed wake-ups) without leaving this wait. While it collects toward
// min_batch_size it follows settings changes: the deadline is always the
// oldest request's arrival plus the current timeout.
inline FillOutcome fill_batch(RequestQueue& queue, const BatchSettings& settings,
                              std::vector<Request>& batch, std::vector<Request>& dropped,
                              const FillHint& hint, int64_t collect_start_ns);

template <typename IdleTick = NoIdleTick>
inline FillOutcome collect_batch(RequestQueue& queue, const BatchSettings& settings,
                                 std::vector<Request>& batch, std::vector<Request>& dropped,
                                 const FillHint& hint = FillHint{}, IdleTick&& idle_tick = {}) {
  const int64_t collect_start = monotonic_ns();
  uint32_t seen = queue.interrupts();
  BatchPolicy policy = settings.load();
  const int64_t idle_deadline = add_saturating(collect_start, policy.idle_wait_ns);
  int64_t tick_at = idle_tick();

  while (batch.empty()) {
    if (queue.closed()) return {};
    detail::take_ready(queue, policy.max_batch_size, batch, dropped);
    if (!batch.empty()) break;
    if (!queue.wait_for_work(std::min(idle_deadline, tick_at), seen, true)) {
      // Timed out, closed or interrupted. A request that landed meanwhile
      // is collected like any other: toward min_batch_size, not alone.
      detail::take_ready(queue, policy.max_batch_size, batch, dropped);
      if (!batch.empty()) break;
      const int64_t now = monotonic_ns();
      if (now >= tick_at && now < idle_deadline && !queue.closed() && queue.interrupts() == seen) {
        tick_at = idle_tick();
        continue;
      }
      return {};
    }
  }

  for (;;) {
    seen = queue.interrupts();
    policy = settings.load();
    if (batch.size() >= policy.max_batch_size || queue.closed()) return {};
    if (batch.size() >= policy.min_batch_size) break;
    const int64_t deadline = detail::queue_deadline(batch, policy);
    const bool ready = monotonic_ns() < deadline && queue.wait_for_work(deadline, seen);
    if (ready || monotonic_ns() >= deadline)
      detail::take_ready(queue, policy.max_batch_size - batch.size(), batch, dropped);
    if (!ready && monotonic_ns() >= deadline) return {};
  }
  return fill_batch(queue, settings, batch, dropped, hint, collect_start);
}

// Step 4 (see the top of this file), once min_batch_size is reached.
inline FillOutcome fill_batch(RequestQueue& queue, const BatchSettings& settings,
                              std::vector<Request>& batch, std::vector<Request>& dropped,
                              const FillHint& hint, int64_t collect_start_ns) {
  FillOutcome out;
  if (hint.budget_ns <= 0) return out;
  const int64_t start = monotonic_ns();
  // The latest arrival in the batch, or the start of this step.
  int64_t latest = std::max(start, detail::newest_arrival(batch));
  for (;;) {
    const uint32_t seen = queue.interrupts();
    const BatchPolicy policy = settings.load();
    const size_t target = std::min(hint.target, policy.max_batch_size);
    if (batch.size() >= target || queue.closed()) {
      out.reached = out.waited && batch.size() >= target;
      break;
    }
    out.waited = true;
    // Never past `timeout` after the oldest request could be served (see
    // step 4 above): its arrival, or the start of this collection.
    const int64_t queue_end = add_saturating(
        std::max(detail::oldest_arrival(batch), collect_start_ns), policy.timeout_ns);
    const int64_t deadline = std::min(add_saturating(latest, hint.budget_ns), queue_end);
    // A wait that ends early (a settings change, the intake's housekeeping)
    // is not a miss: only the deadline ends the step short of the target.
    const bool ready = monotonic_ns() < deadline && queue.wait_for_work(deadline, seen);
    const size_t before = batch.size();
    detail::take_ready(queue, policy.max_batch_size - batch.size(), batch, dropped);
    latest = std::max(latest, detail::newest_arrival(batch, before));  // not our wake-up
    out.gained += batch.size() - before;
    const int64_t now = monotonic_ns();
    // Past the deadline: done, unless a request came meanwhile and the
    // cap still allows waiting on from its arrival.
    if (!ready && now >= deadline && (batch.size() == before || now >= queue_end)) {
      out.reached = batch.size() >= target;
      break;
    }
  }
  out.gain_span_ns = latest - start;
  return out;
}

}  // namespace batchserve
