// Creating and mapping POSIX shared-memory segments: the steps the
// transport's slots (shared_slots.h) and the weight banks (weight_banks.h)
// share.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <string>
#include <system_error>

namespace batchserve {

// Sizes the segment `name` just created as `fd` to `total` bytes and
// reserves its memory. ftruncate alone leaves it sparse, and a /dev/shm too
// small for it would show only at a first write, as SIGBUS. On failure the
// fd is closed, the name removed, and std::system_error thrown.
inline void size_new_segment(int fd, const std::string& name, size_t total) {
  int err = 0;
  std::string what;
  if (::ftruncate(fd, static_cast<off_t>(total)) != 0) {
    err = errno;
    what = "ftruncate " + name;
  } else if ((err = ::posix_fallocate(fd, 0, static_cast<off_t>(total))) != 0) {
    what = name + " needs " + std::to_string(total) + " bytes of shared memory (/dev/shm)";
  }
  if (err != 0) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    throw std::system_error(err, std::generic_category(), what);
  }
}

// Maps `size` bytes of the segment `fd` (named `name`, for errors) read and
// write, shared; closes the fd either way.
inline uint8_t* map_segment(int fd, size_t size, const std::string& name) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw std::system_error(err, std::generic_category(), "mmap " + name);
  return static_cast<uint8_t*>(p);
}

}  // namespace batchserve
