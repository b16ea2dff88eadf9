// The batching policy: when the server stops collecting and runs the model.
//
//  1. Wait up to `timeout` for a first request (an idle server wakes up every
//     `timeout` so its owner can poll weight updates and settings).
//  2. Take what is ready, up to `max_batch_size`.
//  3. While fewer than `min_batch_size` are taken, keep collecting until the
//     deadline = arrival of the oldest taken request + `timeout`. Later
//     arrivals never extend it, so no request waits in the queue longer than
//     `timeout` once the server is free.
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
    queue.interrupt();
  }

  BatchPolicy load() const {
    BatchPolicy p;
    p.max_batch_size = std::max<size_t>(max_batch_size_.load(std::memory_order_acquire), 1);
    p.min_batch_size = std::min(
        std::max<size_t>(min_batch_size_.load(std::memory_order_acquire), 1), p.max_batch_size);
    p.timeout_ns = std::max<int64_t>(timeout_ns_.load(std::memory_order_acquire), 0);
    return p;
  }

 private:
  std::atomic<size_t> max_batch_size_{64};
  std::atomic<size_t> min_batch_size_{1};
  std::atomic<int64_t> timeout_ns_{10'000'000};
};

namespace detail {

// Moves up to `room` requests from the queue into `batch`; withdrawn ones go
// to `dropped` and do not count.
inline void take_ready(RequestQueue& queue, size_t room, std::vector<Request>& batch,
                       std::vector<Request>& dropped) {
  while (room > 0) {
    const size_t start = batch.size();
    if (queue.pop_many(batch, room) == 0) return;
    size_t kept = start;
    for (size_t i = start; i < batch.size(); ++i) {
      const Request r = batch[i];
      if (r.completion != nullptr && !r.completion->take()) {
        dropped.push_back(r);
      } else {
        batch[kept++] = r;
      }
    }
    room -= kept - start;
    batch.resize(kept);
  }
}

}  // namespace detail

// Collects one batch into `batch`. Requests already in `batch` on entry
// (taken ahead by a Prefetcher) count as collected: only the min_batch_size
// phase runs then. Returns with an empty batch when no request came within
// `timeout` (or by the time the queue's intake has housekeeping due, see
// RequestIntake::next_take_due_ns), when the queue is closed, or when the
// settings changed while it
// waited for a first request. While it collects toward min_batch_size it
// follows settings changes: the deadline is always the oldest request's
// arrival plus the current timeout.
inline void collect_batch(RequestQueue& queue, const BatchSettings& settings,
                          std::vector<Request>& batch, std::vector<Request>& dropped) {
  uint32_t seen = queue.interrupts();
  BatchPolicy policy = settings.load();
  const int64_t idle_deadline = add_saturating(monotonic_ns(), policy.timeout_ns);

  while (batch.empty()) {
    if (queue.closed()) return;
    detail::take_ready(queue, policy.max_batch_size, batch, dropped);
    if (!batch.empty()) break;
    if (!queue.wait_for_work(idle_deadline, seen)) {
      // Timed out, closed or interrupted. A request that landed meanwhile
      // is collected like any other: toward min_batch_size, not alone.
      detail::take_ready(queue, policy.max_batch_size, batch, dropped);
      if (batch.empty()) return;
      break;
    }
  }

  for (;;) {
    seen = queue.interrupts();
    policy = settings.load();
    if (batch.size() >= policy.min_batch_size || batch.size() >= policy.max_batch_size ||
        queue.closed())
      return;
    int64_t oldest = batch.front().submit_ns;
    for (const Request& r : batch) oldest = std::min(oldest, r.submit_ns);
    const int64_t deadline = add_saturating(oldest, policy.timeout_ns);
    const bool ready = monotonic_ns() < deadline && queue.wait_for_work(deadline, seen);
    if (ready || monotonic_ns() >= deadline)
      detail::take_ready(queue, policy.max_batch_size - batch.size(), batch, dropped);
    if (!ready && monotonic_ns() >= deadline) return;
  }
}

}  // namespace batchserve
