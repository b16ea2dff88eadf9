// Bounded lock-free multi-producer single-consumer ring (Vyukov's bounded
// queue with per-slot sequence numbers, consumer side specialised to one
// thread).
//
// Invariants, for a cell at index i = pos & mask:
//   seq == pos            the cell is free for the producer that claims `pos`;
//   seq == pos + 1        the value for `pos` is published, the consumer may
//                         read it;
//   seq == pos + capacity the consumer released it for the producer of the
//                         next lap.
// A producer claims a position by CAS on tail_, writes the value, then
// publishes with a release store of seq; the consumer's acquire load of seq
// makes the value visible. The consumer alone advances head_, so popping
// needs no CAS. A producer that claimed a position but has not yet published
// makes the ring look empty to the consumer until it does (a momentary
// "empty", never a lost element): callers that sleep on emptiness are woken by
// the producer's notify after publication.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <type_traits>

namespace batchserve {

constexpr size_t kCacheLine = 64;

template <typename T>
class MpscRing {
  static_assert(std::is_default_constructible<T>::value && std::is_copy_assignable<T>::value,
                "a cell holds a value between pushes: written by copy, reset to T{} by a pop");
  static_assert(std::atomic<uint64_t>::is_always_lock_free,
                "positions and sequence numbers are lock-free atomics");

 public:
  explicit MpscRing(size_t min_capacity)
      : capacity_(round_up_pow2(min_capacity)), mask_(capacity_ - 1), cells_(new Cell[capacity_]) {
    for (size_t i = 0; i < capacity_; ++i) cells_[i].seq.store(i, std::memory_order_relaxed);
  }

  MpscRing(const MpscRing&) = delete;
  MpscRing& operator=(const MpscRing&) = delete;

  // Any thread. Returns false when the ring is full.
  bool try_push(const T& value) noexcept {
    uint64_t pos = tail_.load(std::memory_order_relaxed);
    for (;;) {
      Cell& cell = cells_[pos & mask_];
      const uint64_t seq = cell.seq.load(std::memory_order_acquire);
      const int64_t lag = static_cast<int64_t>(seq - pos);
      if (lag == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          cell.value = value;
          cell.seq.store(pos + 1, std::memory_order_release);
          return true;
        }
        // CAS failure reloaded pos; retry with it.
      } else if (lag < 0) {
        return false;  // the consumer has not released this cell yet: full
      } else {
        pos = tail_.load(std::memory_order_relaxed);  // lost a race, catch up
      }
    }
  }

  // Consumer thread only. Returns false when nothing is published at head.
  bool try_pop(T& out) noexcept {
    const uint64_t pos = head_.load(std::memory_order_relaxed);
    Cell& cell = cells_[pos & mask_];
    const uint64_t seq = cell.seq.load(std::memory_order_acquire);
    if (seq != pos + 1) return false;
    out = cell.value;
    cell.value = T{};
    cell.seq.store(pos + capacity_, std::memory_order_release);
    // Release: a producer that sees head_ past `pos` (size_approx) also sees
    // the cell released, so "not full" by size implies try_push can succeed
    // (short of another producer taking the room first).
    head_.store(pos + 1, std::memory_order_release);
    return true;
  }

  // Consumer thread only. Pops the element published at head only if
  // `wanted(element)`; returns whether it did.
  template <typename Pred>
  bool try_pop_if(Pred&& wanted, T& out) noexcept {
    const uint64_t pos = head_.load(std::memory_order_relaxed);
    const Cell& cell = cells_[pos & mask_];
    if (cell.seq.load(std::memory_order_acquire) != pos + 1 || !wanted(cell.value)) return false;
    return try_pop(out);
  }

  // Consumer thread only: is an element published at head?
  bool ready() const noexcept {
    const uint64_t pos = head_.load(std::memory_order_relaxed);
    return cells_[pos & mask_].seq.load(std::memory_order_acquire) == pos + 1;
  }

  // Any thread; exact only when no push or pop is in progress.
  size_t size_approx() const noexcept {
    const uint64_t tail = tail_.load(std::memory_order_relaxed);
    const uint64_t head = head_.load(std::memory_order_acquire);
    return tail > head ? static_cast<size_t>(tail - head) : 0;
  }

  size_t capacity() const noexcept { return capacity_; }

 private:
  struct alignas(kCacheLine) Cell {
    std::atomic<uint64_t> seq{0};
    T value{};
  };

  static size_t round_up_pow2(size_t n) {
    if (n < 2) n = 2;
    if (n > (size_t{1} << 40)) throw std::invalid_argument("ring too large");
    size_t p = 1;
    while (p < n) p <<= 1;
    return p;
  }

  const size_t capacity_;
  const size_t mask_;
  std::unique_ptr<Cell[]> cells_;
  alignas(kCacheLine) std::atomic<uint64_t> tail_{0};  // producers' claim
  alignas(kCacheLine) std::atomic<uint64_t> head_{0};  // written by consumer
};

}  // namespace batchserve
