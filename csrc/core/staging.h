// Filling staging for the fast path: which requests of a batch take staging
// rows (take_rows), and the Prefetcher, a helper thread that gathers the next
// batch into the other staging buffer while the model runs on this one.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "batch_policy.h"
#include "parking.h"
#include "request_queue.h"
#include "row_copy.h"

namespace batchserve {

// Moves the requests of `from` whose leaves match schema `schema_id` (and
// number at least `leaves`), at most `room` of them, onto the end of `rows`,
// in order; the others stay in `from`, in order.
inline void take_rows(std::vector<Request>& from, uint64_t schema_id, size_t leaves, size_t room,
                      std::vector<Request>& rows) {
  std::vector<Request> rest;
  rest.reserve(from.size());
  for (const Request& r : from) {
    const bool fits =
        room > 0 && r.rows != nullptr && r.rows->schema_id == schema_id && r.rows->count >= leaves;
    if (fits) {
      rows.push_back(r);
      --room;
    } else {
      rest.push_back(r);
    }
  }
  from.swap(rest);
}

// Copies the leaves of `rows[first..]` to staging rows first.. .
inline void gather_from(const std::vector<Request>& rows, size_t first,
                        const StagingColumns& staging) {
  std::vector<const RowSource*> sources;
  sources.reserve(rows.size() - first);
  for (size_t i = first; i < rows.size(); ++i) sources.push_back(rows[i].rows);
  gather_rows(sources, first, staging);
}

// Gathers the next batch while the model runs on the current one.
//
// Just before its forward the server starts a job: take up to max_items
// requests that are ready (never wait for more: the batching policy stays
// with the server) and copy the fast-path ones into a staging buffer the
// current batch does not use. When it next collects, it finishes the job and
// goes on from what the helper took. start() and finish() alternate and must
// not run concurrently (the owner serialises them); the helper thread only
// runs between the two, so it never consumes the queue at the same time as
// the server (the queue's consumer lock guards against a shutdown draining
// it meanwhile).
class Prefetcher {
 public:
  struct Job {
    size_t max_items = 0;
    uint64_t schema_id = 0;
    StagingColumns staging;
  };
  struct Taken {
    std::vector<Request> rows;         // gathered into the job's staging, row i = rows[i]
    std::vector<Request> others;       // for the general path
    std::vector<Request> dropped;      // withdrawn by their callers
    const uint8_t* staging = nullptr;  // the job's first column: which buffer `rows` are in
  };

  explicit Prefetcher(RequestQueue& queue) : queue_(queue) {}
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // The owner must finish() a started job first: its requests are its to end.
  ~Prefetcher() {
    if (!thread_.joinable()) return;
    park_until(
        to_owner_, [this] { return state_.load(std::memory_order_acquire) != kRunning; },
        kNoDeadline);
    state_.store(kStopping, std::memory_order_release);
    to_helper_.notify_all();
    thread_.join();
  }

  // Hands `job` to the helper thread (started on first use).
  void start(Job job) {
    if (state_.load(std::memory_order_acquire) != kIdle)
      throw std::logic_error("Prefetcher: the previous job was not finished");
    if (job.staging.leaf_bytes.size() != job.staging.base.size())
      throw std::invalid_argument("Prefetcher: one size per staging column expected");
    job_ = std::move(job);
    if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
    state_.store(kRunning, std::memory_order_release);
    to_helper_.notify_all();
  }

  // Whether a job was started and not yet finished.
  bool started() const { return state_.load(std::memory_order_acquire) != kIdle; }

  // Waits for the job started last; what it took (nothing if none).
  Taken finish() {
    if (state_.load(std::memory_order_acquire) == kIdle) return Taken{};
    park_until(
        to_owner_, [this] { return state_.load(std::memory_order_acquire) == kDone; }, kNoDeadline);
    Taken out = std::move(taken_);
    taken_ = Taken{};
    state_.store(kIdle, std::memory_order_release);
    return out;
  }

 private:
  enum : uint32_t { kIdle, kRunning, kDone, kStopping };

  void run() {
    for (;;) {
      park_until(
          to_helper_,
          [this] {
            const uint32_t s = state_.load(std::memory_order_acquire);
            return s == kRunning || s == kStopping;
          },
          kNoDeadline);
      if (state_.load(std::memory_order_acquire) == kStopping) return;
      Taken taken;
      try {
        detail::take_ready(queue_, job_.max_items, taken.others, taken.dropped);
        take_rows(taken.others, job_.schema_id, job_.staging.base.size(), job_.staging.rows,
                  taken.rows);
        gather_from(taken.rows, 0, job_.staging);
      } catch (const std::exception&) {
        // Out of memory: what was taken goes to the general path, ungathered.
        taken.others.insert(taken.others.begin(), taken.rows.begin(), taken.rows.end());
        taken.rows.clear();
      }
      taken.staging = job_.staging.base.empty() ? nullptr : job_.staging.base[0];
      taken_ = std::move(taken);
      state_.store(kDone, std::memory_order_release);
      to_owner_.notify_all();
    }
  }

  RequestQueue& queue_;
  std::thread thread_;
  std::atomic<uint32_t> state_{kIdle};
  EventCount to_helper_;
  EventCount to_owner_;
  Job job_;      // written by start(), read by the helper while kRunning
  Taken taken_;  // written by the helper, read by finish() once kDone
};

}  // namespace batchserve
