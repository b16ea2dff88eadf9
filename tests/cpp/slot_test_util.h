// Helpers for the tests of the shared-memory slots: a segment of the test's
// own, 8-byte rows, and a client's submission of one.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/shared_slots.h"
#include "core/slot_client.h"
#include "test_util.h"

namespace batchserve_test {

// A segment of `n` slots, an 8-byte request leaf and response leaves of
// `response_leaf_bytes` (one of 8 bytes unless told), unlinked when the test
// ends; `single_file`: its wake chains' mode (csrc/core/shared_slots.h).
struct Segment {
  explicit Segment(uint32_t n, uint64_t fingerprint = 7,
                   std::vector<size_t> response_leaf_bytes = {8}, size_t error_bytes = 64,
                   bool single_file = false) {
    batchserve::SlotLayout layout;
    layout.num_slots = n;
    layout.request_leaf_bytes = {8};
    layout.response_leaf_bytes = std::move(response_leaf_bytes);
    layout.error_bytes = error_bytes;
    layout.fingerprint = fingerprint;
    layout.single_file = single_file;
    name = unique_name();
    slots = batchserve::SharedSlots::create(name, layout);
  }
  ~Segment() { slots->unlink(); }
  std::string name;
  std::shared_ptr<batchserve::SharedSlots> slots;
};

inline uint64_t read_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void write_u64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, sizeof v); }

// The waits' GIL and signal hooks, as plain callables.
inline const auto without_gil = [](auto&& f) { return f(); };
inline const auto never_interrupted = [] { return false; };

// One 8-byte request leaf: `value` (which must outlive the submission).
inline batchserve::RowSource rows_of(const uint64_t& value) {
  batchserve::RowSource rows;
  rows.count = 1;
  rows.data[0] = &value;
  return rows;
}

// Claims a slot and submits `value` in it.
inline uint32_t submit(batchserve::SlotRequester& client, const uint64_t& value) {
  uint32_t s = 0;
  EXPECT_EQ(client.claim(batchserve::kNoDeadline, without_gil, never_interrupted, s),
            batchserve::SlotClaim::kOk);
  EXPECT_EQ(client.submit(s, rows_of(value), 0), batchserve::SlotWait::kOk);
  return s;
}

}  // namespace batchserve_test
