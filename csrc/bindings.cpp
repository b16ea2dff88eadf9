// Python bindings of the C++ core: the only file that knows about Python.
//
// Ownership across the C++ boundary: a Request's `payload` and `future` are
// owned references (PyObject*, incref'd when the request is made) and are
// released, with the GIL held, by whoever ends the request: a Batch or Ticket
// when it is resolved, or collect()/fail_pending() for requests that were
// withdrawn or rejected. A Completion's outcome is an owned reference handed
// from the server to the caller. Every wait runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "batch_policy.h"
#include "completion.h"
#include "futex.h"
#include "request_queue.h"

namespace py = pybind11;

namespace batchserve {
namespace {

struct QueueClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct QueueFullError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A blocking caller re-checks for Python signals (Ctrl-C) this often.
constexpr int64_t kSignalCheckNs = 200'000'000;
constexpr int kCallerSpin = 128;

[[noreturn]] void raise_timeout(const std::string& message) {
  PyErr_SetString(PyExc_TimeoutError, message.c_str());
  throw py::error_already_set();
}

int64_t deadline_from(const std::optional<double>& timeout_s) {
  if (!timeout_s) return kNoDeadline;
  return deadline_after(*timeout_s);
}

// Calls a method of a concurrent.futures.Future, ignoring the errors of a
// future that was already resolved or cancelled: the caller has left.
void call_future(PyObject* future, const char* method, PyObject* arg) {
  PyObject* r = PyObject_CallMethod(future, method, "O", arg);
  if (r == nullptr) {
    PyErr_Clear();
  } else {
    Py_DECREF(r);
  }
}

// GIL held. Decides whether a drained future-backed request is still wanted
// (Future.set_running_or_notify_cancel, as executors do).
bool claim_future(PyObject* future) {
  PyObject* r = PyObject_CallMethod(future, "set_running_or_notify_cancel", nullptr);
  if (r == nullptr) {
    PyErr_Clear();
    return false;
  }
  const bool claimed = PyObject_IsTrue(r) == 1;
  Py_DECREF(r);
  return claimed;
}

// GIL held. Releases what a request owns on the Python side.
void release_python_refs(const Request& r) {
  Py_XDECREF(static_cast<PyObject*>(r.payload));
  Py_XDECREF(static_cast<PyObject*>(r.future));
}

// GIL held. Ends one request with `outcome` (a result or an exception).
// Completions that must be woken are appended to `to_wake` (their reference
// is released after the wake-up, outside the GIL).
void settle(const Request& r, PyObject* outcome, bool is_error,
            std::vector<Completion*>& to_wake) {
  if (r.completion != nullptr) {
    Py_INCREF(outcome);
    if (!r.completion->finish(outcome, is_error)) Py_DECREF(outcome);
    to_wake.push_back(r.completion);
  } else if (r.future != nullptr) {
    call_future(static_cast<PyObject*>(r.future),
                is_error ? "set_exception" : "set_result", outcome);
  }
}

// GIL held on entry and exit; wakes callers without it.
void wake_and_release(std::vector<Completion*>& to_wake) {
  if (to_wake.empty()) return;
  py::gil_scoped_release nogil;
  for (Completion* c : to_wake) {
    c->notify();
    c->release();
  }
  to_wake.clear();
}

// GIL held. Drops a request that will never be served (withdrawn by its
// caller): no outcome, only references to release.
void discard(const Request& r) {
  release_python_refs(r);
  if (r.completion != nullptr) r.completion->release();
}

// GIL held. A new RuntimeError; MemoryError (never null) if even that
// cannot be allocated, so a request always gets an outcome.
PyObject* new_runtime_error(const char* message) {
  PyObject* err = PyObject_CallFunction(PyExc_RuntimeError, "s", message);
  if (err != nullptr) return err;
  PyErr_Clear();
  Py_INCREF(PyExc_MemoryError);
  return PyExc_MemoryError;
}

// GIL held. Sets the Python error a caller raises for `outcome`: the
// exception instance itself, an exception class, or anything else wrapped in
// a RuntimeError.
void set_error_from(PyObject* outcome) {
  if (PyExceptionInstance_Check(outcome)) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(outcome)), outcome);
  } else if (PyExceptionClass_Check(outcome)) {
    PyErr_SetNone(outcome);
  } else {
    PyErr_SetObject(PyExc_RuntimeError, outcome);
  }
}

// A set of requests taken from the queue together, served by one forward.
//
// Every method that ends requests first takes them out of requests_ (plain
// C++, no Python call), then settles them. Settling runs Python code
// (Future callbacks) during which another thread may take the GIL and call
// into the same batch, e.g. a shutdown failing the batch of a worker that
// overran its timeout: it then finds only requests nobody has taken yet.
class Batch {
 public:
  explicit Batch(std::vector<Request> requests)
      : requests_(std::move(requests)) {}
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;

  ~Batch() {
    if (!requests_.empty()) {
      PyObject* err = new_runtime_error(
          "batchserve: a batch was dropped before it was resolved");
      settle(take_all(), [err](size_t) { return err; }, true);
      Py_DECREF(err);
    }
  }

  size_t size() const { return requests_.size(); }

  py::list items() const {
    py::list out(requests_.size());
    for (size_t i = 0; i < requests_.size(); ++i)
      out[i] = py::reinterpret_borrow<py::object>(
          static_cast<PyObject*>(requests_[i].payload));
    return out;
  }

  std::vector<int64_t> submitted_ns() const {
    std::vector<int64_t> out;
    out.reserve(requests_.size());
    for (const Request& r : requests_) out.push_back(r.submit_ns);
    return out;
  }

  // results: a sequence with one entry per request, in request order.
  void resolve(const py::sequence& results) {
    if (requests_.empty()) return;  // already failed (e.g. by a shutdown)
    const size_t n = requests_.size();
    if (static_cast<size_t>(py::len(results)) != n)
      throw std::invalid_argument("resolve: expected " + std::to_string(n) +
                                  " results, got " +
                                  std::to_string(py::len(results)));
    std::vector<py::object> held;  // keep every result alive while settling
    held.reserve(n);
    for (size_t i = 0; i < n; ++i) held.push_back(results[i]);
    if (requests_.size() != n) return;  // failed while results were read
    settle(take_all(), [&held](size_t i) { return held[i].ptr(); }, false);
  }

  void fail(const py::object& exc) {
    PyObject* outcome = exc.ptr();
    settle(take_all(), [outcome](size_t) { return outcome; }, true);
  }

  // Fails requests [i] for i in `indices` with `exc`, leaving the rest to a
  // later resolve() of the remaining ones (used for malformed inputs).
  void fail_some(const std::vector<size_t>& indices, const py::object& exc) {
    std::vector<bool> drop(requests_.size(), false);
    for (size_t i : indices) {
      if (i >= requests_.size()) throw std::out_of_range("fail_some: index");
      drop[i] = true;
    }
    std::vector<Request> kept, failed;
    for (size_t i = 0; i < requests_.size(); ++i)
      (drop[i] ? failed : kept).push_back(requests_[i]);
    requests_.swap(kept);
    PyObject* outcome = exc.ptr();
    settle(std::move(failed), [outcome](size_t) { return outcome; }, true);
  }

 private:
  std::vector<Request> take_all() {
    std::vector<Request> taken;
    taken.swap(requests_);
    return taken;
  }

  // GIL held. Ends each request of `requests` (owned by the caller, no
  // longer reachable from the batch) with outcome_of(i).
  template <typename OutcomeOf>
  static void settle(std::vector<Request> requests, OutcomeOf&& outcome_of,
                     bool is_error) {
    std::vector<Completion*> to_wake;
    to_wake.reserve(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      batchserve::settle(requests[i], outcome_of(i), is_error, to_wake);
      release_python_refs(requests[i]);
    }
    wake_and_release(to_wake);
  }

  std::vector<Request> requests_;
};

// The handle of one blocking request handed out by drain() (the transport
// protocol path): it quacks like the Future it replaces.
class Ticket {
 public:
  explicit Ticket(Completion* completion) : completion_(completion) {}
  Ticket(const Ticket&) = delete;
  Ticket& operator=(const Ticket&) = delete;
  ~Ticket() {
    if (completion_ != nullptr) {
      PyObject* err = new_runtime_error(
          "batchserve: a request was dropped before it was resolved");
      end(err, true);
      Py_DECREF(err);
    }
  }

  void set_result(const py::object& result) { end(result.ptr(), false); }
  void set_exception(const py::object& exc) { end(exc.ptr(), true); }
  bool done() const { return completion_ == nullptr; }

 private:
  void end(PyObject* outcome, bool is_error) {
    if (completion_ == nullptr) return;
    Completion* c = std::exchange(completion_, nullptr);
    Py_INCREF(outcome);
    if (!c->finish(outcome, is_error)) Py_DECREF(outcome);
    std::vector<Completion*> to_wake{c};
    wake_and_release(to_wake);
  }

  Completion* completion_;
};

class PyRequestQueue {
 public:
  explicit PyRequestQueue(size_t capacity) : queue_(capacity) {}

  // GIL held. Pushes `r`, waiting for room until `deadline` with the GIL
  // released, in slices so that a signal (Ctrl-C) is seen. Returns false
  // when a signal handler raised (the Python error is set).
  bool push_checking_signals(const Request& r, int64_t deadline, PushResult& result) {
    result = queue_.push(r, 0);  // first without giving up the GIL
    while (result == PushResult::kTimedOut && monotonic_ns() < deadline) {
      {
        py::gil_scoped_release nogil;
        result = queue_.push(r, std::min(deadline, monotonic_ns() + kSignalCheckNs));
      }
      if (result == PushResult::kTimedOut && PyErr_CheckSignals() != 0) return false;
    }
    return true;
  }

  // The blocking client call: enqueue, wait for the result with the GIL
  // released, return it or raise the server's exception.
  py::object call(const py::object& item, std::optional<double> timeout_s) {
    const int64_t deadline = deadline_from(timeout_s);
    auto* completion = new Completion();
    const Request request{item.ptr(), nullptr, completion, monotonic_ns()};
    Py_INCREF(item.ptr());
    PushResult pushed;
    if (!push_checking_signals(request, deadline, pushed) ||
        pushed != PushResult::kOk) {
      Py_DECREF(item.ptr());
      completion->release();
      completion->release();
      if (PyErr_Occurred()) throw py::error_already_set();
      if (pushed == PushResult::kClosed)
        throw QueueClosedError("the inference server is shut down");
      raise_timeout("no room in the request queue within the timeout");
    }
    for (;;) {
      bool done;
      int64_t now;
      {
        py::gil_scoped_release nogil;
        const int64_t slice = std::min(deadline, monotonic_ns() + kSignalCheckNs);
        done = completion->wait_until(slice, kCallerSpin);
        now = monotonic_ns();
      }
      if (done) break;
      const bool expired = now >= deadline;
      const bool interrupted = !expired && PyErr_CheckSignals() != 0;
      if (!expired && !interrupted) continue;
      const Completion::State left = completion->give_up();
      if (left == Completion::kDone) {
        if (!interrupted) break;  // the result won the race with the timeout
        // A signal (Ctrl-C) wins over a result that arrived meanwhile.
        Py_DECREF(static_cast<PyObject*>(completion->outcome()));
        completion->release();
        throw py::error_already_set();
      }
      completion->release();
      if (interrupted) throw py::error_already_set();
      raise_timeout(left == Completion::kWithdrawn
                        ? "no result within the timeout; the request was "
                          "withdrawn before it was batched"
                        : "no result within the timeout; the request was "
                          "already being served and its result is discarded");
    }
    PyObject* outcome = static_cast<PyObject*>(completion->outcome());
    const bool is_error = completion->is_error();
    completion->release();
    if (is_error) {
      set_error_from(outcome);
      Py_DECREF(outcome);
      throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(outcome);
  }

  // Enqueues a request resolved through `future` (a concurrent Future).
  // block=False raises QueueFull at once when the queue is full.
  void submit(const py::object& item, const py::object& future, bool block,
              std::optional<double> timeout_s) {
    const int64_t deadline = block ? deadline_from(timeout_s) : 0;
    const Request request{item.ptr(), future.ptr(), nullptr, monotonic_ns()};
    Py_INCREF(item.ptr());
    Py_INCREF(future.ptr());
    PushResult pushed;
    const bool uninterrupted = push_checking_signals(request, deadline, pushed);
    if (uninterrupted && pushed == PushResult::kOk) return;
    Py_DECREF(item.ptr());
    Py_DECREF(future.ptr());
    if (!uninterrupted) throw py::error_already_set();
    if (pushed == PushResult::kClosed)
      throw QueueClosedError("the inference server is shut down");
    throw QueueFullError("the request queue is full (capacity " +
                         std::to_string(queue_.capacity()) + ")");
  }

  // Transport protocol: up to max_items requests, without waiting.
  py::tuple drain(size_t max_items) {
    std::vector<Request> popped;
    std::vector<Request> unused;
    detail::take_ready(queue_, max_items, popped, unused);
    for (const Request& r : unused) discard(r);
    py::list items, handles, submitted_at;
    for (const Request& r : popped) {
      if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
        discard(r);  // cancelled by its caller
        continue;
      }
      items.append(py::reinterpret_steal<py::object>(static_cast<PyObject*>(r.payload)));
      if (r.completion != nullptr) {
        handles.append(py::cast(new Ticket(r.completion),
                                py::return_value_policy::take_ownership));
      } else {
        handles.append(py::reinterpret_steal<py::object>(static_cast<PyObject*>(r.future)));
      }
      submitted_at.append(static_cast<double>(r.submit_ns) * 1e-9);
    }
    return py::make_tuple(items, handles, submitted_at);
  }

  bool wait_for_work(double timeout_s) {
    py::gil_scoped_release nogil;
    return queue_.wait_for_work(deadline_after(timeout_s));
  }

  // The batching policy's settings; a server sleeping in collect() applies
  // them at once.
  void configure(size_t max_batch_size, size_t min_batch_size, double timeout_s) {
    BatchPolicy policy;
    policy.max_batch_size = max_batch_size;
    policy.min_batch_size = min_batch_size;
    policy.timeout_ns = seconds_to_ns(timeout_s);
    settings_.store(policy, queue_);
  }

  // The server's batch: the C++ batching policy, run without the GIL.
  std::unique_ptr<Batch> collect() {
    const size_t reserve =
        std::min(settings_.load().max_batch_size, queue_.capacity());
    std::vector<Request> batch;
    std::vector<Request> dropped;
    batch.reserve(reserve);
    {
      py::gil_scoped_release nogil;
      collect_batch(queue_, settings_, batch, dropped);
    }
    for (const Request& r : dropped) discard(r);
    size_t kept = 0;
    for (const Request& r : batch) {
      if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
        discard(r);
        continue;
      }
      batch[kept++] = r;
    }
    batch.resize(kept);
    if (batch.empty()) return nullptr;
    return std::make_unique<Batch>(std::move(batch));
  }

  // Ends every queued request with `exc`; returns how many.
  size_t fail_pending(const py::object& exc) {
    std::vector<Request> pending;
    size_t total = 0;
    std::vector<Completion*> to_wake;
    while (queue_.pop_many(pending, 1024) > 0) {
      for (const Request& r : pending) {
        if (r.future != nullptr && !claim_future(static_cast<PyObject*>(r.future))) {
          discard(r);
          continue;
        }
        settle(r, exc.ptr(), true, to_wake);
        release_python_refs(r);
        ++total;
      }
      pending.clear();
      wake_and_release(to_wake);
    }
    return total;
  }

  void close() {
    py::gil_scoped_release nogil;
    queue_.close();
  }
  void reopen() { queue_.reopen(); }
  bool closed() const { return queue_.closed(); }
  size_t size() const { return queue_.size(); }
  size_t capacity() const { return queue_.capacity(); }

 private:
  RequestQueue queue_;
  BatchSettings settings_;
};

}  // namespace
}  // namespace batchserve

PYBIND11_MODULE(_core, m) {
  using namespace batchserve;
  m.doc() = "batchserve's C++ core: request queue, batching policy, parking.";

  py::register_exception<QueueClosedError>(m, "ServerClosedError", PyExc_RuntimeError);
  py::register_exception<QueueFullError>(
      m, "QueueFull", py::module_::import("queue").attr("Full"));

  m.def("monotonic_ns", &monotonic_ns,
        "Nanoseconds on the clock the core stamps requests with "
        "(CLOCK_MONOTONIC, as time.monotonic_ns).");

  py::class_<Batch>(m, "Batch")
      .def_property_readonly("size", &Batch::size)
      .def("__len__", &Batch::size)
      .def_property_readonly("items", &Batch::items)
      .def_property_readonly("submitted_ns", &Batch::submitted_ns)
      .def("resolve", &Batch::resolve, py::arg("results"))
      .def("fail", &Batch::fail, py::arg("exc"))
      .def("fail_some", &Batch::fail_some, py::arg("indices"), py::arg("exc"));

  py::class_<Ticket>(m, "Ticket")
      .def("set_result", &Ticket::set_result, py::arg("result"))
      .def("set_exception", &Ticket::set_exception, py::arg("exc"))
      .def("done", &Ticket::done);

  py::class_<PyRequestQueue>(m, "RequestQueue")
      .def(py::init<size_t>(), py::arg("capacity"))
      .def("call", &PyRequestQueue::call, py::arg("item"),
           py::arg("timeout") = py::none())
      .def("submit", &PyRequestQueue::submit, py::arg("item"), py::arg("future"),
           py::arg("block") = true, py::arg("timeout") = py::none())
      .def("drain", &PyRequestQueue::drain, py::arg("max_items"))
      .def("wait_for_work", &PyRequestQueue::wait_for_work, py::arg("timeout"))
      .def("configure", &PyRequestQueue::configure, py::arg("max_batch_size"),
           py::arg("min_batch_size"), py::arg("timeout"))
      .def("collect", &PyRequestQueue::collect)
      .def("fail_pending", &PyRequestQueue::fail_pending, py::arg("exc"))
      .def("close", &PyRequestQueue::close)
      .def("reopen", &PyRequestQueue::reopen)
      .def_property_readonly("closed", &PyRequestQueue::closed)
      .def_property_readonly("capacity", &PyRequestQueue::capacity)
      .def("__len__", &PyRequestQueue::size);
}
