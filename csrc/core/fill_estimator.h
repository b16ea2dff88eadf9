// FillEstimator: how many requests the server should expect in a batch, and
// how long it may wait for each next one (the FillHint that collect_batch's
// fill step takes; see batch_policy.h).
//
// Actors that each wait for their own result come back one after another
// after a hand-back. The estimator learns who they are and their pace:
//
//   - A caller (Request::caller, 0: unknown) is active from the batch that
//     holds one of its requests. The target is the number of active callers
//     in the server's own process (threads). Callers in other processes
//     (shared-memory slots) are not waited for: they do not need the
//     server's GIL, so their own work runs beside the server's forward, and
//     a batch of those that are back keeps the server busy while the rest
//     come (measured: 8 actor processes, 14.4 k req/s waiting for all of
//     them, 17.3 k serving 4 at a time while the other 4 ran).
//   - A fill wait that ran out before the target was reached means the
//     missing callers are not coming back soon (an environment step that
//     takes longer, a thread that ended): the active set becomes the callers
//     of that batch.
//   - The budget (how long the fill waits for the next request) is
//     kGapFactor times a moving average of the gaps between the requests
//     that came during fill waits, halved for each wait that ran out (and
//     restored as waits reach the target again), within [kMinBudgetNs,
//     kMaxBudgetNs]. Callers that seldom come back together (a pool of
//     threads sending now and then) so cost at most kMinBudgetNs per batch
//     once their waits keep running out. collect_batch caps every wait by
//     the batch timeout too: no request waits past the oldest one's
//     arrival + timeout.
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
  // The gap between arrivals assumed before any has been measured.
  static constexpr int64_t kInitialGapNs = 50'000;
  // The budget over the mean gap: arrivals spaced at random (exponential
  // gaps) come within 3 mean gaps 95% of the time.
  static constexpr int64_t kGapFactor = 3;
  // Callers remembered at most (a server with more forgets them all but the
  // last batch's: the target then counts those).
  static constexpr size_t kMaxTracked = 4096;
  // Halvings of the budget after waits that ran out, at most (a budget of
  // kMaxBudgetNs halved this often is below kMinBudgetNs).
  static constexpr int kMaxHalvings = 8;
  // Consecutive batches of one caller alone before it may serve itself
  // inline (see inline_gate.h). Not at start-up or after a missed fill
  // wait, when the active set briefly holds one caller of many: a forward
  // on an actor's thread gives that thread an OpenMP team of its own, and
  // once teams outnumber the cores libgomp stops spinning in all of them
  // (measured: 8 actor threads, the forward 2.6x slower for the rest of the
  // run after a dozen start-up inline calls).
  static constexpr uint32_t kSoloBatchesBeforeInline = 16;
  static_assert(kMinBudgetNs > 0 && kMinBudgetNs <= kMaxBudgetNs, "a budget range");
  static_assert((kMaxBudgetNs >> kMaxHalvings) < kMinBudgetNs, "enough halvings to the floor");

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
    const bool missed = outcome.waited && !outcome.reached;
    if (missed) active_.clear();  // the missing are not near
    if (active_.size() > kMaxTracked) active_.clear();
    for (const std::vector<Request>* part : {&rows, &others})
      for (const Request& r : *part)
        if (r.caller != 0) active_.insert(r.caller);
    note_batch_callers(rows, others);
    if (outcome.gained > 0) {
      const int64_t gap = outcome.gain_span_ns / static_cast<int64_t>(outcome.gained);
      mean_gap_ns_ += (gap - mean_gap_ns_) / 8;
    }
    if (missed) {
      misses_ = std::min(misses_ + 1, kMaxHalvings);
    } else if (outcome.reached && misses_ > 0) {
      --misses_;
    }
    publish();
  }

  // Every active caller, in this process or not (the spin budget counts
  // them all: each may want a core). Serialised with observe() by the owner.
  size_t active_callers() const { return active_.size(); }

  // Whether `caller` is the only active caller, and the last
  // kSoloBatchesBeforeInline batches held its requests alone. Serialised
  // with observe() by the owner.
  bool sole_caller(uint32_t caller) const {
    return caller != 0 && caller == solo_caller_ && solo_batches_ >= kSoloBatchesBeforeInline &&
           active_.size() == 1 && active_.count(caller) == 1;
  }

  // A request of `caller` was served without a batch (an inline call, see
  // inline_gate.h): a batch of its own, as far as the estimate goes.
  void note_caller(uint32_t caller) {
    if (caller == 0) return;
    note_solo(caller);
    if (active_.insert(caller).second) publish();
  }

 private:
  void publish() {
    size_t in_process = 0;
    for (uint32_t caller : active_) in_process += (caller & kSlotCallerBit) == 0 ? 1 : 0;
    target_.store(in_process, std::memory_order_relaxed);
    budget_ns_.store(
        std::clamp<int64_t>((kGapFactor * mean_gap_ns_) >> misses_, kMinBudgetNs, kMaxBudgetNs),
        std::memory_order_relaxed);
  }

  // A batch of one caller alone extends that caller's run of solo
  // batches; any other batch ends it.
  void note_batch_callers(const std::vector<Request>& rows, const std::vector<Request>& others) {
    uint32_t only = 0;
    for (const std::vector<Request>* part : {&rows, &others})
      for (const Request& r : *part) {
        if (r.caller == 0 || (only != 0 && r.caller != only)) {
          solo_caller_ = 0;
          solo_batches_ = 0;
          return;
        }
        only = r.caller;
      }
    if (only != 0) note_solo(only);
  }

  void note_solo(uint32_t caller) {
    if (caller != solo_caller_) {
      solo_caller_ = caller;
      solo_batches_ = 0;
    }
    if (solo_batches_ < kSoloBatchesBeforeInline) ++solo_batches_;
  }

  std::unordered_set<uint32_t> active_;
  uint32_t solo_caller_ = 0;   // the caller of the last batches, if they had one alone
  uint32_t solo_batches_ = 0;  // how many (up to kSoloBatchesBeforeInline)
  int64_t mean_gap_ns_ = kInitialGapNs;
  int misses_ = 0;  // the budget's halvings: +1 per wait that ran out, -1 per one that reached
  std::atomic<size_t> target_{0};
  std::atomic<int64_t> budget_ns_{kGapFactor * kInitialGapNs};
};

}  // namespace batchserve
