"""``effllm.kv.compress(model, policy, quantizer)`` and the state behind ``effllm.patch(model, kv=...)``.

Compression needs the queries (prefill) and the attention mass per key (decode), which only
the attention function sees; attention over a quantizer's codes is effllm's too. So the kv
feature routes the model's attention through effllm's ``AttentionInterface`` entry, and that
function (``kv/attention.py``) reads the ``CompressedCache`` whose ``update`` ran just before it
(``KVCompression.pending``). A cache of any other type is never touched.

``model.generate`` is wrapped on the instance (and unwrapped on exit) so that a call without a
cache (``cache=`` or the older ``past_key_values=``) gets a fresh ``CompressedCache``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._cache_arg import CACHE_ARG_NAMES, cache_argument_name, find_cache
from .policies import Policy

if TYPE_CHECKING:
    from .cache import CompressedCache


class _KVFeature:
    """What ``patch(kv=...)`` keeps: generate() calls without a cache get ``new_cache()``; the
    last cache made answers ``stats()``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.last_cache = None

    def new_cache(self):
        raise NotImplementedError

    def adopt(self, cache) -> None:
        """A cache the caller passed to generate(): stats() describe it from now on (an effllm
        cache; another kind has no stats)."""
        self.last_cache = cache if callable(getattr(cache, "stats", None)) else None

    def after_generate(self) -> None:
        pass

    def stats(self) -> dict:
        return {} if self.last_cache is None else self.last_cache.stats()


class GenerateWithCache:
    """``model.generate`` of a kv-patched model: a call without a cache gets ``feature.new_cache()``;
    a cache the caller passes is adopted. A class, not a closure, so that ``copy.deepcopy`` of
    the model copies it with the model (a closure would keep calling the original)."""

    def __init__(self, feature: _KVFeature, generate):
        self.feature = feature
        self.generate = generate  # the bound original
        # Name and docs only: transformers' annotations hold objects that do not pickle.
        functools.update_wrapper(self, generate, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                                 updated=())

    def __call__(self, *args, **kwargs):
        given = find_cache(kwargs)
        policy = getattr(self.feature, "policy", None) if given is None else getattr(given, "policy", None)
        if policy is not None and _prefill_chunk_size(self.feature.model, kwargs):
            # the policy budgets against the first forward's tokens: the first chunk, not the prompt
            raise ValueError("effllm.kv: generate(prefill_chunk_size=...) with a policy would compress each "
                             "chunk against the first one's budget; prefill the prompt in one forward (drop "
                             "prefill_chunk_size) or use a quantizer alone")
        if given is None:
            for name in CACHE_ARG_NAMES:  # drop an explicit None under either name
                kwargs.pop(name, None)
            kwargs[cache_argument_name(self.feature.model)] = self.feature.new_cache()
        else:
            self.feature.adopt(given)
        try:
            return self.generate(*args, **kwargs)
        finally:
            self.feature.after_generate()


def _prefill_chunk_size(model, kwargs) -> int | None:
    """The ``prefill_chunk_size`` a generate() call would use (its argument, its generation
    config's, or the model's)."""
    if "prefill_chunk_size" in kwargs:  # the call's, None included, overrides the configs'
        return kwargs["prefill_chunk_size"]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, "prefill_chunk_size", None)


class KVCompression(_KVFeature):
    """The kv feature of one patched model: its policy and quantizer (either may be None), and
    the cache now being filled. effllm's attention hands scores to the ``CompressedCache`` whose
    ``update`` ran just before it (``pending``)."""

    def __init__(self, model: nn.Module, policy: Policy | None, quantizer=None):
        super().__init__(model)
        self.policy = policy
        self.quantizer = quantizer
        self.pending: tuple[CompressedCache, int] | None = None  # (cache, layer) set by CompressedCache.update
        self.active = True  # False once unpatched: the caches wired to it are no longer read by effllm

    def deactivate(self) -> None:
        """The model was unpatched: its caches stop handing work to effllm's attention."""
        self.active, self.pending = False, None

    def new_cache(self, page_size: int | str | None = "auto", keep_positions: bool = False) -> CompressedCache:
        """A cache wired to this model (``page_size``, ``keep_positions``: see ``CompressedCache``)."""
        from .cache import CompressedCache

        cache = CompressedCache(self.policy, num_layers=_num_layers(self.model.config), page_size=page_size,
                                quantizer=self.quantizer, keep_positions=keep_positions)
        cache.wired(self)
        self.last_cache = cache
        return cache

    def adopt(self, cache) -> None:
        """Wire a ``CompressedCache`` the caller made (not yet used by another model) to this model."""
        from .cache import CompressedCache

        if isinstance(cache, CompressedCache) and cache.owner is not self:
            if cache.owner is not None and cache.owner.active:
                raise ValueError("kv: this CompressedCache is wired to another patched model; make one for this "
                                 "model with handle.kv.new_cache() or CompressedCache(...)")
            cache.wired(self)  # a new cache, or one whose model was unpatched
            if cache.num_layers is None:
                cache.num_layers = _num_layers(self.model.config)
        super().adopt(cache)

    def before_forward(self, decoder: nn.Module, args, kwargs) -> None:
        """Forward pre-hook on the model's decoder: a cache passed to a plain forward call is
        adopted as generate() adopts it (before anything is stored)."""
        from .cache import CompressedCache

        cache = find_cache(kwargs)
        if isinstance(cache, CompressedCache) and cache.owner is not self:
            self.adopt(cache)

    def after_generate(self) -> None:
        self.pending = None

    def after_forward(self, decoder: nn.Module, args, kwargs, output) -> None:
        """Forward hook on the model's decoder for policies that replay the context (KVzip):
        after the first forward into one of this model's caches, score and compress it."""
        cache = find_cache(kwargs)
        if getattr(cache, "owner", None) is not self or cache.replaying or cache.policy_state.get("replayed") \
                or not getattr(cache.policy, "replays_context", False):
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(f"kv: {type(cache.policy).__name__} replays the prompt's token ids; "
                             f"call the model with input_ids, not inputs_embeds")
        cache.policy_state["replayed"] = True
        cache.policy.replay(decoder, cache, input_ids, position_ids=kwargs.get("position_ids"))

    def take_pending(self, layer_idx: int) -> CompressedCache | None:
        """The CompressedCache that just stored this layer's new keys, if any (consumed once)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        cache, pending_layer = pending
        return cache if pending_layer == layer_idx else None


def _num_layers(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def split_kv(kv) -> tuple[Policy | None, object | None]:
    """``kv=`` of ``patch`` / ``compress``: a policy, a quantizer, or a ``(policy, quantizer)``
    pair (either order) -> ``(policy, quantizer)``; ``ValueError`` naming what was given otherwise."""
    from .quantizers import Quantizer

    items = list(kv) if isinstance(kv, (tuple, list)) else [kv]
    policies = [x for x in items if isinstance(x, Policy)]
    quantizers = [x for x in items if not isinstance(x, Policy) and isinstance(x, Quantizer)]
    if len(items) > 2 or len(policies) > 1 or len(quantizers) > 1 or len(policies) + len(quantizers) != len(items) \
            or not items:
        raise ValueError(f"kv: expected an effllm.kv policy (StreamingLLM, SnapKV, H2O, CAKE, AdaKV, KVzip, "
                         f"Protected), a quantizer (KIVI, ...), or a (policy, quantizer) pair, got {kv!r}")
    return (policies[0] if policies else None), (quantizers[0] if quantizers else None)


def check_supported(model: nn.Module, kv) -> tuple[Policy | None, object | None]:
    """Raise ``ValueError`` naming the setting when ``kv`` cannot run on this model; else return
    ``(policy, quantizer)``."""
    from .cache import check_combination

    policy, quantizer = split_kv(kv)
    check_combination(policy, quantizer)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("kv: compression needs a transformers PreTrainedModel")
    check_config(config, quantizer)
    return policy, quantizer


def check_config(config, quantizer=None) -> None:
    """Raise ``ValueError`` unless the model ``config`` describes can use effllm's caches (and
    ``quantizer`` can hold its keys and values: head dim, dtype)."""
    check_full_attention(config)
    if quantizer is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    try:
        quantizer.validate(head_dim, dtype)
    except ValueError as exc:
        raise ValueError(f"kv: {exc} (this model: head dim {head_dim}, {dtype})") from None


def check_full_attention(config) -> None:
    """Raise ``ValueError`` unless every layer of the model ``config`` describes is full attention
    of a decoder (what effllm's caches store)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("kv: encoder-decoder models are not supported")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # Configs list their layer kinds (transformers 5) or only carry a sliding_window setting.
    layer_types = set(getattr(text, "layer_types", None) or [])
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    if layer_types - {"full_attention"} or (not layer_types and sliding):
        raise ValueError(f"kv: models with sliding-window or non-attention layers are not supported "
                         f"(layer_types={sorted(layer_types) or 'sliding_window'})")


@contextlib.contextmanager
def compress(model: nn.Module, policy=None, quantizer=None, *, backend: str = "auto") -> Iterator[KVCompression]:
    """Compress the KV cache of ``model`` with ``policy``, ``quantizer`` or both inside the block::

        with effllm.kv.compress(model, H2O(budget=0.25)) as kv:
            out = model.generate(ids, max_new_tokens=64)
            print(kv.stats())
        with effllm.kv.compress(model, SnapKV(0.5), KIVI(bits=4)) as kv: ...
        with effllm.kv.compress(model, quantizer=KIVI(bits=2)) as kv: ...

    Same as ``effllm.patch(model, attention=backend, kv=(policy, quantizer))``, undone on exit.
    (The one place ``kv`` calls into ``hf``, at call time: ``compress`` is ``patch`` in a block.)
    """
    from ..hf.patch import patched

    kv = tuple(x for x in (policy, quantizer) if x is not None)
    with patched(model, attention=backend, kv=kv[0] if len(kv) == 1 else kv) as handle:
        yield handle.kv
