// The fast path's request schema on the Python side: the schema a
// transport set (FastSchema), a matched request's leaves (RequestRows: owned
// tensor references and their data pointers) and match_schema, the one place
// that decides whether a TensorDict takes the fast path.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "core/row_copy.h"
#include "python/pyutil.h"

namespace batchserve {
namespace bindings {

namespace py = pybind11;

// One fixed request schema: keys (a str, or a tuple of str for a nested key),
// each a CPU tensor of one dtype and shape. Immutable once made; requests
// refer to it by id.
struct FastSchema {
  uint64_t id = 0;
  bool strict = false;  // given by request_spec: a mismatch is the caller's error
  std::vector<py::object> keys;
  std::vector<py::object> dtypes;
  std::vector<py::object> shapes;  // torch.Size
  std::vector<size_t> leaf_bytes;
  py::object device;                     // the requests' TensorDict device (None or cpu)
  py::object batch_size;                 // torch.Size of a request; unset: []
  std::vector<py::object> general_keys;  // a request holding one takes the general path
  // Keys holding non-tensor metadata (tensordict.NonTensorData): carried
  // beside the rows (the request's own objects), not copied into staging.
  std::vector<py::object> extra_keys;
  // The entries (leaves and nested TensorDicts) of a request of this schema;
  // a request with other entries than the keys does not match (not strict).
  Py_ssize_t entries = 0;
  bool nested = false;  // a key is a tuple: entries are counted through nested dicts
};

// A fast request's leaves, in schema order: the data pointers the C++ core
// copies from (RowSource) and owned references to what holds those bytes
// (the caller's tensors, or a bytearray copy of them made at submission), so
// that a caller that replaces a key of its TensorDict cannot free memory the
// server is about to read.
struct RequestRows : RowSource {
  PyObject* tensors[kMaxLeaves] = {};
  // The request's non-tensor metadata (FastSchema::extra_keys order), as it
  // was when the request was submitted: a submit() caller may go on and
  // replace it in its TensorDict.
  PyObject* extras[kMaxLeaves] = {};
  size_t extra_count = 0;
};

// GIL held. Every RowSource of a Request is a RequestRows.
inline void free_rows(const RowSource* p) {
  const auto* rows = static_cast<const RequestRows*>(p);
  if (rows == nullptr) return;
  for (size_t j = 0; j < rows->count; ++j) Py_DECREF(rows->tensors[j]);
  for (size_t j = 0; j < rows->extra_count; ++j) Py_DECREF(rows->extras[j]);
  delete rows;
}

// GIL held. The tensors a fast request's leaves are read from (the
// caller's own, for a blocking call), in schema order.
inline py::tuple leaves_of(const RequestRows& rows) {
  py::tuple leaves(rows.count);
  for (size_t j = 0; j < rows.count; ++j)
    leaves[j] = py::reinterpret_borrow<py::object>(rows.tensors[j]);
  return leaves;
}

struct RowsDeleter {
  void operator()(RequestRows* rows) const { free_rows(rows); }
};
using OwnedRows = std::unique_ptr<RequestRows, RowsDeleter>;

// The fast path's leaf rules, the one place they are stated: match_schema
// applies them to each request, fast_path_schema to the request a schema is
// learned from, and set_schema to the dtypes of a schema.

// GIL held. Whether tensors of `dtype` are their bytes: not complex (a
// conjugated view shares unconjugated memory) and not quantized (scale and
// zero point live outside the bytes). Checked per schema: a request matches
// only the schema's dtypes.
inline bool plain_bytes_dtype(PyObject* dtype) {
  const TorchRefs& t = torch_refs();
  if (attr(dtype, t.s_is_complex).ptr() == Py_True) return false;
  const Py_ssize_t n = PyTuple_GET_SIZE(t.quantized_dtypes);
  for (Py_ssize_t i = 0; i < n; ++i)
    if (PyTuple_GET_ITEM(t.quantized_dtypes, i) == dtype) return false;
  return true;
}

// GIL held. Whether `v` is a lazily negated view (its bytes are the
// negation of its values), asked without releasing the GIL where torch
// allows (see TorchRefs::dispatch_keys).
inline bool negated_view(PyObject* v) {
  const TorchRefs& t = torch_refs();
  if (t.dispatch_keys == nullptr || t.negative_key == nullptr)
    return call_method(v, t.s_is_neg).ptr() == Py_True;
  PyObject* keys = PyObject_CallOneArg(t.dispatch_keys, v);
  if (keys == nullptr) throw py::error_already_set();
  py::object has =
      py::reinterpret_steal<py::object>(PyObject_CallMethodOneArg(keys, t.s_has, t.negative_key));
  Py_DECREF(keys);
  if (!has) throw py::error_already_set();
  return has.ptr() == Py_True;
}

// GIL held. Whether the tensor `v` is laid out as its rows' bytes: strided,
// contiguous, and not a lazily negated view.
inline bool plain_layout(PyObject* v) {
  const TorchRefs& t = torch_refs();
  return attr(v, t.s_layout).ptr() == t.strided &&
         call_method(v, t.s_is_contiguous).ptr() == Py_True && !negated_view(v);
}

// GIL held. Completes `rows` matched with RawBytes::kDeferred: each leaf's
// data pointer, or, when a leaf's bytes are not its values (see
// plain_layout), drops them (the request then takes the general path).
inline void settle_raw_bytes(OwnedRows& rows) {
  if (!rows) return;
  for (size_t j = 0; j < rows->count; ++j) {
    if (!plain_layout(rows->tensors[j])) {
      rows.reset();
      return;
    }
    rows->data[j] = data_ptr(rows->tensors[j]);
  }
}

// GIL held. Whether `leaves` (a TensorDict's dict of leaves) holds one of
// `general_keys`: such a request takes the general path.
inline bool holds_general_key(PyObject* leaves, const std::vector<py::object>& general_keys) {
  for (const py::object& key : general_keys) {
    const int has = PyDict_Contains(leaves, key.ptr());
    if (has < 0) throw py::error_already_set();
    if (has == 1) return true;
  }
  return false;
}

// GIL held. Whether `o`'s batch size is [], and whether `o` is an exact
// TensorDict of batch size [] (a request, or a sub-TensorDict of one, that
// the fast path can take).
inline bool empty_batch_size(PyObject* o) {
  const Py_ssize_t dims = PyObject_Length(attr(o, torch_refs().s_td_batch_size).ptr());
  if (dims < 0) PyErr_Clear();  // not a size: not a TensorDict the fast path takes
  return dims == 0;
}

inline bool unbatched_tensordict(PyObject* o) {
  return Py_TYPE(o) == reinterpret_cast<PyTypeObject*>(torch_refs().tensordict_type) &&
         empty_batch_size(o);
}

// What walk_leaves found: the leaves of a request in its dict order, nested
// keys as tuples, its non-tensor metadata keys, or why the fast path cannot
// take it.
struct RequestLeaves {
  std::vector<py::object> keys, dtypes, shapes;
  std::vector<py::object> extras;  // keys holding a NonTensorData
  std::string refusal;             // empty: every leaf meets the rules
};

// GIL held. Walks the leaves of `leaves` (a TensorDict's dict) under `prefix`
// into `out`, stopping at the first one that breaks the fast path's leaf
// rules (its reason goes into out.refusal).
inline void walk_leaves(PyObject* leaves, const py::tuple& prefix, RequestLeaves& out) {
  const TorchRefs& t = torch_refs();
  PyObject* key = nullptr;
  PyObject* v = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(leaves, &pos, &key, &v)) {
    py::object full = py::reinterpret_borrow<py::object>(key);
    if (PyTuple_GET_SIZE(prefix.ptr()) > 0)
      full = prefix + py::make_tuple(py::reinterpret_borrow<py::object>(key));
    auto name = [&full] { return repr(full.ptr()); };  // for a refusal only
    if (Py_TYPE(v) == reinterpret_cast<PyTypeObject*>(t.tensordict_type)) {
      if (!unbatched_tensordict(v)) {
        out.refusal = "nested TensorDict " + name() + " has a batch size";
        return;
      }
      py::object sub = attr(v, t.s_tensordict);
      if (!PyDict_Check(sub.ptr())) {
        out.refusal = "nested TensorDict " + name() + " is not a plain TensorDict";
        return;
      }
      if (PyDict_Size(sub.ptr()) == 0) {  // a schema counts entries on its keys' paths
        out.refusal = "nested TensorDict " + name() + " is empty";
        return;
      }
      walk_leaves(sub.ptr(), PyTuple_Check(full.ptr()) ? py::tuple(full) : py::make_tuple(full),
                  out);
      if (!out.refusal.empty()) return;
      continue;
    }
    if (Py_TYPE(v) == reinterpret_cast<PyTypeObject*>(t.non_tensor_type)) {
      if (out.extras.size() == RequestRows::kMaxLeaves) {
        out.refusal =
            "more than " + std::to_string(RequestRows::kMaxLeaves) + " non-tensor entries";
        return;
      }
      out.extras.push_back(full);
      continue;
    }
    if (Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(t.tensor_type)) {
      out.refusal = "key " + name() + " holds a " + repr(reinterpret_cast<PyObject*>(Py_TYPE(v))) +
                    ", not a torch.Tensor";
      return;
    }
    if (attr(v, t.s_is_cpu).ptr() != Py_True) {
      out.refusal = "key " + name() + " is not a CPU tensor";
      return;
    }
    if (!plain_layout(v)) {
      out.refusal = "key " + name() + " is not a contiguous strided tensor";
      return;
    }
    py::object dtype = attr(v, t.s_dtype);
    if (!plain_bytes_dtype(dtype.ptr())) {
      out.refusal = "key " + name() + " has dtype " + repr(dtype.ptr()) + " (complex or quantized)";
      return;
    }
    if (out.keys.size() == RequestRows::kMaxLeaves) {
      out.refusal = "more than " + std::to_string(RequestRows::kMaxLeaves) + " tensor leaves";
      return;
    }
    out.keys.push_back(full);
    out.dtypes.push_back(dtype);
    out.shapes.push_back(attr(v, t.s_shape));
  }
}

// GIL held. Why request `item` cannot take the fast path, or "" when it can
// (then `out` holds its leaves). The rules: an exact TensorDict of batch size
// [] (nested TensorDicts too), 1 to RowSource::kMaxLeaves leaves, each a CPU
// torch.Tensor of a plain-bytes dtype and plain layout, or non-tensor
// metadata (an exact NonTensorData), and none of `general_keys` at the top
// level. A request matches the schema learned from it (match_schema) exactly
// when it meets these rules.
inline std::string inspect_request(const py::object& item,
                                   const std::vector<py::object>& general_keys,
                                   RequestLeaves& out) {
  const TorchRefs& t = torch_refs();
  if (Py_TYPE(item.ptr()) != reinterpret_cast<PyTypeObject*>(t.tensordict_type))
    return "not a TensorDict but a " + repr(reinterpret_cast<PyObject*>(Py_TYPE(item.ptr())));
  if (!unbatched_tensordict(item.ptr())) return "a batched request (batch size not [])";
  py::object leaves = attr(item.ptr(), t.s_tensordict);
  if (!PyDict_Check(leaves.ptr())) return "not a plain TensorDict";
  if (holds_general_key(leaves.ptr(), general_keys)) return "holds a key the schema serves apart";
  walk_leaves(leaves.ptr(), py::tuple(), out);
  if (!out.refusal.empty()) return out.refusal;
  if (out.keys.empty()) return "no tensor leaves";
  return "";
}

// GIL held. The schema (keys, dtypes, shapes, device, extra keys) request
// `item` would take the fast path with, or None (see inspect_request).
inline py::object fast_path_schema(const py::object& item,
                                   const std::vector<py::object>& general_keys) {
  RequestLeaves found;
  if (!inspect_request(item, general_keys, found).empty()) return py::none();
  auto as_tuple = [](const std::vector<py::object>& v) {
    py::tuple out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = v[i];
    return out;
  };
  return py::make_tuple(as_tuple(found.keys), as_tuple(found.dtypes), as_tuple(found.shapes),
                        attr(item.ptr(), torch_refs().s_td_device), as_tuple(found.extras));
}

// GIL held. Why request `item` cannot take the fast path (None: it can).
inline py::object fast_path_refusal(const py::object& item) {
  RequestLeaves found;
  const std::string why = inspect_request(item, {}, found);
  if (why.empty()) return py::none();
  return py::str(why);
}

// GIL held. The entries of `leaves` (a TensorDict's dict), nested ones
// included, or -1 when a nested TensorDict is not one the fast path takes.
// A learned nested schema compares it with its own: a request with a leaf
// the schema lacks must not lose it on the fast path.
inline Py_ssize_t count_entries(PyObject* leaves) {
  const TorchRefs& t = torch_refs();
  Py_ssize_t n = PyDict_Size(leaves);
  PyObject* key = nullptr;
  PyObject* v = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(leaves, &pos, &key, &v)) {
    if (Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(t.tensordict_type)) continue;
    if (!unbatched_tensordict(v)) return -1;
    py::object sub = attr(v, t.s_tensordict);
    if (!PyDict_Check(sub.ptr())) return -1;
    const Py_ssize_t inner = count_entries(sub.ptr());
    if (inner < 0) return -1;
    n += inner;
  }
  return n;
}

// GIL held. Whether `item`'s batch size is the schema's ([] when unset).
inline bool same_batch_size(PyObject* item, const FastSchema& schema) {
  if (!schema.batch_size) return empty_batch_size(item);
  py::object batch_size = attr(item, torch_refs().s_td_batch_size);
  const int same = PyObject_RichCompareBool(batch_size.ptr(), schema.batch_size.ptr(), Py_EQ);
  if (same < 0) throw py::error_already_set();
  return same == 1;
}

// GIL held. Borrowed: the entry `key` of `leaves` (a TensorDict's dict of
// leaves), walking the dicts of exact nested TensorDicts for a tuple key;
// null when it is absent (no Python error set).
inline PyObject* lookup_leaf(PyObject* leaves, PyObject* key) {
  if (!PyTuple_Check(key)) {
    PyObject* v = PyDict_GetItemWithError(leaves, key);
    if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
    return v;
  }
  const TorchRefs& t = torch_refs();
  const Py_ssize_t depth = PyTuple_GET_SIZE(key);
  PyObject* v = nullptr;
  for (Py_ssize_t i = 0; i < depth; ++i) {
    if (i > 0) {
      if (Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(t.tensordict_type)) return nullptr;
      // The nested TensorDict holds its dict: borrowed stays valid with the GIL held.
      leaves = attr(v, t.s_tensordict).ptr();
      if (!PyDict_Check(leaves)) return nullptr;
    }
    v = PyDict_GetItemWithError(leaves, PyTuple_GET_ITEM(key, i));
    if (v == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return nullptr;
    }
  }
  return v;
}

// Whether match_schema checks that the leaves can be read as raw bytes
// (plain_layout) and takes their data pointers, as staging and a
// submission's copy need, or leaves that to settle_raw_bytes. An inline call
// defers it: its leaves go through torch ops, and the checks cost ~3 µs a
// call after a forward has cooled the caches (torch._C._dispatch_keys alone
// ~2 µs, and it slows the next forward about as much; measured on the 2-core
// VM). A declined inline call settles them before its batch of one.
enum class RawBytes { kChecked, kDeferred };

// GIL held. The request's leaves when `item` matches `schema`; null when it
// does not (it then takes the general path). Against a strict schema
// (request_spec=), a TensorDict with a missing key raises KeyError and one
// with a leaf of the wrong dtype, shape or device raises ValueError, naming
// the key; other differences (non-contiguous or negated-view leaves, a
// batched request, another TensorDict device, a key that asks for the general
// path such as torchrl's interaction type) fall back to the general path,
// which serves them correctly. With `own_copy` the leaves' bytes are copied
// (a submit() caller goes on and may resize or refill its tensors); a
// blocking caller's own tensors are read in place while it waits.
inline OwnedRows match_schema(PyObject* item, const FastSchema& schema, bool own_copy,
                              RawBytes raw_bytes = RawBytes::kChecked) {
  const TorchRefs& t = torch_refs();
  const bool checks_raw = raw_bytes == RawBytes::kChecked || own_copy;
  if (Py_TYPE(item) != reinterpret_cast<PyTypeObject*>(t.tensordict_type)) return nullptr;
  if (!same_batch_size(item, schema)) return nullptr;
  py::object leaves = attr(item, t.s_tensordict);
  if (!PyDict_Check(leaves.ptr())) return nullptr;
  const size_t n = schema.keys.size();
  if (n > RequestRows::kMaxLeaves) return nullptr;
  if (!schema.strict) {
    const Py_ssize_t entries =
        schema.nested ? count_entries(leaves.ptr()) : PyDict_Size(leaves.ptr());
    if (entries != schema.entries) return nullptr;
  }
  if (holds_general_key(leaves.ptr(), schema.general_keys)) return nullptr;
  {
    py::object device = attr(item, t.s_td_device);
    const int same = PyObject_RichCompareBool(device.ptr(), schema.device.ptr(), Py_EQ);
    if (same < 0) throw py::error_already_set();
    if (same == 0) return nullptr;
  }
  if (schema.extra_keys.size() > RequestRows::kMaxLeaves) return nullptr;
  PyObject* extras[RequestRows::kMaxLeaves];  // borrowed until all match
  for (size_t j = 0; j < schema.extra_keys.size(); ++j) {
    PyObject* v = lookup_leaf(leaves.ptr(), schema.extra_keys[j].ptr());  // borrowed
    if (v == nullptr || Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(t.non_tensor_type))
      return nullptr;
    extras[j] = v;
  }
  OwnedRows rows(new RequestRows());
  rows->schema_id = schema.id;
  PyObject* tensors[RequestRows::kMaxLeaves];  // borrowed until all match
  for (size_t j = 0; j < n; ++j) {
    PyObject* key = schema.keys[j].ptr();
    PyObject* v = lookup_leaf(leaves.ptr(), key);  // borrowed
    if (v == nullptr) {
      if (!schema.strict) return nullptr;
      PyErr_SetObject(
          PyExc_KeyError,
          py::str("request is missing key {!r} of request_spec").format(py::handle(key)).ptr());
      throw py::error_already_set();
    }
    if (Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(t.tensor_type)) {
      const int is_tensor = PyObject_IsInstance(v, t.tensor_type);
      if (is_tensor < 0) throw py::error_already_set();
      if (!schema.strict || is_tensor == 1) return nullptr;
      raise_spec_error(PyExc_ValueError, "request key " + repr(key) +
                                             " must be a tensor (request_spec); got " +
                                             repr(reinterpret_cast<PyObject*>(Py_TYPE(v))));
    }
    py::object dtype = attr(v, t.s_dtype);
    if (dtype.ptr() != schema.dtypes[j].ptr()) {
      if (!schema.strict) return nullptr;
      raise_spec_error(PyExc_ValueError, "request key " + repr(key) + " has dtype " +
                                             repr(dtype.ptr()) + "; request_spec declares " +
                                             repr(schema.dtypes[j].ptr()));
    }
    py::object shape = attr(v, t.s_shape);
    const int same_shape = PyObject_RichCompareBool(shape.ptr(), schema.shapes[j].ptr(), Py_EQ);
    if (same_shape < 0) throw py::error_already_set();
    if (same_shape == 0) {
      if (!schema.strict) return nullptr;
      raise_spec_error(PyExc_ValueError, "request key " + repr(key) + " has shape " +
                                             repr(shape.ptr()) + "; request_spec declares " +
                                             repr(schema.shapes[j].ptr()));
    }
    if (attr(v, t.s_is_cpu).ptr() != Py_True) {
      if (!schema.strict) return nullptr;
      raise_spec_error(PyExc_ValueError,
                       "request key " + repr(key) +
                           " is not on the CPU; requests matching request_spec carry CPU "
                           "tensors (the server moves the batch to its device)");
    }
    if (checks_raw && !plain_layout(v)) return nullptr;
    tensors[j] = v;
  }
  for (size_t j = 0; j < n; ++j) {
    PyObject* tensor = tensors[j];
    if (own_copy) {
      // The leaf's bytes, copied into a bytearray: no torch call, which
      // would release the GIL (tensor.clone() does) and, with many actor
      // threads, hand it to another thread and wait to get it back. (A
      // bytearray: a caller that claims its request reads it through
      // torch.frombuffer, which wants a writable buffer.)
      PyObject* copy = PyByteArray_FromStringAndSize(static_cast<const char*>(data_ptr(tensor)),
                                                     static_cast<Py_ssize_t>(schema.leaf_bytes[j]));
      if (copy == nullptr) throw py::error_already_set();
      rows->tensors[j] = copy;
      rows->data[j] = PyByteArray_AS_STRING(copy);
    } else {
      Py_INCREF(tensor);
      rows->tensors[j] = tensor;
      rows->data[j] = checks_raw ? data_ptr(tensor) : nullptr;
    }
    rows->count = j + 1;  // owned from here on, released with `rows`
  }
  for (size_t j = 0; j < schema.extra_keys.size(); ++j) {
    Py_INCREF(extras[j]);
    rows->extras[j] = extras[j];
    rows->extra_count = j + 1;  // owned from here on, released with `rows`
  }
  return rows;
}

}  // namespace bindings
}  // namespace batchserve
