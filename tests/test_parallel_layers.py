"""Tensor-parallel layers and collectives on 2 and 3 gloo processes against single-process modules.

Each rank builds the same full module and inputs (same seed), runs the sharded version and
compares forward outputs and gradients with the unsharded computation. One spawn per world size
runs every check (``run_checks``); sizes are chosen so that 2 and 3 ranks both shard unevenly.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from effllm.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                             all_to_all, gather_from_group, shard_sizes, vocab_parallel_cross_entropy)
from effllm.parallel._group import shard_range
from effllm.parallel.launch import run_checks

close = torch.testing.assert_close  # fp32 defaults: rtol 1.3e-6, atol 1e-5


def _ctx(group):
    return dist.get_rank(group), dist.get_world_size(group)


def _seq_shard(x, rank, world, dim=1):
    return x.chunk(world, dim=dim)[rank]


def check_column_linear(group):
    rank, world = _ctx(group)
    torch.manual_seed(0)
    lin = nn.Linear(7, 11)
    x = torch.randn(2, 5, 7, requires_grad=True)
    w_out = torch.randn(2, 5, 11)
    (lin(x) * w_out).sum().backward()

    xp = x.detach().clone().requires_grad_()
    gathered = ColumnParallelLinear.from_linear(lin, group, gather_output=True)
    y = gathered(xp)
    (y * w_out).sum().backward()

    xs = x.detach().clone().requires_grad_()
    sharded = ColumnParallelLinear.from_linear(lin, group)
    start, stop = shard_range(11, world, rank)
    y_local = sharded(xs)
    (y_local * w_out[..., start:stop]).sum().backward()

    want = lin(x).detach()
    close(y, want)
    close(xp.grad, x.grad)
    close(gathered.weight.grad, lin.weight.grad[start:stop])
    close(gathered.bias.grad, lin.bias.grad[start:stop])
    close(y_local, want[..., start:stop])
    close(xs.grad, x.grad)
    assert gathered.weight.shape == (shard_sizes(11, world)[rank], 7)


def check_row_linear(group):
    rank, world = _ctx(group)
    torch.manual_seed(1)
    lin = nn.Linear(10, 6)
    x = torch.randn(3, 4, 10, requires_grad=True)
    w_out = torch.randn(3, 4, 6)
    (lin(x) * w_out).sum().backward()
    start, stop = shard_range(10, world, rank)

    xr = x.detach().clone().requires_grad_()
    scattering = RowParallelLinear.from_linear(lin, group, input_is_parallel=False)
    y = scattering(xr)
    (y * w_out).sum().backward()

    xs = x.detach()[..., start:stop].clone().requires_grad_()
    row = RowParallelLinear.from_linear(lin, group)
    y2 = row(xs)
    (y2 * w_out).sum().backward()

    want = lin(x).detach()
    close(y, want)
    close(y2, want)
    close(xr.grad, x.grad)
    close(xs.grad, x.grad[..., start:stop])
    close(row.weight.grad, lin.weight.grad[:, start:stop])
    close(row.bias.grad, lin.bias.grad)


def _mlp_reference(seed, hidden=6, inner=10, seq=6):
    torch.manual_seed(seed)
    up, down = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
    x = torch.randn(2, seq, hidden, requires_grad=True)
    w_out = torch.randn(2, seq, hidden)
    y = down(F.gelu(up(x)))
    (y * w_out).sum().backward()
    return up, down, x, w_out, y.detach()


def check_mlp_pair(group):
    rank, world = _ctx(group)
    up, down, x, w_out, want = _mlp_reference(2)
    col, row = ColumnParallelLinear.from_linear(up, group), RowParallelLinear.from_linear(down, group)
    xp = x.detach().clone().requires_grad_()
    y = row(F.gelu(col(xp)))
    (y * w_out).sum().backward()
    start, stop = shard_range(10, world, rank)
    close(y, want)
    close(xp.grad, x.grad)
    close(col.weight.grad, up.weight.grad[start:stop])
    close(row.weight.grad, down.weight.grad[:, start:stop])
    close(row.bias.grad, down.bias.grad)


def check_mlp_pair_sequence_parallel(group):
    rank, world = _ctx(group)
    up, down, x, w_out, want = _mlp_reference(3, seq=2 * world)
    col = ColumnParallelLinear.from_linear(up, group, sequence_parallel=True)
    row = RowParallelLinear.from_linear(down, group, sequence_parallel=True)
    xs = _seq_shard(x.detach(), rank, world).clone().requires_grad_()
    y = row(F.gelu(col(xs)))
    # The loss is the sum of every rank's part; each rank backpropagates its own part.
    (y * _seq_shard(w_out, rank, world)).sum().backward()
    start, stop = shard_range(10, world, rank)
    close(y, _seq_shard(want, rank, world))
    close(xs.grad, _seq_shard(x.grad, rank, world))
    close(col.weight.grad, up.weight.grad[start:stop])
    close(col.bias.grad, up.bias.grad[start:stop])
    close(row.weight.grad, down.weight.grad[:, start:stop])
    close(row.bias.grad, down.bias.grad)


def check_vocab_embedding(group):
    rank, world = _ctx(group)
    torch.manual_seed(4)
    emb = nn.Embedding(13, 5, padding_idx=12)
    ids = torch.tensor([[0, 3, 12, 7, 5, 12], [11, 10, 4, 4, 1, 6]])
    w_out = torch.randn(2, 6, 5)
    (emb(ids) * w_out).sum().backward()
    start, stop = shard_range(13, world, rank)

    par = VocabParallelEmbedding.from_embedding(emb, group)
    y = par(ids)
    (y * w_out).sum().backward()

    sp = VocabParallelEmbedding.from_embedding(emb, group, sequence_parallel=True)
    ids_sp = torch.randint(0, 13, (2, 2 * world), generator=torch.Generator().manual_seed(5))
    y_sp = sp(ids_sp)

    close(y, emb(ids).detach())
    close(par.weight.grad, emb.weight.grad[start:stop])
    close(y_sp, _seq_shard(emb(ids_sp).detach(), rank, world))


def check_lm_head_cross_entropy(group):
    rank, world = _ctx(group)
    torch.manual_seed(6)
    head = nn.Linear(8, 13, bias=False)
    h = torch.randn(3, 4, 8, requires_grad=True)
    target = torch.randint(0, 13, (3, 4))
    target[0, 1] = target[2, 3] = -100
    F.cross_entropy(head(h).flatten(0, 1), target.flatten()).backward()
    start, stop = shard_range(13, world, rank)

    par = ParallelLMHead.from_linear(head, group)
    hp = h.detach().clone().requires_grad_()
    local = par(hp)
    loss = vocab_parallel_cross_entropy(local, target, group)
    loss.backward()
    summed = vocab_parallel_cross_entropy(local.detach(), target, group, reduction="sum", vocab_size=13)
    each = vocab_parallel_cross_entropy(local.detach(), target, group, reduction="none")
    full = ParallelLMHead.from_linear(head, group, gather_output=True)(h.detach())

    logits = head(h).detach()
    close(loss, F.cross_entropy(logits.flatten(0, 1), target.flatten()))
    close(summed, F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
    close(each, F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
    close(hp.grad, h.grad)
    close(par.weight.grad, head.weight.grad[start:stop])
    close(full, logits)


def check_tied_embedding_and_head(group):
    rank, world = _ctx(group)
    torch.manual_seed(7)
    emb = nn.Embedding(11, 6)
    ids = torch.randint(0, 11, (2, 5))
    target = torch.randint(0, 11, (2, 5))
    F.cross_entropy((emb(ids) @ emb.weight.t()).transpose(1, 2), target).backward()
    start, stop = shard_range(11, world, rank)

    par_emb = VocabParallelEmbedding.from_embedding(emb, group)
    head = ParallelLMHead.from_embedding(par_emb)
    vocab_parallel_cross_entropy(head(par_emb(ids)), target, group).backward()

    assert head.weight is par_emb.weight
    close(par_emb.weight.grad, emb.weight.grad[start:stop])


def check_uneven_all_to_all(group):
    rank, world = _ctx(group)
    torch.manual_seed(8)
    heads = 2 * world + 1  # uneven split of heads, equal split of the sequence
    full = torch.randn(2, 3 * world, heads, 4)
    w_out = torch.randn(2, 3 * world, heads, 4)
    sizes = shard_sizes(heads, world)
    start, stop = shard_range(heads, world, rank)
    x = _seq_shard(full, rank, world).clone().requires_grad_()
    swapped = all_to_all(x, group, split_dim=2, join_dim=1, split_sizes=sizes, join_sizes=[3] * world)
    (swapped * w_out[:, :, start:stop]).sum().backward()
    back = all_to_all(swapped.detach(), group, split_dim=1, join_dim=2, split_sizes=[3] * world, join_sizes=sizes)
    close(swapped, full[:, :, start:stop])
    close(back, x.detach())
    close(x.grad, _seq_shard(w_out, rank, world))


def check_uneven_gather(group):
    rank, world = _ctx(group)
    full = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7).requires_grad_()
    sizes = shard_sizes(7, world)
    start, stop = shard_range(7, world, rank)
    local = full.detach()[:, start:stop].clone().requires_grad_()
    out = gather_from_group(local, group, dim=-1, sizes=sizes)
    (out * torch.arange(7.0)).sum().backward()
    close(out, full.detach())
    close(local.grad, torch.arange(7.0)[start:stop].expand(2, -1))


def check_dtensor_cross_check(group):
    # DTensor's ColwiseParallel / RowwiseParallel as an independent oracle (even sizes: DTensor
    # shards unevenly by torch.chunk, a different rule).
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    rank, world = _ctx(group)
    torch.manual_seed(9)
    mlp = nn.Sequential(nn.Linear(6, 4 * world), nn.SiLU(), nn.Linear(4 * world, 6))
    x = torch.randn(2, 3, 6)
    w_out = torch.randn(2, 3, 6)
    ours = nn.Sequential(ColumnParallelLinear.from_linear(mlp[0], group), nn.SiLU(),
                         RowParallelLinear.from_linear(mlp[2], group))
    theirs = parallelize_module(copy.deepcopy(mlp), DeviceMesh("cpu", list(range(world))),
                                {"0": ColwiseParallel(), "2": RowwiseParallel()})
    y_ours = ours(x)
    (y_ours * w_out).sum().backward()
    y_theirs = theirs(x)
    (y_theirs * w_out).sum().backward()
    close(y_ours, y_theirs)
    close(ours[0].weight.grad, theirs[0].weight.grad.to_local())
    close(ours[2].weight.grad, theirs[2].weight.grad.to_local())
    close(ours[2].bias.grad, theirs[2].bias.grad.full_tensor())


def check_bad_input(group):
    rank, world = _ctx(group)
    with pytest.raises(ValueError, match="group must be a torch.distributed ProcessGroup"):
        ColumnParallelLinear(4, 4, None)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        RowParallelLinear.from_linear(nn.Conv1d(2, 2, 1), group)
    row = RowParallelLinear(7, 3, group)
    with pytest.raises(ValueError, match=f"this rank's {shard_sizes(7, world)[rank]} of 7 input features"):
        row(torch.randn(2, 7))
    sp = RowParallelLinear(6, 3, group, sequence_parallel=True)
    with pytest.raises(ValueError, match=f"length {2 * world + 1} must be a multiple of the group's world size "
                                         f"{world}"):
        sp(torch.randn(1, 2 * world + 1, shard_sizes(6, world)[rank]))
    with pytest.raises(ValueError, match="should hold logits"):
        wrong_width = shard_sizes(13, world)[rank] + 1
        vocab_parallel_cross_entropy(torch.randn(2, wrong_width), torch.zeros(2, dtype=torch.long), group,
                                     vocab_size=13)


CHECKS = [check_column_linear, check_row_linear, check_mlp_pair, check_mlp_pair_sequence_parallel,
          check_vocab_embedding, check_lm_head_cross_entropy, check_tied_embedding_and_head, check_uneven_all_to_all,
          check_uneven_gather, check_dtensor_cross_check, check_bad_input]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"{p}ranks")
def outcome(request):
    return run_checks(CHECKS, request.param)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_layers_match_single_process(outcome, name):
    failures = outcome[name]
    assert not failures, "\n".join(failures)


def test_layers_refuse_an_uninitialised_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ColumnParallelLinear(4, 4, dist.group.WORLD)
