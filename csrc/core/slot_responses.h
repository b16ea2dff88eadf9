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
// The error area of a slot (error_bytes): the exception encoded by the
// bindings' codec (error_len bytes, possibly 0), then its text
// (error_text_len bytes) for a client that cannot decode it. The text gets
// at most half the area, so an encoding always has room to fit beside it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "shared_slots.h"
#include "utf8.h"

namespace batchserve {

// Copies one response leaf (response_leaf_bytes(j) bytes at `src`) into slot
// `s`'s response row j.
inline void write_response_leaf(SharedSlots& slots, uint32_t s, size_t j, const void* src) {
  const size_t bytes = slots.response_leaf_bytes(j);
  if (bytes != 0) std::memcpy(slots.response_row(s, j), src, bytes);
}

// Writes a failed request's exception into slot `s`'s error area: `encoded`
// when it fits beside `text` (else nothing of it: the client falls back to
// the text), and `text` cut to half the area.
inline void write_error(SharedSlots& slots, uint32_t s, const void* encoded, size_t encoded_len,
                        std::string text) {
  SlotHeader& slot = slots.slot(s);
  const size_t room = slots.error_bytes();
  truncate_utf8(text, room / 2);
  slot.error_len = 0;
  if (encoded != nullptr && encoded_len + text.size() <= room) {
    std::memcpy(slots.error_area(s), encoded, encoded_len);
    slot.error_len = static_cast<uint32_t>(encoded_len);
  }
  std::memcpy(slots.error_area(s) + slot.error_len, text.data(), text.size());
  slot.error_text_len = static_cast<uint32_t>(text.size());
}

// The fast path's hand-back, for requests taken out of their batch (nothing
// else ends or writes their slots meanwhile): row i of each response column
// goes to the response rows of slots_of_rows[i], then each request ends
// (kDone) and its client is woken. No GIL needed; the columns must stay
// alive and unchanged for the call.
inline void scatter_responses(SharedSlots& slots, const std::vector<uint32_t>& slots_of_rows,
                              const std::vector<const uint8_t*>& columns) {
  slots.write_responses(slots_of_rows, columns);
  for (uint32_t s : slots_of_rows)
    if (slots.finish(s, false)) slots.wake(s);
}

}  // namespace batchserve
