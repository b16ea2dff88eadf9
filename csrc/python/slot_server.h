// The server process's end of a SharedMemoryTransport on the Python side:
// the intake its request queue takes slots from, a slot's request as views
// of its rows (general path: Python makes the TensorDict), and results and
// exceptions written into slots (the byte layout is
// csrc/core/slot_responses.h's; exceptions are encoded by Python's
// batchserve.transports.exception_codec).
#pragma once

#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/shared_slots.h"
#include "core/slot_intake.h"
#include "core/slot_responses.h"
#include "python/pyutil.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// GIL held. `value` as a contiguous CPU tensor of `dtype` (converted when it
// is not), checked to hold `rows` rows of `shape` (rows < 0: exactly
// `shape`). Raises ValueError naming `key` otherwise.
inline py::object slot_leaf(PyObject* value, const py::object& key, const py::object& dtype,
                            const py::object& shape, Py_ssize_t rows) {
  const TorchRefs& t = torch_refs();
  const int is_tensor = PyObject_IsInstance(value, t.tensor_type);
  if (is_tensor < 0) throw py::error_already_set();
  if (is_tensor == 0)
    raise_spec_error(PyExc_ValueError, "response key " + repr(key.ptr()) +
                                           " must be a tensor (response_spec); got " +
                                           repr(reinterpret_cast<PyObject*>(Py_TYPE(value))));
  py::object v = py::reinterpret_borrow<py::object>(value);
  if (attr(v.ptr(), t.s_is_cpu).ptr() != Py_True || attr(v.ptr(), t.s_dtype).ptr() != dtype.ptr() ||
      call_method(v.ptr(), t.s_is_contiguous).ptr() != Py_True) {
    v = v.attr("to")(py::arg("device") = "cpu", py::arg("dtype") = dtype).attr("contiguous")();
  }
  py::object got = attr(v.ptr(), t.s_shape);
  py::object want = shape;
  if (rows >= 0) {
    if (PyObject_Length(got.ptr()) < 1 ||
        PyLong_AsSsize_t(PyTuple_GET_ITEM(got.ptr(), 0)) != rows) {
      PyErr_Clear();
      raise_spec_error(PyExc_ValueError, "model output key " + repr(key.ptr()) + " has shape " +
                                             repr(got.ptr()) + " for a batch of " +
                                             std::to_string(rows) + " requests");
    }
    got = py::reinterpret_steal<py::object>(PySequence_GetSlice(got.ptr(), 1, PY_SSIZE_T_MAX));
    if (!got) throw py::error_already_set();
  }
  const int same = PyObject_RichCompareBool(got.ptr(), want.ptr(), Py_EQ);
  if (same < 0) throw py::error_already_set();
  if (same == 0)
    raise_spec_error(PyExc_ValueError,
                     "response key " + repr(key.ptr()) + " has shape " + repr(got.ptr()) +
                         " per request; response_spec declares " + repr(want.ptr()));
  return v;
}

// The server process's end of a SharedMemoryTransport: the intake its
// RequestQueue takes slots from, plus what turns a slot into Python objects
// (its request leaves, for the general path) and results and exceptions into
// slot bytes. `encode_error(exc, limit)` is the Python codec: it returns
// the exception as at most `limit` bytes.
class SlotServer final : public SlotIntake, public std::enable_shared_from_this<SlotServer> {
 public:
  SlotServer(std::shared_ptr<SharedSlots> slots, uint64_t schema_id,
             std::vector<py::object> request_banks, std::vector<py::object> response_keys,
             std::vector<py::object> response_dtypes, std::vector<py::object> response_shapes,
             py::object encode_error)
      : SlotIntake(slots, schema_id),
        request_banks_(std::move(request_banks)),
        response_keys_(std::move(response_keys)),
        response_dtypes_(std::move(response_dtypes)),
        response_shapes_(std::move(response_shapes)),
        encode_error_(std::move(encode_error)) {
    if (request_banks_.size() != slots->request_leaves() ||
        response_keys_.size() != slots->response_leaves() ||
        response_dtypes_.size() != response_keys_.size() ||
        response_shapes_.size() != response_keys_.size())
      throw std::invalid_argument("SlotServer: keys do not match the segment's layout");
  }

  // GIL held. The request in slot `s`: a tuple of views of its rows, one
  // per request leaf in request_spec's order.
  py::object item(uint32_t s) const {
    py::tuple leaves(request_banks_.size());
    py::int_ index(s);
    for (size_t j = 0; j < request_banks_.size(); ++j) leaves[j] = request_banks_[j][index];
    return std::move(leaves);
  }

  // GIL held. Writes `outcome` into slot `s` and ends it (kDone, or kFailed
  // with its exception, or the error of writing it). True when its client
  // waits for it (wake it).
  bool settle(uint32_t s, PyObject* outcome, bool is_error) {
    if (!is_error) {
      try {
        write_result(s, outcome);
      } catch (py::error_already_set& e) {
        write_error(s, e.value().ptr());
        is_error = true;
      }
    } else {
      write_error(s, outcome);
    }
    return slots().finish(s, is_error);
  }

  // The output columns the response rows take, matched to response_spec
  // by key (output keys it does not declare are dropped), each as a
  // contiguous CPU tensor of the declared dtype holding `n` rows. Raises
  // when a declared key is missing or its column does not fit.
  std::vector<py::object> response_columns(const std::vector<py::object>& keys,
                                           const std::vector<py::object>& columns, Py_ssize_t n) {
    std::vector<py::object> held;
    for (size_t j = 0; j < response_keys_.size(); ++j) {
      const py::object* column = nullptr;
      for (size_t k = 0; k < keys.size() && column == nullptr; ++k) {
        const int same = PyObject_RichCompareBool(keys[k].ptr(), response_keys_[j].ptr(), Py_EQ);
        if (same < 0) throw py::error_already_set();
        if (same == 1) column = &columns[k];
      }
      if (column == nullptr) {
        PyErr_SetObject(PyExc_KeyError,
                        py::str("the model output has no key {!r} (declared by response_spec)")
                            .format(response_keys_[j])
                            .ptr());
        throw py::error_already_set();
      }
      held.push_back(
          slot_leaf(column->ptr(), response_keys_[j], response_dtypes_[j], response_shapes_[j], n));
    }
    return held;
  }

  // The fast path's hand-back, for requests the caller has taken out of
  // their batch (so no shutdown can end them meanwhile): row i of each
  // response column goes to the response rows of slots[i], then each
  // request ends (kDone) and its client is woken; all without the GIL.
  void scatter(const std::vector<uint32_t>& slots_of_rows,
               const std::vector<py::object>& response_columns) {
    std::vector<const uint8_t*> source;
    for (const py::object& column : response_columns)
      source.push_back(static_cast<const uint8_t*>(data_ptr(column.ptr())));
    GilRelease nogil;  // the caller's `response_columns` keep the columns alive
    scatter_responses(slots(), slots_of_rows, source);
  }

 private:
  void write_result(uint32_t s, PyObject* result) {
    SharedSlots& sh = slots();
    for (size_t j = 0; j < response_keys_.size(); ++j) {
      py::object value = py::reinterpret_steal<py::object>(
          PyObject_CallMethod(result, "get", "O", response_keys_[j].ptr()));
      if (!value) throw py::error_already_set();
      py::object leaf =
          slot_leaf(value.ptr(), response_keys_[j], response_dtypes_[j], response_shapes_[j], -1);
      write_response_leaf(sh, s, j, data_ptr(leaf.ptr()));
    }
  }

  // The exception as the Python codec encodes it, bounded by the error
  // area. A codec that fails leaves the area empty: the client then raises
  // a RuntimeError saying the exception could not be encoded.
  void write_error(uint32_t s, PyObject* exc) {
    py::object blob = py::reinterpret_steal<py::object>(PyObject_CallFunction(
        encode_error_.ptr(), "On", exc, static_cast<Py_ssize_t>(slots().error_bytes())));
    if (!blob || !PyBytes_Check(blob.ptr())) {
      PyErr_Clear();
      batchserve::write_error(slots(), s, nullptr, 0);
      return;
    }
    batchserve::write_error(slots(), s, PyBytes_AS_STRING(blob.ptr()),
                            static_cast<size_t>(PyBytes_GET_SIZE(blob.ptr())));
  }

  std::vector<py::object> request_banks_;
  std::vector<py::object> response_keys_, response_dtypes_, response_shapes_;
  py::object encode_error_;
};

inline SlotServer& slot_server(const Request& r) { return *static_cast<SlotServer*>(r.intake); }

// The SlotServer a request from slots came from, kept alive by who holds this.
inline std::shared_ptr<SlotServer> keep_slot_server(const Request& r) {
  return r.intake == nullptr
             ? nullptr
             : std::static_pointer_cast<SlotServer>(slot_server(r).shared_from_this());
}

}  // namespace bindings
}  // namespace batchserve
