// Process identity: a pid and its start time, so that a process that died
// is not confused with a later one given the same pid. Used by the
// shared-memory segments (shared_slots.h, weight_banks.h) to tell a live
// peer from a dead one.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace batchserve {

// Start time of `pid` (clock ticks after boot, /proc/<pid>/stat field 22), or
// 0 when no such process runs (a zombie counts as dead: it has exited).
inline uint64_t process_start_time(uint32_t pid) noexcept {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');  // the command name may hold spaces
  if (p == nullptr || p[1] != ' ') return 0;
  p += 2;  // field 3: state
  if (*p == 'Z' || *p == 'X' || *p == 'x') return 0;
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p, ' ');
    if (p == nullptr) return 0;
    ++p;
  }
  const uint64_t start = std::strtoull(p, nullptr, 10);
  return start == 0 ? 1 : start;  // 0 means "not running"
}

struct ProcessIdentity {
  uint32_t pid = 0;
  uint64_t start = 0;
};

// This process (recomputed after a fork).
inline ProcessIdentity self_identity() noexcept {
  static std::atomic<uint32_t> cached_pid{0};
  static std::atomic<uint64_t> cached_start{0};
  const uint32_t pid = static_cast<uint32_t>(::getpid());
  if (cached_pid.load(std::memory_order_acquire) != pid) {
    cached_start.store(process_start_time(pid), std::memory_order_relaxed);
    cached_pid.store(pid, std::memory_order_release);
  }
  return {pid, cached_start.load(std::memory_order_relaxed)};
}

inline bool process_alive(uint32_t pid, uint64_t start) noexcept {
  const uint64_t now = process_start_time(pid);
  return now != 0 && (start == 0 || now == start);
}

}  // namespace batchserve
