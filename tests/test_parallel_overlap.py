"""fused_allreduce_rmsnorm and token_split_overlap on 2 and 3 gloo processes.

The fused norm is compared with all-reduce then add then RMSNorm (forward and gradients); the
overlapped layer with the unsharded single-process layer, with overlap (no grad) and under
autograd.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from effllm.kernels import rms_norm
from effllm.parallel import (ColumnParallelLinear, RowParallelLinear, fused_allreduce_rmsnorm, reduce_from_group,
                             llama_layer_branches, overlap_min_tokens, shard_sequence, tensor_parallel, token_split_overlap,
                             unshard_sequence)
from effllm.parallel.launch import run_checks

close = torch.testing.assert_close


def check_fused_allreduce_rmsnorm(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for shape in [(2, 5, 16), (3, 4 * world, 8), (1, 1, 8)]:
        torch.manual_seed(0)
        residual = torch.randn(shape)
        weight = torch.randn(shape[-1])
        w1, w2 = torch.randn(shape), torch.randn(shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(10 + rank))  # a different partial per rank

        xr, rr, wr = (t.clone().requires_grad_() for t in (x, residual, weight))
        h_ref = reduce_from_group(xr, group) + rr
        normed_ref = rms_norm(h_ref, wr, 1e-5)
        ((normed_ref * w1).sum() + (h_ref * w2).sum()).backward()

        xf, rf, wf = (t.clone().requires_grad_() for t in (x, residual, weight))
        normed, h = fused_allreduce_rmsnorm(xf, rf, wf, group, eps=1e-5)
        ((normed * w1).sum() + (h * w2).sum()).backward()

        close(normed, normed_ref.detach(), msg=lambda m: f"{shape} normed: {m}")
        close(h, h_ref.detach(), msg=lambda m: f"{shape} h: {m}")
        close(xf.grad, xr.grad, msg=lambda m: f"{shape} dx: {m}")
        close(rf.grad, rr.grad, msg=lambda m: f"{shape} dresidual: {m}")
        close(wf.grad, wr.grad, msg=lambda m: f"{shape} dweight: {m}")


def check_fused_chain_with_sharded_residual(group):
    # Two layers' norms with the residual kept as token slices, as TokenWeave chains them.
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shape, count = (2, 5, 8), 10
    torch.manual_seed(2)
    residual = torch.randn(shape)
    weights = [torch.randn(8), torch.randn(8)]
    w_out = [torch.randn(shape) for _ in range(3)]
    gen = torch.Generator().manual_seed(20 + rank)
    partials = [torch.randn(shape, generator=gen) for _ in range(2)]

    def shard(t):
        return shard_sequence(t.reshape(-1, 8), group, dim=0)

    xr = [p.clone().requires_grad_() for p in partials]
    rr = residual.clone().requires_grad_()
    h1 = reduce_from_group(xr[0], group) + rr
    n1 = rms_norm(h1, weights[0], 1e-6)
    h2 = reduce_from_group(xr[1], group) + h1
    n2 = rms_norm(h2, weights[1], 1e-6)
    ((n1 * w_out[0]).sum() + (n2 * w_out[1]).sum() + (h2 * w_out[2]).sum()).backward()

    xs = [p.clone().requires_grad_() for p in partials]
    rs = residual.clone().requires_grad_()
    m1, s1 = fused_allreduce_rmsnorm(xs[0], shard(rs), weights[0], group, residual_sharded=True)
    m2, s2 = fused_allreduce_rmsnorm(xs[1], s1, weights[1], group, residual_sharded=True)
    g2 = unshard_sequence(s2, group, count, dim=0).reshape(shape)
    ((m1 * w_out[0]).sum() + (m2 * w_out[1]).sum() + (g2 * w_out[2]).sum()).backward()

    assert s1.shape == (-(-count // world), 8)
    close(m1, n1.detach())
    close(m2, n2.detach())
    close(g2, h2.detach())
    close(xs[0].grad, xr[0].grad)
    close(xs[1].grad, xr[1].grad)
    close(shard(rs.grad), shard(rr.grad))  # each rank holds (and differentiates) its slice only
    with pytest.raises(ValueError, match=rf"token slice of shape \({-(-count // world)}, 8\)"):
        fused_allreduce_rmsnorm(xs[0], residual, weights[0], group, residual_sharded=True)


class _Layer(nn.Module):
    """A pre-norm decoder layer's shape: a token-mixing branch, then an MLP branch."""

    def __init__(self, hidden=8, inner=12):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.mix_in, self.mix_out = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        self.up, self.down = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    @staticmethod
    def mix(x):  # causal running mean over each sequence: chunks must be whole sequences
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return x.cumsum(1) / steps

    def branches(self):
        return [lambda h: self.mix_out(self.mix(self.mix_in(self.norm1(h)))),
                lambda h: self.down(F.silu(self.up(self.norm2(h))))]

    def forward(self, h):
        for branch in self.branches():
            h = h + branch(h)
        return h


def _sharded(layer, group):
    tp = _Layer()
    tp.norm1, tp.norm2 = layer.norm1, layer.norm2
    tp.mix_in, tp.up = (ColumnParallelLinear.from_linear(m, group) for m in (layer.mix_in, layer.up))
    tp.mix_out, tp.down = (RowParallelLinear.from_linear(m, group, reduce_output=False)
                           for m in (layer.mix_out, layer.down))
    return tp


def check_token_split_overlap(group):
    torch.manual_seed(1)
    layer = _Layer()
    tp = _sharded(layer, group)
    h = torch.randn(5, 6, 8)
    want = layer(h).detach()
    for chunks in (1, 2, 3):
        with torch.no_grad():
            got = token_split_overlap(tp.branches(), h, group, chunks=chunks, min_tokens=0)
        close(got, want, msg=lambda m: f"chunks={chunks}: {m}")
    with torch.no_grad():  # few tokens: one piece whatever chunks says
        close(token_split_overlap(tp.branches(), h, group, chunks=2), want)

    hg = h.clone().requires_grad_()
    token_split_overlap(tp.branches(), hg, group, min_tokens=0).sum().backward()
    hr = h.clone().requires_grad_()
    layer(hr).sum().backward()
    close(hg.grad, hr.grad)
    close(tp.norm1.weight.grad, layer.norm1.weight.grad)


def check_overlap_on_a_sharded_llama_layer(group):
    from transformers import LlamaConfig, LlamaForCausalLM

    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=70,
                                                   num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=3,
                                                   head_dim=8)).eval())
    ref, tp = models
    tensor_parallel(tp, group)
    h = torch.randn(4, 6, 48)
    position_embeddings = ref.model.rotary_emb(h, torch.arange(6)[None])
    want = ref.model.layers[0](h, position_embeddings=position_embeddings)
    branches = llama_layer_branches(tp.model.layers[0], position_embeddings=position_embeddings)
    with torch.no_grad():
        got = token_split_overlap(branches, h, group, min_tokens=0)
    hg = h.clone().requires_grad_()
    token_split_overlap(branches, hg, group, min_tokens=0).sum().backward()
    hr = h.clone().requires_grad_()
    ref.model.layers[0](hr, position_embeddings=position_embeddings).sum().backward()

    close(got, want.detach())
    close(hg.grad, hr.grad)
    assert tp.model.layers[0].self_attn.o_proj.reduce_output  # restored after each branch
    with pytest.raises(ValueError, match="expected a decoder layer sharded by tensor_parallel"):
        llama_layer_branches(ref.model.layers[0])
    with pytest.raises(ValueError, match=r"attention argument position_embeddings\[0\] has batch dimension 4"):
        llama_layer_branches(tp.model.layers[0], position_embeddings=tuple(t.expand(4, -1, -1)
                                                                         for t in position_embeddings))


def check_default_splits_only_from_the_threshold(group):
    # Count the all-reduces: one per branch in one piece, one per branch and chunk when split.
    world = dist.get_world_size(group)
    threshold = overlap_min_tokens(world)
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.shape[0])
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        with torch.no_grad():
            for tokens, want in [(threshold - 2, 2), (threshold, 4)]:
                calls.clear()
                token_split_overlap([lambda t: t * 0.5, lambda t: t * 0.25], torch.ones(2, tokens // 2, 4), group)
                assert len(calls) == want, f"{tokens} tokens at {world} ranks: {len(calls)} all-reduces, want {want}"
    finally:
        dist.all_reduce = real
    assert overlap_min_tokens(2) == 4096 and overlap_min_tokens(8) == 1024
    with pytest.raises(ValueError, match="min_tokens must be None or an int >= 0"):
        token_split_overlap([lambda t: t], torch.ones(2, 3), group, min_tokens=-1)


def check_bad_input(group):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fused_allreduce_rmsnorm(x, x, torch.ones(4), group)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fused_allreduce_rmsnorm(x, x[:1], torch.ones(8), group)
    with pytest.raises(ValueError, match=r"length 2 cannot be split into 3 chunks"):
        token_split_overlap([lambda t: t], x, group, chunks=3, min_tokens=0)
    with pytest.raises(ValueError, match="partial sum shaped like its input"), torch.no_grad():
        token_split_overlap([lambda t: t[..., :4]], x, group, min_tokens=0)
    with pytest.raises(ValueError, match="needs reduce_output=True"):
        RowParallelLinear(4, 4, group, sequence_parallel=True, reduce_output=False)


CHECKS = [check_fused_allreduce_rmsnorm, check_fused_chain_with_sharded_residual, check_token_split_overlap,
          check_overlap_on_a_sharded_llama_layer, check_default_splits_only_from_the_threshold, check_bad_input]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"{p}ranks")
def outcome(request):
    return run_checks(CHECKS, request.param)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_overlap_matches_sequential(outcome, name):
    failures = outcome[name]
    assert not failures, "\n".join(failures)
