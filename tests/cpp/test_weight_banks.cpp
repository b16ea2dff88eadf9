// WeightBanks (csrc/core/weight_banks.h): the triple buffer's hand-over (newest
// wins, nothing torn), either side creating the segment, the holders (a
// second live one refused, a dead one taken over, with real child
// processes), layouts (a live mismatch refused, a stale segment replaced),
// the last holder removing the name, wait_for_publication, and a stress of
// publisher against receiver in two threads (checked by ThreadSanitizer) and
// in two processes.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "core/weight_banks.h"
#include "test_util.h"

namespace {

using batchserve::WeightBankHeader;
using batchserve::WeightBanks;
using batchserve::WeightLayoutMismatch;
using batchserve::WeightRole;
using batchserve::WeightRoleHeld;
using batchserve_test::BackgroundCall;
using batchserve_test::fork_child;
using batchserve_test::kLongWait;
using batchserve_test::kMs;
using batchserve_test::kPromptly;
using batchserve_test::kSec;
using batchserve_test::monotonic_ns;
using batchserve_test::poll_until;
using batchserve_test::unique_name;

const std::string kLayoutA = "w\tfloat32\t[1024]\t0\t4096\nb\tfloat32\t[16]\t4096\t64\n";
const std::string kLayoutB = "w\tfloat32\t[2048]\t0\t8192\n";
constexpr uint64_t kBytesA = 4160;  // not a multiple of the page size
constexpr uint64_t kBytesB = 8192;

constexpr WeightRole kPublisher = WeightRole::kPublisher;
constexpr WeightRole kReceiver = WeightRole::kReceiver;

// Whether the segment's name exists (shm_open O_RDONLY does not fail with
// ENOENT).
bool shm_exists(const std::string& name) {
  const int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
  if (fd >= 0) {
    ::close(fd);
    return true;
  }
  EXPECT_EQ(errno, ENOENT) << name;
  return false;
}

// A segment name of the test's own. Declared first in a test, so it is
// destroyed last, after every WeightBanks of the test: a name still there
// then was left behind, which fails the test (and is removed).
struct ShmName {
  std::string name = unique_name();
  ~ShmName() {
    if (::shm_unlink(name.c_str()) == 0) ADD_FAILURE() << name << " was left in /dev/shm";
  }
};

std::shared_ptr<WeightBanks> open_banks(const std::string& name, WeightRole role,
                                        const std::string& layout = kLayoutA,
                                        uint64_t bank_bytes = kBytesA, double timeout_s = 5.0) {
  return WeightBanks::open(name, layout, bank_bytes, role, timeout_s);
}

// A bank as 64-bit words (banks are page aligned); its last bytes, past the
// last whole word, are not used by the tests.
uint64_t* words(const WeightBanks& banks, int bank) {
  return reinterpret_cast<uint64_t*>(banks.base() + banks.bank_offset(bank));
}
size_t word_count(const WeightBanks& banks) { return banks.bank_bytes() / sizeof(uint64_t); }

void fill(const WeightBanks& banks, int bank, uint64_t value, size_t count = 0) {
  uint64_t* w = words(banks, bank);
  const size_t n = count == 0 ? word_count(banks) : count;
  for (size_t i = 0; i < n; ++i) w[i] = value;
}

// Passes if every word of `bank` is `value`.
::testing::AssertionResult holds(const WeightBanks& banks, int bank, uint64_t value) {
  const uint64_t* w = words(banks, bank);
  for (size_t i = 0, n = word_count(banks); i < n; ++i) {
    if (w[i] != value)
      return ::testing::AssertionFailure()
             << "bank " << bank << " word " << i << " is " << w[i] << ", expected " << value;
  }
  return ::testing::AssertionSuccess();
}

// Writes `value` into the back bank and publishes it as version `version`;
// returns the publication number.
uint64_t publish_value(WeightBanks& pub, uint64_t value, int64_t version) {
  fill(pub, pub.back(), value);
  return pub.publish(version);
}

// Acquires the front bank and checks its publication number, version and
// contents (every word `value`); returns it.
int expect_front(WeightBanks& recv, uint64_t publication, int64_t version, uint64_t value) {
  const int front = recv.acquire();
  EXPECT_EQ(recv.bank_publication(front), publication);
  EXPECT_EQ(recv.bank_version(front), version);
  EXPECT_TRUE(holds(recv, front, value));
  return front;
}

// Waits for a child and passes if it exited with status 0.
::testing::AssertionResult exited_cleanly(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return ::testing::AssertionFailure() << "waitpid";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "child status " << status;
}

// ------------------------------------------------------------------ basics

TEST(WeightBanks, PublishThenAcquireHandsOverTheBank) {
  ShmName shm;
  ASSERT_FALSE(shm_exists(shm.name));
  auto pub = open_banks(shm.name, kPublisher);
  EXPECT_TRUE(shm_exists(shm.name));  // the publisher created it
  EXPECT_EQ(pub->bank_bytes(), kBytesA);
  EXPECT_EQ(pub->published(), 0u);
  auto recv = open_banks(shm.name, kReceiver);

  // Nothing published yet: the front bank is one that never was.
  const int empty = recv->acquire();
  EXPECT_EQ(recv->bank_publication(empty), 0u);
  EXPECT_NE(empty, pub->back());

  const int back = pub->back();
  fill(*pub, back, 0x1111);
  EXPECT_EQ(pub->publish(7), 1u);
  EXPECT_EQ(pub->published(), 1u);
  EXPECT_EQ(recv->published(), 1u);
  EXPECT_EQ(recv->last_version(), 7);
  EXPECT_NE(pub->back(), back);  // the next version goes elsewhere

  const int front = expect_front(*recv, 1u, 7, 0x1111);
  EXPECT_EQ(front, back);  // the very bank that was written
  EXPECT_NE(pub->back(), front);

  // No new publication: the same bank again, untouched.
  EXPECT_EQ(recv->acquire(), front);
  EXPECT_EQ(recv->bank_publication(front), 1u);
  EXPECT_TRUE(holds(*recv, front, 0x1111));

  // The publisher writes the next version without disturbing the front.
  fill(*pub, pub->back(), 0x2222);
  EXPECT_TRUE(holds(*recv, front, 0x1111));
  EXPECT_EQ(pub->publish(8), 2u);
  EXPECT_EQ(recv->last_version(), 8);
  const int next = expect_front(*recv, 2u, 8, 0x2222);
  EXPECT_NE(next, front);
}

TEST(WeightBanks, AcquireTakesTheNewestAndSkipsTheRest) {
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher);
  auto recv = open_banks(shm.name, kReceiver);
  EXPECT_EQ(publish_value(*pub, 101, 1), 1u);
  EXPECT_EQ(publish_value(*pub, 102, 2), 2u);
  EXPECT_EQ(publish_value(*pub, 103, 3), 3u);
  EXPECT_EQ(recv->published(), 3u);
  EXPECT_EQ(recv->last_version(), 3);
  const int front = expect_front(*recv, 3u, 3, 103);
  // The skipped versions are never handed out: acquiring again, with
  // nothing new, keeps the newest.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(recv->acquire(), front);
    EXPECT_EQ(recv->bank_publication(front), 3u);
  }
  EXPECT_EQ(publish_value(*pub, 104, 4), 4u);
  const int next = recv->acquire();
  EXPECT_EQ(recv->bank_publication(next), 4u);
  EXPECT_TRUE(holds(*recv, next, 104));
}

TEST(WeightBanks, EitherSideMayCreateTheSegment) {
  {  // the receiver (a server) first
    ShmName shm;
    auto recv = open_banks(shm.name, kReceiver);
    EXPECT_TRUE(shm_exists(shm.name));
    EXPECT_EQ(recv->bank_bytes(), kBytesA);
    EXPECT_EQ(recv->bank_publication(recv->acquire()), 0u);
    auto pub = open_banks(shm.name, kPublisher);
    EXPECT_EQ(publish_value(*pub, 5, 50), 1u);
    const int front = recv->acquire();
    EXPECT_EQ(recv->bank_version(front), 50);
    EXPECT_TRUE(holds(*recv, front, 5));
  }
  {  // the publisher (a trainer) first, publishing before any receiver
    ShmName shm;
    auto pub = open_banks(shm.name, kPublisher);
    EXPECT_EQ(publish_value(*pub, 6, 60), 1u);
    EXPECT_EQ(publish_value(*pub, 7, 70), 2u);
    auto recv = open_banks(shm.name, kReceiver);
    EXPECT_EQ(recv->published(), 2u);
    expect_front(*recv, 2u, 70, 7);
  }
}

// ----------------------------------------------------------------- holders

TEST(WeightBanks, ASecondPublisherIsRefusedWhileTheFirstHoldsIt) {
  ShmName shm;
  auto recv = open_banks(shm.name, kReceiver);
  auto pub = open_banks(shm.name, kPublisher);
  EXPECT_THROW(open_banks(shm.name, kPublisher), WeightRoleHeld);
  EXPECT_THROW(open_banks(shm.name, kReceiver), WeightRoleHeld);
  EXPECT_EQ(publish_value(*pub, 1, 10), 1u);  // the refused open changed nothing
  EXPECT_EQ(publish_value(*pub, 2, 20), 2u);
  pub.reset();
  EXPECT_TRUE(shm_exists(shm.name));  // the receiver holds it
  auto again = open_banks(shm.name, kPublisher);
  EXPECT_EQ(again->published(), 2u);  // the numbering goes on
  EXPECT_EQ(again->last_version(), 20);
  EXPECT_EQ(publish_value(*again, 3, 30), 3u);
  const int front = recv->acquire();
  EXPECT_EQ(recv->bank_publication(front), 3u);
  EXPECT_TRUE(holds(*recv, front, 3));
}

TEST(WeightBanks, APublisherInAnotherLiveProcessIsRefused) {
  ShmName shm;
  auto recv = open_banks(shm.name, kReceiver);
  const std::string name = shm.name;
  const pid_t child = fork_child([&] {
    try {
      auto held = open_banks(name, kPublisher);
      for (;;) ::pause();  // holds the role until killed
    } catch (...) {
      ::_exit(1);
    }
  });
  poll_until([&] { return recv->role_held_elsewhere(kPublisher); });
  EXPECT_THROW(open_banks(shm.name, kPublisher), WeightRoleHeld);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_FALSE(recv->role_held_elsewhere(kPublisher));
  auto pub = open_banks(shm.name, kPublisher);  // the dead holder's role, taken over
  EXPECT_EQ(publish_value(*pub, 9, 90), 1u);
  EXPECT_EQ(recv->bank_version(recv->acquire()), 90);
}

TEST(WeightBanks, APublisherThatDiesMidWriteLeavesTheLastVersionAndItsRole) {
  ShmName shm;
  auto recv = open_banks(shm.name, kReceiver);
  {
    auto first = open_banks(shm.name, kPublisher);
    EXPECT_EQ(publish_value(*first, 1, 100), 1u);
  }
  const int front = recv->acquire();
  ASSERT_TRUE(holds(*recv, front, 1));
  // A publisher process writes half its next version and dies without
  // publishing or releasing its role.
  const std::string name = shm.name;
  const pid_t child = fork_child([&] {
    try {
      auto dying = open_banks(name, kPublisher);
      fill(*dying, dying->back(), 0xdead, word_count(*dying) / 2);
      ::_exit(0);
    } catch (...) {
      ::_exit(1);
    }
  });
  ASSERT_TRUE(exited_cleanly(child));
  EXPECT_FALSE(recv->role_held_elsewhere(kPublisher));
  // The receiver still has the last complete version, and nothing new.
  EXPECT_EQ(expect_front(*recv, 1u, 100, 1), front);
  EXPECT_EQ(recv->published(), 1u);
  // A new publisher takes the dead one's role and overwrites its back bank.
  auto pub = open_banks(shm.name, kPublisher);
  const int back = pub->back();
  EXPECT_EQ(words(*pub, back)[0], 0xdeadu);  // the half-written bank
  EXPECT_EQ(publish_value(*pub, 2, 200), 2u);
  const int next = expect_front(*recv, 2u, 200, 2);
  EXPECT_EQ(next, back);
}

// A child forked from a holder has a copy of its WeightBanks, but not its
// role (the role is the parent's pid): when the copy is destroyed (or
// released) in the child, the parent must keep its role and its segment.
TEST(WeightBanks, AForkedChildsCopyHoldsNoRole) {
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher);
  const pid_t child = fork_child([&] {
    pub.reset();
    ::_exit(0);
  });
  ASSERT_TRUE(exited_cleanly(child));
  EXPECT_TRUE(shm_exists(shm.name));  // not removed under the parent
  EXPECT_THROW(open_banks(shm.name, kPublisher), WeightRoleHeld);
  auto recv = open_banks(shm.name, kReceiver);
  EXPECT_EQ(publish_value(*pub, 1, 1), 1u);
  EXPECT_EQ(recv->bank_publication(recv->acquire()), 1u);  // the parent's segment
}

// ----------------------------------------------------------------- layouts

TEST(WeightBanks, AnotherLayoutIsRefusedWhileALiveHolderUsesIt) {
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher, kLayoutA, kBytesA);
  EXPECT_EQ(publish_value(*pub, 4, 40), 1u);
  for (WeightRole role : {kReceiver, kPublisher}) {
    try {
      open_banks(shm.name, role, kLayoutB, kBytesB);
      ADD_FAILURE() << "another layout was accepted";
    } catch (const WeightLayoutMismatch& e) {
      EXPECT_EQ(e.existing_layout, kLayoutA);
    }
  }
  // The segment is untouched: a receiver of its layout gets what was published.
  auto recv = open_banks(shm.name, kReceiver, kLayoutA, kBytesA);
  const int front = recv->acquire();
  EXPECT_EQ(recv->bank_version(front), 40);
  EXPECT_TRUE(holds(*recv, front, 4));
}

// The receiver holds the segment, no publisher does, and a publisher of
// another layout is refused: the segment must stay usable for a publisher
// of its own layout, and still be removed when its holders are gone.
TEST(WeightBanks, ARefusedLayoutLeavesTheSegmentUsable) {
  ShmName shm;
  auto recv = open_banks(shm.name, kReceiver, kLayoutA, kBytesA);
  EXPECT_THROW(open_banks(shm.name, kPublisher, kLayoutB, kBytesB, 0.5), WeightLayoutMismatch);
  std::shared_ptr<WeightBanks> pub;
  EXPECT_NO_THROW(pub = open_banks(shm.name, kPublisher, kLayoutA, kBytesA, 0.5));
  if (pub) {
    EXPECT_EQ(publish_value(*pub, 3, 30), 1u);
    EXPECT_EQ(recv->bank_version(recv->acquire()), 30);
  }
  pub.reset();
  recv.reset();
  EXPECT_FALSE(shm_exists(shm.name));
}

TEST(WeightBanks, AStaleSegmentOfAnotherLayoutIsReplaced) {
  ShmName shm;
  // A trainer and a server of layout A both die without releasing.
  const std::string name = shm.name;
  const pid_t child = fork_child([&] {
    try {
      auto pub = open_banks(name, kPublisher, kLayoutA, kBytesA);
      auto recv = open_banks(name, kReceiver, kLayoutA, kBytesA);
      publish_value(*pub, 1, 1);
      ::_exit(0);
    } catch (...) {
      ::_exit(1);
    }
  });
  ASSERT_TRUE(exited_cleanly(child));
  ASSERT_TRUE(shm_exists(shm.name));  // left behind by the dead holders
  auto recv = open_banks(shm.name, kReceiver, kLayoutB, kBytesB);
  EXPECT_EQ(recv->bank_bytes(), kBytesB);
  EXPECT_EQ(recv->published(), 0u);  // a new segment
  EXPECT_EQ(recv->bank_publication(recv->acquire()), 0u);
  auto pub = open_banks(shm.name, kPublisher, kLayoutB, kBytesB);
  EXPECT_EQ(publish_value(*pub, 2, 2), 1u);
  EXPECT_TRUE(holds(*recv, recv->acquire(), 2));
  try {  // held by live processes now, with layout B
    open_banks(shm.name, kReceiver, kLayoutA, kBytesA);
    ADD_FAILURE() << "layout A was accepted";
  } catch (const WeightLayoutMismatch& e) {
    EXPECT_EQ(e.existing_layout, kLayoutB);
  }
}

// ---------------------------------------------------------------- unlinking

TEST(WeightBanks, TheLastHolderRemovesTheName) {
  for (bool publisher_last : {false, true}) {
    SCOPED_TRACE(publisher_last ? "publisher last" : "receiver last");
    ShmName shm;
    auto pub = open_banks(shm.name, kPublisher);
    auto recv = open_banks(shm.name, kReceiver);
    EXPECT_EQ(publish_value(*pub, 1, 1), 1u);
    auto& first = publisher_last ? recv : pub;
    auto& last = publisher_last ? pub : recv;
    first->release();
    first->release();  // idempotent
    EXPECT_TRUE(shm_exists(shm.name));
    first.reset();
    EXPECT_TRUE(shm_exists(shm.name));
    last.reset();
    EXPECT_FALSE(shm_exists(shm.name));
    // Opened again: a new, empty segment.
    auto fresh = open_banks(shm.name, kReceiver);
    EXPECT_EQ(fresh->published(), 0u);
    fresh.reset();
    EXPECT_FALSE(shm_exists(shm.name));
  }
}

TEST(WeightBanks, APublisherReattachesWhileTheReceiverHolds) {
  ShmName shm;
  auto recv = open_banks(shm.name, kReceiver);
  auto pub = open_banks(shm.name, kPublisher);
  EXPECT_EQ(publish_value(*pub, 1, 11), 1u);
  EXPECT_EQ(publish_value(*pub, 2, 12), 2u);
  pub.reset();
  EXPECT_TRUE(shm_exists(shm.name));
  // The receiver keeps working without a publisher.
  const int front = recv->acquire();
  EXPECT_EQ(recv->bank_publication(front), 2u);
  EXPECT_TRUE(holds(*recv, front, 2));
  EXPECT_EQ(recv->acquire(), front);
  // A new publisher attaches the same segment.
  pub = open_banks(shm.name, kPublisher);
  EXPECT_EQ(pub->published(), 2u);
  EXPECT_EQ(pub->last_version(), 12);
  EXPECT_NE(pub->back(), front);
  EXPECT_EQ(publish_value(*pub, 3, 13), 3u);
  const int next = recv->acquire();
  EXPECT_EQ(recv->bank_publication(next), 3u);
  EXPECT_TRUE(holds(*recv, next, 3));
  recv.reset();
  EXPECT_TRUE(shm_exists(shm.name));  // the publisher holds it now
  pub.reset();
  EXPECT_FALSE(shm_exists(shm.name));
}

// The publisher and the receiver release at the same moment: one of them is
// the last, so the name must be gone either way. A race: rounds for up to
// three seconds, until the first name left behind.
TEST(WeightBanks, HoldersReleasingTogetherRemoveTheName) {
  const int64_t until = monotonic_ns() + 3 * kSec;
  int rounds = 0, left_behind = 0;
  for (; left_behind == 0 && (rounds < 10 || monotonic_ns() < until); ++rounds) {
    const std::string name = unique_name();
    auto pub = open_banks(name, kPublisher);
    auto recv = open_banks(name, kReceiver);
    std::atomic<int> ready{0};
    auto release_with_the_other = [&ready](std::shared_ptr<WeightBanks>& banks) {
      ready.fetch_add(1);
      while (ready.load() < 2) batchserve::cpu_relax();
      banks.reset();
    };
    std::thread other([&] { release_with_the_other(recv); });
    release_with_the_other(pub);
    other.join();
    if (::shm_unlink(name.c_str()) == 0) ++left_behind;
  }
  EXPECT_EQ(left_behind, 0) << "in round " << rounds;
}

// ------------------------------------------------------ wait_for_publication

TEST(WeightBanks, WaitForPublicationReturnsAtOnceForANewerOne) {
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher);
  auto recv = open_banks(shm.name, kReceiver);
  EXPECT_EQ(publish_value(*pub, 1, 1), 1u);
  EXPECT_EQ(publish_value(*pub, 2, 2), 2u);
  for (uint64_t seen : {0u, 1u}) {
    const int64_t t0 = monotonic_ns();
    EXPECT_EQ(recv->wait_for_publication(seen, double(kLongWait) / kSec), 2u);
    EXPECT_LT(monotonic_ns() - t0, kPromptly);
  }
}

TEST(WeightBanks, WaitForPublicationTimesOut) {
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher);
  auto recv = open_banks(shm.name, kReceiver);
  EXPECT_EQ(publish_value(*pub, 1, 1), 1u);
  const int64_t t0 = monotonic_ns();
  EXPECT_EQ(recv->wait_for_publication(1, 0.05), 1u);
  EXPECT_TRUE(batchserve_test::ran_to_timeout(monotonic_ns() - t0, 50 * kMs));
  EXPECT_EQ(recv->wait_for_publication(1, 0), 1u);  // a zero timeout only looks
}

TEST(WeightBanks, WaitForPublicationIsWokenByAPublish) {
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher);
  auto recv = open_banks(shm.name, kReceiver);
  EXPECT_EQ(publish_value(*pub, 1, 1), 1u);
  uint64_t got = 0;
  {
    BackgroundCall waiter([&] { got = recv->wait_for_publication(1, -1); });  // no deadline
    auto* header = reinterpret_cast<WeightBankHeader*>(recv->base());
    poll_until([&] { return header->publication_event.has_waiters(); });
    EXPECT_FALSE(waiter.returned());
    EXPECT_EQ(publish_value(*pub, 2, 2), 2u);
    waiter.join();
    EXPECT_LT(waiter.elapsed_ns(), kLongWait);
  }
  EXPECT_EQ(got, 2u);
}

// ------------------------------------------------------------------ stress

// Bank bytes for the stress tests: 16 KiB, every word written each time.
constexpr uint64_t kStressBytes = 16 * 1024;
const std::string kStressLayout = "w\tuint64\t[2048]\t0\t16384\n";

int64_t version_of(uint64_t number) { return static_cast<int64_t>(number) * 3 + 1000; }

// What a receiver saw; checked after it ended.
struct Seen {
  uint64_t last = 0;      // the newest publication it took
  uint64_t distinct = 0;  // how many publications it took
  uint64_t errors = 0;
  std::string first_error;

  void error(const std::string& what) {
    if (errors++ == 0) first_error = what;
  }
};

// The publisher's side: publications 1 .. n, each writing every word of the
// back bank with its number. Returns false at the first unexpected number.
bool publish_numbers(WeightBanks& pub, uint64_t n) {
  for (uint64_t number = 1; number <= n; ++number) {
    fill(pub, pub.back(), number);
    if (pub.publish(version_of(number)) != number) return false;
  }
  return true;
}

// One look of the receiver: takes the front bank and, when it holds a new
// publication, checks it whole. A front bank taken before is checked again
// at its ends: the publisher must not write into it.
void receive_once(WeightBanks& recv, Seen& seen) {
  const int front = recv.acquire();
  const uint64_t number = recv.bank_publication(front);
  const uint64_t* w = words(recv, front);
  const size_t n = word_count(recv);
  if (number == seen.last) {
    if (number != 0 && (w[0] != number || w[n - 1] != number))
      seen.error("front bank of publication " + std::to_string(number) +
                 " changed under the receiver");
    return;
  }
  if (number < seen.last) {
    seen.error("publication " + std::to_string(number) + " after " + std::to_string(seen.last));
    return;
  }
  if (recv.bank_version(front) != version_of(number))
    seen.error("publication " + std::to_string(number) + " has version " +
               std::to_string(recv.bank_version(front)));
  for (size_t i = 0; i < n; ++i) {
    if (w[i] != number) {
      seen.error("torn bank: publication " + std::to_string(number) + " has word " +
                 std::to_string(i) + " = " + std::to_string(w[i]));
      break;
    }
  }
  seen.last = number;
  ++seen.distinct;
}

// The receiver thread: looks until it took publication `n`, found an error,
// or the publisher stopped (one look after that sees all it published). The
// flag is relaxed, so that it orders nothing for ThreadSanitizer.
void receive_until(WeightBanks& recv, Seen& seen, uint64_t n, const std::atomic<bool>& stopped) {
  while (seen.last < n && seen.errors == 0) {
    const bool last_look = stopped.load(std::memory_order_relaxed);
    receive_once(recv, seen);
    if (last_look) return;
  }
}

// One thread publishes n numbered versions through `publisher`, another
// takes them through `receiver`; checks that every bank taken was whole and
// the numbers only went up, to n.
void publish_and_receive_in_threads(WeightBanks& publisher, WeightBanks& receiver, uint64_t n) {
  Seen seen;
  std::atomic<bool> published_all{false};
  std::thread receiving([&] { receive_until(receiver, seen, n, published_all); });
  const bool numbers_ok = publish_numbers(publisher, n);
  published_all.store(true, std::memory_order_relaxed);
  receiving.join();
  EXPECT_TRUE(numbers_ok);
  EXPECT_EQ(seen.errors, 0u) << seen.first_error;
  EXPECT_EQ(seen.last, n);
  EXPECT_GE(seen.distinct, 1u);
  ::testing::Test::RecordProperty("publications_taken", std::to_string(seen.distinct));
}

// Publisher and receiver threads through ONE mapping of the segment (the
// publisher's object; the receiver's object only holds its role). Through
// one mapping ThreadSanitizer sees every bank byte and the state word at the
// same addresses, so an access to a bank that the state word's CAS does not
// order before the other side's is reported: this checks the protocol.
// (Through two mappings, as two WeightBanks objects have, TSAN would see
// unrelated addresses and check nothing; the test after this one covers
// that case, and the processes test the real cross-process use.)
TEST(WeightBanksStress, ThreadsNeverSeeATornBankOneMapping) {
  constexpr uint64_t kN = 20000;
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher, kStressLayout, kStressBytes);
  auto recv_role = open_banks(shm.name, kReceiver, kStressLayout, kStressBytes);
  WeightBanks& banks = *pub;
  publish_and_receive_in_threads(banks, banks, kN);
  EXPECT_EQ(banks.published(), kN);
  EXPECT_EQ(banks.last_version(), version_of(kN));
}

// The same with each side through its own object (its own mapping), as a
// publisher and a receiver in one process have them.
TEST(WeightBanksStress, ThreadsNeverSeeATornBankTwoMappings) {
  constexpr uint64_t kN = 20000;
  ShmName shm;
  auto pub = open_banks(shm.name, kPublisher, kStressLayout, kStressBytes);
  auto recv = open_banks(shm.name, kReceiver, kStressLayout, kStressBytes);
  publish_and_receive_in_threads(*pub, *recv, kN);
}

// The publisher in a child process, the receiver in this one.
TEST(WeightBanksStress, ProcessesNeverSeeATornBank) {
  constexpr uint64_t kN = 5000;
  ShmName shm;
  auto recv = open_banks(shm.name, kReceiver, kStressLayout, kStressBytes);
  const std::string name = shm.name;
  const pid_t child = fork_child([&] {
    int code = 0;
    try {
      auto pub = open_banks(name, kPublisher, kStressLayout, kStressBytes);
      if (!publish_numbers(*pub, kN)) code = 2;
    } catch (...) {
      code = 1;
    }
    ::_exit(code);  // released its role first
  });
  Seen seen;
  bool child_done = false;
  int status = 0;
  for (uint64_t look = 0; seen.last < kN && seen.errors == 0; ++look) {
    receive_once(*recv, seen);
    // A child that failed publishes no more: one look after its exit sees
    // everything it did publish.
    if (look % 1024 == 0 && !child_done && ::waitpid(child, &status, WNOHANG) == child) {
      child_done = true;
      receive_once(*recv, seen);
      break;
    }
  }
  if (!child_done) {
    ASSERT_EQ(::waitpid(child, &status, 0), child);
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  EXPECT_EQ(seen.errors, 0u) << seen.first_error;
  EXPECT_EQ(seen.last, kN);
  EXPECT_GE(seen.distinct, 1u);
  RecordProperty("publications_taken", std::to_string(seen.distinct));
  EXPECT_FALSE(recv->role_held_elsewhere(kPublisher));
  EXPECT_TRUE(shm_exists(shm.name));  // the receiver still holds it
  recv.reset();
  EXPECT_FALSE(shm_exists(shm.name));
}

}  // namespace
