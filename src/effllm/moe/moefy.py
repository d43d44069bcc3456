"""A MoE with real routing, built from a dense gated-MLP model (in the spirit of MoEfication).

No trained MoE checkpoint can be had here, so ``moefy(model, ...)`` turns each decoder layer's
gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, as in Llama) into ``num_experts`` experts
that split its intermediate channels:

- Channels are grouped by co-activation on calibration text: each channel's profile is its
  |activation| over the calibration tokens (normalised), and a balanced k-means puts the same
  number of channels in every expert.
- The router scores an expert by the summed |act(gate)| of its channels for the token and keeps
  the top-k; the weights are all 1, so the layer's output is exactly the dense MLP's restricted
  to the selected experts' channels (top_k = num_experts gives the dense MLP back, up to the
  order of the sum). The router computes the whole gate projection: routing costs a third of the
  dense MLP, and its gate weights stay resident.
- The result is a transformers v5 MoE layout (``mlp.gate`` returning ``(scores, weights, index)``
  and ``mlp.experts`` with fused ``gate_up_proj [E, 2I/E, H]`` / ``down_proj [E, H, I/E]``,
  dispatched through ``ExpertsInterface``), so ``RouteRecorder`` and ``offload_experts`` work on it.

The conversion is one way and in place.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def _classes():
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation
    class MoEfiedExperts(nn.Module):
        """The experts of one MoEfied MLP: fused ``gate_up_proj`` / ``down_proj``."""

        def __init__(self, config, num_experts: int, channels: int):
            super().__init__()
            self.num_experts = num_experts
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * channels, config.hidden_size))
            self.down_proj = nn.Parameter(torch.empty(num_experts, config.hidden_size, channels))
            self.act_fn = ACT2FN[config.hidden_act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for expert in torch.unique(top_k_index).tolist():
                token, slot = torch.where(top_k_index == expert)
                gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
                y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
                out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
            return out

    class MoEfiedRouter(nn.Module):
        """Scores each expert by the summed |act(gate)| of its channels; keeps the top-k, weight 1."""

        def __init__(self, config, num_experts: int, top_k: int, route_by: str, channels: int):
            super().__init__()
            self.num_experts = num_experts
            self.top_k = top_k
            rows = channels * (2 if route_by == "gate_up" else 1)
            self.weight = nn.Parameter(torch.empty(rows, config.hidden_size))  # gate (then up) rows, by expert
            self.act_fn = ACT2FN[config.hidden_act]
            self.route_by = route_by

        def forward(self, hidden_states):
            proj = nn.functional.linear(hidden_states, self.weight)
            if self.route_by == "gate_up":
                gate, up = proj.chunk(2, dim=-1)
                act = (self.act_fn(gate) * up).abs()
            else:
                act = self.act_fn(proj).abs()
            scores = act.view(*act.shape[:-1], self.num_experts, -1).sum(-1).float()
            index = torch.topk(scores, self.top_k, dim=-1).indices
            return scores, torch.ones_like(index, dtype=hidden_states.dtype), index

    class SharedExpert(nn.Module):
        """The always-on channels: a dense gated MLP over ``channels`` of the intermediate ones."""

        def __init__(self, config, channels: int):
            super().__init__()
            self.gate_proj = nn.Linear(config.hidden_size, channels, bias=False)
            self.up_proj = nn.Linear(config.hidden_size, channels, bias=False)
            self.down_proj = nn.Linear(channels, config.hidden_size, bias=False)
            self.act_fn = ACT2FN[config.hidden_act]

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class MoEfiedMLP(nn.Module):
        def __init__(self, config, num_experts: int, top_k: int, route_by: str, shared_channels: int = 0):
            super().__init__()
            routed = config.intermediate_size - shared_channels
            self.gate = MoEfiedRouter(config, num_experts, top_k, route_by, routed)
            self.experts = MoEfiedExperts(config, num_experts, routed // num_experts)
            self.shared_expert = SharedExpert(config, shared_channels) if shared_channels else None

        def forward(self, hidden_states):
            shape = hidden_states.shape
            flat = hidden_states.reshape(-1, shape[-1])
            _, weights, index = self.gate(flat)
            out = self.experts(flat, index, weights)
            if self.shared_expert is not None:
                out = out + self.shared_expert(flat)
            return out.reshape(shape)

    return MoEfiedMLP


def _balanced_kmeans(features: torch.Tensor, groups: int, iters: int, seed: int) -> torch.Tensor:
    """Group ids for each row of ``features`` (unit rows), ``len / groups`` rows per group."""
    n = features.shape[0]
    size = n // groups
    gen = torch.Generator().manual_seed(seed)
    centres = features[torch.randperm(n, generator=gen)[:groups]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = features @ centres.T  # [n, groups]
        # balanced assignment: rows that prefer one group most clearly choose first, each takes
        # its most similar group that still has room
        ranked = torch.argsort(sim, dim=1, descending=True)
        top2 = torch.topk(sim, 2, dim=1).values
        fill = [0] * groups
        for row in torch.argsort(top2[:, 0] - top2[:, 1], descending=True).tolist():
            for group in ranked[row].tolist():
                if fill[group] < size:
                    assign[row] = group
                    fill[group] += 1
                    break
        centres = torch.stack([features[assign == g].mean(0) for g in range(groups)])
        centres = centres / centres.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return assign


@torch.no_grad()
def moefy(model: nn.Module, calibration_ids: torch.Tensor, *, num_experts: int = 16, top_k: int = 4,
          route_by: str = "gate_up", shared_channels: int = 0, iters: int = 8, seed: int = 0) -> nn.Module:
    """Turn every gated MLP of ``model`` into a MoE of ``num_experts`` experts, ``top_k`` per token.

    ``calibration_ids``: token ids ``[batch, seq]`` whose MLP activations group the channels.
    ``shared_channels``: this many channels, those most often among a calibration token's
    ``shared_channels`` strongest (by |act(gate) * up|), form an always-on shared expert
    (``mlp.shared_expert``, resident under ``offload_experts``); the other channels are split
    into the routed experts. Returns the model (converted in place).
    """
    from .traces import _decoder_layers

    layers = _decoder_layers(model)
    config = model.config
    inter = config.intermediate_size
    if not 0 <= shared_channels < inter:
        raise ValueError(f"moefy: shared_channels must be in [0, intermediate_size={inter}), got {shared_channels}")
    if (inter - shared_channels) % num_experts:
        raise ValueError(f"moefy: intermediate_size {inter} less shared_channels={shared_channels} is not a "
                         f"multiple of num_experts={num_experts}")
    if route_by not in ("gate", "gate_up"):
        raise ValueError(f"moefy: route_by must be 'gate' or 'gate_up', got {route_by!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moefy: top_k must be in [1, num_experts={num_experts}], got {top_k}")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"moefy: layer {i} has no gated MLP (gate_proj, up_proj, down_proj)")
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"moefy: layer {i}'s MLP has biases, which the experts do not carry")

    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda module, args, i=i: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).detach()))
        for i, layer in enumerate(layers)]
    try:
        model(calibration_ids)
    finally:
        for hook in hooks:
            hook.remove()

    block_cls = _classes()
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        x = inputs[i]
        act = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs()  # [tokens, channels]
        routed = torch.arange(inter, device=act.device)
        shared = routed[:0]
        if shared_channels:
            # how often each channel is among a token's strongest; ties by total magnitude
            top = torch.topk(act, shared_channels, dim=-1).indices.flatten()
            strong = torch.zeros(inter, device=act.device).index_add_(0, top, torch.ones(top.numel(), device=act.device))
            rank = torch.argsort(strong + act.float().sum(0) / act.float().sum().clamp_min(1e-12), descending=True)
            shared, routed = rank[:shared_channels].sort().values, rank[shared_channels:].sort().values
        act = act[:, routed]
        profile = act.T / act.T.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        groups = _balanced_kmeans(profile.float(), num_experts, iters, seed + i)
        channels = routed[torch.argsort(groups, stable=True)].view(num_experts, -1)  # [experts, channels each]
        block = block_cls(config, num_experts, top_k, route_by, shared_channels).to(
            device=mlp.gate_proj.weight.device, dtype=mlp.gate_proj.weight.dtype)
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        if shared_channels:
            block.shared_expert.gate_proj.weight.copy_(gate[shared])
            block.shared_expert.up_proj.weight.copy_(up[shared])
            block.shared_expert.down_proj.weight.copy_(down[:, shared])
        order = channels.flatten()
        block.gate.weight.copy_(torch.cat([gate[order], up[order]]) if route_by == "gate_up" else gate[order])
        block.experts.gate_up_proj.copy_(torch.cat([gate[channels], up[channels]], dim=1))
        block.experts.down_proj.copy_(down[:, channels].permute(1, 0, 2))
        block.experts.config = config
        layer.mlp = block
    if getattr(config, "_experts_implementation", None) is None:
        config._experts_implementation_internal = "eager"
    return model
