"""MoE routing traces and expert-cache simulation.

Built: ``RoutingTrace`` / ``load_trace`` / ``RouteRecorder`` (record, save, load routes, including
the shipped JSON-lines traces), ``simulate`` (replay a trace through a per-layer or global expert
cache under LRU, LFU, MoE-Infinity's priority or Belady's bound, with route-only predictors that
prefetch, and a ``CostModel`` for stall time), ``srp`` / ``sch`` (local routing consistency), and
the ``effllm moe simulate`` / ``effllm moe locality`` commands.

Not yet: ``offload_experts`` (a bounded expert cache over a RAM or disk tier inside a running
model), hidden-state predictors (cross-layer gate) and ``effllm.patch(model, moe=...)``.
"""

from .locality import sch, srp
from .policies import POLICIES
from .predictors import PREDICTORS
from .simulate import CostModel, SimResult, simulate
from .traces import RouteRecorder, RoutingTrace, TraceFormatError, find_routers, load_trace

__all__ = ["RoutingTrace", "load_trace", "RouteRecorder", "TraceFormatError", "find_routers", "simulate",
           "SimResult", "CostModel", "srp", "sch", "POLICIES", "PREDICTORS"]
