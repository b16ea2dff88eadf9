// The layout of a shared-memory slots segment (csrc/core/shared_slots.h has
// the protocol over it): what lies where, and the words each slot's
// protocol runs on.
//
// One POSIX shared-memory segment (shm_open + mmap) per transport holds
//
//   SegmentHeader  layout, the server's identity, `closed`, two events
//   SlotHeader[n]  per slot: owner, state (a futex word), arrival, its event
//   ready bitmap   one bit per slot: "submitted, not yet taken"
//   request bank   per request leaf: n rows of leaf_bytes (row s = slot s)
//   response bank  per response leaf: n rows
//   error area     per slot: a failed request's encoded exception
//
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "parking.h"
#include "row_copy.h"

namespace batchserve {

// A segment's leaves per side: the fast path's own limit, so that every
// request schema a segment holds can be gathered without a fallback.
constexpr size_t kMaxSlotLeaves = RowSource::kMaxLeaves;

// Bytes of one slot's error area (csrc/core/slot_responses.h): the size the
// transports create segments with (exported to Python as SLOT_ERROR_BYTES).
constexpr size_t kSlotErrorBytes = 2048;

struct SlotLayout {
  uint32_t num_slots = 0;
  std::vector<size_t> request_leaf_bytes;
  std::vector<size_t> response_leaf_bytes;
  size_t error_bytes = kSlotErrorBytes;
  uint64_t fingerprint = 0;  // of the keys, dtypes and shapes (checked on attach)
  bool single_file = false;  // wake chains of one process pass at the next call (see above)
};

struct SegmentHeader {
  static constexpr uint64_t kMagic = 0x3230767368736231ULL;  // "1bshsv02"
  std::atomic<uint64_t> magic;                               // written last by the creator
  uint64_t total_bytes;
  uint64_t fingerprint;
  uint32_t num_slots;
  uint32_t request_leaves;
  uint32_t response_leaves;
  uint32_t error_bytes;
  uint32_t single_file;  // SlotLayout::single_file
  uint64_t request_leaf_bytes[kMaxSlotLeaves];
  uint64_t request_offset[kMaxSlotLeaves];
  uint64_t response_leaf_bytes[kMaxSlotLeaves];
  uint64_t response_offset[kMaxSlotLeaves];
  uint64_t slots_offset;
  uint64_t ready_offset;
  uint64_t errors_offset;
  alignas(64) std::atomic<uint32_t> closed;  // the server shut down
  std::atomic<uint32_t> server_pid;          // 0: no server has started
  std::atomic<uint64_t> server_start;
  alignas(64) EventCount work{true};   // the server sleeps here
  alignas(64) EventCount freed{true};  // submitters wait here for a slot
};

// Every atomic of the segment is one plain word, shared by every process
// that maps it: none may fall back on a lock private to a process.
static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<uint32_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free");

struct alignas(64) SlotHeader {
  enum State : uint32_t {
    kIdle = 0,
    kQueued = 1,
    kTaken = 2,
    kDone = 3,
    kFailed = 4,
    kAbandoned = 5
  };
  std::atomic<uint32_t> owner;  // pid of the client holding it, 0: free
  std::atomic<uint32_t> state;
  std::atomic<uint64_t> owner_start;  // the owner's start time (0: not yet written)
  int64_t submit_ns;
  uint32_t error_len;                    // encoded exception: error area [0, error_len)
  std::atomic<uint32_t> generation;      // the request's number (bumped by each claim)
  std::atomic<uint64_t> wake_link;       // the wake chain's link (see above)
  std::atomic<int64_t> wake_held_since;  // when the caller before took this slot's wake-up
  EventCount done{true};                 // the owner waits here for its result
};

// Who waits on a slot the server is ending: read while the server holds the
// slot (kTaken: its owner and request cannot change), before finish().
struct SlotWaiter {
  uint32_t slot = 0;
  uint32_t owner = 0;       // the client's pid: chains stay within a process
  uint32_t generation = 0;  // the request being ended
};

// Why a client operation did not go through.
enum class SlotWait { kOk, kTimedOut, kClosed, kServerDead };

}  // namespace batchserve
