// Shared-memory slots: how actor processes hand requests to a server
// process and get results back without pipes or pickling.
//
// One POSIX shared-memory segment (shm_open + mmap) per transport, laid
// out as slot_layout.h describes.
//
// A slot's life (every arrow one atomic operation, so a process killed
// anywhere leaves a state the server can recognise and undo):
//
//   owner 0 ──claim (CAS owner 0→pid)──► kIdle: the client writes its rows
//     kIdle ──submit: state=kQueued, then set the ready bit──► kQueued
//     kQueued ──server: clear the bit (fetch_and), CAS kQueued→kTaken──► kTaken
//     kTaken ──server: rows written, CAS kTaken→kDone|kFailed, wake──► kDone|kFailed
//     kDone|kFailed ──client reads the result, release: state=kIdle, owner=0
//   A client that times out withdraws (clears its own ready bit: it gets the
//   bit or the server does, never both) or abandons (CAS kQueued|kTaken→
//   kAbandoned: whoever ends the request then frees the slot).
//
// Wake chains: when several threads of one client process wait on slots
// finished in the same batch, the server wakes the first of them only, and
// each passes the wake-up on to the next. Thread actors of one process
// share its GIL: woken at once they would all block on it together (the
// convoy in-process chains avoid, wake_batching.h). A chain never leaves a
// process: a client process killed mid-chain strands no other process's
// caller, and no caller waits on another process's GIL. The link is the
// slot's `wake_link` word, tied to one request by the slot's generation
// (bumped at each claim, which carries one request):
//
//   0             no caller waits in the chain (left, or never entered)
//   (gen, 1)      a caller waits for request gen's outcome
//   (gen, t + 2)  the server linked slot t: that caller passes its wake-up on
//
// The server links only a (gen, 1) word of the request it just finished
// (CAS), so a caller that has moved on to its slot's next request is never
// handed a wake-up it would sit on; the caller leaving swaps 0 in and takes
// whatever was linked. So exactly one side owns a linked slot's wake-up:
// the caller that took it, or the server, whose link failed because that
// caller had left. Freeing a slot (a release, a reap of a dead client)
// swaps 0 in the same way and wakes what it took.
//
// When a caller passes the wake-up on is the segment's choice:
//
//   default      as soon as it holds its GIL again: the next is woken while
//                this one runs and queues for the GIL behind it.
//   single_file  when it next lets the GIL go to wait (its next call; slot_
//                client.h, HeldSlotWake), and a batch's chain joins its
//                process's chain from earlier batches while that one is
//                still under way: one thread of the process runs its loop
//                between calls at a time. Woken as soon as the one before
//                holds the GIL, they all end up running their loops
//                together, and each GIL-releasing torch call in a loop hands
//                the GIL to another: at 32 thread actors of a server process
//                on the 2-core VM that cost ~7 context switches and ~50 µs of
//                kernel time per request, against ~1 and ~6 µs single file.
//                The cost: a caller that sleeps or waits between calls with
//                the GIL released holds up the next. So the server keeps each
//                wake-up it handed over and wakes the slot itself if its
//                client has not read the result kHeldWakeLimitNs (single_file.h) after the
//                caller before took the wake-up (the slot's
//                `wake_held_since`), or, while no caller has taken it yet,
//                kHandedWakeDeadlineNs per place in its chain after the
//                hand-back (wake_overdue(), which the server's intake runs).
//
// Dead processes: the owner word holds the client's pid and the slot its
// start time, so the server can tell a live owner from a dead (or reused)
// pid. reap_dead_owners() frees the slots of dead clients that the server
// does not hold (kIdle, kDone, kFailed, kQueued without its ready bit); a
// dead client's kQueued/kTaken slot is served as usual and freed at the next
// reap. Clients detect a dead server the same way, from the header.
//
// Nothing here knows about Python; the server side feeds a RequestQueue
// through SlotIntake (slot_intake.h), so the batching policy, the gather into staging and the
// Prefetcher are the fast path's own.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "futex.h"
#include "parking.h"
#include "process_identity.h"
#include "row_copy.h"
#include "shm_segment.h"
#include "slot_layout.h"
#include "slot_wake_chains.h"

namespace batchserve {

// ---------------------------------------------------------------------------
// The segment.

// One process's mapping of a segment. The creator unlinks the name; the
// memory lives until the last process unmaps it.
class SharedSlots {
 public:
  // Creates the segment `name` ("/..."); fails if it exists.
  static std::shared_ptr<SharedSlots> create(const std::string& name, const SlotLayout& layout) {
    if (layout.num_slots == 0)
      throw std::invalid_argument("SharedSlots: num_slots must be positive");
    if (layout.request_leaf_bytes.empty() || layout.response_leaf_bytes.empty() ||
        layout.request_leaf_bytes.size() > kMaxSlotLeaves ||
        layout.response_leaf_bytes.size() > kMaxSlotLeaves)
      throw std::invalid_argument("SharedSlots: 1 to " + std::to_string(kMaxSlotLeaves) +
                                  " leaves per request and per response");
    const uint32_t n = layout.num_slots;
    auto align = [](size_t x) { return (x + 63) & ~size_t{63}; };
    size_t offset = align(sizeof(SegmentHeader));
    const size_t slots_offset = offset;
    offset = align(offset + sizeof(SlotHeader) * n);
    const size_t ready_offset = offset;
    offset = align(offset + sizeof(uint64_t) * ready_words(n));
    std::vector<size_t> request_offset, response_offset;
    for (size_t b : layout.request_leaf_bytes) {
      request_offset.push_back(offset);
      offset = align(offset + b * n);
    }
    for (size_t b : layout.response_leaf_bytes) {
      response_offset.push_back(offset);
      offset = align(offset + b * n);
    }
    const size_t errors_offset = offset;
    offset = align(offset + layout.error_bytes * n);
    const size_t total = offset;

    const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "shm_open " + name);
    size_new_segment(fd, name, total);
    std::shared_ptr<SharedSlots> out;
    try {
      out = std::shared_ptr<SharedSlots>(new SharedSlots(name, fd, total));
    } catch (...) {
      ::shm_unlink(name.c_str());
      throw;
    }
    out->creator_pid_ = static_cast<uint32_t>(::getpid());
    // ftruncate zero-fills: every atomic starts at 0. Construct the objects
    // that need more than zeros, then publish the layout with the magic.
    auto* h = new (out->base_) SegmentHeader();
    h->total_bytes = total;
    h->fingerprint = layout.fingerprint;
    h->num_slots = n;
    h->request_leaves = static_cast<uint32_t>(layout.request_leaf_bytes.size());
    h->response_leaves = static_cast<uint32_t>(layout.response_leaf_bytes.size());
    h->error_bytes = static_cast<uint32_t>(layout.error_bytes);
    h->single_file = layout.single_file ? 1 : 0;
    for (size_t j = 0; j < layout.request_leaf_bytes.size(); ++j) {
      h->request_leaf_bytes[j] = layout.request_leaf_bytes[j];
      h->request_offset[j] = request_offset[j];
    }
    for (size_t j = 0; j < layout.response_leaf_bytes.size(); ++j) {
      h->response_leaf_bytes[j] = layout.response_leaf_bytes[j];
      h->response_offset[j] = response_offset[j];
    }
    h->slots_offset = slots_offset;
    h->ready_offset = ready_offset;
    h->errors_offset = errors_offset;
    for (uint32_t s = 0; s < n; ++s)
      new (out->base_ + slots_offset + s * sizeof(SlotHeader)) SlotHeader();
    for (size_t w = 0; w < ready_words(n); ++w)
      new (out->base_ + ready_offset + w * sizeof(uint64_t)) std::atomic<uint64_t>(0);
    h->magic.store(SegmentHeader::kMagic, std::memory_order_release);
    out->bind();
    return out;
  }

  // Maps the existing segment `name`; checks its fingerprint when nonzero.
  static std::shared_ptr<SharedSlots> attach(const std::string& name, uint64_t fingerprint) {
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "shm_open " + name);
    struct stat st{};
    if (::fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < sizeof(SegmentHeader)) {
      ::close(fd);
      throw std::runtime_error("SharedSlots: " + name + " is not a batchserve segment");
    }
    std::shared_ptr<SharedSlots> out(new SharedSlots(name, fd, static_cast<size_t>(st.st_size)));
    const SegmentHeader* h = out->header();
    if (h->magic.load(std::memory_order_acquire) != SegmentHeader::kMagic ||
        h->total_bytes != out->size_)
      throw std::runtime_error("SharedSlots: " + name + " is not a batchserve segment");
    if (fingerprint != 0 && h->fingerprint != fingerprint)
      throw std::runtime_error("SharedSlots: " + name + " was made for other specs");
    out->bind();
    return out;
  }

  ~SharedSlots() { ::munmap(base_, size_); }
  SharedSlots(const SharedSlots&) = delete;
  SharedSlots& operator=(const SharedSlots&) = delete;

  // Removes the name (the creating process only: a forked child's copy of
  // this object must not; idempotent). Mappings stay valid.
  bool unlink() {
    if (creator_pid_ != static_cast<uint32_t>(::getpid()) || unlinked_) return false;
    unlinked_ = true;
    return ::shm_unlink(name_.c_str()) == 0;
  }

  const std::string& name() const { return name_; }
  uint8_t* base() const { return base_; }
  size_t size() const { return size_; }
  uint32_t num_slots() const { return n_; }
  SegmentHeader* header() const { return reinterpret_cast<SegmentHeader*>(base_); }
  SlotHeader& slot(uint32_t s) const { return slots_[s]; }
  size_t request_leaves() const { return header()->request_leaves; }
  size_t response_leaves() const { return header()->response_leaves; }
  size_t request_leaf_bytes(size_t j) const { return header()->request_leaf_bytes[j]; }
  size_t response_leaf_bytes(size_t j) const { return header()->response_leaf_bytes[j]; }
  uint8_t* request_row(uint32_t s, size_t j) const {
    return base_ + header()->request_offset[j] + s * header()->request_leaf_bytes[j];
  }
  uint8_t* response_row(uint32_t s, size_t j) const {
    return base_ + header()->response_offset[j] + s * header()->response_leaf_bytes[j];
  }
  size_t request_offset(size_t j) const { return header()->request_offset[j]; }
  size_t response_offset(size_t j) const { return header()->response_offset[j]; }
  uint8_t* error_area(uint32_t s) const {
    return base_ + header()->errors_offset + size_t{s} * header()->error_bytes;
  }
  size_t error_bytes() const { return header()->error_bytes; }
  bool single_file() const { return header()->single_file != 0; }

  // -- liveness ------------------------------------------------------------

  bool closed() const { return header()->closed.load(std::memory_order_seq_cst) != 0; }

  // A server started once and its process is gone.
  bool server_dead() const {
    const uint32_t pid = header()->server_pid.load(std::memory_order_acquire);
    if (pid == 0) return false;
    return !process_alive(pid, header()->server_start.load(std::memory_order_acquire));
  }
  uint32_t server_pid() const { return header()->server_pid.load(std::memory_order_acquire); }

  // Server: this process serves from now on; clients may submit. When the
  // previous server's process died, what it held is recovered first: the
  // requests it was serving are queued again (their rows are intact) and
  // the slots whose clients gave up on them are freed.
  void open_for(const ProcessIdentity& server) {
    SegmentHeader* h = header();
    const uint32_t previous = h->server_pid.load(std::memory_order_acquire);
    if (previous != 0 && previous != server.pid && server_dead()) recover_from_dead_server();
    h->server_start.store(server.start, std::memory_order_release);
    h->server_pid.store(server.pid, std::memory_order_release);
    h->closed.store(0, std::memory_order_seq_cst);
  }

  // Server: no more submissions. Clients waiting for a slot wake and see
  // it; requests already submitted are ended by the server (it drains the
  // ready bits after this, and a submit that races sees `closed`).
  void close() {
    SegmentHeader* h = header();
    h->closed.store(1, std::memory_order_seq_cst);
    h->freed.notify_all();
  }

  // -- client side -----------------------------------------------------------

  // Takes a free slot for this process, looking at `hint` first. -1: none.
  int try_claim(uint32_t hint) {
    const ProcessIdentity me = self_identity();
    for (uint32_t i = 0; i < n_; ++i) {
      const uint32_t s = (hint + i) % n_;
      SlotHeader& sl = slots_[s];
      uint32_t expected = 0;
      if (sl.owner.load(std::memory_order_relaxed) == 0 &&
          sl.owner.compare_exchange_strong(expected, me.pid, std::memory_order_acq_rel)) {
        sl.owner_start.store(me.start, std::memory_order_release);
        sl.generation.fetch_add(1, std::memory_order_relaxed);  // a claim carries one request
        sl.wake_held_since.store(0, std::memory_order_relaxed);
        return static_cast<int>(s);
      }
    }
    return -1;
  }

  // Takes a free slot, waiting until `deadline_ns` while all are held.
  SlotWait claim(uint32_t hint, int64_t deadline_ns, int& slot) {
    slot = -1;
    park_until(
        header()->freed,
        [&] {
          if (closed()) return true;
          slot = try_claim(hint);
          return slot >= 0;
        },
        deadline_ns);
    if (slot >= 0) return SlotWait::kOk;
    if (closed()) return SlotWait::kClosed;
    return server_dead() ? SlotWait::kServerDead : SlotWait::kTimedOut;
  }

  // Publishes the request written into slot `s`'s rows and wakes the server.
  // kClosed: the server shut down and the request was withdrawn (the slot is
  // still the caller's).
  SlotWait submit(uint32_t s, int64_t submit_ns) {
    SlotHeader& sl = slots_[s];
    sl.submit_ns = submit_ns;
    sl.error_len = 0;
    sl.state.store(SlotHeader::kQueued, std::memory_order_release);
    ready_word(s).fetch_or(bit(s), std::memory_order_seq_cst);
    header()->work.notify_all();
    // Dekker with close(): it stores `closed` then drains the bits; we set
    // the bit then read `closed`. One of us sees the other.
    if (closed() && withdraw(s)) return SlotWait::kClosed;
    return SlotWait::kOk;
  }

  bool finished(uint32_t s) const {
    const uint32_t st = slots_[s].state.load(std::memory_order_acquire);
    return st == SlotHeader::kDone || st == SlotHeader::kFailed;
  }

  // Waits until slot `s` holds its result (kDone or kFailed) or `deadline_ns`.
  bool wait(uint32_t s, int64_t deadline_ns) {
    return park_until(slots_[s].done, [&] { return finished(s); }, deadline_ns);
  }

  // Client: about to wait for the outcome of slot `s`'s current request
  // (see wake chains above). False when the word is taken already (another
  // of the owner's threads waits for the same request): the caller then
  // waits outside the chain and must not leave it.
  bool enter_wake_chain(uint32_t s) {
    SlotHeader& sl = slots_[s];
    uint64_t idle = 0;
    return sl.wake_link.compare_exchange_strong(
        idle, wake_link_word(sl.generation.load(std::memory_order_relaxed), kWakeLinkWaiting),
        std::memory_order_acq_rel);
  }

  // Client: done waiting on `s` (entered above). The slot whose wake-up it
  // was handed (to pass on with wake()), or -1.
  int leave_wake_chain(uint32_t s) {
    const int next = linked_slot(slots_[s].wake_link.exchange(0, std::memory_order_acq_rel), n_);
    if (next >= 0 && single_file())
      slots_[next].wake_held_since.store(monotonic_ns(), std::memory_order_release);
    return next;
  }

  // Client gives up on its request: true if it was withdrawn before the
  // server took it (the slot is the caller's again, kIdle).
  bool withdraw(uint32_t s) {
    const uint64_t old = ready_word(s).fetch_and(~bit(s), std::memory_order_acq_rel);
    if ((old & bit(s)) == 0) return false;
    slots_[s].state.store(SlotHeader::kIdle, std::memory_order_release);
    return true;
  }

  // Client leaves a request it no longer waits for. Returns the state that
  // decided: kIdle (withdrawn: the caller still owns the slot), kAbandoned
  // (the server frees the slot when it ends the request), or kDone/kFailed
  // (the result won the race: the caller reads or releases it).
  SlotHeader::State give_up(uint32_t s) {
    if (withdraw(s)) return SlotHeader::kIdle;
    SlotHeader& sl = slots_[s];
    uint32_t st = sl.state.load(std::memory_order_acquire);
    while (st == SlotHeader::kQueued || st == SlotHeader::kTaken) {
      if (sl.state.compare_exchange_weak(st, SlotHeader::kAbandoned, std::memory_order_acq_rel))
        return SlotHeader::kAbandoned;
    }
    return static_cast<SlotHeader::State>(st);
  }

  // Client: hands slot `s` back.
  void release(uint32_t s) { free_slot(s); }

  // -- server side -----------------------------------------------------------

  bool any_ready() const {
    for (size_t w = 0; w < ready_words(n_); ++w)
      if (ready_[w].load(std::memory_order_acquire) != 0) return true;
    return false;
  }

  size_t ready_count() const {
    size_t total = 0;
    for (size_t w = 0; w < ready_words(n_); ++w)
      total += static_cast<size_t>(__builtin_popcountll(ready_[w].load(std::memory_order_relaxed)));
    return total;
  }

  // Takes up to `max_items` submitted slots, round robin from where the
  // last take stopped (no slot waits more than num_slots / max_items takes),
  // marking them kTaken. One taker at a time.
  size_t take(std::vector<uint32_t>& out, size_t max_items) {
    size_t taken = 0;
    const uint32_t start = cursor_;
    for (uint32_t i = 0; i < n_ && taken < max_items;) {
      const uint32_t s = (start + i) % n_;
      const size_t w = s / 64;
      const uint64_t word = ready_[w].load(std::memory_order_acquire) >> (s % 64);
      if (word == 0) {  // nothing from s to the end of its word (or of the slots)
        i += std::min<uint32_t>(64 - s % 64, n_ - s);
        continue;
      }
      const uint32_t skip = static_cast<uint32_t>(__builtin_ctzll(word));
      if (i + skip >= n_) break;
      const uint32_t t = s + skip;
      i += skip + 1;
      const uint64_t old = ready_[w].fetch_and(~bit(t), std::memory_order_acq_rel);
      if ((old & bit(t)) == 0) continue;  // withdrawn meanwhile
      uint32_t expected = SlotHeader::kQueued;
      if (!slots_[t].state.compare_exchange_strong(expected, SlotHeader::kTaken,
                                                   std::memory_order_acq_rel)) {
        if (expected == SlotHeader::kAbandoned) free_slot(t);
        continue;
      }
      out.push_back(t);
      ++taken;
      cursor_ = (t + 1) % n_;
    }
    return taken;
  }

  // Server: the fast path's hand-back copy. Row i of each response column
  // (one per response leaf, rows of response_leaf_bytes(j)) goes to the
  // response rows of slot slots_of_rows[i]. The slots must be ones this
  // server took and has not finished: their clients read the rows only once
  // finish() publishes them. Throws before writing anything when a slot is
  // out of range or there is not one column per response leaf.
  void write_responses(const std::vector<uint32_t>& slots_of_rows,
                       const std::vector<const uint8_t*>& columns) {
    for (uint32_t s : slots_of_rows)
      if (s >= n_)
        throw std::out_of_range("write_responses: slot " + std::to_string(s) + " of " +
                                std::to_string(n_));
    std::vector<size_t> leaf_bytes(response_leaves());
    for (size_t j = 0; j < leaf_bytes.size(); ++j) leaf_bytes[j] = response_leaf_bytes(j);
    scatter_rows(columns, leaf_bytes, slots_of_rows.size(),
                 [&](size_t i, size_t j) { return response_row(slots_of_rows[i], j); });
  }

  // Server: the outcome of slot `s` is written. False when its client
  // abandoned it (the slot is freed here). Does not wake: see wake().
  bool finish(uint32_t s, bool failed) {
    uint32_t expected = SlotHeader::kTaken;
    if (slots_[s].state.compare_exchange_strong(
            expected, failed ? SlotHeader::kFailed : SlotHeader::kDone, std::memory_order_acq_rel))
      return true;
    if (expected == SlotHeader::kAbandoned) free_slot(s);
    return false;
  }

  void wake(uint32_t s) { slots_[s].done.notify_all(); }

  // Server: who waits on slot `s`, which it holds (kTaken).
  SlotWaiter waiter(uint32_t s) const {
    const SlotHeader& sl = slots_[s];
    return SlotWaiter{s, sl.owner.load(std::memory_order_acquire),
                      sl.generation.load(std::memory_order_relaxed)};
  }

  // Server: wakes the clients of `waiters` (slots it finished, in batch
  // order) as one chain per client process (slot_wake_chains.h).
  void wake_chained(const SlotWaiter* waiters, size_t count) {
    chains_.wake(slots_, single_file(), waiters, count);
  }

  // Server, single file: wakes the slots whose handed-over wake-up is
  // overdue (SlotWakeChains::wake_overdue); when it next has one to look at.
  void wake_overdue(int64_t now_ns) { chains_.wake_overdue(slots_, now_ns); }
  int64_t handed_due_ns() const { return chains_.due_ns(); }

  // Server (the taker): frees the slots of clients that died, except those
  // it is serving. Returns how many.
  size_t reap_dead_owners() {
    size_t freed = 0;
    for (uint32_t s = 0; s < n_; ++s) {
      SlotHeader& sl = slots_[s];
      const uint32_t owner = sl.owner.load(std::memory_order_acquire);
      if (owner == 0 || process_alive(owner, sl.owner_start.load(std::memory_order_acquire)))
        continue;
      const uint32_t st = sl.state.load(std::memory_order_acquire);
      const bool queued = (ready_word(s).load(std::memory_order_acquire) & bit(s)) != 0;
      const bool held_by_server = st == SlotHeader::kTaken || st == SlotHeader::kAbandoned ||
                                  (st == SlotHeader::kQueued && queued);
      if (held_by_server) continue;  // served as usual, freed at a later reap
      // Take the slot from exactly the owner judged dead (it may have been
      // released and claimed by a live process meanwhile), marking it so no
      // claimer gets it before its state is reset.
      uint32_t expected = owner;
      if (!sl.owner.compare_exchange_strong(expected, kReaping, std::memory_order_acq_rel))
        continue;
      free_slot(s);
      ++freed;
    }
    return freed;
  }

  // Slots a dead server held: kTaken → queued again, kAbandoned → freed.
  // Only before this process serves (no take runs concurrently).
  void recover_from_dead_server() {
    for (uint32_t s = 0; s < n_; ++s) {
      SlotHeader& sl = slots_[s];
      uint32_t st = sl.state.load(std::memory_order_acquire);
      if (st == SlotHeader::kTaken &&
          sl.state.compare_exchange_strong(st, SlotHeader::kQueued, std::memory_order_acq_rel)) {
        ready_word(s).fetch_or(bit(s), std::memory_order_seq_cst);
      } else if (st == SlotHeader::kAbandoned) {
        free_slot(s);
      }
    }
  }

  size_t owned_slots() const {
    size_t total = 0;
    for (uint32_t s = 0; s < n_; ++s) total += slots_[s].owner.load(std::memory_order_relaxed) != 0;
    return total;
  }

 private:
  SharedSlots(std::string name, int fd, size_t size)
      : name_(std::move(name)), base_(map_segment(fd, size, name_)), size_(size) {}

  void bind() {
    n_ = header()->num_slots;
    slots_ = reinterpret_cast<SlotHeader*>(base_ + header()->slots_offset);
    ready_ = reinterpret_cast<std::atomic<uint64_t>*>(base_ + header()->ready_offset);
  }

  static constexpr uint32_t kReaping = 0xFFFFFFFFu;  // never a pid (pid_max < 2^22)
  static size_t ready_words(uint32_t n) { return (n + 63) / 64; }
  static uint64_t bit(uint32_t s) { return uint64_t{1} << (s % 64); }
  std::atomic<uint64_t>& ready_word(uint32_t s) const { return ready_[s / 64]; }

  void free_slot(uint32_t s) {
    SlotHeader& sl = slots_[s];
    const int linked = linked_slot(sl.wake_link.exchange(0, std::memory_order_acq_rel), n_);
    if (linked >= 0) wake(static_cast<uint32_t>(linked));  // e.g. a dead caller's
    sl.state.store(SlotHeader::kIdle, std::memory_order_release);
    sl.owner_start.store(0, std::memory_order_relaxed);
    sl.owner.store(0, std::memory_order_seq_cst);
    header()->freed.notify_all();
  }

  std::string name_;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
  uint32_t n_ = 0;
  SlotHeader* slots_ = nullptr;
  std::atomic<uint64_t>* ready_ = nullptr;
  uint32_t cursor_ = 0;       // the taker's round-robin position (taker only)
  SlotWakeChains chains_;     // the server's wake chains (whoever ends requests)
  uint32_t creator_pid_ = 0;  // 0: attached, not created
  bool unlinked_ = false;
};

}  // namespace batchserve
