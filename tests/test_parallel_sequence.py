"""Sequence parallelism (Ulysses, ring attention) on 2 and 3 gloo processes against full attention.

Every rank computes full attention on the whole sequence (effllm.kernels.attention, autograd) as
the reference, then runs the sharded version on its block and compares the block's output and
the gradients of its q, k, v. Lengths include ones the world size does not divide (padding
rule), GQA with KV heads fewer than, equal to and not dividing the world size.
"""

import itertools

import pytest
import torch
import torch.distributed as dist

from effllm._backend import interpreting, triton_installed
from effllm.kernels import attention
from effllm.parallel import ring_attention, shard_sequence, ulysses_attention, unshard_sequence
from effllm.parallel.launch import run_checks
from effllm.parallel.sequence import padded_length
from effllm.testing import assert_close_to_reference

HEADS = [(4, 4), (6, 2), (6, 3)]  # (query heads, KV heads)


def _close(got, want, case):
    torch.testing.assert_close(got, want, msg=lambda m: f"{case}: {m}")


def _compare(group, fn, layout, causal, heads, kv_heads, seq_len, backend="torch", **options):
    case = (f"{fn.__name__} layout={layout} causal={causal} heads={heads}/{kv_heads} seq_len={seq_len} "
            f"backend={backend} {options}")
    gen = torch.Generator().manual_seed(seq_len * 100 + heads * 10 + kv_heads)
    q = torch.randn(2, seq_len, heads, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, seq_len, kv_heads, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, seq_len, kv_heads, 8, generator=gen, requires_grad=True)
    w_out = torch.randn(2, seq_len, heads, 8, generator=gen)
    ref = attention(q, k, v, causal=causal, backend="torch", **options)
    (ref * w_out).sum().backward()

    def shard(x):
        return shard_sequence(x.detach(), group, layout=layout)

    ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
    out = fn(ql, kl, vl, group, causal=causal, seq_len=seq_len, layout=layout, backend=backend, **options)
    (out * shard(w_out)).sum().backward()
    # Padded rows are zeros in the sharded output and in the zero-padded reference alike.
    _close(out, shard(ref), case + " out")
    _close(ql.grad, shard(q.grad), case + " dq")
    _close(kl.grad, shard(k.grad), case + " dk")
    _close(vl.grad, shard(v.grad), case + " dv")


def _sweep(group, fn, layout, **options):
    world = dist.get_world_size(group)
    unit = 2 * world if layout == "zigzag" else world
    for causal, (heads, kv_heads), seq_len in itertools.product((True, False), HEADS, (2 * unit, 2 * unit - 1, 5)):
        _compare(group, fn, layout, causal, heads, kv_heads, seq_len, **options)


def check_ring_contiguous(group):
    _sweep(group, ring_attention, "contiguous")


def check_ring_zigzag(group):
    _sweep(group, ring_attention, "zigzag")


def check_ulysses_contiguous(group):
    _sweep(group, ulysses_attention, "contiguous")


def check_ulysses_zigzag(group):
    _sweep(group, ulysses_attention, "zigzag")


def check_ulysses_window_and_softcap(group):
    _compare(group, ulysses_attention, "zigzag", True, 6, 3, 11, window=3, softcap=5.0)


def check_triton_backend(group):
    # The blocks' attention and its LSE gradient through the Triton kernels (interpreted on CPU).
    for causal in (True, False):
        _compare(group, ring_attention, "zigzag", causal, 4, 2, 7, backend="triton")
    _compare(group, ulysses_attention, "contiguous", True, 4, 2, 7, backend="triton")


def check_bf16_within_the_attention_tolerance(group):
    # A sharded bf16 run against float32: within the tolerance table's bound (2x torch's own bf16
    # error plus the bf16 floor), output and gradients.
    seq_len = 61
    gen = torch.Generator().manual_seed(7)
    full = [torch.randn(2, seq_len, h, 16, generator=gen) for h in (8, 2, 2)]
    w_out = torch.randn(2, seq_len, 8, 16, generator=gen)

    def run(tensors, fn=None, layout="zigzag"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        if fn is None:
            out = attention(*leaves, causal=True, backend="torch")
            weight = w_out
        else:
            leaves = [shard_sequence(t.detach(), group, layout=layout).clone().requires_grad_() for t in tensors]
            out = fn(*leaves, group, causal=True, seq_len=seq_len, layout=layout, backend="torch")
            weight = shard_sequence(w_out, group, layout=layout)
        (out.float() * weight).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    def shard(x):
        return shard_sequence(x, group, layout="zigzag")

    want = [shard(t) for t in run(full)]
    torch_bf16 = [shard(t) for t in run([t.bfloat16() for t in full])]
    for fn in (ring_attention, ulysses_attention):
        got = run([t.bfloat16() for t in full], fn)
        for name, g, w, t in zip(("out", "dq", "dk", "dv"), got, want, torch_bf16):
            assert_close_to_reference(g, w, t, name=f"{fn.__name__} bf16 {name}")


def check_shard_round_trip(group):
    world = dist.get_world_size(group)
    x = torch.arange(2 * 11 * 3, dtype=torch.float32).reshape(2, 11, 3)
    for layout in ("contiguous", "zigzag"):
        local = shard_sequence(x, group, layout=layout)
        assert local.shape[1] == padded_length(11, world, layout) // world
        _close(unshard_sequence(local, group, 11, layout=layout), x, layout)


def check_bad_input(group):
    world = dist.get_world_size(group)
    q = torch.randn(1, 4, world - 1 or 1, 8)
    with pytest.raises(ValueError, match=f"{world} ranks need at least {world} query heads"):
        ulysses_attention(q, q, q, group)
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"seq_len=3 does not match the shards"):
        ring_attention(q, q, q, group, seq_len=3)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, group, layout="striped")
    with pytest.raises(ValueError, match="local sequence length must be even"):
        ring_attention(q[:, :3], q[:, :3], q[:, :3], group, layout="zigzag")
    with pytest.raises(ValueError, match=r"kv heads \(3\) must divide query heads \(4\)"):
        ring_attention(q, q[:, :, :3], q[:, :, :3], group)
    # Shards of different lengths: every rank raises (gloo would abort a process mid-ring).
    rank = dist.get_rank(group)
    uneven = torch.randn(1, 4 + 2 * rank, 4, 8)
    for fn in (ring_attention, ulysses_attention):
        with pytest.raises(ValueError, match=r"(?s)the ranks' inputs disagree.*rank 1: q \(1, 6, 4, 8\)"):
            fn(uneven, uneven, uneven, group)


CHECKS = [check_ring_contiguous, check_ring_zigzag, check_ulysses_contiguous, check_ulysses_zigzag,
          check_ulysses_window_and_softcap, check_bf16_within_the_attention_tolerance, check_shard_round_trip,
          check_bad_input]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"{p}ranks")
def outcome(request):
    return run_checks(CHECKS, request.param)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_sequence_parallel_matches_full_attention(outcome, name):
    failures = outcome[name]
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not (triton_installed() and interpreting()),
                    reason="CPU ranks run the Triton kernels only under TRITON_INTERPRET=1")
def test_sequence_parallel_with_the_triton_kernels():
    failures = run_checks([check_triton_backend], 2)["check_triton_backend"]
    assert not failures, "\n".join(failures)
