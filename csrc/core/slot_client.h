// The actor's side of the shared-memory slot protocol (csrc/core/
// shared_slots.h), without Python: claim a free slot (the one used last
// first), copy a request's rows into it and submit it, wait for its outcome
// in slices, and leave it cleanly on a timeout, a signal, a server that shut
// down or died.
//
// The bindings (csrc/python/slot_client.h) wrap it: they match a TensorDict
// to the request's rows, and turn outcomes into results and exceptions. The
// waits take two callables from them:
//   without_gil(f)  runs f() with the GIL released and returns its result;
//   interrupted()   (GIL held) true when a signal handler raised.
// Both run on the calling thread; tests pass plain ones.
//
// Slot ownership (PendingSlot.open): from a successful claim until the
// outcome is read, or the request is withdrawn or left, the slot is the
// caller's; every path below that gives it up clears `open` first, so a
// PendingSlot gives its slot back exactly once.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "futex.h"
#include "row_copy.h"
#include "shared_slots.h"
#include "sliced_wait.h"

namespace batchserve {

// A submitted request's slot, owned by the caller's future. Dropped unread
// (the future was discarded, or a signal interrupted the caller before it
// got the future), it gives the slot back.
struct PendingSlot {
  std::shared_ptr<SharedSlots> slots;
  uint32_t slot = 0;
  bool open = true;  // the slot is still the caller's
  // The process whose request this is. A forked child inherits a copy of
  // every future in flight; dropping the copy must not end the parent's
  // request (the child never owned the slot).
  pid_t owner = ::getpid();

  PendingSlot(std::shared_ptr<SharedSlots> s, uint32_t n) : slots(std::move(s)), slot(n) {}
  PendingSlot(const PendingSlot&) = delete;
  PendingSlot& operator=(const PendingSlot&) = delete;
  ~PendingSlot() {
    if (open && owner == ::getpid()) leave();
  }

  // The caller leaves its request (dropped, timeout, signal, dead server):
  // the slot is no longer the caller's, whatever state it was in.
  void leave() {
    open = false;
    if (slots->give_up(slot) != SlotHeader::kAbandoned) slots->release(slot);
  }

  // Withdraws the request if the server has not taken it yet, giving the
  // slot back; false (nothing changed) if it was taken.
  bool withdraw() {
    if (!slots->withdraw(slot)) return false;
    open = false;
    slots->release(slot);
    return true;
  }
};

// Single file (csrc/core/shared_slots.h): the wake-up a client thread was
// handed in its wake chain, held until it next lets its GIL go to wait: the
// next caller then finds the GIL free instead of queuing for it while this
// one runs its loop. pass() is called at the start of every GIL-free stretch of
// a call (SlotRequester::submit, each slice of a wait for a free slot or for
// an outcome); a thread that ends
// passes what it holds, and the server wakes a slot whose handed wake-up is
// overdue (SharedSlots::wake_overdue), so none waits long for a caller
// that does not call again.
class HeldSlotWake {
 public:
  // Holds the wake-up of slot `slot` of `slots` (-1: none), after passing on
  // the one held before.
  static void hold(const std::shared_ptr<SharedSlots>& slots, int slot) {
    if (slot < 0) return;
    Held& h = held();
    h.pass();
    h.slots = slots;
    h.slot = slot;
  }

  // Wakes the held slot, if any. No GIL needed.
  static void pass() { held().pass(); }

 private:
  struct Held {
    std::shared_ptr<SharedSlots> slots;  // keeps the mapping for the wake
    int slot = -1;
    void pass() {
      if (slot < 0) return;
      slots->wake(static_cast<uint32_t>(slot));
      slot = -1;
      slots.reset();
    }
    ~Held() { pass(); }  // the thread ends
  };
  static Held& held() {
    thread_local Held h;
    return h;
  }
};

// A caller's turn in its process's wake chain while it waits on slot `s`:
// entered on construction; on destruction it leaves and passes on the
// wake-up it was handed: at once (the bindings leave it holding the GIL),
// or, single file, at its next call (HeldSlotWake). A turn is made after
// the slot's claim (which names the request it waits for).
class SlotWakeTurn {
 public:
  SlotWakeTurn(const std::shared_ptr<SharedSlots>& slots, uint32_t s)
      : slots_(slots), s_(s), in_(slots->enter_wake_chain(s)) {}
  ~SlotWakeTurn() {
    if (!in_) return;
    const int next = slots_->leave_wake_chain(s_);
    if (slots_->single_file()) {
      HeldSlotWake::hold(slots_, next);
    } else if (next >= 0) {
      slots_->wake(static_cast<uint32_t>(next));
    }
  }
  SlotWakeTurn(const SlotWakeTurn&) = delete;
  SlotWakeTurn& operator=(const SlotWakeTurn&) = delete;

 private:
  const std::shared_ptr<SharedSlots>& slots_;
  uint32_t s_;
  bool in_;  // entered: another thread waiting for the same request may hold the turn
};

// How claiming a slot ended.
enum class SlotClaim { kOk, kNoFreeSlot, kClosed, kServerDead, kInterrupted };

// How waiting for a request's outcome ended.
enum class SlotOutcome {
  kReady,        // the outcome is in the slot: read it, then release the slot
  kInFlight,     // timed out, kept (keep_on_timeout): the request goes on
  kWithdrawn,    // timed out before the server took it; slot given back
  kAbandoned,    // timed out while served: its result is discarded
  kClosed,       // the server shut down with the request still queued
  kServerDead,   // the server process is gone
  kInterrupted,  // a signal: left (kept in flight with keep_on_timeout)
};

// A failed request's exception in its slot's error area: the codec's bytes
// (may be empty: it could not be encoded, or did not fit).
struct SlotError {
  const uint8_t* encoded = nullptr;
  size_t encoded_len = 0;
};

class SlotRequester {
 public:
  explicit SlotRequester(std::shared_ptr<SharedSlots> slots) : slots_(std::move(slots)) {}

  SharedSlots& slots() const { return *slots_; }
  const std::shared_ptr<SharedSlots>& shared_slots() const { return slots_; }

  // Claims a free slot into `slot`, waiting in slices until `deadline_ns`
  // while every slot is in flight.
  template <typename WithoutGil, typename Interrupted>
  SlotClaim claim(int64_t deadline_ns, WithoutGil&& without_gil, Interrupted&& interrupted,
                  uint32_t& slot) {
    if (slots_->closed()) return SlotClaim::kClosed;
    int claimed = slots_->try_claim(hint_.load(std::memory_order_relaxed));
    SlotClaim result = SlotClaim::kOk;
    if (claimed < 0) {
      SlotWait w = SlotWait::kTimedOut;
      wait_in_slices(
          deadline_ns,
          [&](int64_t until) {
            w = without_gil([&] {
              HeldSlotWake::pass();  // the slot it waits for may be the next caller's
              return slots_->claim(hint_.load(std::memory_order_relaxed), until, claimed);
            });
            return w != SlotWait::kTimedOut;
          },
          [&](bool expired) {
            if (expired) {
              result = SlotClaim::kNoFreeSlot;
            } else if (interrupted()) {
              result = SlotClaim::kInterrupted;
            }
            return result == SlotClaim::kOk;
          });
      if (w == SlotWait::kClosed) return SlotClaim::kClosed;
      if (w == SlotWait::kServerDead) return SlotClaim::kServerDead;
      if (w != SlotWait::kOk) return result;
    }
    slot = static_cast<uint32_t>(claimed);
    hint_.store(slot, std::memory_order_relaxed);
    return SlotClaim::kOk;
  }

  // No GIL needed. Passes on the wake-up this thread holds, copies `rows`
  // (one leaf per request leaf of the segment) into claimed slot `s` and
  // submits it; then, if `first_wait_until` is
  // not 0, waits for the outcome until then (the first slice of a blocking
  // call, in the same GIL-free stretch). kClosed: the server shut down, and
  // the slot was given back.
  SlotWait submit(uint32_t s, const RowSource& rows, int64_t first_wait_until) {
    HeldSlotWake::pass();
    if (rows.count != slots_->request_leaves())
      throw std::invalid_argument("SlotRequester::submit: " + std::to_string(rows.count) +
                                  " leaves for a segment of " +
                                  std::to_string(slots_->request_leaves()));
    for (size_t j = 0; j < rows.count; ++j) {
      const size_t bytes = slots_->request_leaf_bytes(j);
      if (bytes != 0) std::memcpy(slots_->request_row(s, j), rows.data[j], bytes);
    }
    const SlotWait submitted = slots_->submit(s, monotonic_ns());
    if (submitted != SlotWait::kOk) {
      slots_->release(s);
      return submitted;
    }
    if (first_wait_until != 0) slots_->wait(s, first_wait_until);
    return SlotWait::kOk;
  }

  bool finished(const PendingSlot& pending) const {
    return !pending.open || slots_->finished(pending.slot);
  }

  // Waits in slices until `deadline_ns` for the outcome of `pending`'s
  // request (see SlotOutcome). With `keep_on_timeout` a timeout or a signal
  // leaves the request in flight (ask again); otherwise they leave it.
  template <typename WithoutGil, typename Interrupted>
  SlotOutcome wait_for_outcome(PendingSlot& pending, int64_t deadline_ns, bool keep_on_timeout,
                               WithoutGil&& without_gil, Interrupted&& interrupted) {
    const uint32_t s = pending.slot;
    if (slots_->finished(s)) return ready(pending);
    // What the last slice's end decided; a slice that ends with the outcome
    // (the wait returns true) makes it kReady whatever came before.
    SlotOutcome outcome = SlotOutcome::kReady;
    const bool finished = wait_in_slices(
        deadline_ns,
        [&](int64_t until) {
          SlotWakeTurn turn(slots_, s);  // left once without_gil has returned
          return without_gil([&] {
            HeldSlotWake::pass();
            return slots_->wait(s, until);
          });
        },
        [&](bool expired) {
          outcome = after_slice(pending, expired, keep_on_timeout, interrupted);
          return outcome == SlotOutcome::kInFlight && !expired;
        });
    if (finished || outcome == SlotOutcome::kReady) return ready(pending);
    return outcome;
  }

  // Whether a ready slot holds an exception (kFailed) rather than a result,
  // and that exception.
  bool failed(uint32_t s) const {
    return slots_->slot(s).state.load(std::memory_order_acquire) == SlotHeader::kFailed;
  }
  SlotError error(uint32_t s) const {
    const SlotHeader& h = slots_->slot(s);
    SlotError e;
    e.encoded = slots_->error_area(s);
    e.encoded_len = h.error_len;
    return e;
  }

  // Withdraws a request the server has not taken yet (true). A request being
  // served or already answered stays as it is (false).
  bool cancel(PendingSlot& pending) { return pending.open && pending.withdraw(); }

 private:
  SlotOutcome ready(PendingSlot& pending) {
    pending.open = false;  // the caller reads the outcome, then releases the slot
    return SlotOutcome::kReady;
  }

  // After a slice that ended without the outcome: what the caller does next
  // (kInFlight before the deadline: wait on; any other answer ends the wait).
  template <typename Interrupted>
  SlotOutcome after_slice(PendingSlot& pending, bool expired, bool keep_on_timeout,
                          Interrupted& interrupted) {
    const uint32_t s = pending.slot;
    // The server shut down with this request still queued, or died.
    if (slots_->closed() && pending.withdraw()) return (SlotOutcome::kClosed);
    if (slots_->server_dead()) {
      if (slots_->finished(s)) return (SlotOutcome::kReady);
      pending.leave();
      return (SlotOutcome::kServerDead);
    }
    const bool signalled = !expired && interrupted();
    if (!expired && !signalled) return SlotOutcome::kInFlight;
    if (keep_on_timeout) return (signalled ? SlotOutcome::kInterrupted : SlotOutcome::kInFlight);
    if (slots_->finished(s) && !signalled) return (SlotOutcome::kReady);  // the result won
    const SlotHeader::State left = slots_->give_up(s);
    if ((left == SlotHeader::kDone || left == SlotHeader::kFailed) && !signalled)
      return (SlotOutcome::kReady);
    pending.open = false;
    if (left != SlotHeader::kAbandoned) slots_->release(s);
    if (signalled) return (SlotOutcome::kInterrupted);
    return (left == SlotHeader::kIdle ? SlotOutcome::kWithdrawn : SlotOutcome::kAbandoned);
  }

  std::shared_ptr<SharedSlots> slots_;
  std::atomic<uint32_t> hint_{0};  // the slot this client used last: likely free
};

}  // namespace batchserve
