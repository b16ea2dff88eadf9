// ServerStatsCore: the per-request and per-batch figures of
// InferenceServer.stats() (python/batchserve/server/stats.py keeps the rest
// and reads these through snapshot()).
//
// They are recorded here, next to the requests' stamps, so that the fast
// path records a batch with two calls and no Python object per request
// (Batch::record_rows and Batch::record_rows_hand_back,
// csrc/python/batch.h): in Python the same bookkeeping was ~10 µs of a lone
// caller's inline call.
//
// Exact since the last reset: requests, fast-path requests, inline
// requests, batches (one per forward) and the batch-size histogram. Over the
// most recent `window` samples: queue waits (per request, submission to
// dispatch), forward times (per forward), server times (per request,
// submission to the end of its batch's hand-back) and client gaps (per
// caller, the end of the hand-back of its last request to its next
// submission; caller 0 is unknown and not tracked).
//
// Threads: every method takes the one mutex (the worker and an inline
// caller record; any thread reads or resets).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace batchserve {

// The last `capacity` values pushed.
class SampleWindow {
 public:
  explicit SampleWindow(size_t capacity) : values_(capacity) {}

  void push(double value) {
    values_[next_] = value;
    next_ = (next_ + 1) % values_.size();
    count_ = std::min(count_ + 1, values_.size());
  }

  // Oldest first.
  std::vector<double> values() const {
    std::vector<double> out;
    out.reserve(count_);
    const size_t first = (next_ + values_.size() - count_) % values_.size();
    for (size_t i = 0; i < count_; ++i) out.push_back(values_[(first + i) % values_.size()]);
    return out;
  }

  void clear() { next_ = count_ = 0; }

 private:
  std::vector<double> values_;
  size_t next_ = 0;
  size_t count_ = 0;
};

struct ServerStatsSnapshot {
  uint64_t requests = 0;
  uint64_t fast_path_requests = 0;
  uint64_t inline_requests = 0;
  uint64_t batches = 0;
  std::vector<std::pair<uint64_t, uint64_t>> batch_sizes;  // (size, forwards), ascending
  std::vector<double> queue_ms;
  std::vector<double> forward_ms;
  std::vector<double> server_ms;
  std::vector<double> client_gap_ms;
};

class ServerStatsCore {
 public:
  explicit ServerStatsCore(size_t window)
      : queue_ms_(checked(window)),
        forward_ms_(window),
        server_ms_(window),
        client_gap_ms_(window) {}

  // A batch served by one forward per entry of `forward_sizes` (several: a
  // batch split by interaction type), each taking `forward_ms`; its
  // requests were submitted at `submit_ns` and dispatched at `dispatch_ns`.
  // `inline_call`: a lone caller's request served on its own thread.
  void record_batch(const std::vector<size_t>& forward_sizes, double forward_ms, bool fast_path,
                    bool inline_call, const std::vector<int64_t>& submit_ns, int64_t dispatch_ns) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t size : forward_sizes) record_forward(size, forward_ms, fast_path, inline_call);
    for (int64_t s : submit_ns) queue_ms_.push(ms_between(s, dispatch_ns));
  }

  // A batch whose results were all handed back at `end_ns`: request i was
  // submitted at submit_ns[i] by caller callers[i] (0: unknown).
  void record_hand_back(const std::vector<int64_t>& submit_ns, const std::vector<uint32_t>& callers,
                        int64_t end_ns) {
    if (callers.size() != submit_ns.size())
      throw std::invalid_argument("record_hand_back: one caller per submission expected");
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < submit_ns.size(); ++i) record_result(submit_ns[i], end_ns, callers[i]);
  }

  // One fast-path request served inline, alone (record_batch and
  // record_hand_back of a batch of one, under one lock): submitted at
  // `submit_ns` by `caller`, dispatched at `dispatch_ns`, ended at `end_ns`.
  void record_one(int64_t submit_ns, int64_t dispatch_ns, int64_t end_ns, uint32_t caller) {
    std::lock_guard<std::mutex> lock(mu_);
    record_forward(1, ms_between(dispatch_ns, end_ns), true, true);
    queue_ms_.push(ms_between(submit_ns, dispatch_ns));
    record_result(submit_ns, end_ns, caller);
  }

  // The figures so far; then cleared if `reset`.
  ServerStatsSnapshot snapshot(bool reset) {
    std::lock_guard<std::mutex> lock(mu_);
    ServerStatsSnapshot s;
    s.requests = requests_;
    s.fast_path_requests = fast_path_requests_;
    s.inline_requests = inline_requests_;
    s.batches = batches_;
    s.batch_sizes.assign(batch_sizes_.begin(), batch_sizes_.end());
    s.queue_ms = queue_ms_.values();
    s.forward_ms = forward_ms_.values();
    s.server_ms = server_ms_.values();
    s.client_gap_ms = client_gap_ms_.values();
    if (reset) clear();
    return s;
  }

  void reset() {
    std::lock_guard<std::mutex> lock(mu_);
    clear();
  }

 private:
  static size_t checked(size_t window) {
    if (window < 1) throw std::invalid_argument("stats_window_size must be at least 1.");
    return window;
  }

  static double ms_between(int64_t from_ns, int64_t to_ns) {
    return static_cast<double>(to_ns - from_ns) * 1e-6;
  }

  // mu_ held. One forward of `size` requests, taking `forward_ms`.
  void record_forward(size_t size, double forward_ms, bool fast_path, bool inline_call) {
    requests_ += size;
    if (fast_path) fast_path_requests_ += size;
    if (inline_call) inline_requests_ += size;
    ++batches_;
    ++batch_sizes_[size];
    forward_ms_.push(forward_ms);
  }

  // mu_ held. A request's server time and its caller's gap.
  void record_result(int64_t submit_ns, int64_t end_ns, uint32_t caller) {
    server_ms_.push(ms_between(submit_ns, end_ns));
    if (caller == 0) return;
    auto [last, first_seen] = last_result_ns_.try_emplace(caller, end_ns);
    // A caller with requests in flight at once has no gap to measure.
    if (!first_seen && submit_ns >= last->second)
      client_gap_ms_.push(ms_between(last->second, submit_ns));
    last->second = end_ns;
  }

  void clear() {
    requests_ = fast_path_requests_ = inline_requests_ = batches_ = 0;
    batch_sizes_.clear();
    queue_ms_.clear();
    forward_ms_.clear();
    server_ms_.clear();
    client_gap_ms_.clear();
    last_result_ns_.clear();
  }

  std::mutex mu_;
  uint64_t requests_ = 0;
  uint64_t fast_path_requests_ = 0;
  uint64_t inline_requests_ = 0;
  uint64_t batches_ = 0;
  std::map<uint64_t, uint64_t> batch_sizes_;
  SampleWindow queue_ms_;
  SampleWindow forward_ms_;
  SampleWindow server_ms_;
  SampleWindow client_gap_ms_;
  std::unordered_map<uint32_t, int64_t> last_result_ns_;  // caller -> its last hand-back
};

}  // namespace batchserve
