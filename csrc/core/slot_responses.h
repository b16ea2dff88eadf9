// The server's side of handing results back through shared-memory slots
// (csrc/core/shared_slots.h), without Python: response rows, the error
// area, and the fast path's scatter.
//
// A slot's outcome is written while the server holds it (kTaken) and
// published by finish(): the client reads the rows or the error area only
// after it sees kDone or kFailed (acquire), so none of the writes here needs
// to be atomic. finish() returns false when the client abandoned the request:
// the slot is freed then, and nobody reads what was written.
//
// The error area of a slot (error_bytes): the exception as Python's codec
// (batchserve.transports.exception_codec) encoded it, error_len bytes; the
// codec bounds its output by the area and keeps a text fallback inside it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "shared_slots.h"

namespace batchserve {

// Copies one response leaf (response_leaf_bytes(j) bytes at `src`) into slot
// `s`'s response row j.
inline void write_response_leaf(SharedSlots& slots, uint32_t s, size_t j, const void* src) {
  const size_t bytes = slots.response_leaf_bytes(j);
  if (bytes != 0) std::memcpy(slots.response_row(s, j), src, bytes);
}

// Writes a failed request's encoded exception into slot `s`'s error area
// when it fits (else nothing: error_len 0, which the client's codec reads as
// an exception that could not be encoded).
inline void write_error(SharedSlots& slots, uint32_t s, const void* encoded, size_t encoded_len) {
  SlotHeader& slot = slots.slot(s);
  slot.error_len = 0;
  if (encoded == nullptr || encoded_len > slots.error_bytes()) return;
  std::memcpy(slots.error_area(s), encoded, encoded_len);
  slot.error_len = static_cast<uint32_t>(encoded_len);
}

// The fast path's hand-back, for requests taken out of their batch (nothing
// else ends or writes their slots meanwhile): row i of each response column
// goes to the response rows of slots_of_rows[i], then each request ends
// (kDone) and its clients are woken (SharedSlots::wake_chained). No GIL
// needed; the columns must stay alive and unchanged for the call.
inline void scatter_responses(SharedSlots& slots, const std::vector<uint32_t>& slots_of_rows,
                              const std::vector<const uint8_t*>& columns) {
  slots.write_responses(slots_of_rows, columns);
  std::vector<SlotWaiter> ended;
  ended.reserve(slots_of_rows.size());
  for (uint32_t s : slots_of_rows) {
    const SlotWaiter waiter = slots.waiter(s);  // before finish(): then the slot is the client's
    if (slots.finish(s, false)) ended.push_back(waiter);
  }
  slots.wake_chained(ended.data(), ended.size());
}

}  // namespace batchserve
