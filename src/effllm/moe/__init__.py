"""MoE routing traces.

Built: ``RoutingTrace`` / ``load_trace`` / ``RouteRecorder`` (record, save and load per-token,
per-layer top-k routes, including the shipped JSON-lines traces).

Not yet: the cache simulator, ``offload_experts`` (a bounded expert cache over a RAM or disk tier
inside a running model), predictors and ``effllm.patch(model, moe=...)``.
"""

from .traces import RouteRecorder, RoutingTrace, TraceFormatError, find_routers, load_trace

__all__ = ["RoutingTrace", "load_trace", "RouteRecorder", "TraceFormatError", "find_routers"]
