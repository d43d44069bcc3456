"""Tier 1: a compressed cache on CUDA (Triton decode and prefill kernels, paged ragged rows)
evicts the same tokens and gives the same logits as on CPU (torch paths), step by step; the
KIVI cache gives the same logits too."""

import pytest
import torch

from effllm.kv import CAKE, H2O, AdaKV, KVzip, Protected, SnapKV, StreamingLLM, compress
from effllm.testing.models import tiny_causal_lm

pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

POLICIES = {
    "StreamingLLM": lambda: StreamingLLM(0.4, sinks=4),
    "SnapKV": lambda: SnapKV(0.4, window=8, kernel=5),
    "H2O": lambda: H2O(0.4, recent=0.25),
    "CAKE": lambda: CAKE(0.4, window=8),
    "AdaKV-SnapKV": lambda: AdaKV(SnapKV(0.4, window=8), alpha_safeguard=0.5),
    "AdaKV-H2O": lambda: AdaKV(H2O(0.4, recent=0.25), alpha_safeguard=0.5),
    "Protected-H2O": lambda: Protected(H2O(0.4, recent=0.25), spans=[(0, 10)]),
    "KVzip": lambda: KVzip(0.4, [7, 8, 9, 10], safeguard=0.2),
}


def _run(device, make_policy, page_size, steps):
    model = tiny_causal_lm("llama", 21, num_hidden_layers=2).to(device)
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(0, 101, (2, 57), generator=gen)
    logits, kept = [], []
    with compress(model, make_policy()) as kv, torch.inference_mode():
        cache = kv.new_cache(page_size=page_size, keep_positions=True)  # compared across devices below
        out = model(ids.to(device), past_key_values=cache, use_cache=True).logits[:, -1:]
        logits.append(out.float().cpu())
        for token in steps:  # the same tokens on both devices, so a difference cannot cascade
            out = model(token.to(device), past_key_values=cache, use_cache=True).logits
            logits.append(out.float().cpu())
        for layer in cache.layers:
            positions = layer.positions.cpu()
            valid = positions >= 0 if layer.valid_mask() is None else layer.valid_mask().cpu()
            kept.append([[sorted(positions[b, h][valid[b, h]].tolist())
                          for h in range(valid.shape[1])] for b in range(valid.shape[0])])
    return logits, kept


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("name", list(POLICIES))
def test_compressed_cache_on_cuda_matches_cpu(name, page_size):
    gen = torch.Generator().manual_seed(22)
    steps = [torch.randint(0, 101, (2, 1), generator=gen) for _ in range(12)]
    cpu_logits, cpu_kept = _run("cpu", POLICIES[name], page_size, steps)
    gpu_logits, gpu_kept = _run("cuda", POLICIES[name], page_size, steps)
    assert gpu_kept == cpu_kept
    for step, (got, want) in enumerate(zip(gpu_logits, cpu_logits)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_cache_on_cuda_matches_cpu(bits):
    from effllm.kv import KIVI, QuantizedKVCache

    gen = torch.Generator().manual_seed(23)
    ids = torch.randint(0, 101, (2, 57), generator=gen)
    steps = [torch.randint(0, 101, (2, 1), generator=gen) for _ in range(20)]
    logits = {}
    for device in ("cpu", "cuda"):
        model = tiny_causal_lm("llama", 23, num_hidden_layers=2).to(device)
        cache = QuantizedKVCache(KIVI(bits, group=8, residual=16))
        with torch.inference_mode():
            out = [model(ids.to(device), past_key_values=cache).logits[:, -1]]
            out += [model(t.to(device), past_key_values=cache).logits[:, -1] for t in steps]
        logits[device] = torch.stack(out).float().cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-4, atol=1e-4)
