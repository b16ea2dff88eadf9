"""The worker loop: what the server's background thread does from start()
to shutdown(). It sets weight sync up, then takes batches from the batch
source, runs the model on each (the fast path's staging rows with one
forward, the rest through ``collate_fn``), stamps the policy version, hands
results back and records statistics. On exit it fails what is still waiting.

The loop reads the server's public settings (model, collate_fn, devices,
``policy_version_key``, ``collect_stats``, ``max_batch_size``) at each batch:
they may change while it serves.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
from tensordict import TensorDict
from tensordict.base import TensorDictBase

from batchserve import _core
from batchserve.batching import native
from batchserve.batching.collate import (
    INTERACTION_TYPE_KEY,
    default_collate,
    forward_by_interaction,
    interaction_context,
    interaction_groups,
    stacks_requests,
)
from batchserve.batching.fast_path import FastPath
from batchserve.batching.lone_request import LoneRequests
from batchserve.config import set_thread_nice
from batchserve.server.lifecycle import (
    SHUTDOWN_MESSAGE,
    ServerRun,
    closed_error,
    finishing_workers,
    running_servers,
)

_log = logging.getLogger("batchserve")

# The switch torch.set_grad_enabled(mode) makes, without the instance of
# that class it builds per call: ~0.5 µs less per switch, two switches per
# inline call (measured with benchmarks/stage_breakdown.py --one-caller).
_set_grad_enabled = getattr(torch._C, "_set_grad_enabled", torch.set_grad_enabled)


class WorkerLoop:
    """The body of one server's worker thread.

    Args:
        server: the :class:`~batchserve.InferenceServer` served (its public
            settings are read per batch).
        transport: its transport, through the declared interface.
        batches: its batch source (``batchserve.batching.batch_source``).
        versions: its policy version and model lock.
        stats: its statistics.
        weight_sync: its :class:`~batchserve.weights.schemes.WeightSyncBinding`.
        graphs: its :class:`~batchserve.server.static_batches.StaticBatches`
            (``static_batch_size``), run in place of the model once captured.
    """

    def __init__(self, server, transport, batches, versions, stats, weight_sync, graphs=None):
        self._server = server
        self._transport = transport
        self._batches = batches
        self._versions = versions
        self._stats = stats
        self._weight_sync = weight_sync
        self._graphs = graphs
        self._fast: FastPath | None = None
        self._fast_off = ""  # why this run has no fast path (stats' refusals)
        self._inline = False  # whether this run serves inline calls (see serve_inline)
        self._lone: LoneRequests | None = None  # the schema serve_one serves
        self._inline_thread: int | None = None  # the thread serving one now, if any

    def start(self, setup_timeout: float | None) -> tuple[ServerRun, threading.Thread]:
        """Starts a run: records it on the transport, opens the batch source
        and starts the worker thread, then waits up to ``setup_timeout`` for
        its set-up (its nice value, weight sync).

        Raises:
            RuntimeError: the set-up failed by then (nothing is left running).
            what the transport raised refusing the start (a closed RayTransport).
        """
        server = self._server
        # The fast path, for a batchserve transport and a collation that only
        # stacks (the settings may have changed since the last run).
        self._fast = None
        if self._transport.request_queue is None:
            served = getattr(self._transport, "inner", self._transport)  # a ForeignTransport's
            self._fast_off = (
                f"transport {type(served).__name__} has no batchserve request queue "
                "(batchserve's ThreadingTransport and SharedMemoryTransport have one)"
            )
        elif not stacks_requests(server.collate_fn):
            name = getattr(server.collate_fn, "__qualname__", type(server.collate_fn).__name__)
            self._fast_off = (
                f"collate_fn {name} is not a stacking collate (the fast path stacks the "
                "requests itself: leave collate_fn unset or pass a stack)"
            )
        else:
            self._fast = FastPath(self._transport, server.device, server.output_device)
        self._inline = (
            self._fast is not None and server.inline_calls and self._graphs is None
            and (server.device is None or server.device.type == "cpu")
        )
        run = ServerRun()
        previous_run = self._transport.serve_with(run)
        try:
            self._batches.open()
        except BaseException:
            self._transport.serve_with(previous_run)
            raise
        worker = threading.Thread(
            target=self.main, args=(run,), daemon=True, name="batchserve-worker"
        )
        worker.start()
        run.prepared.wait()  # worker_nice applied or refused: start() raises the refusal
        run.ready.wait(setup_timeout)
        with run.lock:
            run.start_returned = True
            startup_error = run.startup_error
        if startup_error is not None:
            worker.join()
            # Served by no run of ours: shutdown() then fails what waits.
            self._transport.serve_with(previous_run)
            raise RuntimeError(
                f"InferenceServer failed to start: {run.startup_step} raised {startup_error!r}"
            ) from startup_error
        return run, worker

    def stop(self, run: ServerRun | None, worker: threading.Thread | None,
             last_run: ServerRun | None, timeout: float | None) -> None:
        """Stops ``run`` (None: already stopped; ``last_run`` is the latest
        one) and its ``worker``: closes the batch source unless a later server
        took the transport over, waits up to ``timeout`` for the worker, fails
        what is still waiting and, past the timeout, the batch in flight."""
        if run is not None:
            run.stop.set()
        # A server started on the transport since then keeps it open.
        serves = self._transport.is_served_by(run or last_run)
        if serves:
            self._batches.close()
        elif run is not None and self._transport.request_queue is not None:
            # The queue stays open (it is the later server's, settings
            # included): only wake our worker from its idle wait, so that
            # it sees its stop now.
            self._transport.request_queue.interrupt()
        # Called from the model (on the worker, or on a caller serving
        # itself inline, whom the worker waits for): its forward goes on and
        # hands back its results after this returns; the worker then stops.
        from_worker = (worker is threading.current_thread()
                       or self._inline_thread == threading.get_ident())
        if worker is not None and not from_worker:
            worker.join(timeout)
        still_running = worker is not None and worker.is_alive() and not from_worker
        error = _core.ServerClosedError(SHUTDOWN_MESSAGE)
        if serves:
            self._batches.fail_pending(error, worker_running=still_running)
        if still_running:
            finishing_workers.add(worker)
        # Read once: the worker clears it when its forward ends.
        inflight = run.inflight if still_running and run is not None else None
        if inflight is not None:
            _log.warning(
                "batchserve: the worker did not finish its forward within "
                "%s s; failing that batch's requests", timeout,
            )
            inflight.fail(error)

    def main(self, run: ServerRun) -> None:
        """The worker thread's target."""
        # A process that asked torch for one intra-op thread gets one here
        # too. OpenMP and MKL keep their thread counts per thread, and in a
        # new thread some kernels of the forward still forked a team of every
        # core, whose spinning worker took ~40% of the CPU of a 2-core
        # collector run whose main thread had set one. Larger counts
        # are left as they are: set explicitly in this thread, they make
        # MKL's element-wise kernels fork a team that a fresh thread does not
        # (measured: the policy workload's CPU per request up by half).
        if torch.get_num_threads() == 1:
            torch.set_num_threads(1)
        step = "worker_nice"
        try:
            try:
                nice = self._server.worker_nice
                if nice is not None:
                    set_thread_nice(nice)
            finally:
                run.prepared.set()
            step = "weight_sync set-up"
            self._weight_sync.set_up()
        except BaseException as exc:
            with run.lock:
                run.startup_error, run.startup_step = exc, step
                reported = not run.start_returned  # start() raises it
            run.ready.set()
            if not reported:
                _log.error("batchserve: %s failed: %r", step, exc)
                self._stop_serving(
                    run, closed_error(f"InferenceServer {step} failed: {exc!r}", exc)
                )
            return
        run.ready.set()
        error = _core.ServerClosedError(SHUTDOWN_MESSAGE)
        queue = self._transport.request_queue
        runners = _inline_runners(self, run) if self._inline else (None, None)
        if queue is not None:
            queue.attach_server()  # busy until its first idle wait (see InlineGate)
            # Ours, or none: an earlier server's must not serve our callers.
            queue.set_inline_runner(*runners)
        try:
            with torch.no_grad():
                error = self._serve(run) or error
        except BaseException as exc:  # the transport failed, or was interrupted
            _log.exception("batchserve: the worker stopped")
            error = closed_error(f"InferenceServer stopped: {exc!r}", exc)
        finally:
            if queue is not None:
                if runners[0] is not None:
                    queue.withdraw_inline_runner(runners[0])  # a later server's stays
                queue.detach_server()
            self._stop_serving(run, error)

    def _stop_serving(self, run: ServerRun, error: BaseException) -> None:
        """Worker exit: reject new requests, fail the waiting ones (unless
        another server has started on the transport meanwhile: an overdue
        worker must not close the queue under it)."""
        if self._transport.is_served_by(run):
            self._batches.close()
            self._batches.fail_pending(error, worker_running=False)
        running_servers.discard(self._server)

    def _serve(self, run: ServerRun) -> BaseException | None:
        """Serves until stopped; returns the error that the requests left
        waiting get when a BaseException from the model stopped it."""
        batches = self._batches
        while not self._stopping(run):
            if self._weight_sync.polled:
                batches.wake_resolved()  # applying new weights may take a while
            self._weight_sync.poll()
            batch = batches.next_batch()
            if batch is None:
                if batches.closed:
                    return None
                continue
            if run.stop.is_set():
                batch.fail(_core.ServerClosedError(SHUTDOWN_MESSAGE))
                return None
            run.inflight = batch
            try:
                self.serve_batch(batch)
            except Exception as exc:
                self._stats.record_failed_batch()
                batch.fail(exc)
            except BaseException as exc:
                # SystemExit, KeyboardInterrupt...: end this batch and stop
                # serving cleanly rather than leave callers waiting.
                error = closed_error(f"InferenceServer stopped: the model raised {exc!r}", exc)
                batch.fail(error)
                _log.error("batchserve: worker stopped by %r", exc)
                return error
            finally:
                run.inflight = None
        return None

    def _stopping(self, run: ServerRun) -> bool:
        """Whether ``run`` is told to stop: by shutdown(), or by the user's
        ``shutdown_event``."""
        user_stop = self._server._shutdown_event
        return run.stop.is_set() or (user_stop is not None and user_stop.is_set())

    def serve_inline(self, run: ServerRun, batch) -> None:
        """Serves an inline call: ``batch`` holds the one request of a caller
        that found the server idle and is served here, on the caller's
        thread, while the server waits (``csrc/core/inline_gate.h``). Ends
        the request in every case but a BaseException (KeyboardInterrupt...),
        which reaches the caller."""
        if self._stopping(run):
            batch.fail(_core.ServerClosedError(SHUTDOWN_MESSAGE))
            return
        # New weights are taken between batches, as the server takes them
        # (the server is out of its loop while it waits on the gate).
        self._weight_sync.poll()
        self._inline_thread = threading.get_ident()  # a shutdown from the model must not wait
        # torch.no_grad() as a context costs ~4 µs a call here (its class
        # machinery, on a path that runs once per call); torch's own switch
        # does the same in well under 1.
        grad = torch.is_grad_enabled()
        if grad:
            _set_grad_enabled(False)
        try:
            # No prefetch: no other request is waiting for this batch.
            self.serve_batch(batch, prefetch=False, inline=True)
        except Exception as exc:
            self._stats.record_failed_batch()
            batch.fail(exc)
        finally:
            if grad:
                _set_grad_enabled(True)
            self._inline_thread = None

    def serve_one(self, run: ServerRun, item, leaves: tuple, schema_id: int,
                  submitted_ns: int, copied: bool = False):
        """Serves an inline call without staging (see
        ``batchserve.batching.lone_request``): ``item`` is the caller's
        TensorDict, ``leaves`` its tensors in the order of schema
        ``schema_id``, which they matched at ``submitted_ns`` (``copied``:
        the bytes its submission copied of them instead). Returns the
        caller's result, or None to serve it as a batch of one
        (:meth:`serve_inline`). Raises what the caller gets instead: the
        model's error, a ServerClosedError once the server stops."""
        lone = self._lone
        if lone is None or lone.schema_id != schema_id:
            if self._transport.schema_id != schema_id:
                return None  # replaced since it matched: the batch path ungathers it
            lone = self._lone = LoneRequests(schema_id, self._transport.request_spec,
                                             self._transport.result_keys)
        if not lone.served:
            return None
        if copied:
            leaves = lone.copied_leaves(leaves)
        code = None
        if lone.stamp is not None:
            code = lone.interaction_code(leaves)
            if code is None:
                return None  # a stamp of several elements: they may mix types
        server = self._server
        if self._stopping(run):
            raise _core.ServerClosedError(SHUTDOWN_MESSAGE)
        # New weights between calls, as the server takes them between batches
        # (without weight sync there is nothing to poll: the call is skipped).
        if server.weight_sync is not None:
            self._weight_sync.poll()
        self._inline_thread = threading.get_ident()  # a shutdown from the model must not wait
        # The same steps around the call as serve_inline's, written out: a
        # shared wrapper (one more call and a closure) cost ~1 µs a call.
        grad = torch.is_grad_enabled()  # (see serve_inline)
        if grad:
            _set_grad_enabled(False)
        try:
            # A blocking caller's request is dispatched as it matched: it
            # waits in no queue (and a clock read is ~0.3 µs of the call); a
            # claimed one (copied) waited in the queue since its submission.
            dispatch_ns = _core.monotonic_ns() if copied else submitted_ns
            # The devices of this run's fast path (fixed at start(), as the
            # staged rows' are; inline calls were allowed for them).
            fast = self._fast
            model_input = lone.model_input(leaves, fast.device)
            versions = self._versions
            with versions.model_lock:  # (inline calls have no captured graphs)
                output = (server.model(model_input) if code is None
                          else forward_by_interaction(server.model, model_input, code)[0])
                self._check_output(output, 1)
                version = versions.value
            if fast.output_device is not None:
                output = output.to(fast.output_device)
            result = lone.result(output, leaves, server.policy_version_key, version)
            if server.collect_stats:
                self._stats.core.record_inline_call(submitted_ns, dispatch_ns)
            return result
        except Exception:
            self._stats.record_failed_batch()
            raise
        finally:
            if grad:
                _set_grad_enabled(True)
            self._inline_thread = None

    def serve_batch(self, batch, prefetch: bool = True, inline: bool = False) -> None:
        """Serves one collected batch: its fast-path rows with one forward
        over staging memory (gathering the next batch meanwhile if
        ``prefetch``), the rest (if any) through ``collate_fn``. ``inline``:
        a lone caller's request, served on its own thread."""
        dispatch_ns = _core.monotonic_ns()
        fast = self._fast
        had_rows = False
        if fast is not None:
            buffer = fast.gather(batch, self._server.max_batch_size)
            if buffer is not None:
                had_rows = True
                try:
                    self._serve_rows(batch, buffer, dispatch_ns, prefetch, inline)
                except Exception as exc:
                    self._stats.record_failed_batch()
                    batch.fail_rows(exc)
        # General-path requests remain; read once: a shutdown past its
        # timeout may fail the batch meanwhile, and then there are none.
        items = self._batches.items_of(batch) if len(batch) else []
        if items:
            if had_rows:
                self._batches.wake_resolved()  # the fast rows' callers need not wait for them
            if self._server.collect_stats:
                self._stats.record_refusals(
                    [fast.refusal(item) for item in items] if fast is not None
                    else [self._fast_off] * len(items)
                )
            if fast is not None:
                fast.learn(items, had_rows)
            self._serve_items(batch, items, dispatch_ns)

    def _policy(self):
        """What a forward calls: the captured graphs of a static batch size
        (until a weight update drops them), else the model."""
        graphs = self._graphs
        return graphs if graphs is not None and graphs.captured else self._server.model

    @staticmethod
    def _check_output(output, n: int) -> None:
        if type(output) is TensorDict:  # the usual output, without the ABC's isinstance (~1 µs)
            size = output.batch_size
            if size and size[0] == n:
                return
        if not isinstance(output, TensorDictBase):
            raise TypeError(
                f"The model returned {type(output).__name__}; expected a "
                f"TensorDict with batch size [{n}]."
            )
        if output.batch_dims == 0 or output.batch_size[0] != n:
            raise RuntimeError(
                f"The model returned batch size {list(output.batch_size)} for "
                f"a batch of {n} requests; expected a leading dimension of {n}."
            )

    def _serve_rows(self, batch, buffer, dispatch_ns: int, prefetch: bool, inline: bool) -> None:
        """The fast path: the model runs on the staging rows, callers get
        their rows back (see ``batchserve.batching.fast_path``)."""
        server = self._server
        n = batch.rows
        fast = self._fast
        with self._versions.model_lock:
            model_input = fast.model_input(buffer, n, batch)
            codes = buffer.interaction_codes(n)  # the rows' stamps (None: unstamped)
            if prefetch:
                fast.prefetch()  # the next batch is gathered while the model runs
            output, forwards = forward_by_interaction(self._policy(), model_input, codes)
            self._check_output(output, n)
            version = self._versions.value
        stats = self._stats.core if server.collect_stats else None
        if stats is not None:  # before the hand-back: a caller with its result sees it counted
            if len(forwards) > 1:  # counted as the general path counts it: a batch per forward
                self._stats.record_interaction_split()
            batch.record_rows(stats, dispatch_ns, forwards, inline)
        fast.hand_back(batch, output, n, buffer, server.policy_version_key, version)
        if stats is not None:
            batch.record_rows_hand_back(stats)

    def _serve_items(self, batch, items: list, dispatch_ns: int) -> None:
        """The general path: ``collate_fn``, the model, ``unbind``."""
        server = self._server
        if server.collate_fn is default_collate:
            malformed = [
                i for i, item in enumerate(items) if not isinstance(item, TensorDictBase)
            ]
            if malformed:
                kinds = sorted({type(items[i]).__name__ for i in malformed})
                batch.fail_some(
                    malformed,
                    TypeError(
                        "InferenceServer expects each request to be a TensorDict; "
                        f"got {', '.join(kinds)}."
                    ),
                )
                items = self._batches.items_of(batch)
                if not items:
                    return
        split = interaction_groups(items)
        if split is not None:
            mixed = split[1]
            if mixed:
                batch.fail_some(
                    mixed,
                    RuntimeError(
                        "InferenceServer received a request whose rows mix "
                        f"interaction types ({INTERACTION_TYPE_KEY!r}); stamp "
                        "one interaction type per request."
                    ),
                )
                items = self._batches.items_of(batch)
                if not items:
                    return
                split = interaction_groups(items)
        submitted_ns = batch.submitted_ns
        if split is None:
            results = self._forward(items, submitted_ns, dispatch_ns).unbind(0)
        else:
            # One forward per interaction type (pytorch/rl #4312); every
            # caller gets its row of its own group's output.
            self._stats.record_interaction_split()
            results = [None] * len(items)
            for indices in split[0]:
                output = self._forward(
                    [items[i] for i in indices],
                    [submitted_ns[i] for i in indices] if submitted_ns else [],
                    dispatch_ns,
                )
                for i, result in zip(indices, output.unbind(0)):
                    results[i] = result
        # Read before resolving, which hands the requests out; a torchrl
        # transport's batch knows no callers.
        callers = getattr(batch, "callers", ()) if server.collect_stats else ()
        batch.resolve(results)
        if server.collect_stats:
            self._stats.record_hand_back(submitted_ns or (), callers, _core.monotonic_ns())

    def _forward(self, items: list, submitted_ns, dispatch_ns: int):
        """``collate_fn``, the model (under the requests' interaction type)
        and the version stamp, for requests that share an interaction type."""
        server = self._server
        n = len(items)
        collated = server.collate_fn(items)
        if server.device is not None:
            collated = collated.to(server.device)
        with self._versions.model_lock:
            context, collated = interaction_context(collated)
            with context:
                output = self._policy()(collated)
            self._check_output(output, n)
            if server.output_device is not None:
                output = output.to(server.output_device)
            if server.policy_version_key is not None:
                output.set(
                    server.policy_version_key,
                    torch.full(
                        output.batch_size,
                        self._versions.value,
                        dtype=torch.long,
                        device=output.device or server.output_device or server.device,
                    ),
                )
        if server.collect_stats:  # before the hand-back: a caller with its result sees it counted
            self._stats.record_batch(n, (_core.monotonic_ns() - dispatch_ns) * 1e-6,
                                     submitted_ns or (), dispatch_ns)
        return output


def _inline_runners(loop: WorkerLoop, run: ServerRun):
    """The queue's inline runners for ``run`` (``RequestQueue.set_inline_runner``):
    ``serve_one`` through ``loop``, and the runner of what it declines, which
    serves a ``_core.Batch`` of one. They hold the loop strongly (a closure
    over a weak reference cost ~0.5 µs an inline call): the worker thread
    withdraws them from the queue when it ends, unless a later server's
    replaced them, and until then that thread holds the loop anyway, so the
    queue never keeps a server alive that would otherwise be freed."""

    def run_inline(core_batch) -> None:
        loop.serve_inline(run, native.NativeBatch(core_batch))

    return run_inline, functools.partial(loop.serve_one, run)
