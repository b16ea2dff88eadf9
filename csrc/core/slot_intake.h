// The server process's intake from shared-memory slots (csrc/core/
// shared_slots.h): submitted slots become Requests of its RequestQueue, each
// carrying a RowSource over its request rows, so the fast path gathers them
// straight from shared memory into staging.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "futex.h"
#include "process_identity.h"
#include "request_queue.h"
#include "shared_slots.h"

namespace batchserve {

class SlotIntake : public RequestIntake {
 public:
  // How often take() looks for slots of dead clients.
  static constexpr int64_t kReapIntervalNs = 100'000'000;

  SlotIntake(std::shared_ptr<SharedSlots> slots, uint64_t schema_id)
      : slots_(std::move(slots)), rows_(slots_->num_slots()) {
    if (slots_->request_leaves() > RowSource::kMaxLeaves)
      throw std::invalid_argument("SlotIntake: at most " + std::to_string(RowSource::kMaxLeaves) +
                                  " request leaves");
    for (uint32_t s = 0; s < slots_->num_slots(); ++s) {
      rows_[s].schema_id = schema_id;
      rows_[s].count = slots_->request_leaves();
      for (size_t j = 0; j < rows_[s].count; ++j) rows_[s].data[j] = slots_->request_row(s, j);
    }
  }

  bool ready() const override { return slots_->any_ready(); }
  size_t size() const override { return slots_->ready_count(); }

  size_t take(std::vector<Request>& out, size_t max_items) override {
    const int64_t now = monotonic_ns();
    if (now >= next_reap_ns_.load(std::memory_order_relaxed)) {
      next_reap_ns_.store(now + kReapIntervalNs, std::memory_order_relaxed);
      reaped_ += slots_->reap_dead_owners();
    }
    slots_->wake_overdue(now);
    taken_.clear();
    slots_->take(taken_, max_items);
    for (uint32_t s : taken_) {
      Request r;
      r.submit_ns = slots_->slot(s).submit_ns;
      r.rows = &rows_[s];
      r.intake = this;
      r.slot = s;
      // A client claims the slot it used last first, so a slot stands for
      // its actor (the fill estimate, the caller-gap statistic); the top bit
      // keeps slot callers apart from threads' ids.
      r.caller = kSlotCallerBit | s;
      out.push_back(r);
    }
    return taken_.size();
  }

  EventCount& work_event() override { return slots_->header()->work; }
  // The next reap, or a handed-over wake-up falling due (wake_overdue).
  int64_t next_take_due_ns() const override {
    return std::min(next_reap_ns_.load(std::memory_order_relaxed), slots_->handed_due_ns());
  }
  void close() override { slots_->close(); }
  void reopen() override { slots_->open_for(self_identity()); }

  SharedSlots& slots() const { return *slots_; }
  size_t reaped() const { return reaped_; }

 private:
  std::shared_ptr<SharedSlots> slots_;
  std::vector<RowSource> rows_;
  std::vector<uint32_t> taken_;
  // Written by the taker; read by the server's wait (a shutdown may take
  // from another thread meanwhile).
  std::atomic<int64_t> next_reap_ns_{0};
  size_t reaped_ = 0;  // taker only
};

}  // namespace batchserve
