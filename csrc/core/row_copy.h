// The fast path's copies: requests' leaves into batch staging rows (gather),
// and a batch's output rows back to each request's own rows (scatter).
//
// A fixed schema is a list of leaves; leaf j of every request is
// leaf_bytes[j] contiguous bytes. A batch's columns hold one row per request
// for each leaf, leaf j at base[j] (row i at base[j] + i * leaf_bytes[j]):
// staging for the inputs, the model's output for the responses. Nothing here
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

// A fast request's leaves: the schema they matched (by id) and where each
// leaf's bytes are. The layer above keeps that memory alive until the
// request ends.
struct RowSource {
  // The most leaves a fast-path schema (and so a SharedMemoryTransport's
  // request or response) may have: the one limit, exported to Python as
  // MAX_LEAVES and MAX_SLOT_LEAVES.
  static constexpr size_t kMaxLeaves = 64;
  uint64_t schema_id = 0;
  size_t count = 0;
  const void* data[kMaxLeaves] = {};
};

// Where one batch's input rows go: one column per leaf.
struct StagingColumns {
  std::vector<uint8_t*> base;      // per leaf: row 0 of the column
  std::vector<size_t> leaf_bytes;  // per leaf: bytes of one row
  size_t rows = 0;                 // capacity of every column, in rows

  size_t row_bytes() const {
    size_t total = 0;
    for (size_t n : leaf_bytes) total += n;
    return total;
  }
};

// Copies leaf j of sources[i] to row first_row + i of column j. Throws
// std::length_error before copying anything when the rows would not fit or
// a source has fewer leaves than the staging has columns, so a bad caller
// can never write past the staging memory.
inline void gather_rows(const std::vector<const RowSource*>& sources, size_t first_row,
                        const StagingColumns& dst) {
  const size_t leaves = dst.base.size();
  if (dst.leaf_bytes.size() != leaves)
    throw std::length_error("gather_rows: one size per column expected");
  if (first_row > dst.rows || sources.size() > dst.rows - first_row)
    throw std::length_error("gather_rows: rows " + std::to_string(first_row) + ".." +
                            std::to_string(first_row + sources.size()) + " of " +
                            std::to_string(dst.rows) + " staging rows");
  for (const RowSource* s : sources)
    if (s->count < leaves)
      throw std::length_error("gather_rows: a request carries fewer leaves than the schema");
  for (size_t i = 0; i < sources.size(); ++i) {
    const RowSource& s = *sources[i];
    for (size_t j = 0; j < leaves; ++j) {
      const size_t n = dst.leaf_bytes[j];
      if (n != 0) std::memcpy(dst.base[j] + (first_row + i) * n, s.data[j], n);
    }
  }
}

// The inverse of gather_rows: copies row i of column j (columns[j] +
// i * leaf_bytes[j]) to row_dest(i, j), for rows 0 .. rows - 1. The caller
// guarantees that every column holds at least `rows` rows and that
// row_dest(i, j) points to leaf_bytes[j] writable bytes. Throws
// std::length_error before copying anything when there is not one size per
// column, so a column is never read with another leaf's size.
template <typename RowDest>
void scatter_rows(const std::vector<const uint8_t*>& columns, const std::vector<size_t>& leaf_bytes,
                  size_t rows, RowDest&& row_dest) {
  if (columns.size() != leaf_bytes.size())
    throw std::length_error("scatter_rows: " + std::to_string(columns.size()) + " columns for " +
                            std::to_string(leaf_bytes.size()) + " leaves");
  for (size_t i = 0; i < rows; ++i)
    for (size_t j = 0; j < columns.size(); ++j) {
      const size_t n = leaf_bytes[j];
      if (n != 0) std::memcpy(row_dest(i, j), columns[j] + i * n, n);
    }
}

}  // namespace batchserve
