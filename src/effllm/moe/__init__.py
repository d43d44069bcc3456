"""MoE expert offload and prefetch, routing traces and expert-cache simulation.

Built:
- ``offload_experts(model, store="cpu"|"disk", cache_experts=..., scope=..., policy=..., prefetch=...)``
  -> ``OffloadHandle`` (``stats()``, ``reset_stats()``, ``remove()``): a bounded expert cache over a
  CPU or safetensors-file tier for transformers v5 MoE models (Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V3, GraniteMoE, PhiMoE, GPT-OSS, Jamba), through transformers' ``ExpertsInterface``, outputs equal to the resident
  model's; a background prefetch thread fed by the cross-layer gate or trace matching. ``Offload``
  holds the same settings as a value (``check(model)`` / ``apply(model)``) for ``effllm.patch``.
- ``RoutingTrace`` / ``load_trace`` / ``RouteRecorder``: record, save and load per-token, per-layer
  routes, including the shipped JSON-lines traces.
- ``simulate``: replay a trace through a per-layer or global cache under LRU, LFU, MoE-Infinity's
  priority or Belady's bound, with route-only predictors that prefetch and a ``CostModel`` for
  stall time; ``srp`` / ``sch`` (local routing consistency); ``effllm moe simulate`` / ``locality``.

Experimental, outside the public API: ``effllm.moe.moefy.moefy`` (a MoE built from a dense model's
MLP channels, routed by its own activations; on SmolLM2 the quality collapses at the small active
shares where caching matters, see docs/moe.md).

Not yet: the CUDA path of ``offload_experts`` (pinned memory, a side stream with events) passes
its exactness tests on a GPU but has not been timed there; a SmolLM2-derived MoE with real
routing and usable quality. Benchmarks: ``effllm bench run 'moe.*'`` (docs/moe.md).
"""

from .locality import sch, srp
from .offload import Offload, OffloadHandle, offload_experts
from .policies import POLICIES
from .predictors import PREDICTORS
from .simulate import CostModel, SimResult, simulate
from .traces import RouteRecorder, RoutingTrace, TraceFormatError, find_routers, load_trace, moe_blocks

__all__ = ["offload_experts", "Offload", "OffloadHandle", "RoutingTrace", "load_trace", "RouteRecorder", "TraceFormatError",
           "find_routers", "moe_blocks", "simulate", "SimResult", "CostModel", "srp", "sch", "POLICIES", "PREDICTORS"]
