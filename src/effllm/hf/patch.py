"""``effllm.patch(model, ...)``: one reversible, per-instance call that applies effllm features.

Rules this module keeps:
- Only the given instance changes: no class attributes, no module-level rebinding in transformers.
- Everything is validated before anything changes; if applying fails midway, what was applied
  is rolled back and the error re-raised, so a model is never left half-patched.
- ``handle.unpatch()`` restores the exact original settings; a second call warns and does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from .._backend import check_backend_name, resolve_for_device
from .attention import BACKEND_ATTR, KV_ATTR, ensure_registered
from .specs import ModelLayout, find_layout

_HANDLE_ATTR = "_effllm_patch_handle"


@dataclass(frozen=True)
class PatchRecord:
    feature: str
    target: str
    status: str  # "patched" | "skipped"
    detail: str


class PatchHandle:
    """What ``patch`` did to one model, and how to undo it."""

    def __init__(self, model: nn.Module, layout: ModelLayout):
        self.model = model
        self.layout = layout
        self.records: list[PatchRecord] = []
        self._undo: list[Callable[[], None]] = []
        self._active = True
        self.kv = None  # effllm.kv.api.KVCompression when patched with kv=...
        self.moe = None  # effllm.moe.OffloadHandle when patched with moe=...
        self.parallel = None  # effllm.parallel.TensorParallelHandle when patched with parallel=...
        self.decode = None  # effllm.fast.FastRunner when patched with decode=...

    @property
    def active(self) -> bool:
        return self._active

    def _add(self, feature: str, target: str, status: str, detail: str) -> None:
        self.records.append(PatchRecord(feature, target, status, detail))

    def report(self) -> str:
        """A readable table of what was patched and what was skipped, and why."""
        state = "active" if self._active else "unpatched"
        lines = [f"effllm patch of {type(self.model).__name__} [{state}]: {self.layout.summary()}"]
        if not self.records:
            lines.append("  nothing requested")
        width = max((len(r.feature) for r in self.records), default=7)
        for r in self.records:
            lines.append(f"  {r.feature:<{width}}  {r.status:<7}  {r.target}: {r.detail}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.report()

    def unpatch(self) -> None:
        """Restore the model exactly as it was before ``patch``. A second call is a warned no-op."""
        if not self._active:
            warnings.warn("effllm: this model was already unpatched; nothing to do", stacklevel=2)
            return
        self._rollback()

    def _rollback(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep undoing the rest; report at the end
                errors.append(exc)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self._active = False
        if errors:
            raise RuntimeError(f"effllm: {len(errors)} step(s) failed while unpatching: {errors}")

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            self.unpatch()


def _config_tree(model: nn.Module) -> list:
    """Every distinct config reachable from the model: its own, sub-configs, and submodels'."""
    seen: dict[int, object] = {}
    stack = [getattr(model, "config", None)]
    stack += [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen[id(cfg)] = cfg
        for name in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, name, None))
    return list(seen.values())


def _attention_plan(model: nn.Module, layout: ModelLayout, option) -> tuple[str | None, str]:
    """Return ``(backend, reason)``: backend None means skip, with the reason."""
    backend = "auto" if option is True else option
    check_backend_name(backend)
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        return None, "not a transformers PreTrainedModel (no set_attn_implementation)"
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return None, f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
    if not layout.attention:
        return None, "no attention modules found (q/k/v/o projections)"
    if backend == "triton":  # refuse now what the first forward would refuse
        device = next((p.device for p in model.parameters()), None)
        try:
            resolve_for_device(backend, device or "cpu", op="effllm.patch(attention='triton')")
        except RuntimeError as exc:
            raise ValueError(f"{exc} (the model is on {device}; nothing was changed)") from None
    return backend, ""


def _modules_of(model: nn.Module, configs: list) -> list[nn.Module]:
    """The modules that read one of ``configs`` (attention modules among them)."""
    ids = {id(cfg) for cfg in configs}
    return [m for m in model.modules() if id(m.__dict__.get("config")) in ids]


def _set_module_attrs(modules: list[nn.Module], name: str, value) -> None:
    for module in modules:
        module.__dict__[name] = value


def _del_module_attrs(modules: list[nn.Module], name: str) -> None:
    for module in modules:
        module.__dict__.pop(name, None)


def _restore_attn_implementations(before: list) -> None:
    for cfg, value in before:
        cfg._attn_implementation_internal = value


# Undo steps are partials over module-level functions, not closures: copy.deepcopy copies a
# partial's arguments (a deep-copied patched model then undoes itself, not the original).
def _apply_attention(model: nn.Module, handle: PatchHandle, backend: str) -> None:
    key = ensure_registered()
    configs = _config_tree(model)
    before = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    original = model.config._attn_implementation
    modules = _modules_of(model, configs)
    handle._undo.append(functools.partial(_restore_attn_implementations, before))
    handle._undo.append(functools.partial(_del_module_attrs, modules, BACKEND_ATTR))
    model.set_attn_implementation(key)
    _set_module_attrs(modules, BACKEND_ATTR, backend)
    handle._add(
        "attention", f"{len(handle.layout.attention)} attention modules", "patched",
        f"attn_implementation {original!r} -> {key!r} (backend={backend})",
    )


def _quant_plan(model: nn.Module, config):
    from ..quant.api import plan_quantization

    if getattr(config, "act_aware", False):
        raise ValueError("effllm.patch(quant=...): act_aware configs need calibration batches; call "
                         "effllm.quant.quantize_(model, config, calibration=...) instead")
    return plan_quantization(model, config)


def _apply_quant(model: nn.Module, handle: PatchHandle, plan, report, where: str) -> None:
    from ..quant.api import build_quantized, replace_module
    from ..quant.originals import KeptOriginals

    new_modules = build_quantized(model, plan)
    originals = KeptOriginals(where)
    handle._undo.append(functools.partial(originals.restore, model))
    for name, module in new_modules.items():
        originals.add(name, replace_module(model, name, module))
    originals.offload(model)
    kinds = sorted({str(cfg) for cfg in plan.values()})
    kept = (f"float originals in {originals.path} ({originals.offloaded_bytes / 2**20:.1f} MiB)" if originals.path
            else "float originals kept in memory")
    handle._add("quant", f"{len(new_modules)} linear modules", "patched",
                f"{'; '.join(kinds) or 'nothing matched'}; {kept} for unpatch()")
    for name, why in report.skipped.items():
        handle._add("quant", name, "skipped", why)


def _remove_generate(model: nn.Module, had_own_generate: bool) -> None:
    if not had_own_generate:
        vars(model).pop("generate", None)


def _apply_kv(model: nn.Module, handle: PatchHandle, policy, quantizer) -> None:
    """A policy, a quantizer or both: effllm's attention reads the model's ``CompressedCache``
    (scores for the policy, attention over the codes), and generate() gets one by default."""
    from ..kv.api import GenerateWithCache, KVCompression

    feature = KVCompression(model, policy, quantizer)
    modules = _modules_of(model, _config_tree(model))
    had_own_generate = "generate" in vars(model)
    handle._undo.append(functools.partial(setattr, handle, "kv", None))
    handle._undo.append(feature.deactivate)
    handle._undo.append(functools.partial(_remove_generate, model, had_own_generate))
    handle._undo.append(functools.partial(_del_module_attrs, modules, KV_ATTR))
    hook = model.base_model.register_forward_pre_hook(feature.before_forward, with_kwargs=True)
    handle._undo.append(hook.remove)
    # Policies that replay the context (KVzip) run a pass of their own after the first prefill.
    if getattr(policy, "replays_context", False):
        hook = model.base_model.register_forward_hook(feature.after_forward, with_kwargs=True)
        handle._undo.append(hook.remove)
    _set_module_attrs(modules, KV_ATTR, feature)
    if hasattr(model, "generate"):
        model.generate = GenerateWithCache(feature, model.generate)
    handle.kv = feature
    what = " + ".join(repr(x) for x in (policy, quantizer) if x is not None)
    handle._add("kv", " + ".join(type(x).__name__ for x in (policy, quantizer) if x is not None), "patched",
                f"{what}; generate() gets a CompressedCache")


def _apply_parallel(model: nn.Module, handle: PatchHandle, group) -> None:
    from ..parallel import tensor_parallel

    tp = tensor_parallel(model, group)
    handle._undo.append(tp.restore)
    handle._undo.append(functools.partial(setattr, handle, "parallel", None))
    handle.parallel = tp
    handle._add("parallel", type(model).__name__, "patched", f"tensor_parallel over {tp.world_size} ranks: "
                f"query heads {tp.query_heads}, KV heads {tp.kv_heads}")


def _apply_moe(model: nn.Module, handle: PatchHandle, moe) -> None:
    offload = moe.apply(model)
    handle._undo.append(offload.remove)
    handle._undo.append(functools.partial(setattr, handle, "moe", None))
    handle.moe = offload
    handle._add("moe", type(model).__name__, "patched", repr(moe))


def _apply_decode(model: nn.Module, handle: PatchHandle, config) -> None:
    from ..fast.patching import apply_decode

    runner, undo = apply_decode(model, config)
    handle._undo.append(undo)
    handle._undo.append(functools.partial(setattr, handle, "decode", None))
    handle.decode = runner
    handle._add("decode", type(model).__name__, "patched", f"generate() runs the fast path: {runner.report()}")


def patch(
    model: nn.Module,
    *,
    attention: bool | str | None = None,
    quant=None,
    kv=None,
    moe=None,
    parallel=None,
    decode=None,
    strict: bool = False,
    quant_originals: str = "disk",
) -> PatchHandle:
    """Apply effllm features to this model instance and return a handle that can undo them.

    - ``attention``: True (backend "auto"), or a backend name "auto" | "torch" | "triton":
      route attention through ``effllm.kernels.attention``.
    - ``quant``: an ``effllm.quant`` config (or ``ModuleConfigs``): linears are replaced by
      quantized modules, and the process holds less weight memory while patched. For an exact
      ``unpatch()`` the handle keeps the float modules: with ``quant_originals="disk"`` (the
      default) their weights are moved to a temporary safetensors file (under ``TMPDIR``,
      deleted on unpatch) and their ``Parameter`` objects are empty until then;
      ``quant_originals="memory"`` keeps them in memory (a fast unpatch, no memory saved).
      ``effllm.quantize_`` is the one-way conversion that keeps nothing.
    - ``kv``: an ``effllm.kv`` policy (eviction), a quantizer (``effllm.kv.KIVI``, ...), or a
      ``(policy, quantizer)`` pair: generate() gets a ``CompressedCache`` holding both (evict,
      then quantize); attention is routed through effllm (backend ``attention`` if given, else
      "auto"), which scores for the policy and reads the codes. ``handle.kv`` holds the state
      (``handle.kv.new_cache()``, ``handle.kv.stats()``).
    - ``moe``: an ``effllm.moe.Offload(...)``: experts offloaded behind a bounded cache
      (``handle.moe.stats()``); outputs are unchanged.
    - ``parallel``: a ``torch.distributed`` process group: the model is sharded in place by
      ``effllm.parallel.tensor_parallel`` (every rank calls ``patch`` and ``unpatch`` together;
      ``unpatch()`` gathers the shards back). Not together with ``quant`` in one call: patch
      ``parallel`` first, then ``effllm.quant.quantize_`` the shards.
    - ``decode``: True or an ``effllm.fast.FastDecode(...)``: greedy ``generate()`` runs
      effllm's fast path (static KV cache, compiled decode step, packed INT8/INT4 weights when
      ``quant`` is given); composes with ``attention`` and ``quant``, refused with ``kv``,
      ``moe`` and ``parallel`` (docs/fast_decode.md).
    - ``strict``: raise instead of skipping a feature the model does not support.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"effllm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    existing = getattr(model, _HANDLE_ATTR, None)
    if existing is not None and existing.active:
        raise RuntimeError(
            "effllm.patch: this model is already patched; call handle.unpatch() (or use effllm.patched) first"
        )
    if attention not in (None, False, True) and not isinstance(attention, str):
        raise TypeError(f"effllm.patch: attention must be a bool or a backend name, got {attention!r}")

    # 1. validate and plan: nothing changes yet.
    layout = find_layout(model)
    handle = PatchHandle(model, layout)
    attention_backend = None
    if attention not in (None, False):
        attention_backend, reason = _attention_plan(model, layout, attention)
        if attention_backend is None:
            if strict:
                raise ValueError(f"effllm.patch(attention=...): cannot patch {type(model).__name__}: {reason}")
            handle._add("attention", type(model).__name__, "skipped", reason)
    quant_plan = _quant_plan(model, quant) if quant is not None else None
    if quant is not None:
        from ..quant.originals import check_where

        check_where(quant_originals)
    if kv is not None:
        from ..kv.api import check_supported

        kv_parts = check_supported(model, kv)  # (policy, quantizer)
        if attention_backend is None:  # the cache is read by effllm's attention
            attention_backend, reason = _attention_plan(model, layout, True)
            if attention_backend is None:
                raise ValueError(f"effllm.patch(kv=...): cannot route attention of {type(model).__name__}: {reason}")
    if parallel is not None:
        from ..parallel import check_tensor_parallel

        if quant is not None:
            raise ValueError("effllm.patch: quant=... with parallel=... is not supported in one call; patch "
                             "parallel first, then effllm.quant.quantize_ the shards")
        try:
            check_tensor_parallel(model, parallel)
        except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: no process group initialised
            raise type(exc)(f"effllm.patch(parallel=...): {exc}") from None
    if moe is not None:
        from ..moe import Offload

        if not isinstance(moe, Offload):
            raise TypeError(f"effllm.patch(moe=...): expected effllm.moe.Offload(...), got {moe!r}")
        moe.check(model)
    decode_config = None
    if decode not in (None, False):
        from ..fast.patching import check_decode

        decode_config = check_decode(model, decode, quant_plan=quant_plan, kv=kv, moe=moe, parallel=parallel)
    if layout.source == "structural":
        handle._add("layout", layout.model_type, "note", "no spec for this model_type; found modules structurally")

    # 2. apply, rolling back on any failure.
    setattr(model, _HANDLE_ATTR, handle)
    try:
        if parallel is not None:
            _apply_parallel(model, handle, parallel)
        if attention_backend is not None:
            _apply_attention(model, handle, attention_backend)
        if quant_plan is not None:
            _apply_quant(model, handle, *quant_plan, quant_originals)
        if kv is not None:
            _apply_kv(model, handle, *kv_parts)
        if moe is not None:
            _apply_moe(model, handle, moe)
        if decode_config is not None:
            _apply_decode(model, handle, decode_config)
    except BaseException:
        handle._rollback()
        raise
    return handle


@contextlib.contextmanager
def patched(model: nn.Module, **features) -> Iterator[PatchHandle]:
    """Context manager form of ``patch``: the model is unpatched on exit, even on error."""
    handle = patch(model, **features)
    try:
        yield handle
    finally:
        if handle.active:
            handle.unpatch()
