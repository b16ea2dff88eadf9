// FillEstimator: how many requests the server should expect in a batch, and
// how long it may wait for them (the FillHint that collect_batch's fill step
// takes; see batch_policy.h).
//
// Actors that each wait for their own result come back together after a
// hand-back. The estimator learns who they are and how long they take:
//
//   - A caller (Request::caller, 0: unknown) is active from the batch that
//     holds one of its requests. The target is the number of active callers.
//   - A fill wait that ran out before the target was reached means the
//     missing callers are not coming back soon (an environment step that
//     takes longer, a thread that ended): the active set becomes the callers
//     of that batch.
//   - The budget is twice a moving average of the waits that did reach the
//     target, within [kMinBudgetNs, kMaxBudgetNs]; collect_batch caps it by
//     the batch timeout too, so no request waits longer than it would
//     without the fill step's being there.
//
// Threads: observe() is serialised by the owner (RequestCollector::complete,
// with the GIL held); hint() may run on any thread at any time (a server
// collecting without the GIL): it reads two atomics that observe() stores.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <unordered_set>
#include <vector>

#include "batch_policy.h"
#include "request_queue.h"

namespace batchserve {

class FillEstimator {
 public:
  // A wait shorter than this is too short to gain a request on a VM (a
  // futex wake-up alone costs 10-20 µs there); longer than kMaxBudgetNs, a
  // caller is better served by the next batch.
  static constexpr int64_t kMinBudgetNs = 20'000;
  static constexpr int64_t kMaxBudgetNs = 2'000'000;
  // The first waits, before any has been measured.
  static constexpr int64_t kInitialWaitNs = 100'000;
  // Callers remembered at most (a server with more forgets them all but the
  // last batch's: the target then counts those).
  static constexpr size_t kMaxTracked = 4096;
  static_assert(kMinBudgetNs > 0 && kMinBudgetNs <= kMaxBudgetNs, "a budget range");

  FillHint hint() const {
    FillHint h;
    h.target = target_.load(std::memory_order_relaxed);
    h.budget_ns = budget_ns_.load(std::memory_order_relaxed);
    return h;
  }

  // After each collected batch: the requests it holds (both parts) and what
  // its fill step did.
  void observe(const std::vector<Request>& rows, const std::vector<Request>& others,
               const FillOutcome& outcome) {
    if (outcome.waited && !outcome.reached) active_.clear();  // the missing are not near
    if (active_.size() > kMaxTracked) active_.clear();
    for (const std::vector<Request>* part : {&rows, &others})
      for (const Request& r : *part)
        if (r.caller != 0) active_.insert(r.caller);
    if (outcome.reached) mean_wait_ns_ += (outcome.waited_ns - mean_wait_ns_) / 8;
    target_.store(active_.size(), std::memory_order_relaxed);
    budget_ns_.store(std::clamp<int64_t>(2 * mean_wait_ns_, kMinBudgetNs, kMaxBudgetNs),
                     std::memory_order_relaxed);
  }

 private:
  std::unordered_set<uint32_t> active_;
  int64_t mean_wait_ns_ = kInitialWaitNs;
  std::atomic<size_t> target_{0};
  std::atomic<int64_t> budget_ns_{2 * kInitialWaitNs};
};

}  // namespace batchserve
