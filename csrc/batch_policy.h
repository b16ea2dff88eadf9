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

namespace detail {

// Moves up to `room` requests from the queue into `batch`; withdrawn ones go
// to `dropped` and do not count.
inline void take_ready(RequestQueue& queue, size_t room,
                       std::vector<Request>& batch,
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

// Collects one batch into `batch` (appended; expected empty on entry).
// Returns with an empty batch when no request came within `timeout`, when the
// queue is closed, or when interrupted.
inline void collect_batch(RequestQueue& queue, const BatchPolicy& policy,
                          std::vector<Request>& batch,
                          std::vector<Request>& dropped) {
  const size_t max_size = std::max<size_t>(policy.max_batch_size, 1);
  const size_t min_size =
      std::min(std::max<size_t>(policy.min_batch_size, 1), max_size);
  const int64_t idle_deadline = monotonic_ns() + policy.timeout_ns;

  while (batch.empty()) {
    if (queue.closed()) return;
    detail::take_ready(queue, max_size, batch, dropped);
    if (!batch.empty()) break;
    if (!queue.wait_for_work(idle_deadline)) {
      // Timed out, closed or interrupted; a request may still have landed.
      detail::take_ready(queue, max_size, batch, dropped);
      return;
    }
  }

  const int64_t deadline = batch.front().submit_ns + policy.timeout_ns;
  while (batch.size() < min_size && !queue.closed()) {
    if (monotonic_ns() >= deadline) break;
    if (!queue.wait_for_work(deadline)) {
      if (monotonic_ns() >= deadline || queue.closed()) {
        detail::take_ready(queue, max_size - batch.size(), batch, dropped);
        break;
      }
      continue;  // interrupted: keep the original deadline
    }
    detail::take_ready(queue, max_size - batch.size(), batch, dropped);
  }
}

}  // namespace batchserve
