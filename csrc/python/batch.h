// Batch (a set of requests the server took together, on both paths) and
// Ticket (the Future-like handle of a request handed out by drain()).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/row_copy.h"
#include "core/server_stats.h"
#include "core/staging.h"
#include "core/wake_batching.h"
#include "python/pyutil.h"
#include "python/schema.h"
#include "python/settle.h"
#include "python/slot_server.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// A set of requests taken from the queue together. gather() moves those of
// the server's fast-path schema into staging rows (`rows_`, served by one
// forward over the staging columns); the others (`requests_`) take the
// general path (items, collate_fn, resolve).
//
// Requests are ended here: their callers wait in C++ (a blocking call's or
// a QueuedFuture's Completion, a shared-memory slot). Each method that ends
// requests returns the watched QueuedFutures among them, for Python to
// notify (python/batchserve/batching/native.py: NativeBatch).
//
// Every method that ends requests first takes them out of the batch (plain
// C++, no Python call), then settles them. Python then notifies those
// futures, running callbacks, during which another thread may take the GIL
// and call into the same batch, e.g. a shutdown failing the batch of a
// worker that overran its timeout: it then finds only requests nobody has
// taken yet.
class Batch {
 public:
  // Staging bytes above which gather() copies with the GIL released.
  static constexpr size_t kGilFreeGatherBytes = 256 * 1024;

  // Results are handed out through `deferred` (see DeferredWakes) when
  // given; failures always wake at once.
  // `rows` were gathered ahead into rows 0.. of the staging buffer whose
  // first column is at `prefetched_into` (see Prefetcher).
  Batch(std::vector<Request> rows, std::vector<Request> requests,
        std::shared_ptr<DeferredWakes> deferred, uintptr_t prefetched_into,
        std::shared_ptr<SlotServer> slots = nullptr)
      : requests_(std::move(requests)),
        rows_(std::move(rows)),
        deferred_(std::move(deferred)),
        prefetched_into_(rows_.empty() ? 0 : prefetched_into),
        slots_(std::move(slots)) {}
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;

  // What is still here is failed (NativeBatch fails what is left before it
  // drops the batch: this is the last resort).
  ~Batch() {
    if (!requests_.empty() || !rows_.empty()) {
      PyObject* err = new_runtime_error("batchserve: a batch was dropped before it was resolved");
      fail_futures_now(settle(take_all(), [err](size_t) { return err; }, true), err);
      Py_DECREF(err);
    }
  }

  // Requests not yet ended, on both paths.
  size_t size() const { return requests_.size() + rows_.size(); }
  size_t rows() const { return rows_.size(); }

  // The general path's requests (a slot's: a TensorDict of views of its rows).
  py::list items() const {
    py::list out(requests_.size());
    for (size_t i = 0; i < requests_.size(); ++i) {
      const Request& r = requests_[i];
      out[i] = r.intake != nullptr
                   ? slot_server(r).item(r.slot)
                   : py::reinterpret_borrow<py::object>(static_cast<PyObject*>(r.payload));
    }
    return out;
  }

  // The non-tensor metadata of the fast path's requests, in row order: per
  // row a tuple in the schema's extra_keys order, as it was at submission
  // (an empty tuple for a shared-memory slot's row, which has none).
  py::list rows_extras() const {
    py::list out(rows_.size());
    for (size_t i = 0; i < rows_.size(); ++i) {
      const auto* leaves =
          rows_[i].intake != nullptr ? nullptr : static_cast<const RequestRows*>(rows_[i].rows);
      const size_t n = leaves != nullptr ? leaves->extra_count : 0;
      py::tuple extras(n);
      for (size_t j = 0; j < n; ++j)
        extras[j] = py::reinterpret_borrow<py::object>(leaves->extras[j]);
      out[i] = extras;
    }
    return out;
  }

  std::vector<int64_t> submitted_ns() const { return arrivals(requests_); }
  std::vector<uint32_t> callers() const { return senders(requests_); }

  // Statistics of the fast path's rows, recorded in `stats` in two steps
  // around their hand-back (which takes them out of the batch): their
  // forwards (one per entry of `forward_sizes`, sharing the time since
  // `dispatch_ns`) and queue waits before it, so that a caller holding its
  // result finds it counted; their server times and callers' gaps after.
  void record_rows(ServerStatsCore& stats, int64_t dispatch_ns,
                   const std::vector<size_t>& forward_sizes, bool inline_call) {
    if (forward_sizes.empty()) return;
    stamped_submit_ns_ = arrivals(rows_);
    stamped_callers_ = senders(rows_);
    const double forward_ms = static_cast<double>(monotonic_ns() - dispatch_ns) * 1e-6 /
                              static_cast<double>(forward_sizes.size());
    stats.record_batch(forward_sizes, forward_ms, true, inline_call, stamped_submit_ns_,
                       dispatch_ns);
  }
  void record_rows_hand_back(ServerStatsCore& stats) {
    stats.record_hand_back(stamped_submit_ns_, stamped_callers_, monotonic_ns());
    stamped_submit_ns_.clear();
    stamped_callers_.clear();
  }

  // Moves the requests whose leaves match schema `schema_id` to the fast
  // path, after the rows it already has (taken ahead by the Prefetcher), up
  // to `capacity` rows in all, and copies their leaves into staging: leaf j
  // of row i to columns[j] + i * leaf_bytes[j]. Returns the number of rows.
  // Large copies run with the GIL released.
  size_t gather(uint64_t schema_id, const std::vector<uintptr_t>& columns,
                const std::vector<size_t>& leaf_bytes, size_t capacity) {
    const StagingColumns staging = staging_columns(columns, leaf_bytes, capacity);
    const size_t first = rows_.size();
    if (first >= capacity) return first;
    take_rows(requests_, schema_id, columns.size(), capacity - first, rows_);
    if ((rows_.size() - first) * staging.row_bytes() < kGilFreeGatherBytes) {
      gather_from(rows_, first, staging);
      return rows_.size();
    }
    // Without the GIL a shutdown may end these requests (and free their
    // leaves) meanwhile: copy from a snapshot of the sources, holding the
    // tensors they point into.
    std::vector<RowSource> snapshot;
    std::vector<py::object> held;
    snapshot.reserve(rows_.size() - first);
    held.reserve((rows_.size() - first) * columns.size());
    for (size_t i = first; i < rows_.size(); ++i) {
      if (rows_[i].intake != nullptr) {  // shared memory, mapped for the process's life
        snapshot.push_back(*rows_[i].rows);
        continue;
      }
      const auto* leaves = static_cast<const RequestRows*>(rows_[i].rows);
      snapshot.push_back(*leaves);
      for (size_t j = 0; j < leaves->count; ++j)
        held.push_back(py::reinterpret_borrow<py::object>(leaves->tensors[j]));
    }
    std::vector<const RowSource*> sources;
    sources.reserve(snapshot.size());
    for (const RowSource& s : snapshot) sources.push_back(&s);
    {
      GilRelease nogil;
      gather_rows(sources, first, staging);
    }
    return rows_.size();  // a shutdown may have failed them meanwhile
  }

  // Gives the fast path's rows back to the general path (their staging was
  // filled for a schema or buffer that is gone, or another server's).
  void ungather() {
    requests_.insert(requests_.begin(), rows_.begin(), rows_.end());
    rows_.clear();
    prefetched_into_ = 0;
  }

  // The first staging column the prefetched rows are in (0: none).
  uintptr_t prefetched_into() const { return prefetched_into_; }

  // General path: results has one entry per request, in request order.
  // Returns (i, future) for each watched QueuedFuture, for Python to notify
  // with results[i] (so does resolve_rows_with).
  py::list resolve(const py::sequence& results) {
    return resolve_each(requests_, results, "resolve");
  }

  // Whether the fast path's rows came from shared-memory slots: then
  // scatter_rows hands them back; else Python builds one result per row and
  // hands them over with resolve_rows_with.
  bool rows_in_slots() const { return !rows_.empty() && rows_.front().intake != nullptr; }

  // Fast path, rows from shared-memory slots: copies row i of each column
  // (keys[j] -> columns[j]) into the i-th gathered request's response slot
  // (SlotServer::scatter): no Python object per request at all.
  void scatter_rows(const std::vector<py::object>& keys, const std::vector<py::object>& columns) {
    if (rows_.empty()) return;  // already failed (e.g. by a shutdown)
    if (!rows_in_slots()) throw std::logic_error("scatter_rows: the rows are not from slots");
    if (columns.size() != keys.size())
      throw std::invalid_argument("scatter_rows: one column per key expected");
    const size_t n = rows_.size();
    std::vector<uint32_t> slots_of_rows;
    for (const Request& r : rows_) {
      if (r.intake != rows_.front().intake)
        throw std::logic_error("scatter_rows: rows from two sources in one batch");
      slots_of_rows.push_back(r.slot);
    }
    std::shared_ptr<SlotServer> server = keep_slot_server(rows_.front());
    std::vector<py::object> response = server->response_columns(keys, columns, n);
    // From here these requests are the hand-back's alone: a shutdown
    // that fails this batch meanwhile finds none of them, so nothing but
    // this copy ends or writes their slots (the copy cannot stall). Their
    // clients are other processes: woken without our GIL.
    take(rows_);
    server->scatter(slots_of_rows, response);
  }

  // Fast path (rows not from slots): one result object per gathered
  // request, in row order. The server builds them all, with the GIL it
  // holds anyway, before any caller is woken: building them in the
  // callers' threads was measured 2x slower at 8 actor threads (36 k vs
  // 18-20 k req/s, p99 0.4 vs 3.8 ms), as freshly woken callers contend
  // with the server for the GIL.
  py::list resolve_rows_with(const py::sequence& results) {
    return resolve_each(rows_, results, "resolve_rows_with");
  }

  // Ends every request still in the batch, on both paths. Returns the
  // watched QueuedFutures among them, for Python to fail with `exc` (so do
  // fail_rows and fail_some).
  py::list fail(const py::object& exc) {
    PyObject* outcome = exc.ptr();
    return settle(take_all(), [outcome](size_t) { return outcome; }, true);
  }

  // Ends the fast path's requests.
  py::list fail_rows(const py::object& exc) {
    PyObject* outcome = exc.ptr();
    return settle(take(rows_), [outcome](size_t) { return outcome; }, true);
  }

  // Fails general requests [i] for i in `indices` with `exc`, leaving the
  // rest to a later resolve() of the remaining ones (malformed inputs).
  py::list fail_some(const std::vector<size_t>& indices, const py::object& exc) {
    std::vector<bool> drop(requests_.size(), false);
    for (size_t i : indices) {
      if (i >= requests_.size()) throw std::out_of_range("fail_some: index");
      drop[i] = true;
    }
    std::vector<Request> kept, failed;
    for (size_t i = 0; i < requests_.size(); ++i) (drop[i] ? failed : kept).push_back(requests_[i]);
    requests_.swap(kept);
    PyObject* outcome = exc.ptr();
    return settle(std::move(failed), [outcome](size_t) { return outcome; }, true);
  }

 private:
  // Ends each request of `which` (requests_ or rows_) with its entry of
  // `results`, in order.
  py::list resolve_each(std::vector<Request>& which, const py::sequence& results,
                        const char* name) {
    if (which.empty()) return py::list();  // already failed (e.g. by a shutdown)
    const size_t n = which.size();
    if (static_cast<size_t>(py::len(results)) != n)
      throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(n) +
                                  " results, got " + std::to_string(py::len(results)));
    std::vector<py::object> held;  // keep every result alive while settling
    held.reserve(n);
    for (size_t i = 0; i < n; ++i) held.push_back(results[i]);
    if (which.size() != n) return py::list();  // failed while results were read
    return settle(
        take(which), [&held](size_t i) { return held[i].ptr(); }, false, deferred_.get(), true);
  }

  static StagingColumns staging_columns(const std::vector<uintptr_t>& columns,
                                        const std::vector<size_t>& leaf_bytes, size_t capacity) {
    if (leaf_bytes.size() != columns.size())
      throw std::invalid_argument("gather: one size per column expected");
    StagingColumns staging;
    for (uintptr_t c : columns) staging.base.push_back(reinterpret_cast<uint8_t*>(c));
    staging.leaf_bytes = leaf_bytes;
    staging.rows = capacity;
    return staging;
  }

  static std::vector<int64_t> arrivals(const std::vector<Request>& requests) {
    std::vector<int64_t> out;
    out.reserve(requests.size());
    for (const Request& r : requests) out.push_back(r.submit_ns);
    return out;
  }

  static std::vector<uint32_t> senders(const std::vector<Request>& requests) {
    std::vector<uint32_t> out;
    out.reserve(requests.size());
    for (const Request& r : requests) out.push_back(r.caller);
    return out;
  }

  static std::vector<Request> take(std::vector<Request>& from) {
    std::vector<Request> taken;
    taken.swap(from);
    return taken;
  }

  std::vector<Request> take_all() {
    std::vector<Request> taken = take(rows_);
    for (const Request& r : requests_) taken.push_back(r);
    requests_.clear();
    return taken;
  }

  // GIL held. Wakes now, or leaves the wake-ups to `deferred`.
  // Slots' clients (other processes) are woken now either way.
  static void wake(std::vector<Wake>& to_wake, DeferredWakes* deferred) {
    if (deferred != nullptr) deferred->defer(to_wake);
    wake_and_release(to_wake);
  }

  // GIL held. Ends each request of `requests` (owned by the caller, no
  // longer reachable from the batch) with outcome_of(i); returns the watched
  // QueuedFutures to notify, as (i, future) when `indexed`.
  template <typename OutcomeOf>
  static py::list settle(std::vector<Request> requests, OutcomeOf&& outcome_of, bool is_error,
                         DeferredWakes* deferred = nullptr, bool indexed = false) {
    py::list futures;
    std::vector<Wake> to_wake;
    to_wake.reserve(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      const Py_ssize_t index = indexed ? static_cast<Py_ssize_t>(i) : -1;
      bindings::settle(requests[i], outcome_of(i), is_error, to_wake, futures.ptr(), index);
      release_python_refs(requests[i]);
    }
    wake(to_wake, deferred);
    return futures;
  }

  std::vector<Request> requests_;  // general path
  std::vector<Request> rows_;      // fast path: row i of the staging batch
  std::shared_ptr<DeferredWakes> deferred_;
  uintptr_t prefetched_into_ = 0;
  std::shared_ptr<SlotServer> slots_;  // where requests from slots go back (kept alive)
  // The rows' stamps between record_rows and record_rows_hand_back.
  std::vector<int64_t> stamped_submit_ns_;
  std::vector<uint32_t> stamped_callers_;
};

// The handle of a request handed out by drain() (the transport protocol
// path): it quacks like the Future torchrl's transports hand out, and ends
// the request as Batch does (a blocking call's or a QueuedFuture's
// Completion, a shared-memory slot).
class Ticket {
 public:
  explicit Ticket(const Request& request) : request_(request), slots_(keep_slot_server(request)) {}
  Ticket(const Ticket&) = delete;
  Ticket& operator=(const Ticket&) = delete;
  ~Ticket() {
    if (!done_) {
      try {
        end(py::reinterpret_steal<py::object>(
                new_runtime_error("batchserve: a request was dropped before it was resolved")),
            true);
      } catch (...) {  // a destructor must not throw; a callback's error is reported by Python
        PyErr_Clear();
      }
    }
  }

  void set_result(const py::object& result) { end(result, false); }
  void set_exception(const py::object& exc) { end(exc, true); }
  bool done() const { return done_; }

 private:
  // Called from Python (the protocol's resolve): a QueuedFuture with done
  // callbacks is notified here, as Future.set_result would run them.
  void end(const py::object& outcome, bool is_error) {
    if (done_) return;
    done_ = true;
    end_request_now(request_, outcome, is_error);
  }

  Request request_;                    // owns no Python reference (drain handed them out)
  std::shared_ptr<SlotServer> slots_;  // keeps request_.intake alive
  bool done_ = false;
};

}  // namespace bindings
}  // namespace batchserve
