// gather_rows: requests' leaves land in the right staging rows, and a batch
// larger than the staging never writes past it (the ASan build turns any
// overrun into a failure; the checks here must also throw before copying).
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "row_copy.h"

namespace {

using batchserve::gather_rows;
using batchserve::RowSource;
using batchserve::StagingColumns;

// One request: two leaves of 3 and 5 bytes, filled from `seed`.
struct FakeRequest {
  std::vector<uint8_t> a, b;
  RowSource source;
  explicit FakeRequest(uint8_t seed) : a(3), b(5) {
    std::iota(a.begin(), a.end(), seed);
    std::iota(b.begin(), b.end(), static_cast<uint8_t>(seed + 100));
    source.count = 2;
    source.data[0] = a.data();
    source.data[1] = b.data();
  }
};

// Staging sized exactly to `rows` rows (heap blocks of that size, so ASan
// sees one byte past the end as an overflow).
struct Staging {
  std::vector<uint8_t> a, b;
  StagingColumns columns;
  explicit Staging(size_t rows) : a(rows * 3), b(rows * 5) {
    columns.base = {a.data(), b.data()};
    columns.leaf_bytes = {3, 5};
    columns.rows = rows;
  }
};

std::vector<const RowSource*> sources_of(const std::vector<FakeRequest>& requests) {
  std::vector<const RowSource*> out;
  for (const FakeRequest& r : requests) out.push_back(&r.source);
  return out;
}

TEST(GatherRows, CopiesEachRequestToItsRow) {
  std::vector<FakeRequest> requests;
  for (uint8_t i = 0; i < 4; ++i) requests.emplace_back(static_cast<uint8_t>(i * 10));
  Staging staging(4);
  gather_rows(sources_of(requests), 0, staging.columns);
  for (size_t i = 0; i < 4; ++i) {
    for (size_t k = 0; k < 3; ++k) EXPECT_EQ(staging.a[i * 3 + k], requests[i].a[k]);
    for (size_t k = 0; k < 5; ++k) EXPECT_EQ(staging.b[i * 5 + k], requests[i].b[k]);
  }
}

TEST(GatherRows, FewerRequestsThanRowsLeavesTheRestAlone) {
  std::vector<FakeRequest> requests;
  requests.emplace_back(1);
  Staging staging(8);
  std::fill(staging.a.begin(), staging.a.end(), 0xEE);
  gather_rows(sources_of(requests), 0, staging.columns);
  EXPECT_EQ(staging.a[0], 1);
  for (size_t k = 3; k < staging.a.size(); ++k) EXPECT_EQ(staging.a[k], 0xEE);
}

TEST(GatherRows, FullStagingIsFilledToTheLastByte) {
  constexpr size_t kRows = 64;  // max_batch_size rows, the server's staging
  std::vector<FakeRequest> requests;
  for (size_t i = 0; i < kRows; ++i) requests.emplace_back(static_cast<uint8_t>(i));
  Staging staging(kRows);
  gather_rows(sources_of(requests), 0, staging.columns);
  EXPECT_EQ(staging.b.back(), requests.back().b.back());
}

TEST(GatherRows, MoreRequestsThanRowsThrowsBeforeCopying) {
  std::vector<FakeRequest> requests;
  for (uint8_t i = 0; i < 5; ++i) requests.emplace_back(i);
  Staging staging(4);
  std::fill(staging.a.begin(), staging.a.end(), 0xEE);
  EXPECT_THROW(gather_rows(sources_of(requests), 0, staging.columns), std::length_error);
  for (uint8_t v : staging.a) EXPECT_EQ(v, 0xEE);  // nothing written
}

TEST(GatherRows, RequestsWithFewerLeavesThanColumnsThrow) {
  std::vector<FakeRequest> requests;
  requests.emplace_back(1);
  requests.back().source.count = 1;
  Staging staging(2);
  EXPECT_THROW(gather_rows(sources_of(requests), 0, staging.columns), std::length_error);
}

TEST(GatherRows, AppendsAfterFirstRow) {
  std::vector<FakeRequest> first, second;
  first.emplace_back(10);
  second.emplace_back(20);
  second.emplace_back(30);
  Staging staging(3);
  gather_rows(sources_of(first), 0, staging.columns);
  gather_rows(sources_of(second), 1, staging.columns);
  EXPECT_EQ(staging.a[0], 10);
  EXPECT_EQ(staging.a[3], 20);
  EXPECT_EQ(staging.a[6], 30);
  EXPECT_THROW(gather_rows(sources_of(second), 2, staging.columns), std::length_error);
  EXPECT_THROW(gather_rows(sources_of(first), 4, staging.columns), std::length_error);
}

TEST(GatherRows, MismatchedColumnSizesThrow) {
  Staging staging(2);
  staging.columns.leaf_bytes.pop_back();
  EXPECT_THROW(gather_rows({}, 0, staging.columns), std::length_error);
}

TEST(GatherRows, ZeroByteLeavesAndEmptyBatchesAreFine) {
  std::vector<FakeRequest> requests;
  requests.emplace_back(1);
  Staging staging(1);
  staging.columns.leaf_bytes = {3, 0};
  gather_rows(sources_of(requests), 0, staging.columns);
  EXPECT_EQ(staging.a[2], 3);
  gather_rows({}, 0, staging.columns);
}

}  // namespace
