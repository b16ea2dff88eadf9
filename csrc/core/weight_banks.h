// Weight banks: how a trainer process hands new policy weights to a server
// process through shared memory, with no pickling and neither side ever
// waiting for the other.
//
// One POSIX shared-memory segment, named by the user, holds
//
//   WeightBankHeader  layout fingerprint, the two holders, the triple-buffer
//                     state word, per-bank publication number and version
//   layout text       one line per tensor: name, dtype, shape, offset (so a
//                     mismatch can be reported by parameter name)
//   bank[3]           three full copies of the weights, bank_bytes each
//
// Triple buffering. Each bank always has exactly one role:
//   back    the publisher writes its next version here; only it touches it
//   front   the receiver copies the version it applies from here; only it
//   middle  the newest published version, touched by nobody
// Roles change only by one CAS on the state word:
//   publish  back <-> middle, fresh = 1  (the old middle becomes the new back)
//   acquire  if fresh: front <-> middle, fresh = 0
// so the publisher never waits for the receiver, the receiver always takes
// the newest complete version (versions published in between are skipped,
// never mixed), and no bank is ever written while it is read. A publisher
// killed mid-write leaves a half-written back bank that was never published;
// the next publisher overwrites it.
//
// Holders. The publisher and the receiver each claim their role by a CAS of
// their identity (pid and start time) into holder[role]; a live holder
// refuses a second one, a dead one is taken over. Either may create the
// segment, so the trainer and the server start in either order. The last
// holder to close removes the name; a segment made for another layout and
// held by no live process is stale and replaced.
#pragma once

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>

#include "parking.h"
#include "process_identity.h"
#include "shm_segment.h"

namespace batchserve {

enum class WeightRole : int { kPublisher = 0, kReceiver = 1 };

// The segment exists with another layout and a live holder uses it.
struct WeightLayoutMismatch : std::runtime_error {
  WeightLayoutMismatch(const std::string& what, std::string existing)
      : std::runtime_error(what), existing_layout(std::move(existing)) {}
  std::string existing_layout;
};

// A live process already holds the role.
struct WeightRoleHeld : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct WeightBankHeader {
  static constexpr uint64_t kMagic = 0x3130746777736231ULL;  // "1bswgt01"
  std::atomic<uint64_t> magic;                               // written last by the creator
  uint64_t total_bytes;
  uint64_t fingerprint;  // FNV-1a of the layout text
  uint64_t layout_offset, layout_bytes;
  uint64_t bank_bytes;
  uint64_t bank_offset[3];
  std::atomic<uint64_t> holder[2];  // by WeightRole: 0 = none, else holder_word()
  std::atomic<uint32_t> state;      // back | middle << 2 | front << 4 | fresh << 6
  std::atomic<uint64_t> published;  // publications so far
  std::atomic<int64_t> last_version;
  // Written by the publisher while the bank is its back, read by the
  // receiver once it is front: the CAS that moves the bank orders them.
  std::atomic<uint64_t> bank_publication[3];  // 0 = never published
  std::atomic<int64_t> bank_version[3];
  EventCount publication_event;  // notified after each publish
};

class WeightBanks {
 public:
  static constexpr uint64_t kUnlinking = ~0ULL;  // holder value while the name is removed

  // Opens segment `name` for `role`, creating it for `layout` (bank_bytes per
  // bank) when it does not exist. Throws WeightLayoutMismatch, WeightRoleHeld,
  // or std::system_error.
  static std::shared_ptr<WeightBanks> open(const std::string& name, const std::string& layout,
                                           uint64_t bank_bytes, WeightRole role,
                                           double timeout_s = 5.0) {
    const int64_t deadline = deadline_after(timeout_s);
    const uint64_t fingerprint = fnv1a(layout);
    for (;;) {
      std::shared_ptr<WeightBanks> banks = create(name, layout, bank_bytes, fingerprint);
      if (!banks) banks = attach(name, deadline);
      if (banks) {
        if (banks->header()->fingerprint != fingerprint) {
          if (!banks->remove_if_stale()) {
            const WeightBankHeader* h = banks->header();
            throw WeightLayoutMismatch(
                "weights '" + name + "' are shared with another layout",
                std::string(reinterpret_cast<const char*>(banks->base_ + h->layout_offset),
                            h->layout_bytes));
          }
        } else if (banks->claim(role)) {
          return banks;
        }
      }
      // The segment was being removed (or replaced as stale): open it anew.
      if (monotonic_ns() >= deadline)
        throw std::runtime_error("weights '" + name + "': the segment kept being removed");
      ::sched_yield();
    }
  }

  ~WeightBanks() {
    release();
    ::munmap(base_, size_);
  }
  WeightBanks(const WeightBanks&) = delete;
  WeightBanks& operator=(const WeightBanks&) = delete;

  // -- the publisher ---------------------------------------------------------

  // The bank to write the next version into.
  int back() const {
    check_holder();
    return state_back(header()->state.load(std::memory_order_acquire));
  }

  // Publishes the back bank (fully written by now) as `version`; returns its
  // publication number. Wait-free for practical purposes: the CAS only
  // retries while the receiver swaps front and middle.
  uint64_t publish(int64_t version) {
    check_holder();
    WeightBankHeader* h = header();
    // One more than any number given so far, also by a publisher killed
    // between its CAS and its store of `published`.
    uint64_t number = h->published.load(std::memory_order_relaxed);
    for (int b = 0; b < 3; ++b)
      number = std::max(number, h->bank_publication[b].load(std::memory_order_relaxed));
    ++number;
    uint32_t s = h->state.load(std::memory_order_relaxed);
    const int b = state_back(s);
    h->bank_publication[b].store(number, std::memory_order_relaxed);
    h->bank_version[b].store(version, std::memory_order_relaxed);
    // Before the swap: a publisher killed right after it must not leave the
    // next one a stale last version to number from (a repeat); a gap is fine.
    h->last_version.store(version, std::memory_order_relaxed);
    uint32_t next;
    do {
      next = make_state(state_middle(s), state_back(s), state_front(s), true);
    } while (!h->state.compare_exchange_weak(s, next, std::memory_order_acq_rel,
                                             std::memory_order_relaxed));
    h->published.store(number, std::memory_order_release);
    h->publication_event.notify_all();
    return number;
  }

  // -- the receiver ------------------------------------------------------------

  // Makes the newest published version the front bank if it is not already
  // and returns the front bank. Check bank_publication(front) to see
  // whether it holds anything new (0: nothing was ever published).
  int acquire() {
    check_holder();
    WeightBankHeader* h = header();
    uint32_t s = h->state.load(std::memory_order_acquire);
    while (state_fresh(s)) {
      const uint32_t next = make_state(state_back(s), state_front(s), state_middle(s), false);
      if (h->state.compare_exchange_weak(s, next, std::memory_order_acq_rel,
                                         std::memory_order_acquire))
        return state_front(next);
    }
    return state_front(s);
  }

  // The bank acquire() would return now, without taking it.
  int newest() const {
    const uint32_t s = header()->state.load(std::memory_order_acquire);
    return state_fresh(s) ? state_middle(s) : state_front(s);
  }

  // Waits until more than `seen` publications were made or the deadline;
  // returns the number made so far.
  uint64_t wait_for_publication(uint64_t seen, double timeout_s) {
    WeightBankHeader* h = header();
    const int64_t deadline = deadline_after(timeout_s);
    park_until(
        h->publication_event, [&] { return h->published.load(std::memory_order_acquire) > seen; },
        deadline);
    return h->published.load(std::memory_order_acquire);
  }

  // -- both --------------------------------------------------------------------

  uint64_t bank_publication(int bank) const {
    return header()->bank_publication[bank].load(std::memory_order_acquire);
  }
  int64_t bank_version(int bank) const {
    return header()->bank_version[bank].load(std::memory_order_acquire);
  }
  uint64_t bank_offset(int bank) const { return header()->bank_offset[bank]; }
  uint64_t bank_bytes() const { return header()->bank_bytes; }
  uint64_t published() const { return header()->published.load(std::memory_order_acquire); }
  int64_t last_version() const { return header()->last_version.load(std::memory_order_acquire); }
  // Whether a live process other than this object holds `role`.
  bool role_held_elsewhere(WeightRole role) const {
    const uint64_t v = header()->holder[static_cast<int>(role)].load(std::memory_order_acquire);
    return v != 0 && v != kUnlinking && v != me_ && holder_alive(v);
  }
  const std::string& name() const { return name_; }
  uint8_t* base() const { return base_; }
  size_t size() const { return size_; }

  // Gives up the role (idempotent); the last holder removes the name.
  void release() {
    if (me_ == 0) return;
    const uint64_t me = me_;
    me_ = 0;
    // A copy inherited by a forked child: the role is the parent's.
    if (static_cast<uint32_t>(me) != static_cast<uint32_t>(::getpid())) return;
    uint64_t expected = me;
    // First give the role up, then look at the other: of two holders that
    // release at once, at least one sees the other's slot empty (seq_cst).
    if (!header()->holder[static_cast<int>(role_)].compare_exchange_strong(
            expected, 0, std::memory_order_seq_cst))
      return;  // taken over meanwhile (this process was thought dead): not ours
    if (mark_unlinking()) ::shm_unlink(name_.c_str());
  }

 private:
  WeightBanks(std::string name, int fd, size_t size)
      : name_(std::move(name)), base_(map_segment(fd, size, name_)), size_(size) {}

  WeightBankHeader* header() const { return reinterpret_cast<WeightBankHeader*>(base_); }

  // A negative timeout: no deadline.
  static int64_t deadline_after(double timeout_s) {
    if (timeout_s < 0) return kNoDeadline;
    return add_saturating(monotonic_ns(), seconds_to_ns(timeout_s));
  }

  // The role is this process's: a copy inherited by a forked child must not
  // write or take banks behind its parent's back.
  void check_holder() const {
    if (me_ == 0 || static_cast<uint32_t>(me_) != static_cast<uint32_t>(::getpid()))
      throw std::runtime_error("weights '" + name_ + "': this object holds no role in process " +
                               std::to_string(::getpid()) +
                               " (released, or inherited through fork())");
  }

  static size_t align(size_t n) { return (n + 4095) & ~size_t{4095}; }

  // nullptr when the segment already exists.
  static std::shared_ptr<WeightBanks> create(const std::string& name, const std::string& layout,
                                             uint64_t bank_bytes, uint64_t fingerprint) {
    const size_t layout_offset = align(sizeof(WeightBankHeader));
    const size_t first_bank = align(layout_offset + layout.size());
    const size_t stride = align(bank_bytes);
    const size_t total = first_bank + 3 * stride;
    const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
      if (errno == EEXIST) return nullptr;
      throw std::system_error(errno, std::generic_category(), "shm_open " + name);
    }
    size_new_segment(fd, name, total);
    std::shared_ptr<WeightBanks> out;
    try {
      out = std::shared_ptr<WeightBanks>(new WeightBanks(name, fd, total));
    } catch (...) {
      ::shm_unlink(name.c_str());
      throw;
    }
    // ftruncate zero-fills: every counter and holder starts at 0.
    auto* h = new (out->base_) WeightBankHeader();
    new (&h->publication_event) EventCount(/*process_shared=*/true);
    h->total_bytes = total;
    h->fingerprint = fingerprint;
    h->layout_offset = layout_offset;
    h->layout_bytes = layout.size();
    h->bank_bytes = bank_bytes;
    for (int b = 0; b < 3; ++b) h->bank_offset[b] = first_bank + b * stride;
    h->state.store(make_state(0, 1, 2, false), std::memory_order_relaxed);
    std::memcpy(out->base_ + layout_offset, layout.data(), layout.size());
    h->magic.store(WeightBankHeader::kMagic, std::memory_order_release);
    return out;
  }

  // nullptr when the name went away meanwhile.
  static std::shared_ptr<WeightBanks> attach(const std::string& name, int64_t deadline) {
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
      if (errno == ENOENT) return nullptr;
      throw std::system_error(errno, std::generic_category(), "shm_open " + name);
    }
    // The creator may still be sizing and filling it in.
    struct stat st{};
    for (;;) {
      if (::fstat(fd, &st) != 0) {
        const int err = errno;
        ::close(fd);
        throw std::system_error(err, std::generic_category(), "fstat " + name);
      }
      if (static_cast<size_t>(st.st_size) >= sizeof(WeightBankHeader)) break;
      if (monotonic_ns() >= deadline) {
        ::close(fd);
        throw std::runtime_error("weights '" + name + "': the segment was never set up");
      }
      ::sched_yield();
    }
    std::shared_ptr<WeightBanks> out(new WeightBanks(name, fd, static_cast<size_t>(st.st_size)));
    while (out->header()->magic.load(std::memory_order_acquire) != WeightBankHeader::kMagic) {
      if (monotonic_ns() >= deadline)
        throw std::runtime_error("weights '" + name + "' is not a batchserve weight segment");
      ::sched_yield();
    }
    if (out->header()->total_bytes != out->size_)
      throw std::runtime_error("weights '" + name + "' is not a batchserve weight segment");
    return out;
  }

  // Claims `role`; false when the segment is being removed.
  bool claim(WeightRole role) {
    std::atomic<uint64_t>& slot = header()->holder[static_cast<int>(role)];
    const uint64_t me = holder_word(self_identity());
    uint64_t v = slot.load(std::memory_order_acquire);
    for (;;) {
      if (v == kUnlinking) return false;
      if (v != 0 && holder_alive(v)) {
        throw WeightRoleHeld("weights '" + name_ + "' already have a " +
                             (role == WeightRole::kPublisher ? "publisher" : "receiver") +
                             " (pid " + std::to_string(static_cast<uint32_t>(v)) + ")");
      }
      if (slot.compare_exchange_weak(v, me, std::memory_order_acq_rel, std::memory_order_acquire))
        break;
    }
    role_ = role;
    me_ = me;
    return true;
  }

  // A segment with another layout is replaced when no live process holds
  // it. True when it is gone or going (open anew), false when a live holder
  // keeps it.
  bool remove_if_stale() {
    if (mark_unlinking()) {
      ::shm_unlink(name_.c_str());
      return true;
    }
    const WeightBankHeader* h = header();
    return h->holder[0].load() == kUnlinking || h->holder[1].load() == kUnlinking;
  }

  // Sets both holder words to kUnlinking when neither is held by a live
  // process and nobody else is removing the segment: then the caller, and
  // only it, unlinks. Both are marked in role order, so only the caller that
  // marked the publisher's word can mark the receiver's; one that must undo
  // its mark looks again, since a holder that left meanwhile may have seen
  // the mark and left the removal to it.
  bool mark_unlinking() {
    WeightBankHeader* h = header();
    for (;;) {
      uint64_t v0 = h->holder[0].load(std::memory_order_seq_cst);
      if (v0 == kUnlinking || (v0 != 0 && holder_alive(v0))) return false;
      uint64_t v1 = h->holder[1].load(std::memory_order_seq_cst);
      if (v1 == kUnlinking || (v1 != 0 && holder_alive(v1))) return false;
      if (!h->holder[0].compare_exchange_strong(v0, kUnlinking, std::memory_order_seq_cst))
        continue;  // changed meanwhile: look again
      if (h->holder[1].compare_exchange_strong(v1, kUnlinking, std::memory_order_seq_cst))
        return true;
      h->holder[0].store(0, std::memory_order_seq_cst);  // undo, and look again
    }
  }

  // A holder: pid in the low half, the low 32 bits of its start time above.
  static uint64_t holder_word(ProcessIdentity id) {
    return static_cast<uint64_t>(id.pid) | (static_cast<uint64_t>(id.start & 0xFFFFFFFFu) << 32);
  }
  static bool holder_alive(uint64_t v) {
    const uint64_t start = process_start_time(static_cast<uint32_t>(v));
    return start != 0 && (start & 0xFFFFFFFFu) == (v >> 32);
  }

  static int state_back(uint32_t s) { return static_cast<int>(s & 3u); }
  static int state_middle(uint32_t s) { return static_cast<int>((s >> 2) & 3u); }
  static int state_front(uint32_t s) { return static_cast<int>((s >> 4) & 3u); }
  static bool state_fresh(uint32_t s) { return (s >> 6) & 1u; }
  static uint32_t make_state(int back, int middle, int front, bool fresh) {
    return static_cast<uint32_t>(back) | static_cast<uint32_t>(middle) << 2 |
           static_cast<uint32_t>(front) << 4 | static_cast<uint32_t>(fresh) << 6;
  }

  static uint64_t fnv1a(const std::string& text) {
    uint64_t hash = 1469598103934665603ULL;
    for (unsigned char c : text) hash = (hash ^ c) * 1099511628211ULL;
    return hash == 0 ? 1 : hash;
  }

  std::string name_;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
  WeightRole role_ = WeightRole::kPublisher;
  uint64_t me_ = 0;  // holder word while this object holds its role
};

}  // namespace batchserve
