"""Quantized linear layers against float ``F.linear`` at Llama shapes, M in {1, 16, 128}.

CPU memory-bound GEMVs run from cache when one weight is reused, which flatters whichever format
is smallest. Each provider therefore cycles through ``COPIES`` distinct weights (more than the
L3 of a server CPU holds at 4096 x 4096 fp32), one per call.

Providers compute different (quantized) products, so this case has no refcheck: quality is
measured by the ``quant.quality`` case.
"""

from __future__ import annotations

import importlib.util
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ...quant import Fp8, Int4WeightOnly, Int8WeightOnly, quantize_
from ..registry import Setup, case

COPIES = 4
# Llama-2/3 7-8B attention projection, Llama-3.2-1B MLP up and down.
_SHAPES = [
    {"M": m, "N": n, "K": k}
    for (n, k) in ((4096, 4096), (8192, 2048), (2048, 8192))
    for m in (1, 16, 128)
]


def _cycled(fns):
    it = itertools.cycle(fns)
    return lambda: next(it)()


def _quantized(weights, config):
    modules = []
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_(w)
        holder = nn.Sequential(lin)
        quantize_(holder, config)
        modules.append(holder[0])
    return modules


def _torchao_providers(weights, x, x_bf16, unavailable) -> dict:
    """torchao's weight-only configs on the same weights: INT8 (fp32 model) and, on CPU, its
    prototype INT4 (bf16 model, torch's packed CPU op underneath)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.quantization import quantize_ as ao_quantize_
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        unavailable["torchao"] = f"torchao failed to import: {exc}"
        return {}

    def modules(config, dtype):
        mods = []
        for w in weights:
            holder = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=dtype))
            holder[0].weight.data.copy_(w)
            ao_quantize_(holder, config)
            mods.append(holder[0])
        return mods

    providers = {"torchao-int8": _cycled([lambda mod=mod: mod(x) for mod in modules(Int8WeightOnlyConfig(),
                                                                                     x.dtype)])}
    if x.device.type == "cpu":
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            int4 = modules(PrototypeInt4WeightOnlyConfig(group_size=128), torch.bfloat16)
            providers["torchao-int4-bf16x"] = _cycled([lambda mod=mod: mod(x_bf16) for mod in int4])
        except Exception as exc:  # noqa: BLE001
            unavailable["torchao-int4-bf16x"] = f"torchao's CPU INT4 config failed: {exc}"
    return providers


# A prefill-sized M, where the GEMMs turn compute-bound on a GPU.
_GPU_SHAPES = [{"M": 2048, "N": n, "K": k} for (n, k) in ((4096, 4096), (8192, 2048))]


@case("quant.linear", shapes=_SHAPES, gpu_shapes=_GPU_SHAPES, dtypes=("float32",), baseline="bf16",
      description=f"y = x @ W.T with W cycled over {COPIES} copies; effllm INT4/INT8/FP8 vs fp32/bf16 F.linear")
def quant_linear(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    m, n, k = shape["M"], shape["N"], shape["K"]
    weights = [(torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype) for _ in range(COPIES)]
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    x_bf16 = x.to(torch.bfloat16)
    weights_bf16 = [w.to(torch.bfloat16) for w in weights]
    int4 = _quantized(weights, Int4WeightOnly(128))
    int8 = _quantized(weights, Int8WeightOnly())
    providers = {
        "fp32": _cycled([lambda w=w: F.linear(x, w) for w in weights]),
        "bf16": _cycled([lambda w=w: F.linear(x_bf16, w) for w in weights_bf16]),
        "effllm-int4": _cycled([lambda mod=mod: mod(x) for mod in int4]),
        "effllm-int4-bf16x": _cycled([lambda mod=mod: mod(x_bf16) for mod in int4]),
        "effllm-int8": _cycled([lambda mod=mod: mod(x) for mod in int8]),
    }
    unavailable = {}
    if device.type == "cuda":
        fp8 = _quantized(weights, Fp8("row", "token"))
        providers["effllm-fp8-row"] = _cycled([lambda mod=mod: mod(x_bf16) for mod in fp8])
    else:
        unavailable["effllm-fp8-row"] = "FP8 on CPU is a storage format (dequantized fp32 compute): not a speed path"
    if importlib.util.find_spec("torchao") is None:
        unavailable["torchao"] = "torchao is not installed"
    else:
        providers.update(_torchao_providers(weights, x, x_bf16, unavailable))
    for mod in int4:  # build the CPU pack outside the timed region
        mod(x[:1])
    if device.type == "cpu":
        # torch's packed ops alone (pre-packed weights, bf16 x, no module): the ceiling of the
        # CPU path, to tell the module's overhead from the op's own speed.
        providers["torch-int4pack-op"] = _cycled([
            lambda mod=mod: torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, *mod._cpu_pack[:1], 128,
                                                                        mod._cpu_pack[1]) for mod in int4])
        for mod in int8:
            mod(x[:1])
        providers["torch-int8pack-op"] = _cycled([
            lambda mod=mod: torch._weight_int8pack_mm(x_bf16, mod.qweight, mod._bf16_scales) for mod in int8])
    weight_bytes = {"fp32": 4, "bf16": 2, "effllm-int4": 0.5 + 4 / 128, "effllm-int8": 1}
    return Setup(providers=providers, flops=2 * m * n * k, bytes_moved=n * k * weight_bytes["fp32"],
                 unavailable=unavailable)
