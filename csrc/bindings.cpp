// batchserve._core: the module definition only. The core (csrc/core/) has
// no Python in it; csrc/python/ is the one marshalling layer between the
// two, and this file binds its classes.
//
// Ownership across the C++ boundary: a Request's `payload` is an owned
// reference (PyObject*, incref'd when the request is made) released, with
// the GIL held, by whoever ends the request: a Batch or Ticket when it is
// resolved, or collect()/fail_pending() for requests that were withdrawn or
// rejected. A Completion's outcome is an owned reference handed from the
// server to the caller; a watched QueuedFuture is handed to Python to notify
// (python/batchserve/batching/native.py). Every wait runs with the GIL
// released.
//
// The fast path (requests of one fixed schema): the caller matches its
// TensorDict against the schema and the request carries its leaves
// (RequestRows: owned tensor references and their data pointers). The server
// copies them into staging columns (Batch::gather, csrc/core/row_copy.h)
// without creating any Python object per request, runs the model on the
// batch, and resolves each request with its row of the output (built in
// Python: Batch::resolve_rows_with; a slot's row is copied into its slot:
// Batch::scatter_rows).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/futex.h"
#include "core/server_stats.h"
#include "core/shared_slots.h"
#include "core/slot_echo.h"
#include "core/weight_banks.h"
#include "python/batch.h"
#include "python/pyutil.h"
#include "python/request_queue.h"
#include "python/slot_client.h"
#include "python/slot_server.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  using namespace batchserve;
  using namespace batchserve::bindings;
  m.doc() = "batchserve's C++ core: request queue, batching policy, parking.";

  py::register_exception<QueueClosedError>(m, "ServerClosedError", PyExc_RuntimeError);
  py::register_exception<QueueFullError>(m, "QueueFull", py::module_::import("queue").attr("Full"));

  {
    py::tuple bases =
        py::make_tuple(py::handle(PyExc_TimeoutError), py::module_::import("queue").attr("Empty"));
    g_result_timeout = PyErr_NewExceptionWithDoc(
        "batchserve._core.ResultTimeout",
        "A SharedMemoryTransport request ran out of time: a TimeoutError, and the "
        "queue.Empty torchrl's shared-memory client raises.",
        bases.ptr(), nullptr);
    if (g_result_timeout == nullptr) throw py::error_already_set();
    m.add_object("ResultTimeout", py::handle(g_result_timeout));
  }

  m.attr("MAX_LEAVES") = py::int_(RowSource::kMaxLeaves);
  m.attr("SLOT_ERROR_BYTES") = py::int_(kSlotErrorBytes);
  m.attr("MAX_SLOT_LEAVES") = py::int_(kMaxSlotLeaves);

  m.def("fast_path_schema", &fast_path_schema, py::arg("td"),
        py::arg("general_keys") = std::vector<py::object>{},
        "The (keys, dtypes, shapes, device, extra_keys) request `td` would take the fast path "
        "with, or None (the rules RequestQueue.set_schema's matcher applies).");
  m.def("fast_path_refusal", &fast_path_refusal, py::arg("td"),
        "Why request `td` cannot take the fast path under those rules (a sentence), "
        "or None when it can.");

  m.def("monotonic_ns", &monotonic_ns,
        "Nanoseconds on the clock the core stamps requests with "
        "(CLOCK_MONOTONIC, as time.monotonic_ns).");

  py::class_<Batch>(m, "Batch")
      .def_property_readonly("size", &Batch::size)
      .def("__len__", &Batch::size)
      .def_property_readonly("rows", &Batch::rows)
      .def_property_readonly("items", &Batch::items)
      .def_property_readonly("submitted_ns", &Batch::submitted_ns)
      .def_property_readonly("rows_extras", &Batch::rows_extras)
      .def_property_readonly("callers", &Batch::callers)
      .def("gather", &Batch::gather, py::arg("schema_id"), py::arg("columns"),
           py::arg("leaf_bytes"), py::arg("capacity"))
      .def("resolve", &Batch::resolve, py::arg("results"))
      .def_property_readonly("rows_in_slots", &Batch::rows_in_slots)
      .def("scatter_rows", &Batch::scatter_rows, py::arg("keys"), py::arg("columns"))
      .def("resolve_rows_with", &Batch::resolve_rows_with, py::arg("results"))
      .def("ungather", &Batch::ungather)
      .def_property_readonly("prefetched_into", &Batch::prefetched_into)
      .def("fail", &Batch::fail, py::arg("exc"))
      .def("fail_rows", &Batch::fail_rows, py::arg("exc"))
      .def("fail_some", &Batch::fail_some, py::arg("indices"), py::arg("exc"))
      .def("record_rows", &Batch::record_rows, py::arg("stats"), py::arg("dispatch_ns"),
           py::arg("forward_sizes"), py::arg("inline_call"))
      .def("record_rows_hand_back", &Batch::record_rows_hand_back, py::arg("stats"));

  py::class_<ServerStatsSnapshot>(m, "ServerStatsSnapshot")
      .def_readonly("requests", &ServerStatsSnapshot::requests)
      .def_readonly("fast_path_requests", &ServerStatsSnapshot::fast_path_requests)
      .def_readonly("inline_requests", &ServerStatsSnapshot::inline_requests)
      .def_readonly("batches", &ServerStatsSnapshot::batches)
      .def_readonly("batch_sizes", &ServerStatsSnapshot::batch_sizes)
      .def_readonly("queue_ms", &ServerStatsSnapshot::queue_ms)
      .def_readonly("forward_ms", &ServerStatsSnapshot::forward_ms)
      .def_readonly("server_ms", &ServerStatsSnapshot::server_ms)
      .def_readonly("client_gap_ms", &ServerStatsSnapshot::client_gap_ms);

  py::class_<ServerStatsCore>(m, "ServerStatsCore")
      .def(py::init<size_t>(), py::arg("window"))
      .def("record_batch", &ServerStatsCore::record_batch, py::arg("forward_sizes"),
           py::arg("forward_ms"), py::arg("fast_path"), py::arg("inline_call"),
           py::arg("submit_ns"), py::arg("dispatch_ns"))
      .def("record_hand_back", &ServerStatsCore::record_hand_back, py::arg("submit_ns"),
           py::arg("callers"), py::arg("end_ns"))
      .def(
          "record_inline_call",
          [](ServerStatsCore& stats, int64_t submit_ns, int64_t dispatch_ns) {
            stats.record_one(submit_ns, dispatch_ns, monotonic_ns(), bindings::this_caller());
          },
          py::arg("submit_ns"), py::arg("dispatch_ns"),
          "A lone caller's fast-path request served on its own thread (the calling "
          "thread, its caller), dispatched at dispatch_ns and ended now.")
      .def("snapshot", &ServerStatsCore::snapshot, py::arg("reset") = false)
      .def("reset", &ServerStatsCore::reset);

  py::class_<Ticket>(m, "Ticket")
      .def("set_result", &Ticket::set_result, py::arg("result"))
      .def("set_exception", &Ticket::set_exception, py::arg("exc"))
      .def("done", &Ticket::done);

  bindings::add_pending_result_type(m);

  py::class_<bindings::RequestQueue>(m, "RequestQueue")
      .def(py::init<size_t, bool>(), py::arg("capacity"), py::arg("single_file") = false)
      .def_property_readonly("single_file", &bindings::RequestQueue::single_file)
      .def("call", &bindings::RequestQueue::call, py::arg("item"), py::arg("timeout") = py::none())
      .def_property_readonly(
          "blocking_call",
          [](const py::object& self) {
            return bindings::blocking_call_of<bindings::RequestQueue,
                                              &bindings::RequestQueue::call>(self);
          },
          "call(item, timeout=None) with positional arguments only, entered without "
          "pybind11's dispatcher (a new callable on each read: read it once)")
      .def(
          "submit_pending",
          [](bindings::RequestQueue& queue, const py::object& item, bool block,
             std::optional<double> timeout_s) {
            return bindings::wrap_pending(queue.submit_pending(item, block, timeout_s));
          },
          py::arg("item"), py::arg("block") = true, py::arg("timeout") = py::none())
      .def("drain", &bindings::RequestQueue::drain, py::arg("max_items"))
      .def("wait_for_work", &bindings::RequestQueue::wait_for_work, py::arg("timeout"))
      .def("configure", &bindings::RequestQueue::configure, py::arg("max_batch_size"),
           py::arg("min_batch_size"), py::arg("timeout"), py::arg("idle_wait") = py::none())
      .def("collect", &bindings::RequestQueue::collect)
      .def("wake_resolved", &bindings::RequestQueue::wake_resolved)
      .def("prefetch", &bindings::RequestQueue::prefetch, py::arg("schema_id"), py::arg("columns"),
           py::arg("leaf_bytes"), py::arg("capacity"))
      .def("set_schema", &bindings::RequestQueue::set_schema, py::arg("keys"), py::arg("dtypes"),
           py::arg("shapes"), py::arg("leaf_bytes"), py::arg("strict") = false,
           py::arg("device") = py::none(), py::arg("general_keys") = std::vector<py::object>{},
           py::arg("extra_keys") = std::vector<py::object>{})
      .def_property_readonly("schema_strict", &bindings::RequestQueue::schema_strict)
      .def_property_readonly("server_spin_ns", &bindings::RequestQueue::server_spin_ns)
      .def("set_inline_runner", &bindings::RequestQueue::set_inline_runner, py::arg("runner"),
           py::arg("serve_one") = py::none())
      .def_property_readonly("inline_runner_set", &bindings::RequestQueue::inline_runner_set)
      .def("withdraw_inline_runner", &bindings::RequestQueue::withdraw_inline_runner,
           py::arg("runner"))
      .def("interrupt", &bindings::RequestQueue::interrupt)
      .def("attach_server", &bindings::RequestQueue::attach_server)
      .def("detach_server", &bindings::RequestQueue::detach_server)

      .def("attach_slots", &bindings::RequestQueue::attach_slots, py::arg("slots"))
      .def_property_readonly("reaped_slots", &bindings::RequestQueue::reaped_slots)
      .def("fail_pending", &bindings::RequestQueue::fail_pending, py::arg("exc"))
      .def("close", &bindings::RequestQueue::close)
      .def("reopen", &bindings::RequestQueue::reopen)
      .def_property_readonly("closed", &bindings::RequestQueue::closed)
      .def_property_readonly("capacity", &bindings::RequestQueue::capacity)
      .def("__len__", &bindings::RequestQueue::size);

  py::class_<SharedSlots, std::shared_ptr<SharedSlots>>(m, "SharedSlots", py::buffer_protocol())
      .def_static(
          "create",
          [](const std::string& name, uint32_t num_slots, std::vector<size_t> request_leaf_bytes,
             std::vector<size_t> response_leaf_bytes, size_t error_bytes, uint64_t fingerprint,
             bool single_file) {
            SlotLayout layout;
            layout.num_slots = num_slots;
            layout.request_leaf_bytes = std::move(request_leaf_bytes);
            layout.response_leaf_bytes = std::move(response_leaf_bytes);
            layout.error_bytes = error_bytes;
            layout.fingerprint = fingerprint;
            layout.single_file = single_file;
            return SharedSlots::create(name, layout);
          },
          py::arg("name"), py::arg("num_slots"), py::arg("request_leaf_bytes"),
          py::arg("response_leaf_bytes"), py::arg("error_bytes"), py::arg("fingerprint"),
          py::arg("single_file") = false)
      .def_static("attach", &SharedSlots::attach, py::arg("name"), py::arg("fingerprint"))
      .def_buffer([](SharedSlots& s) {
        return py::buffer_info(s.base(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.size())}, {1});
      })
      .def("unlink", &SharedSlots::unlink)
      .def_property_readonly("name", &SharedSlots::name)
      .def_property_readonly("size", &SharedSlots::size)
      .def_property_readonly("num_slots", &SharedSlots::num_slots)
      .def_property_readonly("single_file", &SharedSlots::single_file)
      .def("request_offset", &SharedSlots::request_offset, py::arg("leaf"))
      .def("response_offset", &SharedSlots::response_offset, py::arg("leaf"))
      .def_property_readonly("closed", &SharedSlots::closed)
      .def_property_readonly("server_pid", &SharedSlots::server_pid)
      .def_property_readonly("server_dead", &SharedSlots::server_dead)
      .def_property_readonly("owned_slots", &SharedSlots::owned_slots)
      .def_property_readonly("ready_count", &SharedSlots::ready_count);

  // The benchmark harness's server that costs nothing for process actors
  // (csrc/core/slot_echo.h); `response_rows`: one bytes object per response leaf.
  py::class_<SlotEcho>(m, "SlotEcho")
      .def(py::init([](std::shared_ptr<SharedSlots> segment, const std::vector<py::bytes>& rows) {
             std::vector<std::vector<uint8_t>> response_rows;
             for (const py::bytes& row : rows) {
               const std::string data = row;
               response_rows.emplace_back(data.begin(), data.end());
             }
             return std::make_unique<SlotEcho>(std::move(segment), std::move(response_rows));
           }),
           py::arg("segment"), py::arg("response_rows"))
      .def("start", &SlotEcho::start)
      .def("stop", &SlotEcho::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("answered", &SlotEcho::answered);

  py::class_<SlotServer, std::shared_ptr<SlotServer>>(m, "SlotServer")
      .def(py::init<std::shared_ptr<SharedSlots>, uint64_t, std::vector<py::object>,
                    std::vector<py::object>, std::vector<py::object>, std::vector<py::object>,
                    py::object>(),
           py::arg("segment"), py::arg("schema_id"), py::arg("request_banks"),
           py::arg("response_keys"), py::arg("response_dtypes"), py::arg("response_shapes"),
           py::arg("encode_error"));

  py::class_<SlotClient>(m, "SlotClient")
      .def(py::init<std::shared_ptr<SharedSlots>, std::vector<py::object>, std::vector<py::object>,
                    std::vector<py::object>, py::object, std::vector<py::object>, bool, py::object,
                    py::object>(),
           py::arg("segment"), py::arg("request_keys"), py::arg("request_dtypes"),
           py::arg("request_shapes"), py::arg("request_device"), py::arg("response_banks"),
           py::arg("copy_result"), py::arg("normalise"), py::arg("request_batch_size") = py::none())
      .def("call", &SlotClient::call, py::arg("item"), py::arg("timeout") = py::none())
      .def("submit", &SlotClient::submit, py::arg("item"), py::arg("timeout") = py::none())
      .def("result", &SlotClient::result, py::arg("pending"), py::arg("timeout") = py::none())
      .def("done", &SlotClient::done, py::arg("pending"))
      .def("cancel", &SlotClient::cancel, py::arg("pending"));

  // Weight banks (csrc/weight_banks.h): the shared-memory segment that
  // WeightPublisher and SharedMemoryWeightReceiver (python/batchserve/
  // _weight_banks.py) share. The tensor copies in and out are torch's.
  static py::exception<WeightLayoutMismatch> layout_mismatch(m, "WeightLayoutMismatch",
                                                             PyExc_ValueError);
  py::register_exception<WeightRoleHeld>(m, "WeightRoleHeld", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const WeightLayoutMismatch& e) {  // args: (message, the segment's layout text)
      PyErr_SetObject(layout_mismatch.ptr(), py::make_tuple(e.what(), e.existing_layout).ptr());
    }
  });
  py::enum_<WeightRole>(m, "WeightRole")
      .value("publisher", WeightRole::kPublisher)
      .value("receiver", WeightRole::kReceiver);
  py::class_<WeightBanks, std::shared_ptr<WeightBanks>>(m, "WeightBanks", py::buffer_protocol())
      .def_static(
          "open",
          [](const std::string& name, const std::string& layout, uint64_t bank_bytes,
             WeightRole role, double timeout) {
            GilRelease released;  // may wait for a creator to finish setting it up
            return WeightBanks::open(name, layout, bank_bytes, role, timeout);
          },
          py::arg("name"), py::arg("layout"), py::arg("bank_bytes"), py::arg("role"),
          py::arg("timeout") = 5.0)
      .def_buffer([](WeightBanks& b) {
        return py::buffer_info(b.base(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1});
      })
      .def("back", &WeightBanks::back)
      .def("publish", &WeightBanks::publish, py::arg("version"))
      .def("acquire", &WeightBanks::acquire)
      .def("newest", &WeightBanks::newest)
      .def(
          "wait_for_publication",
          [](WeightBanks& b, uint64_t seen, std::optional<double> timeout) {
            GilRelease released;
            return b.wait_for_publication(seen, timeout ? *timeout : -1.0);
          },
          py::arg("seen"), py::arg("timeout") = py::none())
      .def("bank_publication", &WeightBanks::bank_publication, py::arg("bank"))
      .def("bank_version", &WeightBanks::bank_version, py::arg("bank"))
      .def("bank_offset", &WeightBanks::bank_offset, py::arg("bank"))
      .def("role_held_elsewhere", &WeightBanks::role_held_elsewhere, py::arg("role"))
      .def("release", &WeightBanks::release)
      .def_property_readonly("bank_bytes", &WeightBanks::bank_bytes)
      .def_property_readonly("published", &WeightBanks::published)
      .def_property_readonly("last_version", &WeightBanks::last_version)
      .def_property_readonly("name", &WeightBanks::name)
      .def_property_readonly("size", &WeightBanks::size);

  py::class_<PendingSlot>(m, "PendingSlot")
      .def_readonly("slot", &PendingSlot::slot)
      .def_readonly("open", &PendingSlot::open);
}
