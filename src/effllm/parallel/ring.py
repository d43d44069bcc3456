"""Ring attention: each rank keeps its queries and the key/value blocks travel around the ring.

At step ``t`` rank ``r`` attends to the block of rank ``r - t`` (``effllm.kernels.attention`` with
``return_lse=True``) while the next block is already in flight (``batch_isend_irecv``), and merges
the partial result with the running one by its log-sum-exp, in float32:
``lse = logaddexp(lse, lse_b); out = out * exp(lse_old - lse) + out_b * exp(lse_b - lse)``.

Causal masking per step (positions from ``sequence.py``'s layouts):

- contiguous: the own block is causal, earlier ranks' blocks are fully visible, later ones are
  skipped, so rank P-1 works P times as much as rank 0;
- zigzag: the own block is causal; a block from an earlier rank is visible to all local queries
  through its first chunk only; a block from a later rank is visible in full to the second local
  chunk only. Every step is half a block's work on every rank: balanced.

Backward (a custom ``autograd.Function``): the blocks go around the ring again, each one's
attention is recomputed with autograd, and the gradient of the merged output is split into the
gradients of the block's output and LSE (``d out_b = w dout``, ``d lse_b = w (dout . (out_b - out))``
with ``w = exp(lse_b - lse)``); key/value gradients travel with their block and arrive home after
the last step. Memory stays one block of keys and values (plus its gradient) per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._group import rank_and_size
from .sequence import check_sharded_qkv, token_positions


class _RingExchange:
    """Send a tensor to the next rank and receive the previous rank's, asynchronously."""

    def __init__(self, group):
        rank, world = rank_and_size(group)
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.prev = dist.get_global_rank(group, (rank - 1) % world)

    def start(self, tensor: torch.Tensor):
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, self.next, self.group),
                                        dist.P2POp(dist.irecv, received, self.prev, self.group)])
        return received, works

    @staticmethod
    def finish(pending) -> torch.Tensor:
        received, works = pending
        for work in works:
            work.wait()
        return received


def _plan(step, rank, world, *, causal, layout, local_len, seq_len):
    """The attention calls of one step: ``(query slice, key slice, causal)`` against rank ``rank - step``'s block."""
    src = (rank - step) % world
    everything = slice(None)
    if causal:
        # Real queries never see padded keys: those sit after every real position.
        if src == rank:
            return [(everything, everything, True)]
        if layout == "contiguous":
            return [(everything, everything, False)] if src < rank else []
        half = local_len // 2
        if src < rank:
            return [(everything, slice(0, half), False)]
        return [(slice(half, None), everything, False)]
    # Padded keys are a suffix of their block: attend to the real prefix only.
    real = _real_tokens(src, world, local_len, layout, seq_len)
    return [(everything, slice(0, real), False)] if real else []


def _real_tokens(rank, world, local_len, layout, seq_len) -> int:
    """How many of rank's tokens are real (position < seq_len); no device work."""
    def count(start, length):
        return min(max(seq_len - start, 0), length)

    if layout == "contiguous":
        return count(rank * local_len, local_len)
    chunk = local_len // 2
    return count(rank * chunk, chunk) + count((2 * world - 1 - rank) * chunk, chunk)


def _merge(out, lse, block_out, block_lse, rows):
    """Fold a block's (out, lse) into the running float32 ones for the query rows ``rows``."""
    old = lse[:, :, rows]
    new = torch.logaddexp(old, block_lse)
    # Rows that have seen no key yet are -inf on both sides: their weights are 0, not NaN.
    w_old = torch.exp(old - new).nan_to_num(nan=0.0).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse - new).nan_to_num(nan=0.0).transpose(1, 2).unsqueeze(-1)
    out[:, rows] = out[:, rows] * w_old + block_out.float() * w_new
    lse[:, :, rows] = new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, options):
        rank, world = rank_and_size(group)
        batch, local_len, heads, _ = q.shape
        plan = dict(causal=options["causal"], layout=options["layout"], local_len=local_len,
                    seq_len=options["seq_len"])
        attend = dict(scale=options["scale"], return_lse=True, backend=options["backend"])
        ring = _RingExchange(group) if world > 1 else None
        out = torch.zeros(batch, local_len, heads, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full((batch, heads, local_len), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        from ..kernels.attention import attention

        for step in range(world):
            pending = ring.start(kv) if step < world - 1 else None  # the next block travels during compute
            for rows, keys, causal in _plan(step, rank, world, **plan):
                block_out, block_lse = attention(q[:, rows], kv[0][:, keys], kv[1][:, keys], causal=causal, **attend)
                _merge(out, lse, block_out, block_lse, rows)
            if pending is not None:
                kv = ring.finish(pending)
        padded = token_positions(world, rank, local_len, options["layout"], q.device) >= options["seq_len"]
        out[:, padded] = 0.0
        ctx.save_for_backward(q, k, v, out, lse, padded)
        ctx.group, ctx.plan, ctx.attend = group, plan, attend
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        from ..kernels.attention import attention

        q, k, v, out, lse, padded = ctx.saved_tensors
        group, plan, attend = ctx.group, ctx.plan, ctx.attend
        rank, world = rank_and_size(group)
        ring = _RingExchange(group) if world > 1 else None
        dout = dout.float().masked_fill(padded.view(1, -1, 1, 1), 0.0)  # padded rows are not outputs
        dout_dot_out = (dout * out).sum(-1)  # (B, S_local, H)
        dq = torch.zeros_like(q, dtype=torch.float32)
        dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
        kv = torch.stack([k, v])
        for step in range(world):
            pending = ring.start(kv) if step < world - 1 else None
            for rows, keys, causal in _plan(step, rank, world, **plan):
                with torch.enable_grad():
                    qb = q[:, rows].detach().requires_grad_()
                    kb = kv[0][:, keys].detach().requires_grad_()
                    vb = kv[1][:, keys].detach().requires_grad_()
                    block_out, block_lse = attention(qb, kb, vb, causal=causal, **attend)
                weight = torch.exp(block_lse.detach() - lse[:, :, rows]).nan_to_num(nan=0.0)  # (B, H, rows)
                d_block_out = dout[:, rows] * weight.transpose(1, 2).unsqueeze(-1)
                d_block_lse = weight * ((dout[:, rows] * block_out.detach().float()).sum(-1)
                                        - dout_dot_out[:, rows]).transpose(1, 2)
                gq, gk, gv = torch.autograd.grad((block_out, block_lse), (qb, kb, vb),
                                                 (d_block_out.to(block_out.dtype), d_block_lse))
                dq[:, rows] += gq
                dkv[0][:, keys] += gk
                dkv[1][:, keys] += gv
            if pending is not None:
                kv = ring.finish(pending)
            if ring is not None:
                # This block's key/value gradient moves on with the block; after the last step it is home.
                dkv = ring.finish(ring.start(dkv))
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *, causal: bool = True,
                   seq_len: int | None = None, layout: str = "contiguous", scale: float | None = None,
                   backend: str = "auto", check_inputs: bool = True) -> torch.Tensor:
    """Attention over a sequence sharded on ``group`` by passing key/value blocks around the ring.

    ``q (B, S_local, H, D)``, ``k, v (B, S_local, H_kv, D)`` are this rank's tokens in ``layout``
    (``"zigzag"`` balances causal work; see ``sequence.py`` for the layouts and the padding rule),
    ``seq_len`` the true sequence length (default ``P * S_local``). Returns this rank's
    ``(B, S_local, H, D)`` output (padded query rows are zeros). GQA as in
    ``effllm.kernels.attention``; differentiable. ``check_inputs`` compares the shapes and options
    of all ranks first (one small all-gather), so a mismatch raises on every rank instead of
    failing inside the ring (gloo aborts the process on a size mismatch).
    """
    _, seq_len = check_sharded_qkv("ring_attention", q, k, v, group, layout=layout, seq_len=seq_len,
                                   causal=causal, check_inputs=check_inputs, value_dim_is_head_dim=True)
    options = dict(causal=bool(causal), layout=layout, seq_len=seq_len, scale=scale, backend=backend)
    return _RingAttention.apply(q, k, v, group, options)
