"""Routing traces: which experts each token was sent to, at every MoE layer.

A ``RoutingTrace`` holds, for T tokens and L MoE layers with top-k routing over E experts:

- ``experts``: int64 tensor ``[T, L, k]``, the chosen expert ids, in the router's order;
- ``weights``: float32 tensor ``[T, L, k]`` (router weights after top-k) or ``None``;
- ``request``: int64 tensor ``[T]``, an index into ``requests`` (the names of the prompts/answers);
- ``layers``: the model's layer index of each of the L columns (``[0]`` for a layer-0-only trace).

Tokens are in the order the model processed them. On disk a trace is one safetensors file: the
three tensors (ids as uint8 when E <= 256, else int16; weights as float16, so about 4 significant
digits) and JSON metadata (``format``, ``num_experts``, ``layers``, ``requests``, ``meta``).
``load_trace`` also reads the two JSON-lines layouts of the shipped traces (see their README):
one row per (token, layer) with ``topk_ids`` / ``topk_weights`` (vLLM route dumps), and one row
per token with ``experts`` / ``weights`` lists per layer.

``RouteRecorder`` records a trace from a transformers (v5) MoE model with forward hooks on its
routers, which it removes on exit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMAT = "effllm.moe.trace"
VERSION = "1"


class TraceFormatError(ValueError):
    """A trace file that is not in any layout ``load_trace`` reads; the message names the file and line."""


@dataclass
class RoutingTrace:
    experts: torch.Tensor
    num_experts: int
    weights: torch.Tensor | None = None
    request: torch.Tensor | None = None
    requests: list[str] | None = None
    layers: list[int] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        ex = torch.as_tensor(self.experts)
        if ex.dim() != 3 or ex.dtype.is_floating_point or ex.dtype == torch.bool:
            raise ValueError(f"RoutingTrace: experts must be an integer tensor [tokens, layers, top_k], got "
                             f"{tuple(ex.shape)} {ex.dtype}")
        self.experts = ex.long()
        t, n_layers, _ = self.experts.shape
        if self.experts.numel() and (int(self.experts.min()) < 0 or int(self.experts.max()) >= self.num_experts):
            raise ValueError(f"RoutingTrace: expert ids must lie in [0, num_experts={self.num_experts}), got "
                             f"[{int(self.experts.min())}, {int(self.experts.max())}]")
        if self.weights is not None:
            self.weights = torch.as_tensor(self.weights).float()
            if self.weights.shape != self.experts.shape:
                raise ValueError(f"RoutingTrace: weights shape {tuple(self.weights.shape)} != experts shape "
                                 f"{tuple(self.experts.shape)}")
        self.request = torch.zeros(t, dtype=torch.long) if self.request is None else torch.as_tensor(self.request).long()
        if self.request.shape != (t,):
            raise ValueError(f"RoutingTrace: request must have shape [tokens]=({t},), got {tuple(self.request.shape)}")
        if self.requests is None:  # unnamed requests: "0", "1", ...
            self.requests = [str(i) for i in range(int(self.request.max()) + 1 if t else 1)]
        if t and (int(self.request.min()) < 0 or int(self.request.max()) >= len(self.requests)):
            raise ValueError("RoutingTrace: request indices must index requests")
        self.layers = list(range(n_layers)) if self.layers is None else [int(x) for x in self.layers]
        if len(self.layers) != n_layers:
            raise ValueError(f"RoutingTrace: {len(self.layers)} layer names for {n_layers} layers")

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def __repr__(self) -> str:
        return (f"RoutingTrace(tokens={self.num_tokens}, layers={self.num_layers}, top_k={self.top_k}, "
                f"num_experts={self.num_experts}, requests={len(self.requests)})")

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"experts": self.experts.to(torch.uint8 if self.num_experts <= 256 else torch.int16).contiguous(),
                   "request": self.request.int().contiguous()}
        if self.weights is not None:
            tensors["weights"] = self.weights.half().contiguous()
        metadata = {"format": FORMAT, "version": VERSION, "num_experts": str(self.num_experts),
                    "layers": json.dumps(self.layers), "requests": json.dumps(self.requests),
                    "meta": json.dumps(self.meta)}
        save_file(tensors, str(path), metadata=metadata)
        return path


def load_trace(path: str | Path, *, drop_warmup: bool = True) -> RoutingTrace:
    """Read a trace: effllm's safetensors format, or one of the two JSON-lines layouts.

    ``drop_warmup``: in the per-(token, layer) JSON-lines layout, drop the leading run of rows whose
    router weights are all equal (vLLM's profiling batch routes dummy tokens with uniform weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] in (b"{", b"["):
        return _load_jsonl(path, drop_warmup)
    return _load_safetensors(path)


def _load_safetensors(path: Path) -> RoutingTrace:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise TraceFormatError(f"{path}: a safetensors file but not an effllm routing trace "
                                       f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise TraceFormatError(f"{path}: neither JSON lines nor a readable safetensors routing trace ({exc})") from exc
    if meta.get("version") != VERSION:
        raise TraceFormatError(f"{path}: trace format version {meta.get('version')!r}, this effllm reads {VERSION!r}")
    try:
        return RoutingTrace(tensors["experts"].long(), int(meta["num_experts"]), tensors.get("weights"),
                            tensors["request"].long(), json.loads(meta["requests"]), json.loads(meta["layers"]),
                            json.loads(meta.get("meta", "{}")))
    except (KeyError, ValueError) as exc:
        raise TraceFormatError(f"{path}: malformed effllm routing trace ({exc})") from exc


def _int_list(value, where: str, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TraceFormatError(f"{where}: {what} must be a list of integers, got {value!r}")
    return value


def _float_list(value, where: str, what: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TraceFormatError(f"{where}: {what} must be a list of numbers, got {value!r}")
    return [float(v) for v in value]


def _load_jsonl(path: Path, drop_warmup: bool) -> RoutingTrace:
    header: dict = {}
    tokens: list[tuple[str, list[list[int]], list[list[float]] | None]] = []
    layout = None
    pending: dict[tuple[str, int], dict[int, tuple[list[int], list[float] | None]]] = {}
    order: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TraceFormatError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            if row.get("type") == "meta":
                header.update(row)
                continue
            if "topk_ids" in row:  # one row per (token, layer)
                if layout not in (None, "route"):
                    raise TraceFormatError(f"{where}: a per-(token, layer) route row in a per-token trace")
                layout = "route"
                try:
                    key = (str(row["req_id"]), int(row["token_idx"]))
                    layer = int(row["layer"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise TraceFormatError(f"{where}: a route row needs req_id, integer token_idx and layer "
                                           f"({exc!r})") from None
                ids = _int_list(row["topk_ids"], where, "topk_ids")
                w = _float_list(row["topk_weights"], where, "topk_weights") if "topk_weights" in row else None
                if w is not None and len(w) != len(ids):
                    raise TraceFormatError(f"{where}: {len(ids)} topk_ids but {len(w)} topk_weights")
                if key not in pending:
                    pending[key] = {}
                    order.append(key)
                if layer in pending[key]:
                    raise TraceFormatError(f"{where}: token {key[1]} of request {key[0]!r} has layer {layer} twice")
                pending[key][layer] = (ids, w, lineno)
            elif "experts" in row:  # one row per token
                if layout not in (None, "token"):
                    raise TraceFormatError(f"{where}: a per-token row in a per-(token, layer) trace")
                layout = "token"
                experts = row["experts"]
                if not isinstance(experts, list) or not experts:
                    raise TraceFormatError(f"{where}: experts must be a non-empty list of per-layer id lists")
                ids = [_int_list(e, where, f"experts[{i}]") for i, e in enumerate(experts)]
                w = row.get("weights")
                if w is not None:
                    if not isinstance(w, list) or len(w) != len(ids):
                        raise TraceFormatError(f"{where}: weights must be one list per layer like experts")
                    w = [_float_list(x, where, f"weights[{i}]") for i, x in enumerate(w)]
                    if any(len(a) != len(b) for a, b in zip(ids, w)):
                        raise TraceFormatError(f"{where}: weights and experts differ in length")
                tokens.append((str(row.get("request", "0")), ids, w, lineno))
            else:
                raise TraceFormatError(f"{where}: a row needs 'topk_ids' (one row per token and layer) or "
                                       f"'experts' (one row per token); got keys {sorted(row)}")
    if layout is None:
        raise TraceFormatError(f"{path}: no route rows found")

    dropped = 0
    if layout == "route":
        layer_ids = sorted({layer for rows in pending.values() for layer in rows})
        if drop_warmup:
            # vLLM's profiling run routes dummy tokens with exactly uniform weights.
            while dropped < len(order) and all(
                    w is not None and len(set(w)) == 1 for _, w, _ in pending[order[dropped]].values()):
                dropped += 1
        for key in order[dropped:]:
            rows = pending[key]
            if sorted(rows) != layer_ids:
                first_line = min(line for _, _, line in rows.values())
                raise TraceFormatError(f"{path}:{first_line}: token {key[1]} of request {key[0]!r} has layers "
                                       f"{sorted(rows)}, others have {layer_ids}")
            tokens.append((key[0], [rows[layer][0] for layer in layer_ids],
                           None if any(rows[layer][1] is None for layer in layer_ids)
                           else [rows[layer][1] for layer in layer_ids], min(r[2] for r in rows.values())))
    else:
        layer_ids = list(range(len(tokens[0][1])))
    if not tokens:
        raise TraceFormatError(f"{path}: no route rows left after dropping {dropped} warm-up rows")

    top_k = len(tokens[0][1][0])
    for _, ids, _, lineno in tokens:
        if len(ids) != len(layer_ids) or any(len(x) != top_k for x in ids):
            raise TraceFormatError(f"{path}:{lineno}: expected {len(layer_ids)} layers of {top_k} expert ids, got "
                                   f"{[len(x) for x in ids]}")
    experts = torch.tensor([ids for _, ids, _, _ in tokens], dtype=torch.long)
    has_weights = all(w is not None for _, _, w, _ in tokens)
    weights = torch.tensor([w for _, _, w, _ in tokens], dtype=torch.float32) if has_weights else None
    names: list[str] = []
    index: dict[str, int] = {}
    for name, *_ in tokens:
        if name not in index:
            index[name] = len(names)
            names.append(name)
    request = torch.tensor([index[name] for name, *_ in tokens], dtype=torch.long)
    num_experts = header.get("num_experts")
    if num_experts is None:
        num_experts = int(experts.max()) + 1
    if int(experts.min()) < 0 or int(experts.max()) >= int(num_experts):
        bad = int(((experts < 0) | (experts >= int(num_experts))).flatten(1).any(1).nonzero()[0])
        raise TraceFormatError(f"{path}:{tokens[bad][3]}: expert id outside [0, num_experts={num_experts})")
    meta = {k: v for k, v in header.items() if k != "type"}
    meta.update(source=str(path), dropped_warmup_tokens=dropped)
    return RoutingTrace(experts, int(num_experts), weights, request, names, layer_ids, meta)


# -- recording from a model -------------------------------------------------------------------------------------


# where decoder layers keep their MoE block: Mixtral, Qwen, OLMoE, DeepSeek (mlp), GraniteMoE
# (block_sparse_moe), Jamba (feed_forward)
_BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward")


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module]]:
    """``(layer index, MoE block, router)`` for every MoE layer of a transformers v5 model, in order.

    A MoE layer is a decoder layer whose block (``mlp``, ``block_sparse_moe`` or ``feed_forward``)
    holds ``experts`` and a router at ``gate`` or ``router``; dense layers (Qwen2-MoE's
    ``mlp_only_layers``, DeepSeek-V3's first layers) are skipped.
    """
    out = []
    for index, layer in enumerate(_decoder_layers(model)):
        for name in _BLOCK_NAMES:
            block = getattr(layer, name, None)
            if isinstance(block, nn.Module) and isinstance(getattr(block, "experts", None), nn.Module):
                router = getattr(block, "gate", None)
                if not isinstance(router, nn.Module):
                    router = getattr(block, "router", None)
                if isinstance(router, nn.Module):
                    out.append((index, block, router))
                break
    return out


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(layer index, router)`` for every MoE layer (see ``moe_blocks``)."""
    return [(index, router) for index, _, router in moe_blocks(model)]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name in ("model.layers", "layers", "model.decoder.layers", "transformer.h"):
        obj = model
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"{type(model).__name__}: no decoder layer list (looked for model.layers, layers, "
                     f"model.decoder.layers, transformer.h)")


class RouteRecorder:
    """Records the top-k routes of every MoE layer while a model runs.

    >>> with RouteRecorder(model) as rec:
    ...     model.generate(ids, max_new_tokens=32)
    >>> rec.trace().save("routes.safetensors")

    Hooks sit on the routers (``mlp.gate`` / ``mlp.router``; see ``moe_blocks``), which in transformers v5 return
    ``(router_logits, top_k_weights, top_k_index)``; they are removed on exit. Each forward pass
    adds one row per token it routes (a batch of B sequences of S tokens adds B*S rows, sequence
    by sequence; padding tokens are routed and recorded too). ``new_request(name)`` starts a new
    request label for the rows that follow.
    """

    def __init__(self, model: nn.Module, request: str = "0"):
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__}: no MoE layer found (a decoder layer whose mlp has experts and "
                             f"a router at mlp.gate or mlp.router)")
        self.num_experts = _num_experts(model)
        self._handles: list = []
        self._step: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._experts: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self._request: list[torch.Tensor] = []
        self._requests: list[str] = []
        self._current = -1
        self.new_request(request)

    def new_request(self, name: str) -> None:
        self._flush()
        if name not in self._requests:
            self._requests.append(name)
        self._current = self._requests.index(name)

    def __enter__(self) -> RouteRecorder:
        if self._handles:
            raise RuntimeError("RouteRecorder is already recording")
        for column, (_, router) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(column)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._flush()

    def _hook(self, column: int):
        def record(module, args, output):
            if not (isinstance(output, tuple) and len(output) >= 3):
                raise TypeError(f"{type(module).__name__}: router output is not (router_logits, top_k_weights, "
                                f"top_k_index); effllm records transformers >= 5 routers only")
            if column in self._step:  # a new forward pass began before the last one reached every layer
                self._flush()
            self._step[column] = (output[2].detach().reshape(-1, output[2].shape[-1]).cpu(),
                                  output[1].detach().reshape(-1, output[1].shape[-1]).float().cpu())
            if len(self._step) == len(self.routers):
                self._flush()
        return record

    def _flush(self) -> None:
        if not self._step:
            return
        if len(self._step) != len(self.routers):
            self._step.clear()  # a pass that skipped layers (an exception mid-forward): not a full route
            return
        cols = [self._step[c] for c in range(len(self.routers))]
        self._step.clear()
        self._experts.append(torch.stack([c[0] for c in cols], 1))
        self._weights.append(torch.stack([c[1] for c in cols], 1))
        self._request.append(torch.full((cols[0][0].shape[0],), self._current, dtype=torch.long))

    def trace(self, **meta) -> RoutingTrace:
        """The routes recorded so far."""
        self._flush()
        if not self._experts:
            raise RuntimeError("RouteRecorder: nothing recorded yet (run the model inside the `with` block)")
        return RoutingTrace(torch.cat(self._experts), self.num_experts, torch.cat(self._weights),
                            torch.cat(self._request), list(self._requests), [i for i, _ in self.routers], meta)


def _num_experts(model: nn.Module) -> int:
    # the experts modules know (transformers v5 experts keep num_experts); else the router's rows
    for _, block, router in moe_blocks(model):
        if isinstance(getattr(block.experts, "num_experts", None), int):
            return block.experts.num_experts
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    raise ValueError(f"{type(model).__name__}: cannot tell the number of experts (no num_experts on the experts "
                     f"modules, no 2-D router weight)")
