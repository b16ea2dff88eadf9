// RequestCollector: the server's side of the request queue. It owns the
// queue, the batching settings, the Prefetcher, the spin budget
// (spin_budget.h) and the fill estimate, and turns them into one batch of
// Requests at a time.
//
// A collection runs in two phases, because the bindings release the GIL for
// the first and hold it for the second:
//
//   wait_for_batch()  (may block; GIL released): finishes the prefetch the
//       server started before its last forward (those rows are in staging
//       already and count as collected), puts the requests carried over
//       from the previous batch next (they are older than anything still in
//       the ring), then runs the batching policy (collect_batch) with the
//       FillEstimator's hint.
//   complete()        (GIL held again): takes what arrived while the GIL
//       was being retaken (up to max_batch_size: it joins this batch rather
//       than wait for the next one) and caps the batch at the current
//       max_batch_size: a prefetch took up to the maximum of its time, and a
//       maximum lowered since then holds; the excess is carried to the next
//       collection (regathered there). The FillEstimator learns from the
//       final batch.
//
// Invariants: a CollectedBatch's rows are the first rows of the prefetch's
// staging buffer, in order (rows[i] is staging row i); rows.size() +
// others.size() <= max_batch_size; every request taken from the queue ends
// up in exactly one of rows, others, dropped or the carried-over set.
//
// Threads: several servers may serve one queue, so a collection in progress
// lives in its CollectedBatch, never in the collector: two servers' phases may
// interleave freely (the queue lets one consumer take at a time). take_carried
// and finish_prefetch may also run on a thread shutting a server down; the
// owner serialises complete, take_carried and adapt_server_spin (the
// bindings: with the GIL held); finish_prefetch takes its own lock.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "batch_policy.h"
#include "fill_estimator.h"
#include "inline_gate.h"
#include "request_queue.h"
#include "row_copy.h"
#include "spin_budget.h"
#include "staging.h"

namespace batchserve {

struct CollectedBatch {
  std::vector<Request> rows;      // gathered into staging by the prefetch: row i = rows[i]
  std::vector<Request> others;    // not gathered yet (the fast path may still gather them)
  std::vector<Request> dropped;   // withdrawn by their callers: release only
  uintptr_t prefetched_into = 0;  // the staging buffer's first column `rows` are in (0: none)

  size_t size() const { return rows.size() + others.size(); }

 private:
  friend class RequestCollector;
  // Between wait_for_batch and complete: the collection, whose first
  // `prefetched_` requests are gathered rows.
  std::vector<Request> collecting_;
  size_t prefetched_ = 0;
  FillOutcome fill_outcome_;
  // The server waited on an empty queue: from then to the first request's
  // submission (SpinBudget's gap); -1 when it did not wait.
  int64_t idle_gap_ns_ = -1;
};

class RequestCollector {
 public:
  // The quiet bound (request_queue.h) is the batching timeout, at most this:
  // a request pushed quietly and never claimed waits no longer than a
  // request may wait for its batch to fill.
  static constexpr int64_t kMaxQuietBoundNs = 1'000'000;
  // Below this timeout, no quiet pushes (the server would tick too often).
  static constexpr int64_t kMinQuietBoundNs = 200'000;
  // How long after the last claim the idle server keeps ticking.
  static constexpr int64_t kClaimsRecentNs = 100'000'000;

  // The cores the server and its callers share (those this process may run
  // on), for the spin budget.
  static size_t cores() {
    static const size_t n = usable_cores();
    return n;
  }

  explicit RequestCollector(size_t capacity) : queue_(capacity) {}
  RequestCollector(const RequestCollector&) = delete;
  RequestCollector& operator=(const RequestCollector&) = delete;

  RequestQueue& queue() { return queue_; }
  const RequestQueue& queue() const { return queue_; }

  // Any thread: a server sleeping in wait_for_batch applies it at once.
  void configure(const BatchPolicy& policy) {
    queue_.set_quiet_bound_ns(
        policy.timeout_ns < kMinQuietBoundNs ? 0 : std::min(policy.timeout_ns, kMaxQuietBoundNs));
    settings_.store(policy, queue_);
  }
  BatchPolicy policy() const { return settings_.load(); }

  // Starts gathering the next batch into `staging` while the model runs on
  // the current one (see Prefetcher). Does nothing when no request is
  // waiting (one actor: it is waiting for this batch) or a job is already
  // started. Returns whether it started one.
  bool prefetch(uint64_t schema_id, StagingColumns staging) {
    if (queue_.size() == 0) return false;
    std::lock_guard<std::mutex> lock(prefetch_mutex_);
    if (prefetcher_.started()) return false;
    Prefetcher::Job job;
    job.max_items = settings_.load().max_batch_size;
    job.schema_id = schema_id;
    job.staging = std::move(staging);
    prefetcher_.start(std::move(job));
    return true;
  }

  // What the prefetch started last took (nothing if none). May wait for it.
  Prefetcher::Taken finish_prefetch() {
    std::lock_guard<std::mutex> lock(prefetch_mutex_);
    return prefetcher_.finish();
  }

  // The requests taken beyond a lowered max_batch_size, oldest first; the
  // next wait_for_batch gets them back (or a shutdown ends them).
  std::vector<Request> take_carried() {
    std::vector<Request> out;
    out.swap(carried_);
    return out;
  }

  // Phase one (may block; see above). `carried` is take_carried()'s.
  // `before_wait` runs once the server's state is settled, before it waits:
  // the bindings wake the previous batch's callers there, so that a caller
  // coming straight back finds the server idle (and may go inline).
  // `idle_tick` is collect_batch's: the bindings' single-file housekeeping.
  CollectedBatch wait_for_batch(std::vector<Request> carried) {
    return wait_for_batch(std::move(carried), [] {}, NoIdleTick{});
  }
  template <typename BeforeWait, typename IdleTick>
  CollectedBatch wait_for_batch(std::vector<Request> carried, BeforeWait&& before_wait,
                                IdleTick&& idle_tick) {
    CollectedBatch out;
    Prefetcher::Taken taken = finish_prefetch();
    out.prefetched_ = taken.rows.size();
    out.prefetched_into = reinterpret_cast<uintptr_t>(taken.staging);
    std::vector<Request>& batch = out.collecting_;
    batch = std::move(taken.rows);  // the policy counts them as collected
    batch.insert(batch.end(), carried.begin(), carried.end());
    batch.insert(batch.end(), taken.others.begin(), taken.others.end());
    out.dropped = std::move(taken.dropped);
    batch.reserve(std::min(settings_.load().max_batch_size, queue_.capacity()));
    const bool idle = batch.empty() && queue_.size() == 0;
    const int64_t idle_since = idle ? monotonic_ns() : 0;
    if (idle) gate_.server_idle();  // a caller alone may serve itself meanwhile
    before_wait();
    // While callers claim their requests, they push them quietly (not
    // waking this server; request_queue.h): it wakes by itself within the
    // quiet bound, to serve a request nobody claimed.
    auto tick = [this, &idle_tick] {
      const int64_t at = idle_tick();
      const int64_t now = monotonic_ns();
      const int64_t bound = queue_.quiet_bound_ns();
      if (bound <= 0 || now - last_claim_ns_.load(std::memory_order_relaxed) > kClaimsRecentNs)
        return at;
      return std::min(at, add_saturating(now, bound));
    };
    out.fill_outcome_ = collect_batch(queue_, settings_, batch, out.dropped, fill_.hint(), tick);
    if (idle) gate_.server_wake();  // after that caller is done
    if (idle && !batch.empty()) out.idle_gap_ns_ = detail::oldest_arrival(batch) - idle_since;
    return out;
  }

  // Phase two (see above): fills `batch`'s rows and others.
  void complete(CollectedBatch& batch) {
    std::vector<Request>& collected = batch.collecting_;
    const size_t max_batch_size = settings_.load().max_batch_size;
    if (!collected.empty() && collected.size() < max_batch_size)
      detail::take_ready(queue_, max_batch_size - collected.size(), collected, batch.dropped);
    size_t prefetched = batch.prefetched_;
    if (collected.size() > max_batch_size) {
      const auto excess = collected.begin() + static_cast<std::ptrdiff_t>(max_batch_size);
      carried_.insert(carried_.end(), excess, collected.end());
      collected.resize(max_batch_size);
      prefetched = std::min(prefetched, max_batch_size);
    }
    const auto split = collected.begin() + static_cast<std::ptrdiff_t>(prefetched);
    batch.rows.assign(collected.begin(), split);
    batch.others.assign(split, collected.end());
    if (batch.rows.empty()) batch.prefetched_into = 0;
    collected.clear();
    batch.prefetched_ = 0;
    if (batch.size() > 0) fill_.observe(batch.rows, batch.others, batch.fill_outcome_);
  }

  // A server loop serving this queue starts / stops (see InlineGate).
  void attach_server() { gate_.attach_server(); }
  void detach_server() { gate_.detach_server(); }

  // Caller (serialised with complete() by the owner): true if `caller` may
  // serve its request itself now, inline: the server waits idle on an
  // empty queue and `caller` is the only caller the fill estimate knows
  // (a batch of one is what the server would serve). `own_queued` (0 or 1):
  // the caller's own submitted request may still be in the queue, for it to
  // claim (Completion::claim). Then end_inline() once its request is served.
  bool try_inline(uint32_t caller, size_t own_queued = 0) {
    if (queue_.size() > own_queued || !fill_.sole_caller(caller)) return false;
    if (!gate_.try_borrow()) return false;
    fill_.note_caller(caller);
    if (own_queued != 0) last_claim_ns_.store(monotonic_ns(), std::memory_order_relaxed);
    return true;
  }
  void end_inline() { gate_.end_borrow(); }

  // Caller (serialised with complete() by the owner): whether `caller` is
  // the only caller the fill estimate knows, alone in its last batches.
  bool sole_caller(uint32_t caller) const { return fill_.sole_caller(caller); }

  // Server thread, after each batch: learns the gap it waited (if it did)
  // and sets the spin of its next wait (see SpinBudget).
  void adapt_server_spin(const CollectedBatch& batch) {
    if (batch.idle_gap_ns_ >= 0) spin_.observe(batch.idle_gap_ns_);
    queue_.set_server_spin_ns(spin_.budget_ns(fill_.active_callers(), cores()));
  }

 private:
  RequestQueue queue_;
  BatchSettings settings_;
  std::mutex prefetch_mutex_;     // start() and finish() of prefetcher_, never at once
  std::vector<Request> carried_;  // taken beyond a lowered max_batch_size
  SpinBudget spin_;               // serialised by the owner (see Threads)
  FillEstimator fill_;            // observe(): in complete(), serialised by the owner
  InlineGate gate_;               // the server's idle waits against inline callers
  // When a caller last borrowed to claim its request: the server ticks at
  // the quiet bound while that was at most kClaimsRecentNs ago.
  std::atomic<int64_t> last_claim_ns_{INT64_MIN / 2};
  Prefetcher prefetcher_{queue_};  // last: its helper thread uses queue_
};

}  // namespace batchserve
