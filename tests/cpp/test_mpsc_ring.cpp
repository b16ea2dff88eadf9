// MpscRing: capacity, FIFO, full/empty, wrap-around, many producers.
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/mpsc_ring.h"
#include "test_util.h"

namespace {

using batchserve::MpscRing;
using batchserve_test::producer_of;
using batchserve_test::seq_of;
using batchserve_test::tagged_id;

TEST(MpscRing, CapacityRoundsUpToPowerOfTwo) {
  struct Case {
    size_t requested;
    size_t expected;
  };
  const Case cases[] = {{0, 2},       {1, 2},       {2, 2},      {3, 4},  {4, 4},
                        {5, 8},       {7, 8},       {8, 8},      {9, 16}, {1000, 1024},
                        {1024, 1024}, {1025, 2048}, {4097, 8192}};
  for (const Case& c : cases) {
    MpscRing<int> ring(c.requested);
    EXPECT_EQ(ring.capacity(), c.expected) << "requested " << c.requested;
  }
}

TEST(MpscRing, AbsurdCapacityThrows) {
  EXPECT_THROW(MpscRing<int>((size_t{1} << 40) + 1), std::invalid_argument);
}

TEST(MpscRing, EmptyRing) {
  MpscRing<int> ring(4);
  int out = -1;
  EXPECT_FALSE(ring.ready());
  EXPECT_FALSE(ring.try_pop(out));
  EXPECT_EQ(out, -1);
  EXPECT_EQ(ring.size_approx(), 0u);
}

TEST(MpscRing, FifoSingleThread) {
  MpscRing<int> ring(8);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(ring.try_push(100 + i));
    EXPECT_EQ(ring.size_approx(), static_cast<size_t>(i + 1));
  }
  EXPECT_TRUE(ring.ready());
  for (int i = 0; i < 5; ++i) {
    int out = -1;
    ASSERT_TRUE(ring.try_pop(out));
    EXPECT_EQ(out, 100 + i);
    EXPECT_EQ(ring.size_approx(), static_cast<size_t>(4 - i));
  }
  int out = -1;
  EXPECT_FALSE(ring.ready());
  EXPECT_FALSE(ring.try_pop(out));
}

TEST(MpscRing, FullRingRejectsPush) {
  MpscRing<int> ring(4);
  ASSERT_EQ(ring.capacity(), 4u);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(ring.try_push(i));
  EXPECT_EQ(ring.size_approx(), 4u);
  EXPECT_FALSE(ring.try_push(99));
  EXPECT_FALSE(ring.try_push(99));
  EXPECT_EQ(ring.size_approx(), 4u);

  // One pop frees exactly one slot.
  int out = -1;
  ASSERT_TRUE(ring.try_pop(out));
  EXPECT_EQ(out, 0);
  EXPECT_TRUE(ring.try_push(4));
  EXPECT_FALSE(ring.try_push(99));

  // The rejected values never appear.
  for (int expected = 1; expected <= 4; ++expected) {
    ASSERT_TRUE(ring.try_pop(out));
    EXPECT_EQ(out, expected);
  }
  EXPECT_FALSE(ring.try_pop(out));
}

TEST(MpscRing, WrapAroundManyLaps) {
  MpscRing<uint64_t> ring(4);
  const size_t cap = ring.capacity();
  uint64_t next_push = 0;
  uint64_t next_pop = 0;
  // Batches of every size from 1 to capacity, many laps around the ring.
  for (int lap = 0; lap < 5000; ++lap) {
    const size_t n = 1 + static_cast<size_t>(lap) % cap;
    for (size_t i = 0; i < n; ++i) ASSERT_TRUE(ring.try_push(next_push++));
    if (n == cap) {
      EXPECT_FALSE(ring.try_push(~uint64_t{0}));
    }
    EXPECT_EQ(ring.size_approx(), n);
    for (size_t i = 0; i < n; ++i) {
      uint64_t out = 0;
      ASSERT_TRUE(ring.try_pop(out));
      ASSERT_EQ(out, next_pop++);
    }
    uint64_t out = 0;
    EXPECT_FALSE(ring.try_pop(out));
  }
  // Keep the ring half full while it goes round: push one, pop one.
  for (uint64_t i = 0; i < cap / 2; ++i) ASSERT_TRUE(ring.try_push(next_push++));
  for (int i = 0; i < 10000; ++i) {
    ASSERT_TRUE(ring.try_push(next_push++));
    uint64_t out = 0;
    ASSERT_TRUE(ring.try_pop(out));
    ASSERT_EQ(out, next_pop++);
    ASSERT_EQ(ring.size_approx(), cap / 2);
  }
}

TEST(MpscRing, PopReleasesTheStoredValue) {
  MpscRing<std::shared_ptr<int>> ring(2);
  auto value = std::make_shared<int>(7);
  ASSERT_TRUE(ring.try_push(value));
  EXPECT_EQ(value.use_count(), 2);
  std::shared_ptr<int> out;
  ASSERT_TRUE(ring.try_pop(out));
  EXPECT_EQ(out, value);
  out.reset();
  EXPECT_EQ(value.use_count(), 1);  // the ring kept no copy
}

// 8 producers x 20000 items through a small ring into one consumer: every
// item arrives exactly once, and each producer's items arrive in order.
TEST(MpscRing, ManyProducersOneConsumer) {
  constexpr uint32_t kProducers = 8;
  constexpr uint32_t kPerProducer = 20000;
  MpscRing<uint64_t> ring(256);
  const size_t cap = ring.capacity();

  std::atomic<bool> go{false};
  std::vector<std::thread> producers;
  for (uint32_t p = 0; p < kProducers; ++p) {
    producers.emplace_back([&ring, &go, p] {
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      for (uint32_t seq = 0; seq < kPerProducer; ++seq) {
        const uint64_t item = tagged_id(p, seq);
        while (!ring.try_push(item)) std::this_thread::yield();
      }
    });
  }

  std::vector<uint32_t> next(kProducers, 0);  // next expected seq per producer
  uint64_t received = 0;
  uint64_t out_of_order = 0;
  uint64_t bad_producer = 0;
  uint64_t size_over_capacity = 0;
  const uint64_t total = uint64_t{kProducers} * kPerProducer;
  go.store(true, std::memory_order_release);
  while (received < total) {
    uint64_t item = 0;
    if (!ring.try_pop(item)) {
      std::this_thread::yield();
      continue;
    }
    ++received;
    if (ring.size_approx() > cap) ++size_over_capacity;
    const uint32_t p = producer_of(item);
    const uint32_t seq = seq_of(item);
    if (p >= kProducers) {
      ++bad_producer;
      continue;
    }
    // Exactly-once plus per-producer FIFO: the seq must be the next one.
    if (seq != next[p]) ++out_of_order;
    next[p] = seq + 1;
  }
  for (auto& t : producers) t.join();

  EXPECT_EQ(received, total);
  EXPECT_EQ(bad_producer, 0u);
  EXPECT_EQ(out_of_order, 0u);
  EXPECT_EQ(size_over_capacity, 0u);
  for (uint32_t p = 0; p < kProducers; ++p) EXPECT_EQ(next[p], kPerProducer) << "producer " << p;
  uint64_t extra = 0;
  EXPECT_FALSE(ring.try_pop(extra));
  EXPECT_FALSE(ring.ready());
  EXPECT_EQ(ring.size_approx(), 0u);
}

}  // namespace
