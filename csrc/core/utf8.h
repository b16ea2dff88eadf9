// Text helpers that know about UTF-8 and nothing else.
#pragma once

#include <cstddef>
#include <string>

namespace batchserve {

// Cuts `text` to at most `max_bytes` without splitting a UTF-8 character
// (continuation bytes are 10xxxxxx: the cut moves back to a lead byte).
inline void truncate_utf8(std::string& text, size_t max_bytes) {
  if (text.size() <= max_bytes) return;
  size_t end = max_bytes;
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  text.resize(end);
}

}  // namespace batchserve
