// SlotClient (batchserve._core.SlotClient): the actor's end of a
// SharedMemoryTransport, over the core's SlotRequester (csrc/core/
// slot_client.h): a request matched to request_spec goes into a slot, and
// the slot's outcome comes back as plain data: its response leaves, or the
// server's exception as the bytes of Python's exception codec
// (batchserve.transports.exception_codec). Python makes the TensorDict or
// raises the decoded exception.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/shared_slots.h"
#include "core/sliced_wait.h"
#include "core/slot_client.h"
#include "python/pyutil.h"
#include "python/schema.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// The actor's end of a SharedMemoryTransport, in any process: it copies a
// request's leaves into a free slot, publishes it, and waits on the slot's
// futex for the server to write the result; all without the GIL (the
// protocol is SlotRequester's, csrc/core/slot_client.h). A client object
// may be used from several threads (each call takes its own slot).
class SlotClient {
 public:
  SlotClient(std::shared_ptr<SharedSlots> segment, std::vector<py::object> request_keys,
             std::vector<py::object> request_dtypes, std::vector<py::object> request_shapes,
             py::object request_device, std::vector<py::object> response_banks, bool copy_result,
             py::object normalise, py::object request_batch_size)
      : requester_(std::move(segment)),
        response_banks_(std::move(response_banks)),
        copy_result_(copy_result),
        normalise_(std::move(normalise)) {
    torch_refs();
    schema_.strict = true;
    schema_.keys = std::move(request_keys);
    schema_.dtypes = std::move(request_dtypes);
    schema_.shapes = std::move(request_shapes);
    schema_.device = std::move(request_device);
    // A batched request_spec: requests carry its batch size (leaf shapes
    // include the batch dims); None: batch size [].
    if (!request_batch_size.is_none()) schema_.batch_size = std::move(request_batch_size);
    if (schema_.keys.size() != slots().request_leaves() ||
        response_banks_.size() != slots().response_leaves())
      throw std::invalid_argument("SlotClient: keys do not match the segment's layout");
    if (schema_.keys.size() > RequestRows::kMaxLeaves)
      throw std::invalid_argument("SlotClient: at most " + std::to_string(RequestRows::kMaxLeaves) +
                                  " request leaves");
  }

  // The blocking call: submit, wait, return the outcome (see read_outcome).
  // On timeout the request is withdrawn if the server has not
  // taken it yet, else its result is discarded; ResultTimeout either way.
  py::object call(const py::object& item, std::optional<double> timeout_s) {
    const int64_t deadline = deadline_from(timeout_s);
    PendingSlot pending(requester_.shared_slots(), submit_until(item, deadline, true));
    return finish_wait(pending, deadline, false);
  }

  // Submits; the returned PendingSlot owns the slot (for a future). Blocks
  // while every slot is in flight, until `timeout` (ResultTimeout).
  std::unique_ptr<PendingSlot> submit(const py::object& item, std::optional<double> timeout_s) {
    return std::make_unique<PendingSlot>(requester_.shared_slots(),
                                         submit_until(item, deadline_from(timeout_s), false));
  }

  // The outcome of a submitted request (see read_outcome), or None when
  // `timeout` passes first:
  // the request then stays in flight (ask again), as torchrl's future does.
  py::object result(PendingSlot& pending, std::optional<double> timeout_s) {
    if (!pending.open) throw std::logic_error("SlotClient.result: this request was already read");
    return finish_wait(pending, deadline_from(timeout_s), true);
  }

  bool done(const PendingSlot& pending) const { return requester_.finished(pending); }

  // Withdraws a request the server has not taken yet (true). A request being
  // served or already answered stays as it is (false): its result can still
  // be read.
  bool cancel(PendingSlot& pending) { return requester_.cancel(pending); }

 private:
  SharedSlots& slots() const { return requester_.slots(); }

  // GIL held. The request's leaves, after the Python-side normaliser for
  // inputs the C++ matcher does not take as they are (a TensorDict subclass,
  // non-contiguous leaves, a TensorDict device): raises what it raises.
  OwnedRows match(const py::object& item, py::object& normalised) {
    OwnedRows rows = match_schema(item.ptr(), schema_, false);
    if (rows) return rows;
    normalised = normalise_(item);
    rows = match_schema(normalised.ptr(), schema_, false);
    if (!rows)
      raise_spec_error(PyExc_ValueError,
                       "request does not match request_spec: " + repr(normalised.ptr()));
    return rows;
  }

  // GIL held. A slot holding `item`, published to the server; with
  // `and_wait`, also waits for the result for up to one slice in the same
  // GIL-free stretch.
  uint32_t submit_until(const py::object& item, int64_t deadline, bool and_wait) {
    py::object normalised;
    OwnedRows rows = match(item, normalised);
    uint32_t s = 0;
    switch (requester_.claim(deadline, WithoutGil(), signalled, s)) {
      case SlotClaim::kOk:
        break;
      case SlotClaim::kClosed:
        raise_unservable(SlotOutcome::kClosed);
      case SlotClaim::kServerDead:
        raise_unservable(SlotOutcome::kServerDead);
      case SlotClaim::kNoFreeSlot:
        raise_result_timeout("no free slot within the timeout: all " +
                             std::to_string(slots().num_slots()) +
                             " slots hold requests in flight (num_slots)");
      case SlotClaim::kInterrupted:
        throw py::error_already_set();
    }
    SlotWait submitted;
    {
      std::optional<SlotWakeTurn> turn;  // left after the GIL is back (declared first)
      if (and_wait) turn.emplace(requester_.shared_slots(), s);
      GilRelease nogil;
      submitted = requester_.submit(s, *rows, and_wait ? slice_end(deadline) : 0);
    }
    if (submitted != SlotWait::kOk) throw QueueClosedError("the inference server is shut down");
    return s;
  }

  [[noreturn]] void raise_unservable(SlotOutcome why) const {
    if (why == SlotOutcome::kClosed) throw QueueClosedError("the inference server is shut down");
    throw QueueClosedError("the inference server process (pid " +
                           std::to_string(slots().server_pid()) +
                           ") is gone; no request can be served");
  }

  // GIL held. Waits for the outcome, reads it, frees the slot. With
  // `keep_on_timeout`, a timeout returns None and leaves the request in
  // flight; otherwise it raises ResultTimeout.
  py::object finish_wait(PendingSlot& pending, int64_t deadline, bool keep_on_timeout) {
    const SlotOutcome outcome =
        requester_.wait_for_outcome(pending, deadline, keep_on_timeout, WithoutGil(), signalled);
    switch (outcome) {
      case SlotOutcome::kReady:
        return read_outcome(pending.slot);
      case SlotOutcome::kInFlight:
        return py::none();
      case SlotOutcome::kWithdrawn:
      case SlotOutcome::kAbandoned:
        raise_result_timeout(timed_out_because(outcome == SlotOutcome::kWithdrawn));
      case SlotOutcome::kClosed:
      case SlotOutcome::kServerDead:
        raise_unservable(outcome);
      case SlotOutcome::kInterrupted:
        break;
    }
    throw py::error_already_set();
  }

  // GIL held. The finished slot's outcome, and frees it: a tuple of its
  // response leaves in response_spec's order (views of the response rows,
  // or copies with copy_result), or, for a failed request, the bytes of its
  // encoded exception.
  py::object read_outcome(uint32_t s) {
    struct Release {
      SharedSlots& slots;
      uint32_t s;
      ~Release() { slots.release(s); }
    } release{slots(), s};
    if (requester_.failed(s)) {
      const SlotError error = requester_.error(s);
      return py::bytes(reinterpret_cast<const char*>(error.encoded), error.encoded_len);
    }
    const TorchRefs& t = torch_refs();
    py::tuple leaves(response_banks_.size());
    py::int_ index(s);
    for (size_t j = 0; j < response_banks_.size(); ++j) {
      py::object view = response_banks_[j][index];
      leaves[j] = copy_result_ ? call_method(view.ptr(), t.s_clone) : std::move(view);
    }
    return std::move(leaves);
  }

  SlotRequester requester_;
  FastSchema schema_;
  std::vector<py::object> response_banks_;
  bool copy_result_;
  py::object normalise_;
};

}  // namespace bindings
}  // namespace batchserve
