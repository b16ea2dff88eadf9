// RequestQueue as Python sees it (batchserve._core.RequestQueue): the
// client calls (call, submit) that match a request to the fast path and
// wait in slices (csrc/core/sliced_wait.h), the transport protocol's drain,
// and the server's collect over the core's RequestCollector.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/batch_policy.h"
#include "core/collector.h"
#include "core/completion.h"
#include "core/request_queue.h"
#include "core/sliced_wait.h"
#include "core/wake_batching.h"
#include "python/batch.h"
#include "python/pending_result.h"
#include "python/pyutil.h"
#include "python/schema.h"
#include "python/settle.h"
#include "python/slot_server.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// The submitting thread, as the caller whose gaps (result to next request)
// stats follow: one id per thread, never 0 (0 is "unknown").
inline uint32_t this_caller() {
  static std::atomic<uint32_t> next{1};
  thread_local const uint32_t id = next.fetch_add(1, std::memory_order_relaxed);
  return id;
}

class RequestQueue final : public ClaimDesk {
 public:
  // `single_file`: blocking callers pass their chain's wake-up on at their
  // next call (csrc/core/single_file.h).
  explicit RequestQueue(size_t capacity, bool single_file = false)
      : collector_(capacity), single_file_(single_file) {}
  // GIL held (Python frees the queue). Requests still here end with an
  // error rather than never (a QueuedFuture's callbacks run).
  ~RequestQueue() {
    *claim_route_ = nullptr;  // futures that outlive the queue claim nothing
    try {
      auto err = py::reinterpret_steal<py::object>(
          new_runtime_error("batchserve: the request queue was destroyed"));
      const py::tuple failed = fail_pending(err);
      fail_futures_now(failed[1].cast<py::list>(), err.ptr());  // the QueuedFutures to notify
    } catch (...) {  // a destructor must not throw; Python reports none here
      PyErr_Clear();
    }
  }
  RequestQueue(const RequestQueue&) = delete;
  RequestQueue& operator=(const RequestQueue&) = delete;

  // GIL held. Pushes `r`, waiting for room until `deadline` with the GIL
  // released, in slices so that a signal (Ctrl-C) is seen. Returns false
  // when a signal handler raised (the Python error is set).
  bool push_checking_signals(const Request& r, int64_t deadline, PushResult& result,
                             bool quiet = false) {
    result = queue().push(r, 0, quiet);  // first without giving up the GIL
    if (result != PushResult::kTimedOut || monotonic_ns() >= deadline) return true;
    bool interrupted = false;
    wait_in_slices(
        deadline,
        [&](int64_t until) {
          GilRelease nogil;
          HeldWake::pass();
          result = queue().push(r, until, quiet);
          return result != PushResult::kTimedOut;
        },
        [&](bool expired) { return !expired && !(interrupted = signalled()); });
    return !interrupted;
  }

  // The blocking client call: enqueue, wait for the result with the GIL
  // released, return it or raise the server's exception.
  py::object call(const py::object& item, std::optional<double> timeout_s) {
    const int64_t deadline = deadline_from(timeout_s);
    OwnedRows rows = match(item.ptr(), false, RawBytes::kDeferred);
    // No inline call under a timeout: the caller could not leave its own
    // forward when it passes.
    if (rows && !timeout_s && try_inline(0)) return call_inline(item, std::move(rows));
    settle_raw_bytes(rows);  // the server reads the rows' bytes
    auto* completion = new Completion();
    const int64_t submit_ns = monotonic_ns();
    const Request request{item.ptr(), completion, submit_ns, rows.get(), nullptr, 0, this_caller()};
    Py_INCREF(item.ptr());
    // Push and first wait in one GIL-free stretch: a caller that took the
    // GIL back in between would hold it just when the server wakes up for
    // this very request, and the server would sleep on the GIL. The caller
    // sleeps at once: on a small machine a spinning caller takes the core
    // the server and torch's threads need (measured: 1-actor latency
    // 85 µs parked, 150-165 µs spinning, on the 2-core CI VM).
    PushResult pushed = PushResult::kTimedOut;
    bool interrupted = false;
    bool done = false;
    {
      WakeChainTurn turn(completion, single_file_);  // left with the GIL held, before any release
      done = wait_in_slices(
          deadline,
          [&](int64_t until) {
            GilRelease nogil;
            HeldWake::pass();  // single file: the next caller's turn
            if (pushed != PushResult::kOk) {
              pushed = queue().push(request, until);
              if (pushed == PushResult::kClosed) return true;  // ends the wait: see below
              if (pushed != PushResult::kOk) return false;
              until = slice_end(deadline);  // the first wait gets a whole slice
            }
            return completion->wait_until(until, 0);
          },
          [&](bool expired) { return !expired && !(interrupted = signalled()); });
    }
    if (pushed != PushResult::kOk) {
      Py_DECREF(item.ptr());
      completion->release();
      completion->release();
      if (interrupted) throw py::error_already_set();  // Ctrl-C while the queue is full
      if (pushed == PushResult::kClosed)
        throw QueueClosedError("the inference server is shut down");
      raise_timeout("no room in the request queue within the timeout");
    }
    rows.release();  // the request owns them now
    if (!done) {
      const Completion::State left = completion->give_up();
      if (left == Completion::kDone && interrupted) {
        discard_outcome(completion);  // a signal (Ctrl-C) wins over a result that arrived meanwhile
        throw py::error_already_set();
      }
      if (left != Completion::kDone) {
        completion->release();
        if (interrupted) throw py::error_already_set();
        raise_timeout(timed_out_because(left == Completion::kWithdrawn));
      }
      // else the result won the race with the timeout
    }
    return take_outcome(completion);
  }

  // The inline call (see InlineGate): the caller serves its own request
  // through the server's WorkerLoop, with the server kept out meanwhile.
  // GIL held throughout: no hand-off at all. `serve_one` takes it without
  // staging (python/batchserve/batching/lone_request.py); what it declines
  // is served as a batch of one by `runner`.
  py::object call_inline(const py::object& item, OwnedRows rows) {
    HeldWake::pass();  // this thread runs a forward now: the next caller's turn
    EndInline end_inline{collector_};
    if (serve_one_) {
      const int64_t submit_ns = monotonic_ns();
      const py::object serve_one = serve_one_;  // set_inline_runner may run meanwhile
      py::object result = offer(serve_one, item.ptr(), *rows, submit_ns, false);
      if (!result.is_none()) return result;
    }
    settle_raw_bytes(rows);  // the batch of one reads the rows' bytes
    auto* completion = new Completion();
    Py_INCREF(item.ptr());
    std::optional<py::error_already_set> raised = serve_batch_of_one(
        Request{item.ptr(), completion, monotonic_ns(), rows.release(), nullptr, 0, this_caller()});
    if (!raised) return take_outcome(completion);
    discard_outcome(completion);
    throw std::move(*raised);  // KeyboardInterrupt... in the caller's own forward
  }

  // ClaimDesk: the caller of a submitted request, waiting for its result,
  // serves it inline as a blocking caller would (the same conditions: the
  // server idle, no other caller known), from the bytes copied at
  // submission. It claims the request in the queue (Completion::claim), so
  // the server skips it there, and ends it as the server would: the
  // completion, other threads waiting on it, the future's callbacks. Those
  // run once the server may serve again: a callback may call the server.
  bool serve_claimed(Completion* completion, PyObject* item, RequestRows* rows,
                     int64_t submit_ns) override {
    if (!try_inline(1)) return false;
    const Request request{item, completion, submit_ns, rows, nullptr, 0, this_caller()};
    py::object outcome;  // unset: the batch of one ended the request
    bool is_error = false;
    std::optional<py::error_already_set> raised;
    py::object watcher;  // a batch of one's future, held back until the server may serve
    {
      EndInline end_inline{collector_};
      if (!completion->claim()) return false;  // the server took it first, or it ended
      // Taken back from the queue, its reference there dropped: a server
      // left asleep (a quiet push) never sees it. Else it skips it there.
      Request queued;
      if (queue().pop_if([completion](const Request& r) { return r.completion == completion; },
                         queued))
        completion->release();
      HeldWake::pass();  // (see call_inline)
      // The request's references to its input and rows are this caller's
      // now. The end of the request drops a reference to the completion:
      // this one (a copy still in the queue keeps its own, see take_ready).
      completion->retain();
      if (serve_one_) {
        OwnedRows owned_rows(rows);
        auto owned_item = py::reinterpret_steal<py::object>(item);
        const py::object serve_one = serve_one_;  // set_inline_runner may run meanwhile
        try {
          outcome = offer(serve_one, owned_item.ptr(), *owned_rows, submit_ns, true);
        } catch (py::error_already_set& e) {
          // The model's error ends the request, as the server's would; what
          // is no Exception (Ctrl-C in the caller's forward) is raised too.
          outcome = e.value();
          is_error = true;
          if (!e.matches(PyExc_Exception)) raised = std::move(e);
        }
        if (outcome.is_none() && !is_error) {
          outcome = py::object();
          owned_item.release();  // declined: the batch of one owns them
          owned_rows.release();
        }
      }
      if (!outcome) {
        // The batch ends the request within the borrow: its future is
        // notified after it, here below.
        void* w = completion->take_watcher();
        if (w != nullptr && w != kOrphaned)
          watcher = py::reinterpret_steal<py::object>(static_cast<PyObject*>(w));
        raised = serve_batch_of_one(request);
      }
    }
    if (outcome) end_request_now(request, outcome, is_error);  // the borrow ended
    if (watcher)
      notify_future(
          watcher,
          py::reinterpret_borrow<py::object>(static_cast<PyObject*>(completion->outcome())),
          completion->is_error());
    if (raised) throw std::move(*raised);
    return true;
  }

  void announce() override { queue().announce(); }

  // Serves callers' requests inline while the server is idle (see
  // InlineGate): `runner(batch)` serves a _core.Batch of one on the calling
  // thread, or None to stop. `serve_one(item, leaves, schema_id, submit_ns)`,
  // when given, is offered each request first: its fast-path leaves (a
  // tuple, in schema order) and the schema they matched; it returns the
  // caller's result, raises the caller's error, or returns None to leave the
  // request to `runner`.
  void set_inline_runner(const py::object& runner, const py::object& serve_one) {
    inline_runner_ = runner.is_none() ? py::object() : runner;
    serve_one_ = runner.is_none() || serve_one.is_none() ? py::object() : serve_one;
  }
  bool inline_runner_set() const { return static_cast<bool>(inline_runner_); }
  // Stops inline calls if `runner` is the one set (a server's worker ending:
  // a later server's runners stay). Returns whether it was.
  bool withdraw_inline_runner(const py::object& runner) {
    if (!inline_runner_ || !inline_runner_.is(runner)) return false;
    inline_runner_ = py::object();
    serve_one_ = py::object();
    return true;
  }
  // Wakes a server waiting for work (it returns from collect() with no
  // batch and looks at its stop).
  void interrupt() { queue().interrupt(); }
  void attach_server() { collector_.attach_server(); }
  void detach_server() { collector_.detach_server(); }

  // Enqueues a request whose caller waits on the returned PendingResult
  // (python/batchserve/transports/queued_future.py wraps it in a Future):
  // ended in C++ as a blocking call's is. block=False raises QueueFull at
  // once when the queue is full.
  std::unique_ptr<PendingResult> submit_pending(const py::object& item, bool block,
                                                std::optional<double> timeout_s) {
    const int64_t deadline = block ? deadline_from(timeout_s) : 0;
    OwnedRows rows = match(item.ptr(), true);
    auto* completion = new Completion();
    auto pending = std::make_unique<PendingResult>(completion);  // the caller's reference
    const Request request{item.ptr(), completion, monotonic_ns(), rows.get(),
                          nullptr,    0,          this_caller()};
    Py_INCREF(item.ptr());
    PushResult pushed;
    // Its caller may serve it itself when it waits (serve_claimed). A lone
    // caller's is pushed quietly: an idle server is left asleep where it
    // wakes by itself soon enough (core/request_queue.h).
    const bool claimable = rows && inline_runner_;
    const bool quiet =
        claimable && queue().quiet_bound_ns() > 0 && collector_.sole_caller(this_caller());
    const bool uninterrupted = push_checking_signals(request, deadline, pushed, quiet);
    if (uninterrupted && pushed == PushResult::kOk) {
      if (claimable)
        pending->allow_claim(claim_route_, item.ptr(), rows.get(), request.submit_ns, quiet);
      rows.release();  // the request owns them now
      return pending;
    }
    Py_DECREF(item.ptr());
    completion->give_up();  // kWithdrawn: the pending result holds nothing
    completion->release();  // the request's reference: it never left
    if (!uninterrupted) throw py::error_already_set();
    if (pushed == PushResult::kClosed) throw QueueClosedError("the inference server is shut down");
    throw QueueFullError("the request queue is full (capacity " +
                         std::to_string(queue().capacity()) + ")");
  }

  // The fast path's schema: requests that match it carry their leaves to the
  // server. Returns its id. `strict` (a request_spec) makes a mismatching
  // TensorDict an error at submission.
  uint64_t set_schema(const std::vector<py::object>& keys, const std::vector<py::object>& dtypes,
                      const std::vector<py::object>& shapes, const std::vector<size_t>& leaf_bytes,
                      bool strict, const py::object& device,
                      const std::vector<py::object>& general_keys,
                      const std::vector<py::object>& extra_keys) {
    if (dtypes.size() != keys.size() || shapes.size() != keys.size() ||
        leaf_bytes.size() != keys.size())
      throw std::invalid_argument("set_schema: one dtype, shape and size per key");
    if (keys.empty() || keys.size() > RequestRows::kMaxLeaves)
      throw std::invalid_argument("set_schema: the fast path takes 1 to " +
                                  std::to_string(RequestRows::kMaxLeaves) + " leaves");
    for (const py::object& dtype : dtypes)
      if (!plain_bytes_dtype(dtype.ptr()))
        throw std::invalid_argument("set_schema: dtype " + repr(dtype.ptr()) +
                                    " cannot take the fast path (complex or quantized)");
    auto schema = std::make_shared<FastSchema>();
    schema->id = ++last_schema_id_;
    schema->strict = strict;
    schema->keys = keys;
    schema->dtypes = dtypes;
    schema->shapes = shapes;
    schema->leaf_bytes = leaf_bytes;
    schema->device = device;
    schema->general_keys = general_keys;
    schema->extra_keys = extra_keys;
    // Each leaf and metadata entry, plus each distinct nested TensorDict on
    // their paths.
    std::set<std::vector<std::string>> nodes;
    for (const std::vector<py::object>* entries : {&keys, &extra_keys})
      for (const py::object& key : *entries) {
        if (!PyTuple_Check(key.ptr())) continue;
        schema->nested = true;
        std::vector<std::string> path;
        const py::tuple parts(key);
        for (size_t i = 0; i + 1 < parts.size(); ++i) {
          path.push_back(py::str(parts[i]));
          nodes.insert(path);
        }
      }
    schema->entries = static_cast<Py_ssize_t>(keys.size() + extra_keys.size() + nodes.size());
    schema_ = std::move(schema);
    return schema_->id;
  }

  bool schema_strict() const { return schema_ && schema_->strict; }

  // Transport protocol: up to max_items requests, without waiting, as
  // (items, tickets, submitted_at): each request's Ticket ends it.
  py::tuple drain(size_t max_items) {
    std::vector<Request> popped;
    std::vector<Request> unused;
    detail::take_ready(queue(), max_items, popped, unused);
    for (const Request& r : unused) discard(r);
    py::list items, handles, submitted_at;
    for (const Request& r : popped) {
      if (r.intake != nullptr) {
        items.append(slot_server(r).item(r.slot));
      } else {
        items.append(py::reinterpret_steal<py::object>(static_cast<PyObject*>(r.payload)));
        free_rows(r.rows);  // the protocol path hands out the TensorDict itself
      }
      Request bare = r;  // its references were handed out above
      bare.payload = nullptr;
      bare.rows = nullptr;
      handles.append(py::cast(new Ticket(bare), py::return_value_policy::take_ownership));
      submitted_at.append(static_cast<double>(r.submit_ns) * 1e-9);
    }
    return py::make_tuple(items, handles, submitted_at);
  }

  bool wait_for_work(double timeout_s) {
    GilRelease nogil;
    return queue().wait_for_work(deadline_after(timeout_s));
  }

  // The batching policy's settings; a server sleeping in collect() applies
  // them at once. `idle_wait_s`: how long an idle collect() waits for a
  // first request before it returns empty (None: `timeout_s`).
  void configure(size_t max_batch_size, size_t min_batch_size, double timeout_s,
                 std::optional<double> idle_wait_s) {
    BatchPolicy policy;
    policy.max_batch_size = max_batch_size;
    policy.min_batch_size = min_batch_size;
    policy.timeout_ns = seconds_to_ns(timeout_s);
    if (idle_wait_s) policy.idle_wait_ns = seconds_to_ns(*idle_wait_s);
    collector_.configure(policy);
  }

  // Fast path: starts gathering the next batch into the staging `columns`
  // while the model runs on the current one (see Prefetcher). Does nothing
  // when no request is waiting (one actor: it is waiting for this batch) or
  // a job is already started. Returns whether it started one.
  bool prefetch(uint64_t schema_id, const std::vector<uintptr_t>& columns,
                const std::vector<size_t>& leaf_bytes, size_t capacity) {
    if (queue().size() == 0) return false;  // without building the staging description
    StagingColumns staging;
    for (uintptr_t c : columns) staging.base.push_back(reinterpret_cast<uint8_t*>(c));
    staging.leaf_bytes = leaf_bytes;
    staging.rows = capacity;
    return collector_.prefetch(schema_id, std::move(staging));
  }

  // The server's batch (csrc/core/collector.h): the C++ batching policy, run
  // without the GIL, going on from what a prefetch took (those rows are
  // already in staging). Here only the Python side: wake the callers left
  // from the last batch, build the Batch.
  std::unique_ptr<Batch> collect() {
    std::vector<Wake> to_wake = deferred_->take();
    std::vector<Request> carried = collector_.take_carried();
    CollectedBatch collected;
    {
      GilRelease nogil;
      bool woken = false;
      auto wake = [&] {  // once: in wait_for_batch, or here if it threw first
        if (woken) return;
        woken = true;
        notify_and_release(to_wake, handed());
      };
      // Single file: wakes the handed wake-ups that fell due while idle.
      auto idle_tick = [this] {
        return single_file_ ? handed_.wake_overdue(monotonic_ns()) : kNoDeadline;
      };
      try {
        collected = collector_.wait_for_batch(std::move(carried), wake, idle_tick);
      } catch (...) {
        wake();
        throw;
      }
    }
    // Taking the GIL back can take a while when woken callers hold it; what
    // arrived meanwhile joins this batch (complete()).
    collector_.complete(collected);
    for (const Request& r : collected.dropped) discard(r);
    if (collected.rows.empty() && collected.others.empty()) return nullptr;
    collector_.adapt_server_spin(collected);
    return std::make_unique<Batch>(std::move(collected.rows), std::move(collected.others),
                                   deferred_, collected.prefetched_into, slots_);
  }

  // Takes every queued request (and any a prefetch took) and ends it with
  // `exc`. Returns (how many it ended, the QueuedFutures among them to
  // notify).
  py::tuple fail_pending(const py::object& exc) {
    flush(*deferred_);
    size_t total = 0;
    py::list to_notify;
    std::vector<Wake> to_wake;
    auto fail = [&](const Request& r) {
      settle(r, exc.ptr(), true, to_wake, to_notify.ptr());
      ++total;
      release_python_refs(r);
    };
    Prefetcher::Taken taken;
    {
      GilRelease nogil;
      taken = collector_.finish_prefetch();
    }
    for (const Request& r : taken.dropped) discard(r);
    for (const Request& r : taken.rows) fail(r);
    for (const Request& r : taken.others) fail(r);
    for (const Request& r : collector_.take_carried()) fail(r);
    wake_and_release(to_wake);
    std::vector<Request> pending;
    while (queue().pop_many(pending, 1024) > 0) {
      // A claimed request is its caller's: checked with the GIL held, as
      // claims are made, so none is claimed between the check and the fail.
      for (const Request& r : pending)
        if (!release_if_claimed(r)) fail(r);
      pending.clear();
      wake_and_release(to_wake);
    }
    return py::make_tuple(total, to_notify);
  }

  // Wakes the callers whose results are published (see DeferredWakes) now
  // rather than at the next collect().
  void wake_resolved() { flush(*deferred_, handed()); }

  bool single_file() const { return single_file_; }

  // How long the server spins for work before it sleeps now (SpinBudget).
  int64_t server_spin_ns() const { return queue().server_spin_ns(); }

  void close() {
    flush(*deferred_);
    GilRelease nogil;
    queue().close();
  }
  void reopen() { queue().reopen(); }
  bool closed() const { return queue().closed(); }

  // Requests also come from shared-memory slots (a SharedMemoryTransport's
  // server end). Once, before the queue is used.
  void attach_slots(std::shared_ptr<SlotServer> slots) {
    if (slots_) throw std::logic_error("attach_slots: the queue already has slots");
    slots_ = std::move(slots);
    queue().attach_intake(slots_.get());
  }
  size_t reaped_slots() const { return slots_ ? slots_->reaped() : 0; }
  size_t size() const { return queue().size(); }
  size_t capacity() const { return queue().capacity(); }

 private:
  batchserve::RequestQueue& queue() { return collector_.queue(); }
  const batchserve::RequestQueue& queue() const { return collector_.queue(); }

  // GIL held. The outcome of `completion` (ended kDone), the caller's
  // reference dropped: the result, or the server's exception raised.
  static py::object take_outcome(Completion* completion) {
    py::object outcome =
        py::reinterpret_steal<py::object>(static_cast<PyObject*>(completion->outcome()));
    const bool is_error = completion->is_error();
    completion->release();
    if (is_error) {
      set_error_from(outcome.ptr());
      throw py::error_already_set();
    }
    return outcome;
  }

  // GIL held. Drops the outcome of `completion` (ended kDone) unread, and
  // the caller's reference.
  static void discard_outcome(Completion* completion) {
    Py_XDECREF(static_cast<PyObject*>(completion->outcome()));
    completion->release();
  }

  HandedWakes* handed() { return single_file_ ? &handed_ : nullptr; }

  // Whether this thread may serve its request inline now (then end_inline()
  // once served): inline calls are on, the queue open, and the collector
  // lets it in (RequestCollector::try_inline; `own_queued`: its own
  // submitted request may still be queued).
  bool try_inline(size_t own_queued) {
    return inline_runner_ && !queue().closed() && collector_.try_inline(this_caller(), own_queued);
  }

  // GIL held. `serve_one(item, leaves, schema_id, submit_ns, copied)` for
  // the request of `rows`: what it returns (None: declined) or raises. A
  // vectorcall: pybind11's call builds a tuple of converted arguments, ~0.5
  // µs of an inline call after a forward (measured on the 2-core VM).
  static py::object offer(const py::object& serve_one, PyObject* item, const RequestRows& rows,
                          int64_t submit_ns, bool copied) {
    const py::tuple leaves = leaves_of(rows);
    const auto schema_id =
        py::reinterpret_steal<py::object>(PyLong_FromUnsignedLongLong(rows.schema_id));
    const auto submitted = py::reinterpret_steal<py::object>(PyLong_FromLongLong(submit_ns));
    if (!schema_id || !submitted) throw py::error_already_set();
    PyObject* args[] = {item, leaves.ptr(), schema_id.ptr(), submitted.ptr(),
                        copied ? Py_True : Py_False};
    PyObject* result = PyObject_Vectorcall(serve_one.ptr(), args, 5, nullptr);
    if (result == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(result);
  }

  // Ends a borrow of the inline gate (try_inline) when it leaves scope.
  struct EndInline {
    RequestCollector& collector;
    ~EndInline() { collector.end_inline(); }
  };

  // GIL held, the inline gate borrowed. Serves `request` (its references
  // owned) as a batch of one through the inline runner, on this thread: the
  // batch ends its completion, never woken (this thread would be the one
  // waiting), and drops the completion reference the request holds. Returns
  // what the runner raised (the request ended with it), if anything.
  std::optional<py::error_already_set> serve_batch_of_one(const Request& request) {
    auto own = std::make_shared<DeferredWakes>();
    auto batch = std::make_unique<Batch>(std::vector<Request>{}, std::vector<Request>{request}, own,
                                         0, slots_);
    Batch* served = batch.get();
    const py::object runner = inline_runner_;  // set_inline_runner may run meanwhile
    std::optional<py::error_already_set> raised;
    {
      const py::object handle = py::cast(std::move(batch));
      try {
        runner(handle);
      } catch (py::error_already_set& e) {
        raised = std::move(e);  // the request is failed below, then this is returned
      }
      if (served->size() != 0) {  // a runner that neither served nor failed it
        const py::object err = py::reinterpret_steal<py::object>(
            new_runtime_error("batchserve: the inline call was not served"));
        served->fail(err);
      }
    }
    std::vector<Wake> settled = own->take();
    notify_and_release(settled);  // drops the request's reference; no one waits
    return raised;
  }

  OwnedRows match(PyObject* item, bool own_copy, RawBytes raw_bytes = RawBytes::kChecked) {
    if (!schema_) return nullptr;
    std::shared_ptr<const FastSchema> schema = schema_;  // set_schema may run in a callback
    return match_schema(item, *schema, own_copy, raw_bytes);
  }

  std::shared_ptr<SlotServer> slots_;  // the intake of the queue, if any (outlives the prefetcher)
  RequestCollector collector_;         // the queue, the settings, the prefetcher
  std::shared_ptr<DeferredWakes> deferred_ = std::make_shared<DeferredWakes>();
  std::shared_ptr<const FastSchema> schema_;  // GIL held to read or change
  py::object inline_runner_;                  // GIL held to read or change (None: no inline calls)
  py::object serve_one_;                      // GIL held to read or change (None: runner only)
  uint64_t last_schema_id_ = 0;
  const bool single_file_;
  ClaimRoute claim_route_ = std::make_shared<ClaimDesk*>(this);  // (see serve_claimed)
  HandedWakes handed_;  // single file: wake-ups handed on to callers (any server thread)
};

}  // namespace bindings
}  // namespace batchserve
