// The server's side of the shared-memory slots' wake chains (the protocol
// is in csrc/core/shared_slots.h): how a batch's finished slots are linked,
// one chain per client process, and, single file, the chains kept across
// batches and the wake-ups handed to clients, which the server wakes itself
// when a client does not pass them on in time.
//
// Everything here works on the segment's slot headers (slot_layout.h); the
// state it keeps (SlotWakeChains) is the server process's own, not shared.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "futex.h"
#include "single_file.h"
#include "slot_layout.h"

namespace batchserve {

// A slot's wake_link word: (generation << 32) | code, code 0 for none (the
// whole word is 0), kWakeLinkWaiting, or the linked slot + 2.
constexpr uint32_t kWakeLinkWaiting = 1;

inline uint64_t wake_link_word(uint32_t generation, uint32_t code) {
  return (uint64_t{generation} << 32) | code;
}

// The slot a link word taken out of a slot names (of `n`), or -1.
inline int linked_slot(uint64_t word, uint32_t n) {
  const uint32_t code = static_cast<uint32_t>(word);
  return code >= 2 && code - 2 < n ? static_cast<int>(code - 2) : -1;
}

class SlotWakeChains {
 public:
  // Wakes the clients of `waiters` (slots of `slots` the server finished,
  // in batch order) as one chain per client process. Single file, a process
  // whose chain from an earlier batch is still under way (its last caller
  // still waits) has the new one appended to it; otherwise the server wakes
  // the chain's first slot. Linked from the back: a slot is linked to only
  // before its own link is set (after that, the caller before it may wake
  // it at any time).
  void wake(SlotHeader* slots, bool single_file, const SlotWaiter* waiters, size_t count) {
    std::vector<Chain> chains;  // one per client process, latest first
    std::vector<uint32_t> wake_now;
    for (size_t i = count; i-- > 0;) {
      const SlotWaiter& w = waiters[i];
      auto c = std::find_if(chains.begin(), chains.end(),
                            [&](const Chain& c) { return c.first.owner == w.owner; });
      if (c == chains.end()) {
        chains.push_back(Chain{w, {}});
        continue;
      }
      if (link(slots, w, c->first.slot)) {
        c->later.push_back(c->first);
      } else {
        wake_now.push_back(c->first.slot);
      }
      c->first = w;
    }
    if (single_file) {
      hand_over(slots, chains, wake_now);
    } else {
      for (const Chain& c : chains) wake_now.push_back(c.first.slot);
    }
    for (uint32_t s : wake_now) slots[s].done.notify_all();
  }

  // Single file: wakes the slots whose handed-over wake-up is overdue and
  // whose client has not read the result yet: kHeldWakeLimitNs after the
  // caller before took the wake-up (the slot's wake_held_since), or, while
  // nobody has taken it, at its place's deadline. Cheap when none is due.
  void wake_overdue(SlotHeader* slots, int64_t now_ns) {
    if (now_ns < due_ns_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(mu_);
    int64_t next_due = kNoDeadline;
    size_t kept = 0;
    for (const HandedWake& h : handed_) {
      SlotHeader& slot = slots[h.waiter.slot];
      const int64_t held = slot.wake_held_since.load(std::memory_order_acquire);
      const int64_t due = handed_wake_due(h.due_ns, held);
      if (due <= now_ns) {
        if (unread(slot, h.waiter)) slot.done.notify_all();
        continue;
      }
      next_due = std::min(next_due, handed_wake_next_look(due, held, now_ns));
      handed_[kept++] = h;
    }
    handed_.resize(kept);
    due_ns_.store(next_due, std::memory_order_release);
  }

  // When wake_overdue() next has a slot to look at (kNoDeadline: none).
  int64_t due_ns() const { return due_ns_.load(std::memory_order_acquire); }

 private:
  // The slots of one client process in a batch: `first` and, linked after
  // it, `later` (latest first).
  struct Chain {
    SlotWaiter first;
    std::vector<SlotWaiter> later;
  };

  // A client process's chain under way: its last slot, and when that slot's
  // wake-up falls due.
  struct ChainTail {
    SlotWaiter last;
    int64_t due_ns;
  };

  struct HandedWake {
    SlotWaiter waiter;
    int64_t due_ns;
  };

  // Hands slot `next` to the caller waiting for `w`'s request, to pass on
  // when it leaves. False if no caller waits for that request.
  static bool link(SlotHeader* slots, const SlotWaiter& w, uint32_t next) {
    uint64_t waiting = wake_link_word(w.generation, kWakeLinkWaiting);
    return slots[w.slot].wake_link.compare_exchange_strong(
        waiting, wake_link_word(w.generation, next + 2), std::memory_order_acq_rel);
  }

  static bool still_waits(const SlotHeader& slot, const SlotWaiter& w) {
    return slot.wake_link.load(std::memory_order_acquire) ==
           wake_link_word(w.generation, kWakeLinkWaiting);
  }

  // Whether `w`'s request is ended and its client has not read it yet.
  static bool unread(const SlotHeader& slot, const SlotWaiter& w) {
    const uint32_t state = slot.state.load(std::memory_order_acquire);
    return (state == SlotHeader::kDone || state == SlotHeader::kFailed) &&
           slot.generation.load(std::memory_order_relaxed) == w.generation;
  }

  // Appends each chain to its process's chain under way, or adds its first
  // slot to `wake_now`; remembers the wake-ups handed to clients
  // (wake_overdue), each due kHandedWakeDeadlineNs per place after the
  // chain's start.
  void hand_over(SlotHeader* slots, const std::vector<Chain>& chains,
                 std::vector<uint32_t>& wake_now) {
    const int64_t now = monotonic_ns();
    std::lock_guard<std::mutex> lock(mu_);
    int64_t earliest = due_ns_.load(std::memory_order_relaxed);
    auto handed = [&](const SlotWaiter& w, int64_t due) {
      handed_.push_back(HandedWake{w, due});
      earliest = std::min(earliest, handed_wake_next_look(due, 0, now));  // not taken yet
    };
    for (auto c = chains.rbegin(); c != chains.rend(); ++c) {
      auto tail = std::find_if(tails_.begin(), tails_.end(),
                               [&](const ChainTail& t) { return t.last.owner == c->first.owner; });
      int64_t due = now;  // the first slot's: woken now
      if (tail != tails_.end() && link(slots, tail->last, c->first.slot)) {
        due = add_saturating(std::max(now, tail->due_ns), kHandedWakeDeadlineNs);
        handed(c->first, due);
      } else {
        wake_now.push_back(c->first.slot);
      }
      for (auto w = c->later.rbegin(); w != c->later.rend(); ++w) {
        due = add_saturating(due, kHandedWakeDeadlineNs);
        handed(*w, due);
      }
      const ChainTail last{c->later.empty() ? c->first : c->later.front(), due};
      if (tail != tails_.end()) {
        *tail = last;
        continue;
      }
      // A process new to the list: drop the chains whose last caller no
      // longer waits, so the list stays as long as the client processes
      // with a chain under way.
      tails_.erase(std::remove_if(tails_.begin(), tails_.end(),
                                  [&](const ChainTail& t) {
                                    return !still_waits(slots[t.last.slot], t.last);
                                  }),
                   tails_.end());
      tails_.push_back(last);
    }
    due_ns_.store(earliest, std::memory_order_release);
  }

  std::mutex mu_;
  std::vector<HandedWake> handed_;
  std::vector<ChainTail> tails_;              // per client process
  std::atomic<int64_t> due_ns_{kNoDeadline};  // the earliest of handed_
};

}  // namespace batchserve
