// SlotEcho: a server of a shared-memory segment that costs nothing but the
// round trip. A thread of its own takes every submitted slot and answers it
// with the same response rows, with no model, no Python and no batching
// policy: what actor processes reach through the slots when serving is
// free (the benchmark harness's limit for process actors; an in-process
// "null" server would leave out the cross-process hand-off, which is most
// of what a request costs there).
//
// It serves the segment as a server does (open_for at start, close at
// stop); the segment must have no other server meanwhile. Requests still
// in flight at stop are answered before the thread ends.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "parking.h"
#include "process_identity.h"
#include "shared_slots.h"
#include "slot_responses.h"

namespace batchserve {

class SlotEcho {
 public:
  // How long the thread sleeps at most before it looks at its stop flag
  // (stop() wakes it at once; this only bounds a lost wake-up's cost).
  static constexpr int64_t kPollNs = 100'000'000;

  // `response_rows[j]`: the bytes of response leaf j, one row
  // (response_leaf_bytes(j) of them), written into every answered slot.
  SlotEcho(std::shared_ptr<SharedSlots> slots, std::vector<std::vector<uint8_t>> response_rows)
      : slots_(std::move(slots)) {
    const size_t n = slots_->num_slots();
    if (response_rows.size() != slots_->response_leaves())
      throw std::invalid_argument("SlotEcho: one row per response leaf expected");
    // One column per leaf holding the row num_slots times: a batch of any
    // size reads its rows 0..k-1 from it.
    for (size_t j = 0; j < response_rows.size(); ++j) {
      const size_t bytes = slots_->response_leaf_bytes(j);
      if (response_rows[j].size() != bytes)
        throw std::invalid_argument("SlotEcho: response leaf " + std::to_string(j) + " has " +
                                    std::to_string(bytes) + " bytes per row");
      std::vector<uint8_t> column(bytes * n);
      for (size_t s = 0; s < n; ++s)
        std::copy(response_rows[j].begin(), response_rows[j].end(), column.begin() + s * bytes);
      columns_.push_back(std::move(column));
    }
  }
  SlotEcho(const SlotEcho&) = delete;
  SlotEcho& operator=(const SlotEcho&) = delete;
  ~SlotEcho() { stop(); }

  void start() {
    if (thread_.joinable()) throw std::logic_error("SlotEcho: already started");
    stop_.store(false, std::memory_order_seq_cst);
    slots_->open_for(self_identity());
    thread_ = std::thread([this] { run(); });
  }

  // Refuses new requests, answers those already submitted, joins.
  void stop() {
    if (!thread_.joinable()) return;
    slots_->close();
    stop_.store(true, std::memory_order_seq_cst);
    slots_->header()->work.notify_all();
    thread_.join();
  }

  // Requests answered so far.
  uint64_t answered() const { return answered_.load(std::memory_order_relaxed); }

 private:
  void run() {
    std::vector<uint32_t> taken;
    std::vector<const uint8_t*> columns;
    for (const std::vector<uint8_t>& column : columns_) columns.push_back(column.data());
    const size_t n = slots_->num_slots();
    for (;;) {
      park_until(
          slots_->header()->work,
          [this] { return slots_->any_ready() || stop_.load(std::memory_order_acquire); },
          add_saturating(monotonic_ns(), kPollNs));
      taken.clear();
      slots_->take(taken, n);
      if (!taken.empty()) {
        scatter_responses(*slots_, taken, columns);
        answered_.fetch_add(taken.size(), std::memory_order_relaxed);
      } else if (stop_.load(std::memory_order_acquire)) {
        return;  // closed first, then drained: no submission can follow
      }
    }
  }

  std::shared_ptr<SharedSlots> slots_;
  std::vector<std::vector<uint8_t>> columns_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> answered_{0};
  std::thread thread_;
};

}  // namespace batchserve
