// gather_rows: requests' leaves land in the right staging rows, and a batch
// larger than the staging never writes past it; scatter_rows: a batch's
// output rows land at each request's own destination. The ASan build turns
// any overrun into a failure; the checks here must also throw before copying.
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "core/row_copy.h"

namespace {

using batchserve::gather_rows;
using batchserve::RowSource;
using batchserve::scatter_rows;
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

// scatter_rows reads a Staging's columns (sized exactly, so reading past a
// column's last row is an overflow) and writes into FakeRequests' leaves.
std::vector<const uint8_t*> columns_of(const Staging& staging) {
  return {staging.a.data(), staging.b.data()};
}

// Row i goes to responses[order[i]]; counts the destinations asked for.
struct Destinations {
  std::vector<FakeRequest>& responses;
  std::vector<size_t> order;
  size_t calls = 0;
  uint8_t* operator()(size_t i, size_t j) {
    ++calls;
    FakeRequest& r = responses[order.at(i)];
    return j == 0 ? r.a.data() : r.b.data();
  }
};

// Staging of `rows` rows holding 0, 1, 2, ... in a and 100, 101, ... in b.
Staging numbered_staging(size_t rows) {
  Staging staging(rows);
  std::iota(staging.a.begin(), staging.a.end(), uint8_t{0});
  std::iota(staging.b.begin(), staging.b.end(), uint8_t{100});
  return staging;
}

std::vector<FakeRequest> blank_responses(size_t count) {
  std::vector<FakeRequest> out;
  for (size_t i = 0; i < count; ++i) {
    out.emplace_back(0);
    std::fill(out.back().a.begin(), out.back().a.end(), 0xEE);
    std::fill(out.back().b.begin(), out.back().b.end(), 0xEE);
  }
  return out;
}

TEST(ScatterRows, CopiesEachRowToItsDestination) {
  const Staging output = numbered_staging(4);
  std::vector<FakeRequest> responses = blank_responses(4);
  Destinations to{responses, {2, 0, 3, 1}};
  scatter_rows(columns_of(output), output.columns.leaf_bytes, 4, to);
  for (size_t i = 0; i < 4; ++i) {
    const FakeRequest& r = responses[to.order[i]];
    for (size_t k = 0; k < 3; ++k) EXPECT_EQ(r.a[k], output.a[i * 3 + k]) << "row " << i;
    for (size_t k = 0; k < 5; ++k) EXPECT_EQ(r.b[k], output.b[i * 5 + k]) << "row " << i;
  }
}

TEST(ScatterRows, FewerRowsThanTheColumnsHoldLeavesTheOtherDestinationsAlone) {
  const Staging output = numbered_staging(8);
  std::vector<FakeRequest> responses = blank_responses(8);
  Destinations to{responses, {0, 1, 2, 3, 4, 5, 6, 7}};
  scatter_rows(columns_of(output), output.columns.leaf_bytes, 2, to);
  EXPECT_EQ(to.calls, 2u * 2u);  // rows 0 and 1, two leaves each
  EXPECT_EQ(responses[1].b[4], output.b[9]);
  for (size_t i = 2; i < 8; ++i) {
    for (uint8_t v : responses[i].a) EXPECT_EQ(v, 0xEE);
    for (uint8_t v : responses[i].b) EXPECT_EQ(v, 0xEE);
  }
}

TEST(ScatterRows, FullColumnsAreReadToTheLastByte) {
  constexpr size_t kRows = 64;
  const Staging output = numbered_staging(kRows);
  std::vector<FakeRequest> responses = blank_responses(kRows);
  Destinations to{responses, {}};
  for (size_t i = 0; i < kRows; ++i) to.order.push_back(kRows - 1 - i);
  scatter_rows(columns_of(output), output.columns.leaf_bytes, kRows, to);
  EXPECT_EQ(responses.front().b.back(), output.b.back());
  EXPECT_EQ(responses.back().a.front(), output.a.front());
}

TEST(ScatterRows, MismatchedSizesThrowBeforeCopying) {
  const Staging output = numbered_staging(2);
  std::vector<FakeRequest> responses = blank_responses(2);
  Destinations to{responses, {0, 1}};
  EXPECT_THROW(scatter_rows(columns_of(output), {3}, 2, to), std::length_error);
  EXPECT_THROW(scatter_rows(columns_of(output), {3, 5, 1}, 2, to), std::length_error);
  EXPECT_EQ(to.calls, 0u);
  for (const FakeRequest& r : responses) {
    for (uint8_t v : r.a) EXPECT_EQ(v, 0xEE);  // nothing written
    for (uint8_t v : r.b) EXPECT_EQ(v, 0xEE);
  }
}

TEST(ScatterRows, ZeroByteLeavesAndEmptyBatchesAreFine) {
  const Staging output = numbered_staging(1);
  std::vector<FakeRequest> responses = blank_responses(1);
  // A zero-byte leaf may have no memory at all: neither its column nor its
  // destination is touched (memcpy with a null pointer would trip UBSan).
  size_t calls = 0;
  auto to = [&](size_t, size_t j) -> uint8_t* {
    ++calls;
    return j == 0 ? responses[0].a.data() : nullptr;
  };
  scatter_rows({output.a.data(), nullptr}, {3, 0}, 1, to);
  EXPECT_EQ(responses[0].a[2], 2);
  EXPECT_EQ(calls, 1u);
  scatter_rows(columns_of(output), output.columns.leaf_bytes, 0, to);
  EXPECT_EQ(calls, 1u);
}

}  // namespace
