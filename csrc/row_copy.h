// The fast path's copy: requests' rows into batch staging (gather).
//
// A fixed schema is a list of leaves; leaf j of every request is
// leaf_bytes[j] contiguous bytes. Staging holds `rows` rows of each leaf,
// leaf j at base[j] (row i at base[j] + i * leaf_bytes[j]). Nothing here
// knows about Python or torch: pointers and sizes only, so it runs with the
// GIL released and is tested alone (under ASan for overruns).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace batchserve {

// Where one batch's input rows go: one column per leaf.
struct StagingColumns {
  std::vector<uint8_t*> base;       // per leaf: row 0 of the column
  std::vector<size_t> leaf_bytes;   // per leaf: bytes of one row
  size_t rows = 0;                  // capacity of every column, in rows
};

// Copies leaf j of request i (sources[i][j], leaf_bytes[j] bytes) to row i of
// column j. Throws std::length_error before copying anything when there are
// more requests than rows or a request has too few leaves, so a bad caller
// can never write past the staging memory.
inline void gather_rows(const std::vector<const void* const*>& sources,
                        size_t leaves_per_request, const StagingColumns& dst) {
  const size_t leaves = dst.base.size();
  if (dst.leaf_bytes.size() != leaves)
    throw std::length_error("gather_rows: one size per column expected");
  if (sources.size() > dst.rows)
    throw std::length_error("gather_rows: " + std::to_string(sources.size()) +
                            " requests for " + std::to_string(dst.rows) +
                            " staging rows");
  if (leaves_per_request < leaves)
    throw std::length_error("gather_rows: requests carry fewer leaves than the schema");
  for (size_t i = 0; i < sources.size(); ++i) {
    const void* const* leaf = sources[i];
    for (size_t j = 0; j < leaves; ++j) {
      const size_t n = dst.leaf_bytes[j];
      if (n != 0) std::memcpy(dst.base[j] + i * n, leaf[j], n);
    }
  }
}

}  // namespace batchserve
