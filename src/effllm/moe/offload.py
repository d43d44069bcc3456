"""``offload_experts(model, ...)``: keep a bounded set of a MoE model's experts resident.

How it plugs in: transformers v5 experts modules dispatch their forward through
``ExpertsInterface`` by ``config._experts_implementation``. effllm registers one entry,
``"effllm_offload"``, the first time ``offload_experts`` runs (never at import), and points the
offloaded model's configs at it; ``remove()`` points them back. The entry reads the state kept on
each experts module (``_effllm_offload``), so only offloaded instances are affected.

What happens in an offloaded layer: the fused expert parameters hold no data (their tensors are
in the store: CPU memory, or a safetensors file read one expert at a time). The layer's needed
experts come from the cache or are loaded on demand, stacked in ascending expert order into a
compact table, and the model's own experts implementation (eager, grouped_mm, ...) runs on that
table with the routes renumbered. Per expert and token the arithmetic is the same as the
resident model's, so outputs are equal.

The bound: at most ``cache_experts`` experts are cached, per layer (``scope="per_layer"``) or in
all (``scope="global"``). A forward whose layer needs more distinct experts than that (a long
prefill) loads the rest for that layer only and drops them after it (``overflow_loads``).
Resident expert bytes stay within the bound plus the layer's overflow plus one prefetch in
flight (``peak_resident_bytes``); the compact table is a further, transient copy of the layer's
active experts, not counted there.

Prefetch: a background thread loads predicted experts while the current layer computes;
on-demand loads pre-empt queued prefetches (a queued prefetch of a needed expert is taken over
by the demand load; stale ones for a layer already reached are dropped). Predictors:
``"cross_layer_gate"`` applies the next layers' routers to the current router input (layer 0 of
the next step falls back to frequency); ``"trace_match"`` matches the routes so far against past
tokens (``TraceMatchPredictor``). Predictions are made in the loader thread too, before any
queued load: the router hook only hands over a copy of the router input (or the routes), and a
layer waits for a prediction only if the one aimed at it is not made yet. A loader exception is
raised in the forward that needs it, or the next one; waits are bounded.
"""

from __future__ import annotations

import collections
import itertools
import queue as queue_module
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .policies import make_policy
from .predictors import FrequencyPredictor, TraceMatchPredictor
from .store import CpuStore, DiskStore, ExpertStore, direct_io_unsupported, slab
from .traces import moe_blocks

IMPLEMENTATION = "effllm_offload"
_WAIT_S = 0.05  # poll period while waiting for the loader: how fast a dead loader is noticed
_registered = False
_register_lock = threading.Lock()


def _ensure_registered() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            from transformers.integrations.moe import ExpertsInterface

            ExpertsInterface.register(IMPLEMENTATION, _offloaded_experts_forward)
            _registered = True


def _offloaded_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    state = self.__dict__.get("_effllm_offload")
    if state is None:
        raise RuntimeError(f"{type(self).__name__}: config selects the {IMPLEMENTATION!r} experts implementation but "
                           f"this module was not offloaded by effllm.moe.offload_experts")
    return state.handle._forward(state, self, hidden_states, top_k_index, top_k_weights)


class _CompactExperts:
    """The experts module seen through a table of only the needed experts."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor], num_experts: int):
        self.__dict__["_module"] = module
        self.__dict__.update(tensors)
        self.__dict__["num_experts"] = num_experts

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


@dataclass
class _Layer:
    column: int
    index: int  # the decoder layer's index in the model
    path: str  # the experts module's name in the model, for messages
    experts: nn.Module
    router: nn.Module
    num_experts: int
    implementation: object  # the function the model used for this experts module
    previous_impl_config: list = field(default_factory=list)


class _State:
    __slots__ = ("handle", "column")

    def __init__(self, handle, column):
        self.handle = handle
        self.column = column


class _Job:
    __slots__ = ("key", "started", "done")

    def __init__(self, key):
        self.key = key
        self.started = False
        self.done = threading.Event()


class _Request:
    """A prediction to make in the loader thread: at forward event ``source`` (the layer call about
    to run), from that layer's router input or routes."""

    __slots__ = ("column", "done", "router_input", "routes", "source")

    def __init__(self, source, column, router_input, routes):
        self.source = source
        self.column = column
        self.router_input = router_input
        self.routes = routes
        self.done = threading.Event()


class _Entry:
    __slots__ = ("event", "prefetched", "slot", "tensors")

    def __init__(self, tensors, prefetched, event=None, slot=None):
        self.tensors = tensors
        self.prefetched = prefetched
        self.event = event  # CUDA event the copy was recorded on (side-stream prefetches)
        self.slot = slot  # index in the cache's slab, when the cache has one


class OffloadHandle:
    """What ``offload_experts`` returns: ``stats()``, ``remove()``; a context manager too."""

    def __reduce_ex__(self, protocol):
        # Reached by copy.deepcopy / pickle of the offloaded model: a loader thread, locks and an
        # open expert file cannot be copied, so say what to do instead of a bare lock error.
        raise TypeError("effllm.moe: a model with offloaded experts cannot be copied or pickled; call "
                        "remove() (or unpatch) first, copy or save the model, then offload the copy")

    def __deepcopy__(self, memo):
        self.__reduce_ex__(None)

    def __init__(self, model, layers, store, params, cache_experts, scope, policy, prefetch, lookahead, device,
                 top_k, own_path):
        self.model = model
        self.layers: list[_Layer] = layers
        self.store: ExpertStore = store
        self.params = params  # per column: {name: Parameter}, data emptied while offloaded
        self.capacity = cache_experts
        self.scope = scope
        self.policy_name = policy
        self.prefetch = prefetch
        self.lookahead = lookahead
        self.device = device
        self.top_k = top_k
        # closes the store (and deletes a temporary expert file) on remove() or when the handle is freed
        self._finalizer = weakref.finalize(self, _close_store, store, own_path)
        n_caches = len(layers) if scope == "per_layer" else 1
        self._caches: list[dict] = [{} for _ in range(n_caches)]
        self._policies = [make_policy(policy, num_layers=len(layers)) for _ in range(n_caches)]
        # Slabs (CPU only): per cache, one [cache_experts, ...] tensor per parameter; a cached expert
        # is a slot, so a layer's compact table can be the slab itself (no copy; see _table).
        self._slabs: list[tuple[torch.Tensor, ...] | None] = [None] * n_caches
        self._free: list[list[int]] = [[] for _ in range(n_caches)]
        self._reserved = [0] * n_caches  # room taken by on-demand loads in progress
        self._lock = threading.RLock()
        self._queue: collections.deque[_Job] = collections.deque()
        self._pending: dict[tuple[int, int], _Job] = {}
        # predictions run in the loader thread, off the forward's path: requests in order, and the
        # one in progress; the forward waits only for those that target the layer it is about to run
        # A SimpleQueue: put() never blocks, so the forward never waits on a lock that the loader
        # holds (and may be descheduled with, on a loaded machine); the loader blocks in get().
        self._requests: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._last_requests: tuple = (None, None)  # the forward's two latest requests (older, newer)
        self._event = 0  # experts-layer calls so far: the forward event a prediction targets
        # False: a prediction whose layer has started is skipped (the forward never waits for the
        # predictor). Tests set True to make the prediction counts deterministic: the forward then
        # waits for a prediction aimed at its layer that is not made yet.
        self._await_predictions = False
        self._cached_count = 0
        self._protected: set = set()
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._hooks: list = []
        self._removed = False
        self._resident = 0
        self._predicted: dict[int, set] = {}  # per forward event: the experts predicted for it
        self.reset_stats()
        self._frequency = FrequencyPredictor(len(layers), max(layer.num_experts for layer in layers))
        self._matcher = None
        self._side_stream = None

    # -- public ---------------------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero the counters (the cache keeps its contents); peaks restart from what is resident now."""
        with self._lock:
            self._predicted.clear()
            cached = sum(len(c) for c in self._caches)
            self._stats = dict(hits=0, misses=0, prefetch_hits=0, prefetches=0, wasted_prefetches=0,
                               cancelled_prefetches=0, overflow_loads=0, loads=0, bytes_moved=0, stall_s=0.0,
                               predictor_s=0.0, predictor_cpu_s=0.0, predictor_wait_s=0.0, late_predictions=0, predictor_forward_s=0.0, predicted=0, predicted_used=0, used_after_prediction=0,
                               peak_resident_bytes=self._resident, peak_cached_experts=cached)
            self._layer_stats = [[0, 0, 0] for _ in self.layers]  # hits, prefetch hits, misses per MoE layer

    def stats(self) -> dict:
        """Counts since offloading: hits, misses, prefetch hits, wasted prefetches, bytes moved, seconds
        the forward waited on loads, peak resident expert bytes; and the bound.

        Predictor time: predictions run in the loader thread. ``predictor_s`` / ``predictor_cpu_s``:
        wall / CPU seconds spent making them there; ``predictor_forward_s``: seconds the forward
        spent on prediction (handing requests over, plus ``predictor_wait_s`` waiting for a
        prediction its layer needed that was not made yet)."""
        with self._lock:
            out = dict(self._stats)
            accesses = out["hits"] + out["misses"] + out["prefetch_hits"]
            out["accesses"] = accesses
            out["hit_rate"] = (out["hits"] + out["prefetch_hits"]) / accesses if accesses else 0.0
            # prediction quality, independent of whether the load arrived in time
            out["prediction_precision"] = out["predicted_used"] / out["predicted"] if out["predicted"] else 0.0
            out["prediction_recall"] = (out["predicted_used"] / out["used_after_prediction"]
                                        if out["used_after_prediction"] else 0.0)
            # per MoE layer (model layer index, hit rate): early layers are the hard ones to prefetch
            out["per_layer_hit_rate"] = [(layer.index, (h + p) / (h + p + m) if h + p + m else 0.0)
                                         for layer, (h, p, m) in zip(self.layers, self._layer_stats)]
            out["cached_experts"] = sum(len(c) for c in self._caches)
            out["cache_bound_experts"] = self.capacity * len(self._caches)
            out["cache_bound_bytes"] = self.capacity * (max(self.store.expert_bytes) if self.scope == "global" else
                                                        sum(self.store.expert_bytes))
            # besides the experts: direct reads into slots that are not aligned go through a buffer
            # per reading thread (0 when every read lands in its slot)
            out["read_buffer_bytes"] = self.store.buffer_bytes()
            return out

    def remove(self) -> None:
        """Restore the model exactly: parameters, experts implementation, hooks; stop the loader."""
        if self._removed:
            return
        self._stop_loader()
        # Read every layer's experts before changing anything: a failed read (a disk error)
        # leaves the model offloaded and working, and remove() can be called again.
        restored = [self.store.load_all(layer.column) for layer in self.layers]
        self._removed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for layer, params, fused in zip(self.layers, self.params, restored):
            for name, tensor in zip(self.store.names, fused):
                param = params[name]
                param.data = tensor.to(device=param.device, dtype=param.dtype) if tensor.device != param.device \
                    else tensor
            layer.experts.__dict__.pop("_effllm_offload", None)
            for cfg, value in layer.previous_impl_config:
                cfg._experts_implementation_internal = value
        for cache in self._caches:
            cache.clear()
        self._cached_count = 0
        self._slabs = [None] * len(self._slabs)
        self._finalizer()

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"OffloadHandle(layers={len(self.layers)}, cache_experts={self.capacity} {self.scope}, "
                f"policy={self.policy_name!r}, store={type(self.store).__name__}, prefetch={self.prefetch!r})")

    # -- cache ----------------------------------------------------------------------------------------------------

    def _cache_of(self, column):
        i = column if self.scope == "per_layer" else 0
        return self._caches[i], self._policies[i]

    def _cache_index(self, column) -> int:
        return column if self.scope == "per_layer" else 0

    def _make_slabs(self, shapes: list[tuple[tuple, torch.dtype]]) -> None:
        """Give each cache a slab when the experts it holds all have one shape and dtype (CPU only:
        on CUDA the side-stream copies keep their own tensors)."""
        if self.device.type != "cpu":
            return
        for i in range(len(self._caches)):
            columns = [i] if self.scope == "per_layer" else range(len(self.layers))
            kinds = {shapes[c] for c in columns}
            if len(kinds) != 1:
                continue
            (kind,) = kinds
            # torch.empty: pages become resident only as slots are filled, so memory follows the cache.
            # One slot more than the bound: the prefetch in flight (one loader thread) reads into it
            # before the cache makes room, as it does without slabs.
            slots = self.capacity + 1
            self._slabs[i] = tuple(slab(slots, shape, dtype, self.store.slot_alignment) for shape, dtype in kind)
            self._free[i] = list(range(slots - 1, -1, -1))

    def _bytes(self, column) -> int:
        return self.store.expert_bytes[column]

    def _account(self, delta: int) -> None:
        self._resident += delta
        if self._resident > self._stats["peak_resident_bytes"]:
            self._stats["peak_resident_bytes"] = self._resident

    def _make_room(self, i: int) -> bool:
        """Evict by the policy until cache ``i`` has room for one more (lock held); False when
        everything cached is protected."""
        cache, policy = self._caches[i], self._policies[i]
        while len(cache) + self._reserved[i] >= self.capacity:
            candidates = [k for k in cache if k not in self._protected]
            if not candidates:
                return False
            victim = policy.victim(candidates)
            gone = cache.pop(victim)
            self._cached_count -= 1
            if gone.prefetched:
                self._stats["wasted_prefetches"] += 1
            policy.evicted(victim)
            self._account(-self._bytes(victim[0]))
            if gone.slot is not None:
                self._free[i].append(gone.slot)
        return True

    def _reserve(self, key, prefetch: bool = False):
        """The slot to load ``key`` into (lock held): -1 when the cache has no slab, None when there
        is none. An on-demand load makes room first (None: everything cached is protected, the load
        is transient, an overflow); a prefetch takes the spare slot and makes room when it lands."""
        i = self._cache_index(key[0])
        if not prefetch:
            if not self._make_room(i):
                return None
            self._reserved[i] += 1
        if self._slabs[i] is None:
            return -1
        if not self._free[i]:  # cannot happen with one loader thread; refuse rather than overrun
            if not prefetch:
                self._reserved[i] -= 1
            return None
        return self._free[i].pop()

    def _unreserve(self, key, slot, prefetch: bool = False) -> None:
        if slot is None:
            return
        i = self._cache_index(key[0])
        if not prefetch:
            self._reserved[i] -= 1
        if slot >= 0:
            self._free[i].append(slot)

    def _commit(self, key, tensors, prefetched, slot, event=None) -> bool:
        """Cache ``tensors`` under ``key`` in its slot (lock held). A prefetch makes room now; False
        (the load is dropped) when everything cached is protected."""
        i = self._cache_index(key[0])
        if prefetched:
            if not self._make_room(i):
                if slot >= 0:
                    self._free[i].append(slot)
                return False
        else:
            self._reserved[i] -= 1
        self._caches[i][key] = _Entry(tensors, prefetched, event, slot if slot >= 0 else None)
        self._policies[i].inserted(key, prefetched)
        self._cached_count += 1
        self._stats["peak_cached_experts"] = max(self._stats["peak_cached_experts"], self._cached_count)
        return True

    def _load(self, key, slot=None):
        """The expert's tensors, read into its slab slot when it has one (``slot >= 0``)."""
        if slot is not None and slot >= 0:
            slab = self._slabs[self._cache_index(key[0])]
            return self.store.load(*key, tuple(s[slot] for s in slab))
        tensors = self.store.load(*key)
        if self.device.type != "cpu":
            tensors = tuple(t.to(self.device, non_blocking=t.is_pinned()) for t in tensors)
        elif isinstance(self.store, CpuStore):
            tensors = tuple(t.clone() for t in tensors)  # the cache owns its copy, as on a device
        return tensors

    def _raise_loader_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("effllm.moe: the background expert loader failed") from error

    def _fetch(self, column: int, experts: list[int], slots: dict | None = None) -> list[tuple[torch.Tensor, ...]]:
        """The tensors of ``experts`` at ``column``, loading what is missing; blocks until resident.
        ``slots`` (optional) receives each expert's slab slot (None: not in a slab)."""
        event = self._event  # only the forward thread changes it
        if self.prefetch is not None and self._await_predictions:
            self._wait_for_predictions(event)
        with self._lock:  # from here on, predictions aimed at this layer are late
            self._event += 1
        start = time.perf_counter()
        keys = [(column, e) for e in experts]
        out: dict = {}
        slots = {} if slots is None else slots
        transient = 0
        try:
            with self._lock:
                self._raise_loader_error()
                self._protected.update(keys)
                predicted = self._predicted.pop(event, None)
                if predicted is not None:
                    self._stats["predicted"] += len(predicted)
                    self._stats["predicted_used"] += len(predicted.intersection(experts))
                    self._stats["used_after_prediction"] += len(experts)
                # stale prefetches for this layer: not started and not needed
                for job in list(self._queue):
                    if job.key[0] == column and job.key[1] not in experts:
                        self._drop_job(job)
            for key in keys:
                with self._lock:
                    cache, policy = self._cache_of(column)
                    entry = cache.get(key)
                    job = self._pending.get(key)
                    if entry is None and job is not None and not job.started:
                        self._drop_job(job)  # the demand load takes it over
                        job = None
                if entry is None and job is not None:
                    self._wait(job)
                    with self._lock:
                        entry = cache.get(key)
                with self._lock:
                    if entry is not None:
                        if entry.prefetched:
                            self._stats["prefetch_hits"] += 1
                            self._layer_stats[column][1] += 1
                            entry.prefetched = False
                        else:
                            self._stats["hits"] += 1
                            self._layer_stats[column][0] += 1
                        policy.accessed(key)
                        self._frequency.observe(column, [key[1]])
                        if entry.event is not None:  # copied on the side stream: order it before use
                            stream = torch.cuda.current_stream(self.device)
                            stream.wait_event(entry.event)
                            for t in entry.tensors:  # freed later on this stream, not the side one
                                t.record_stream(stream)
                            entry.event = None
                        out[key] = entry.tensors
                        slots[key[1]] = entry.slot
                        continue
                    slot = self._reserve(key)
                try:  # on demand, in the caller's thread: its errors reach the caller
                    tensors = self._load(key, slot)
                except BaseException:
                    with self._lock:
                        self._unreserve(key, slot)
                    raise
                with self._lock:
                    nbytes = self._bytes(column)
                    self._stats["misses"] += 1
                    self._layer_stats[column][2] += 1
                    self._stats["loads"] += 1
                    self._stats["bytes_moved"] += nbytes
                    self._account(nbytes)
                    if slot is not None:
                        self._commit(key, tensors, False, slot)
                        policy.accessed(key)
                    else:  # more experts in this layer than the cache holds: used once, then dropped
                        self._stats["overflow_loads"] += 1
                        transient += nbytes
                    self._frequency.observe(column, [key[1]])
                    out[key] = tensors
                    slots[key[1]] = slot if slot is not None and slot >= 0 else None
            return [out[k] for k in keys]
        finally:
            with self._lock:
                self._stats["stall_s"] += time.perf_counter() - start
                if transient:
                    self._account(-transient)

    def _release(self, column: int, experts: list[int]) -> None:
        with self._lock:
            self._protected.difference_update((column, e) for e in experts)

    # -- prefetch -------------------------------------------------------------------------------------------------

    def _drop_job(self, job: _Job) -> None:
        try:
            self._queue.remove(job)
        except ValueError:
            pass
        self._pending.pop(job.key, None)
        self._stats["cancelled_prefetches"] += 1
        job.done.set()

    def _enqueue(self, column: int, experts: list[int]) -> None:
        with self._lock:
            if self._stop:  # the loader was stopped (a remove() that failed): load on demand only
                return
            cache, _ = self._cache_of(column)
            for e in experts:
                key = (column, e)
                if key in cache or key in self._pending:
                    continue
                job = _Job(key)
                self._pending[key] = job
                self._queue.append(job)
            if threading.current_thread() is not self._thread:
                self._requests.put(None)  # wake the loader (it queues its own prefetches itself)

    def _wait(self, job: _Job) -> None:
        while not job.done.wait(_WAIT_S):
            with self._lock:
                self._raise_loader_error()
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("effllm.moe: the background expert loader stopped while a load or prediction was pending")
        with self._lock:
            self._raise_loader_error()

    def _start_loader(self) -> None:
        if self.device.type == "cuda":
            self._side_stream = torch.cuda.Stream(self.device)
        # the thread holds only a weak reference: a model dropped without remove() is still freed
        self._thread = threading.Thread(target=_loader_main, args=(weakref.ref(self), self._queue, self._requests),
                                        name="effllm-moe-prefetch", daemon=True)
        self._thread.start()

    def _stop_loader(self) -> None:
        if self._thread is None:
            return
        with self._lock:
            self._stop = True
            for job in list(self._queue):
                self._drop_job(job)
            while True:
                try:
                    request = self._requests.get_nowait()
                except queue_module.Empty:
                    break
                if request is not None:
                    request.done.set()
            self._requests.put(None)  # wake the loader to see _stop
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
            if self._thread.is_alive():  # still inside a read: closing the store under it would break it
                raise RuntimeError("offload_experts: the expert loader thread did not stop within 10 s (a slow "
                                   "read?); the store stays open, call remove() again")
        self._thread = None

    def _run_request(self, request: _Request) -> None:
        """Make one requested prediction (in the loader thread)."""
        try:
            if not self._stop:
                self._predict(request)
        except BaseException as exc:  # handed to the forward thread, which raises it
            with self._lock:
                self._error = exc
        finally:
            request.router_input = request.routes = None
            request.done.set()

    def _loader_step(self) -> None:
        """Run the next queued prefetch, if any (in the loader thread)."""
        with self._lock:
            if self._stop or not self._queue:
                return
            job = self._queue.popleft()
            job.started = True
            slot = self._reserve(job.key, prefetch=True)
            if slot is None:  # no spare slot: the prefetch is dropped
                self._stats["cancelled_prefetches"] += 1
                self._pending.pop(job.key, None)
                job.done.set()
                return
        event = None
        try:
            if self._side_stream is not None:
                with torch.cuda.stream(self._side_stream):
                    tensors = self._load(job.key, slot)
                    event = torch.cuda.Event()
                    event.record(self._side_stream)
            else:
                tensors = self._load(job.key, slot)
        except BaseException as exc:  # handed to the forward thread, which raises it
            with self._lock:
                self._unreserve(job.key, slot, prefetch=True)
                self._error = exc
                self._pending.pop(job.key, None)
                job.done.set()
            return
        with self._lock:
            nbytes = self._bytes(job.key[0])
            self._stats["prefetches"] += 1
            self._stats["loads"] += 1
            self._stats["bytes_moved"] += nbytes
            self._account(nbytes)
            if not self._commit(job.key, tensors, True, slot, event):  # everything cached is in use
                self._stats["wasted_prefetches"] += 1
                self._account(-nbytes)
            self._pending.pop(job.key, None)
            job.done.set()

    def _request_prediction(self, column: int, router_input: torch.Tensor | None, routes: torch.Tensor) -> None:
        """Called in the forward when ``column``'s router has run: hand the prediction to the loader
        thread (a copy of the router input: the forward may reuse its buffer)."""
        # No handle lock here: the loader may hold it (and be descheduled) while loading. Only the
        # forward thread appends requests and writes predictor_forward_s; deque appends are atomic.
        start = time.perf_counter()
        if self.prefetch == "cross_layer_gate":
            router_input, routes = router_input.detach().clone(), None
        else:
            router_input, routes = None, routes.detach()
        if not self._stop:
            request = _Request(self._event, column, router_input, routes)
            self._requests.put(request)
            self._last_requests = (self._last_requests[1], request)
        self._stats["predictor_forward_s"] += time.perf_counter() - start

    def _wait_for_predictions(self, event: int) -> None:
        """Block until every prediction that may target forward ``event`` is made (the loader makes
        predictions before loads, so this waits only when the predictor is slower than a layer)."""
        # requests are made in order: the newest one before ``event`` being done means all are
        older, newer = self._last_requests
        request = newer if newer is not None and newer.source < event else older
        if request is None or request.source >= event or request.done.is_set():
            return
        start = time.perf_counter()
        try:
            self._wait(request)
        finally:
            with self._lock:
                spent = time.perf_counter() - start
                self._stats["predictor_wait_s"] += spent
                self._stats["predictor_forward_s"] += spent

    def _predict(self, request: _Request) -> None:
        """Make one prediction (in the loader thread): queue the experts of the next ``lookahead``
        layers, as forward events ``request.source + ahead``."""
        start, cpu = time.perf_counter(), time.thread_time()
        column, n_cols = request.column, len(self.layers)
        targets = []
        late = 0
        if self.prefetch == "cross_layer_gate":
            with torch.no_grad():  # grad mode is per thread
                for ahead in range(1, self.lookahead + 1):
                    target = column + ahead
                    if self._event > request.source + ahead:  # its layer has started: too late to help
                        late += 1
                    elif target < n_cols:
                        router = self.layers[target].router
                        _, _, index = type(router).forward(router, request.router_input)
                        experts = (index.flatten() if index.shape[0] == 1 else torch.unique(index)).tolist()
                        targets.append((ahead, target, experts))
                    elif target == n_cols:  # the next step's first layer: no hidden state yet
                        targets.append((ahead, 0, self._frequency.predict(0, self.top_k)))
        else:  # trace_match
            seen = torch.unique(request.routes).tolist()
            self._matcher.observe(column, seen)
            for ahead in range(1, self.lookahead + 1):
                target = (column + ahead) % n_cols
                if self._event > request.source + ahead:
                    late += 1
                    continue
                targets.append((ahead, target, self._matcher.predict(target, max(self.top_k, len(seen)), ahead)))
        with self._lock:
            self._stats["predictor_s"] += time.perf_counter() - start
            self._stats["predictor_cpu_s"] += time.thread_time() - cpu
            for ahead, target, experts in targets:
                if self._event > request.source + ahead:  # reached while predicting
                    late += 1
                    continue
                self._predicted.setdefault(request.source + ahead, set()).update(experts)
                self._enqueue(target, experts)
            self._stats["late_predictions"] += late

    # -- the experts forward ----------------------------------------------------------------------------------------

    @staticmethod
    def _slab_is_exact(layer, experts: list[int], slots: dict, hidden_states: torch.Tensor) -> bool:
        """Whether running on the slab gives the bits the resident model gives. The experts must all
        be in the slab; then it is exact when their slots ascend with their ids (the table is the
        resident one with other experts in between, which no token uses), or for one token under
        an implementation that combines the experts in top-k order (every expert then multiplies
        one row, wherever it sits). Otherwise the layer stacks a compact table."""
        chosen = [slots.get(e) for e in experts]
        if any(s is None for s in chosen):
            return False
        if all(a < b for a, b in itertools.pairwise(chosen)):
            # Only for implementations that touch the selected experts alone: slots never
            # loaded hold uninitialised memory, which one that multiplies every expert by a
            # zero weight would turn into NaN (0 * NaN).
            eager = getattr(type(layer.experts).forward, "__wrapped__", None)
            return layer.implementation is eager or layer.implementation in _order_insensitive_implementations()
        return hidden_states.shape[0] == 1 and layer.implementation in _order_insensitive_implementations()


    def _forward(self, state: _State, module, hidden_states, top_k_index, top_k_weights):
        layer = self.layers[state.column]
        needed = torch.unique(top_k_index)
        if len(needed) and (int(needed[0]) < 0 or int(needed[-1]) >= layer.num_experts):
            raise IndexError(f"{layer.path}: expert id out of [0, {layer.num_experts})")
        experts = needed.tolist()
        # the cache sees the experts in the router's order (token by token, heaviest first), as the
        # simulator replays a trace; the table is built in ascending order, as the model iterates
        order = list(dict.fromkeys(top_k_index.flatten().tolist()))
        try:
            slots: dict = {}
            fetched = dict(zip(order, self._fetch(state.column, order, slots)))
            slab = self._slabs[self._cache_index(state.column)]
            remap = torch.full((layer.num_experts,), -1, dtype=top_k_index.dtype, device=top_k_index.device)
            if slab is not None and self._slab_is_exact(layer, experts, slots, hidden_states):
                # the slab is the table: no copy of the experts
                table = dict(zip(self.store.names, slab))
                remap[needed] = torch.tensor([slots[e] for e in experts], dtype=top_k_index.dtype,
                                             device=top_k_index.device)
                compact = _CompactExperts(module, table, slab[0].shape[0])
            else:
                tensors = [fetched[e] for e in experts]
                table = {name: torch.stack([t[i] for t in tensors]) for i, name in enumerate(self.store.names)}
                remap[needed] = torch.arange(len(experts), dtype=top_k_index.dtype, device=top_k_index.device)
                compact = _CompactExperts(module, table, len(experts))
            return layer.implementation(compact, hidden_states, remap[top_k_index], top_k_weights)
        finally:
            self._release(state.column, order)


def _order_insensitive_implementations() -> tuple:
    """Experts implementations whose result for a token is combined in the router's top-k order and
    whose per-expert product for one token does not depend on where the expert sits in the table."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return tuple(ALL_EXPERTS_FUNCTIONS[n] for n in ("grouped_mm", "batched_mm") if n in ALL_EXPERTS_FUNCTIONS)


def _loader_main(ref, queue, requests) -> None:
    while True:
        # predictions first (they are cheap and tell what to load); block only when no load is queued
        try:
            request = requests.get_nowait() if queue else requests.get(timeout=_WAIT_S)
        except queue_module.Empty:
            request = None
        handle = ref()
        if handle is None or handle._stop:
            if request is not None:
                request.done.set()
            return
        if request is not None:
            handle._run_request(request)
        else:
            handle._loader_step()
        del handle


def _close_store(store: ExpertStore | None, own_path: Path | None) -> None:
    if store is not None:
        store.close()
    if own_path is not None:
        Path(own_path).unlink(missing_ok=True)
        Path(own_path).parent.rmdir()


def _experts_params(experts: nn.Module, num_experts: int, where: str) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in experts.named_parameters(recurse=False)
              if p.dim() >= 2 and p.shape[0] == num_experts}
    if not params:
        raise ValueError(f"{where}: unsupported expert layout (no fused parameter with {num_experts} experts in its "
                         f"first dimension; effllm offloads transformers v5 experts such as gate_up_proj [E, 2I, H])")
    return params


def _implementation(experts: nn.Module, name: str | None, where: str):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if name in (None, "eager"):
        original = getattr(type(experts).forward, "__wrapped__", None)
        if original is None:
            raise ValueError(f"{where}: {type(experts).__name__} does not dispatch through transformers' "
                             f"ExpertsInterface (no @use_experts_implementation)")
        return original
    if name == IMPLEMENTATION:
        raise ValueError(f"{where}: already offloaded (call remove() on its handle first)")
    if name not in ALL_EXPERTS_FUNCTIONS:
        raise ValueError(f"{where}: unknown experts implementation {name!r}")
    return ALL_EXPERTS_FUNCTIONS[name]


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return type(module).__name__


def _top_k(model: nn.Module, routers) -> int:
    for _, router in routers:
        for name in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(router, name, None), int):
                return getattr(router, name)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        if isinstance(getattr(text, name, None), int):
            return getattr(text, name)
    raise ValueError(f"{type(model).__name__}: cannot tell how many experts a token uses (no top_k on the routers, "
                     f"no num_experts_per_tok in the config)")


POLICIES = ("lru", "lfu", "moe_infinity")
PREFETCHERS = (None, "cross_layer_gate", "trace_match")


def offload_experts(model: nn.Module, *, store: str = "cpu", path: str | Path | None = None, cache_experts: int = 16,
                    scope: str = "per_layer", policy: str = "lru", prefetch: str | None = None,
                    lookahead: int = 1, direct_io: bool = False) -> OffloadHandle:
    """Move a transformers v5 MoE model's experts to a slow tier, keeping at most ``cache_experts``
    of them resident (per layer, or in all with ``scope="global"``).

    ``store``: ``"cpu"`` (CPU memory, pinned on CUDA) or ``"disk"`` (a safetensors file at ``path``,
    a temporary file when None, read one expert at a time). ``policy``: ``"lru"``, ``"lfu"`` or
    ``"moe_infinity"``. ``prefetch``: None, ``"cross_layer_gate"`` or ``"trace_match"``, looking
    ``lookahead`` layers ahead. ``direct_io`` (``store="disk"``, Linux): read experts with
    ``O_DIRECT``, bypassing the OS page cache, so that the experts occupy neither the process nor
    the page cache (experts larger than RAM; a miss then costs a real device read). Shared
    experts, dense layers and everything else stay as they are. Returns an ``OffloadHandle``;
    ``handle.remove()`` restores the model.
    """
    return _apply(_plan(model, store=store, path=path, cache_experts=cache_experts, scope=scope, policy=policy,
                        prefetch=prefetch, lookahead=lookahead, direct_io=direct_io))


def _plan(model: nn.Module, *, store, path, cache_experts, scope, policy, prefetch, lookahead, direct_io) -> _Plan:
    """Check everything and collect what offloading will change; the model is not touched."""
    where = type(model).__name__
    if store not in ("cpu", "disk"):
        raise ValueError(f"offload_experts: store must be 'cpu' or 'disk', got {store!r}")
    if store == "cpu" and path is not None:
        raise ValueError("offload_experts: path is for store='disk'")
    if scope not in ("per_layer", "global"):
        raise ValueError(f"offload_experts: scope must be 'per_layer' or 'global', got {scope!r}")
    if policy not in POLICIES:
        raise ValueError(f"offload_experts: policy must be one of {', '.join(POLICIES)} (Belady needs the future: "
                         f"see effllm.moe.simulate), got {policy!r}")
    if prefetch not in PREFETCHERS:
        raise ValueError(f"offload_experts: prefetch must be None, 'cross_layer_gate' or 'trace_match', got {prefetch!r}")
    if not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"offload_experts: lookahead must be an int >= 1, got {lookahead!r}")
    if not isinstance(direct_io, bool):
        raise ValueError(f"offload_experts: direct_io must be a bool, got {direct_io!r}")
    if direct_io:
        if store != "disk":
            raise ValueError("offload_experts: direct_io is for store='disk'")
        why = direct_io_unsupported(Path(path).parent if path is not None else tempfile.gettempdir())
        if why is not None:
            raise ValueError(f"offload_experts: direct_io=True, but {why}")

    blocks = moe_blocks(model)
    routers = [(index, router) for index, _, router in blocks]
    if not routers:
        raise ValueError(f"{where}: not a MoE model (no decoder layer whose mlp has experts and a router at "
                         f"mlp.gate or mlp.router)")
    top_k = _top_k(model, routers)
    if not isinstance(cache_experts, int) or cache_experts < top_k:
        raise ValueError(f"offload_experts: cache_experts must be an int >= the experts one token uses "
                         f"(top_k={top_k}), got {cache_experts!r}")

    layers, params, columns = [], [], []
    names = None
    for column, (index, block, router) in enumerate(blocks):
        experts = block.experts
        place = _path_of(model, experts)
        if "_effllm_offload" in experts.__dict__:
            raise ValueError(f"{place}: already offloaded (call remove() on its handle first)")
        num_experts = getattr(experts, "num_experts", None)
        if not isinstance(num_experts, int):
            raise ValueError(f"{place}: unsupported expert layout (no num_experts; {type(experts).__name__})")
        p = _experts_params(experts, num_experts, place)
        if names is None:
            names = tuple(p)
        elif tuple(p) != names:
            raise ValueError(f"{place}: expert parameters {tuple(p)} differ from the first MoE layer's {names}")
        cfg = getattr(experts, "config", None)
        if cfg is None or not hasattr(cfg, "_experts_implementation_internal"):
            raise ValueError(f"{place}: no transformers config selecting an experts implementation")
        impl = _implementation(experts, cfg._experts_implementation, place)
        layers.append(_Layer(column, index, place, experts, router, num_experts, impl,
                             [(cfg, cfg._experts_implementation_internal)]))
        params.append(p)
        columns.append(tuple(p[n].data for n in names))
    devices = {t.device for ts in columns for t in ts}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(f"{where}: experts must all be materialised on one device, found {sorted(map(str, devices))}")
    device = next(iter(devices))
    return _Plan(model, layers, params, columns, names, device, top_k,
                 dict(store=store, path=path, cache_experts=cache_experts, scope=scope, policy=policy,
                      prefetch=prefetch, lookahead=lookahead, direct_io=direct_io))


@dataclass
class _Plan:
    model: nn.Module
    layers: list
    params: list
    columns: list
    names: tuple
    device: torch.device
    top_k: int
    options: dict


def _apply(plan: _Plan) -> OffloadHandle:
    model, layers, params, columns, names, device, top_k = (plan.model, plan.layers, plan.params, plan.columns,
                                                            plan.names, plan.device, plan.top_k)
    store, path, cache_experts, scope, policy, prefetch, lookahead, direct_io = (
        plan.options[k] for k in ("store", "path", "cache_experts", "scope", "policy", "prefetch", "lookahead",
                                  "direct_io"))
    _ensure_registered()
    own_path = None
    if store == "disk":
        if path is None:
            own_path = Path(tempfile.mkdtemp(prefix="effllm-experts-")) / "experts.safetensors"
            path = own_path
        # direct reads land in the cache's slots when every tensor starts at a page boundary
        DiskStore.write(path, names, columns, align=4096 if direct_io else None)
        try:
            slow: ExpertStore = DiskStore(path, names, [layer.num_experts for layer in layers], direct=direct_io)
        except ValueError:
            _close_store(None, own_path)  # the model is unchanged; drop our temporary file
            raise
    else:
        slow = CpuStore(names, columns, pin=device.type == "cuda")

    handle = OffloadHandle(model, layers, slow, params, cache_experts, scope, policy, prefetch, lookahead, device,
                           top_k, own_path)
    handle._make_slabs([tuple((tuple(t.shape[1:]), t.dtype) for t in ts) for ts in columns])
    # from here on the model changes: free the fused tensors, switch the implementation, add hooks
    for layer, p in zip(layers, params):
        for name in names:
            p[name].data = torch.empty(0, dtype=p[name].dtype, device=device)
        layer.experts.__dict__["_effllm_offload"] = _State(handle, layer.column)
        for cfg, _ in layer.previous_impl_config:
            cfg._experts_implementation_internal = IMPLEMENTATION
    if prefetch is not None:
        if prefetch == "trace_match":
            handle._matcher = TraceMatchPredictor(len(layers), max(layer.num_experts for layer in layers))
        for layer in layers:
            handle._hooks.append(layer.router.register_forward_hook(_prediction_hook(handle, layer.column)))
        handle._start_loader()
    return handle


@dataclass(frozen=True)
class Offload:
    """``offload_experts`` settings as a value, for ``effllm.patch(model, moe=Offload(...))``:
    ``check(model)`` raises on anything unsupported without changing the model; ``apply(model)``
    offloads and returns the ``OffloadHandle``."""

    store: str = "cpu"
    path: str | Path | None = None
    cache_experts: int = 16
    scope: str = "per_layer"
    policy: str = "lru"
    prefetch: str | None = None
    lookahead: int = 1
    direct_io: bool = False

    def _options(self) -> dict:
        return dict(store=self.store, path=self.path, cache_experts=self.cache_experts, scope=self.scope,
                    policy=self.policy, prefetch=self.prefetch, lookahead=self.lookahead, direct_io=self.direct_io)

    def check(self, model: nn.Module) -> None:
        _plan(model, **self._options())

    def apply(self, model: nn.Module) -> OffloadHandle:
        return offload_experts(model, **self._options())


def _prediction_hook(handle: OffloadHandle, column: int):
    def predict(module, args, output):
        hidden = args[0] if args else None
        handle._request_prediction(column, hidden.reshape(-1, hidden.shape[-1]) if hidden is not None else None,
                                   output[2])
    return predict
