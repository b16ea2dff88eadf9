// RequestQueue: the intake of an inference server.
//
// A bounded MPSC ring of Requests plus the parking needed around it:
// producers block (spin, then futex) while the ring is full, the server
// sleeps while it is empty, and close() wakes both. A request is a handful of
// words; what it points to (the caller's data, its Future, its Completion) is
// opaque here and owned by the layer above.
//
// Closing: once close() returns, no push can still land in the ring
// (producers register in pushers_ before checking closed_, and close() waits
// for registered pushers to leave), so draining after close() sees every
// request that will ever be accepted.
//
// One consumer at a time: consumer-side calls take consumer_mutex_, which
// costs nothing while uncontended (the server thread) and lets a shutdown
// drain the ring from another thread without breaking the single-consumer
// rule of the ring.
//
// Quiet pushes: a push normally wakes a sleeping server (a futex wake, ~15
// us of the pusher's time on the 2-core VM, and the woken server's run on
// the other core). A push may skip it (push(..., quiet = true)) when every
// server asleep is idle (waiting for a first request, not for a batch to
// fill) and wakes within quiet_bound_ns() anyway (its deadline is that
// close: the collector's ticks while a caller claims its requests, see
// collector.h), so the request is seen within that bound. A server about to
// sleep longer counts itself in long_sleepers_ first and then looks for
// work (the park's re-check); a quiet pusher publishes and then reads the
// count (both seq_cst): either the pusher sees the sleeper and wakes it, or
// the sleeper sees the request.
//
// Requests may also come from an intake (RequestIntake): a source the
// consumer takes from after the ring, such as the shared-memory slots that
// actor processes fill (csrc/core/shared_slots.h). The server then sleeps on the
// intake's event, which those producers notify.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "completion.h"
#include "mpsc_ring.h"
#include "parking.h"
#include "row_copy.h"

namespace batchserve {

class RequestIntake;

struct Request {
  void* payload = nullptr;           // the caller's input (opaque)
  Completion* completion = nullptr;  // a blocking caller's slot, or null
  int64_t submit_ns = 0;             // arrival, monotonic_ns()
  const RowSource* rows = nullptr;   // fast path: the request's fixed-schema
                                     // leaves, or null (owned by the layer above,
                                     // or by the intake)
  RequestIntake* intake = nullptr;   // where it came from, if not the ring
  uint32_t slot = 0;                 // the intake's name for it
  uint32_t caller = 0;               // who sent it, for the caller-gap statistic
                                     // and the fill estimate (0: unknown; a
                                     // shared-memory slot: kSlotCallerBit | slot)
};

// Request::caller of a shared-memory slot's request has this bit set; a
// thread's id (the bindings count them from 1) never does.
inline constexpr uint32_t kSlotCallerBit = 0x8000'0000u;

static_assert(std::is_trivially_copyable<Request>::value,
              "a Request travels through the ring as plain words");

// A request taken from the queue that its caller claimed (Completion::claim)
// is the caller's, its input and rows included: drops only the queue's
// reference to its completion. True if it was claimed.
inline bool release_if_claimed(const Request& r) {
  if (r.completion == nullptr || !r.completion->claimed_by_caller()) return false;
  r.completion->release();
  return true;
}

// Requests that reach the consumer other than through push(). Taking is
// called with the queue's consumer lock held (one taker at a time).
class RequestIntake {
 public:
  virtual ~RequestIntake() = default;
  virtual bool ready() const = 0;   // a request can be taken now
  virtual size_t size() const = 0;  // about how many wait
  // Appends up to max_items requests to `out`; returns how many.
  virtual size_t take(std::vector<Request>& out, size_t max_items) = 0;
  virtual EventCount& work_event() = 0;  // producers notify it
  virtual void close() = 0;              // the queue closed: refuse producers
  virtual void reopen() = 0;
  // When take() next has housekeeping to do even with nothing ready (the
  // shared-memory slots look for dead clients and wake callers whose
  // handed-over wake-up is overdue): a waiting server wakes by then, so an
  // idle server with a long timeout still does it.
  virtual int64_t next_take_due_ns() const { return INT64_MAX; }
};

enum class PushResult { kOk, kClosed, kTimedOut };

class RequestQueue {
 public:
  // How long a waiter re-checks before sleeping. A producer waiting for room
  // spins briefly: the server frees room a batch at a time. The server spins
  // for server_spin_ns (set by its owner, see set_server_spin_ns).
  static constexpr int kProducerSpin = 64;

  explicit RequestQueue(size_t capacity) : ring_(capacity) {}

  // Any thread. Blocks while the ring is full until `deadline_ns`
  // (0: do not block), and always returns by then (kTimedOut) if no room
  // came. Never pushes after close().
  PushResult push(const Request& request, int64_t deadline_ns, bool quiet = false) {
    pushers_.fetch_add(1, std::memory_order_seq_cst);
    PushResult result = PushResult::kOk;
    for (;;) {
      if (closed_.load(std::memory_order_seq_cst)) {
        result = PushResult::kClosed;
        break;
      }
      if (ring_.try_push(request)) break;
      // Full. The deadline is checked on every failed attempt, not only when
      // the wait below times out: that wait ends as soon as has_space() holds,
      // and has_space() (head and tail) may briefly disagree with try_push()
      // (the cell's sequence number), so a loop that only trusted the wait
      // could retry past its deadline without ever returning to its caller.
      if (deadline_ns == 0 || monotonic_ns() >= deadline_ns) {
        result = PushResult::kTimedOut;
        break;
      }
      // Leave pushers_ while asleep so close() need not wait for us.
      pushers_.fetch_sub(1, std::memory_order_seq_cst);
      spin_then_park(
          not_full_, [this] { return has_space() || closed(); }, deadline_ns, kProducerSpin);
      pushers_.fetch_add(1, std::memory_order_seq_cst);
    }
    // Notify before leaving pushers_: once close() has seen pushers_ == 0,
    // no producer touches the queue any more.
    if (result == PushResult::kOk && (!quiet || long_sleeper())) work_->notify_all();
    pushers_.fetch_sub(1, std::memory_order_seq_cst);
    return result;
  }

  // Consumer. Pops one published request.
  bool try_pop(Request& out) {
    std::lock_guard<std::mutex> lock(consumer_mutex_);
    return pop_locked(out);
  }

  // Any thread, as a consumer: pops the request at the head only if
  // `wanted(request)` (a caller taking back its own request, see
  // Completion::claim).
  template <typename Pred>
  bool pop_if(Pred&& wanted, Request& out) {
    std::lock_guard<std::mutex> lock(consumer_mutex_);
    if (!ring_.try_pop_if(std::forward<Pred>(wanted), out)) return false;
    not_full_.notify_all();
    return true;
  }

  // Wakes a server waiting for work, as a push does (after a quiet push).
  void announce() { work_->notify_all(); }

  // Consumer. Pops up to `max_items` published requests onto `out`.
  size_t pop_many(std::vector<Request>& out, size_t max_items) {
    std::lock_guard<std::mutex> lock(consumer_mutex_);
    size_t n = 0;
    Request r;
    while (n < max_items && pop_locked(r)) {
      out.push_back(r);
      ++n;
    }
    if (intake_ != nullptr && n < max_items) n += intake_->take(out, max_items - n);
    return n;
  }

  // Before any consumer or producer runs: requests also come from `intake`
  // (not owned; it must outlive the queue's use), and the server sleeps on
  // its event.
  void attach_intake(RequestIntake* intake) {
    intake_ = intake;
    work_ = &intake->work_event();
  }

  // Server side: sleeps until a request is published, the queue is closed,
  // interrupt() is called after `seen_interrupts` was read from
  // interrupts(), or the deadline passes. True if a request is ready.
  // `idle`: a wait for a first request, which a quiet push may leave to end
  // by itself (see above); any other (a batch waiting to fill) is woken.
  bool wait_for_work(int64_t deadline_ns, uint32_t seen_interrupts, bool idle = false) {
    if (intake_ != nullptr) deadline_ns = std::min(deadline_ns, intake_->next_take_due_ns());
    // Past the quiet bound: a quiet push must wake this wait (see above).
    // Counted before the park's last look for work.
    const bool long_sleep =
        !idle || deadline_ns - monotonic_ns() > quiet_bound_ns_.load(std::memory_order_relaxed);
    if (long_sleep) long_sleepers_.fetch_add(1, std::memory_order_seq_cst);
    struct LeaveLongSleep {
      std::atomic<uint32_t>* count;
      ~LeaveLongSleep() {
        if (count != nullptr) count->fetch_sub(1, std::memory_order_seq_cst);
      }
    } leave{long_sleep ? &long_sleepers_ : nullptr};
    spin_for_then_park(
        *work_,
        [this, seen_interrupts] {
          return has_work() || closed() ||
                 interrupts_.load(std::memory_order_acquire) != seen_interrupts;
        },
        deadline_ns, server_spin_ns_.load(std::memory_order_relaxed));
    return has_work();
  }

  bool wait_for_work(int64_t deadline_ns) { return wait_for_work(deadline_ns, interrupts()); }

  // Wakes a server sleeping in wait_for_work (e.g. its settings changed).
  // A server that reads interrupts() before it reads its settings cannot
  // miss a change: either it reads the new settings or its wait sees the
  // count move.
  void interrupt() {
    interrupts_.fetch_add(1, std::memory_order_acq_rel);
    work_->notify_all();
  }

  uint32_t interrupts() const { return interrupts_.load(std::memory_order_acquire); }

  // Rejects every later push and wakes all sleepers. When it returns, no
  // push is in flight: the ring holds every request that was accepted.
  void close() {
    closed_.store(true, std::memory_order_seq_cst);
    if (intake_ != nullptr) intake_->close();
    work_->notify_all();
    not_full_.notify_all();
    while (pushers_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  }

  void reopen() {
    if (intake_ != nullptr) intake_->reopen();
    closed_.store(false, std::memory_order_seq_cst);
  }

  // How soon every sleeping server wakes by itself for a quiet push to skip
  // the wake-up (see above; 0: never skipped).
  void set_quiet_bound_ns(int64_t ns) { quiet_bound_ns_.store(ns, std::memory_order_relaxed); }
  int64_t quiet_bound_ns() const { return quiet_bound_ns_.load(std::memory_order_relaxed); }

  // Servers asleep past the quiet bound now (a quiet push wakes them).
  uint32_t long_sleepers() const { return long_sleepers_.load(std::memory_order_acquire); }

  // How long the server spins for work before it sleeps (0: sleep at once).
  void set_server_spin_ns(int64_t ns) {
    server_spin_ns_.store(ns > 0 ? ns : 0, std::memory_order_relaxed);
  }

  int64_t server_spin_ns() const { return server_spin_ns_.load(std::memory_order_relaxed); }

  bool closed() const { return closed_.load(std::memory_order_acquire); }
  size_t size() const { return ring_.size_approx() + (intake_ != nullptr ? intake_->size() : 0); }
  size_t capacity() const { return ring_.capacity(); }

 private:
  bool has_space() const { return ring_.size_approx() < ring_.capacity(); }

  // A quiet pusher, after publishing: must it wake a sleeper?
  bool long_sleeper() const {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return long_sleepers_.load(std::memory_order_seq_cst) != 0;
  }
  bool has_work() const { return ring_.ready() || (intake_ != nullptr && intake_->ready()); }

  bool pop_locked(Request& out) {
    if (!ring_.try_pop(out)) return false;
    not_full_.notify_all();  // a fence and a load unless a producer waits
    return true;
  }

  MpscRing<Request> ring_;
  EventCount not_empty_;
  EventCount* work_ = &not_empty_;  // where the server sleeps
  RequestIntake* intake_ = nullptr;
  EventCount not_full_;
  std::mutex consumer_mutex_;
  std::atomic<bool> closed_{false};
  std::atomic<uint32_t> pushers_{0};
  std::atomic<uint32_t> interrupts_{0};
  std::atomic<int64_t> server_spin_ns_{0};
  std::atomic<int64_t> quiet_bound_ns_{0};
  std::atomic<uint32_t> long_sleepers_{0};  // servers in a wait past the quiet bound
};

}  // namespace batchserve
