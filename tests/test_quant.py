"""Quantized linears, the Triton W4A16 / FP8 kernels (interpreter), quantize_, save/load."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from effllm._backend import interpreting
from effllm.quant.registry import handler_for
from effllm.quant import (Fp8, Fp8Linear, Int4Linear, Int4WeightOnly, Int8Linear, Int8WeightOnly, ModuleConfigs,
                          load, quantize_, save)
from effllm.quant import formats
from effllm.quant.fp8 import _dequantize_activations
from effllm.testing import SQNR_FLOOR_DB, assert_close_to_reference, assert_sqnr_at_least

HAS_TRITON = torch.cuda.is_available() or interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {
    "int4_g32": Int4WeightOnly(32), "int4_g64": Int4WeightOnly(64), "int4_g128": Int4WeightOnly(128),
    "int8_weight_only": Int8WeightOnly(), "fp8_e4m3_row": Fp8("row"), "fp8_e4m3_block": Fp8("block", "block"),
    "fp8_e4m3_tensor": Fp8("tensor"),
}


def _linear(n=96, k=256, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=k ** -0.5)  # trained-weight-like: bell shaped, not uniform
    return lin


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sqnr_floor_per_format(name):
    lin = _linear()
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(copy.deepcopy(lin))
    quantize_(model, CONFIGS[name])
    assert_sqnr_at_least(lin(x).detach(), model(x), SQNR_FLOOR_DB[name], name=name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_module_matches_its_own_dequantized_weight(name):
    # The fast path (CPU packed ops) multiplies by exactly the weight the module reports.
    lin = _linear(n=48, k=128, seed=2)
    model = nn.Sequential(lin)
    quantize_(model, CONFIGS[name])
    module = model[0]
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3))
    out = module(x)
    assert out.shape == (3, 5, 48)
    x2 = x.reshape(-1, 128)
    if isinstance(module, Fp8Linear):
        x2 = _dequantize_activations(*formats.fp8_quantize_activations(x2, module.config.activations))
    want = (x2 @ module.dequantize(torch.float32).t() + module.bias).reshape(3, 5, 48)
    # CPU int4/int8 ops run in bf16: allow bf16 rounding of the output
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_repr_state_dict_and_bad_input():
    model = nn.Sequential(_linear(), nn.ReLU(), _linear(n=32, k=96, bias=False))
    quantize_(model, ModuleConfigs({"2": Int8WeightOnly(), "default": Int4WeightOnly(64)}))
    assert "int4 asymmetric group_size=64" in repr(model[0]) and "int8 per-channel" in repr(model[2])
    keys = set(model.state_dict())
    assert {"0.qweight", "0.scales", "0.zeros", "0.bias", "2.qweight", "2.scales"} == keys
    assert model.state_dict()["0.qweight"].dtype == torch.uint8 and model.state_dict()["0.qweight"].shape == (96, 128)
    with pytest.raises(ValueError, match="in_features=256"):
        model[0](torch.randn(2, 255))


# ---- Triton kernels (interpreter) -------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("m,n,k,group,split", [(1, 33, 128, 128, None), (5, 72, 256, 64, 3), (19, 40, 192, 32, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["fused", "dequant"])
def test_w4a16_kernel(m, n, k, group, split, dtype, symmetric, method):
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from effllm.kernels.triton.w4a16 import w4a16_matmul

    gen = torch.Generator().manual_seed(m * n)
    w, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    q, scales, zeros = formats.int4_quantize(w.to(dtype), group, symmetric)
    deq = formats.int4_dequantize(q, scales, zeros, group, dtype=torch.float32)
    xd = x.to(dtype).to(DEVICE)
    out = w4a16_matmul(xd, formats.int4_pack(q).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group, split_k=split,
                       method=method)
    ref = x.to(dtype).float() @ deq.t()
    same = (x.to(dtype) @ deq.to(dtype).t()) if dtype != torch.bfloat16 else (x.to(dtype).float() @ deq.t()).to(dtype)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_reference(out.cpu(), ref, same, floor=1e-4 if dtype == torch.float32 else None)


@pytest.mark.interpret
def test_w4a16_rejects_bad_group_and_method():
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from effllm.kernels.triton.w4a16 import w4a16_matmul

    x = torch.randn(2, 96, device=DEVICE)
    qweight = torch.zeros(8, 48, dtype=torch.uint8, device=DEVICE)
    scales = torch.ones(8, 1, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of group_size 64"):
        w4a16_matmul(x, qweight, scales, scales, 64)
    with pytest.raises(ValueError, match="method must be"):
        w4a16_matmul(x, qweight, torch.ones(8, 3, device=DEVICE), torch.ones(8, 3, device=DEVICE), 32, method="x")


@pytest.mark.interpret
@pytest.mark.parametrize("m,n,k", [(5, 72, 300), (17, 130, 256), (1, 16, 128)])
@pytest.mark.parametrize("weights", ["tensor", "row", "block"])
@pytest.mark.parametrize("acts", ["token", "block"])
def test_fp8_kernel_matches_dequantized_product(m, n, k, weights, acts):
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from effllm.kernels.triton.fp8_gemm import fp8_matmul

    gen = torch.Generator().manual_seed(m + n)
    w, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    wq, ws = formats.fp8_quantize(w, weights)
    xq, xs = formats.fp8_quantize_activations(x, acts)
    x_deq, w_deq = _dequantize_activations(xq, xs), formats.fp8_dequantize(wq, ws)
    ref = x_deq @ w_deq.t()
    out = fp8_matmul(xq.to(DEVICE), xs.to(DEVICE), wq.to(DEVICE), ws.to(DEVICE), out_dtype=torch.float32).cpu()
    # fp8 products are exact; the interpreter sums them in fp32, so only the order differs. A
    # GPU's fp8 tensor cores add each MMA's products with about 14 bits kept (DeepSeek-V3
    # report, section 3.3.2), so there each output may be off by 2^-14 of its sum of |products|.
    hardware = 2.0 ** -14 * (x_deq.abs() @ w_deq.abs().t()) if DEVICE == "cuda" else 0.0
    err = (out - ref).abs()
    assert (err <= 1e-4 + 1e-5 * ref.abs() + hardware).all(), f"max error {err.max():.3g}"


@pytest.mark.interpret
def test_modules_route_to_triton_when_asked():
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    for cfg in (Int4WeightOnly(64), Fp8("block", "block")):
        model = nn.Sequential(_linear(n=40, k=128, seed=4)).to(DEVICE)
        quantize_(model, cfg)
        x = torch.randn(3, 128, device=DEVICE)
        torch_out = model(x)
        model[0].backend = "triton"
        # the CPU op runs in bf16; the kernel in x's dtype (fp32): agreement to bf16 rounding
        torch.testing.assert_close(model(x), torch_out, rtol=2e-2, atol=2e-2)


# ---- quantize_ --------------------------------------------------------------------------------

class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.proj = _linear(n=64, k=64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.proj(self.embed(ids)))


def test_report_skips_tied_and_none():
    model = TiedLM()
    report = quantize_(model, ModuleConfigs({"re:pro.*": Int4WeightOnly(64), "default": Int8WeightOnly()}))
    assert list(report.quantized) == ["proj"] and isinstance(model.proj, Int4Linear)
    assert "weight tied to embed.weight" in report.skipped["head"]
    assert model.head.weight is model.embed.weight
    report = quantize_(TiedLM(), Int8WeightOnly(), filter_fn=lambda m, name: name != "proj")
    assert report.quantized == {} and "head" in report.skipped
    report = quantize_(TiedLM(), ModuleConfigs({"re:pro.*": Int4WeightOnly(64)}))
    assert report.skipped["head"] == "config is None"
    untied = TiedLM()
    report = quantize_(untied, ModuleConfigs({"head": Int8WeightOnly()}))  # named explicitly: quantized
    assert list(report.quantized) == ["head"] and isinstance(untied.head, Int8Linear)
    assert isinstance(untied.embed.weight, nn.Parameter)


def test_shape_errors_change_nothing():
    model = nn.Sequential(_linear(k=256), _linear(n=8, k=96))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"1: in_features 96 is not a multiple of group_size 128"):
        quantize_(model, Int4WeightOnly(128))
    assert type(model[0]) is nn.Linear and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_(model, Int4WeightOnly(32, act_aware=True))
    with pytest.raises(ValueError, match="config must be"):
        quantize_(model, "int4")


def test_act_aware_beats_round_to_nearest_on_outlier_channels():
    # Inputs with a few large channels: activation-aware scales protect the weights that meet them.
    gen = torch.Generator().manual_seed(5)
    lin = _linear(n=64, k=256, seed=6)
    boost = torch.ones(256)
    boost[torch.randperm(256, generator=gen)[:8]] = 30.0
    calib = [torch.randn(32, 256, generator=gen) * boost for _ in range(4)]
    x = torch.randn(64, 256, generator=gen) * boost
    ref = lin(x).detach()
    errors = {}
    for aware in (False, True):
        model = nn.Sequential(copy.deepcopy(lin))
        quantize_(model, Int4WeightOnly(128, act_aware=aware), calibration=calib if aware else None)
        errors[aware] = (model(x) - ref).pow(2).mean().item()
        if aware:
            assert model[0].input_scale is not None and "act_aware" in repr(model[0])
    assert errors[True] < 0.7 * errors[False], errors


# ---- save / load ------------------------------------------------------------------------------

def _mixed_model():
    model = TiedLM()
    model.extra = _linear(n=32, k=64, seed=7)
    return model


GPTQ_CASES = {"fp8-row": Fp8("row", None), "fp8-block": Fp8("block", None), "fp8-tensor": Fp8("tensor", None),
              "int4-g32": Int4WeightOnly(32), "int4-g32-act-aware": Int4WeightOnly(32, act_aware=True)}


@pytest.mark.parametrize("name", list(GPTQ_CASES))
def test_gptq_rounding_cuts_the_output_error_on_the_same_grid(name):
    # Inputs of low effective rank (as real activations are): rounding errors along directions
    # the inputs never take cost nothing, which is what compensation exploits.
    gen = torch.Generator().manual_seed(9)
    lin = _linear(n=48, k=160, seed=10)
    mix = torch.randn(40, 160, generator=gen)

    def inputs(rows):
        return torch.randn(rows, 40, generator=gen) @ mix + 0.05 * torch.randn(rows, 160, generator=gen)

    calib = [inputs(64) for _ in range(4)]
    x = inputs(256)
    ref = lin(x).detach()
    cfg = GPTQ_CASES[name]
    rtn, comp = nn.Sequential(copy.deepcopy(lin)), nn.Sequential(copy.deepcopy(lin))
    quantize_(rtn, cfg, calibration=calib if getattr(cfg, "act_aware", False) else None)
    quantize_(comp, dataclasses.replace(cfg, gptq=True), calibration=calib)
    # same scales (the stored format is unchanged), different codes
    scale_names = ["weight_scale"] if isinstance(cfg, Fp8) else ["scales", "zeros"]
    assert all(torch.equal(getattr(rtn[0], b), getattr(comp[0], b)) for b in scale_names)
    assert not torch.equal(rtn[0].qweight.float(), comp[0].qweight.float())
    err_rtn = (rtn(x) - ref).pow(2).mean().item()
    err_comp = (comp(x) - ref).pow(2).mean().item()
    assert err_comp < 0.7 * err_rtn, (err_comp, err_rtn)
    with pytest.raises(ValueError, match=r"with act_aware=True or gptq=True needs calibration"):
        quantize_(nn.Sequential(copy.deepcopy(lin)), dataclasses.replace(cfg, gptq=True))


def test_gptq_round_with_an_identity_hessian_is_round_to_nearest():
    # No input correlation: nothing to compensate with, every column rounds on its own.
    from effllm.quant.gptq import gptq_round

    w = torch.randn(8, 200, generator=torch.Generator().manual_seed(3))

    def round_column(col, j):
        return torch.round(col * 4) / 4

    torch.testing.assert_close(gptq_round(w, torch.eye(200), round_column, damp=0.0), torch.round(w * 4) / 4)


def test_save_load_is_bit_identical(tmp_path):
    model = _mixed_model()
    quantize_(model, ModuleConfigs({"extra": Fp8("block", "token"), "default": Int4WeightOnly(32, symmetric=True)}))
    ids = torch.randint(0, 50, (2, 9))
    want = model(ids)
    path = tmp_path / "q.safetensors"
    save(model, path)
    fresh = _mixed_model()  # different random init: everything must come from the file
    load(fresh, path)
    assert isinstance(fresh.proj, Int4Linear) and isinstance(fresh.extra, Fp8Linear)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh(ids), want)


def test_load_rejects_mismatches_without_changing_the_model(tmp_path):
    model = _mixed_model()
    quantize_(model, Int8WeightOnly())
    path = tmp_path / "q.safetensors"
    save(model, path)

    wrong_shape = TiedLM()
    wrong_shape.proj = nn.Linear(32, 64)
    with pytest.raises(ValueError, match="proj is 32 -> 64 in the model but 64 -> 64 in the file"):
        load(wrong_shape, path)
    assert type(wrong_shape.proj) is nn.Linear

    # metadata that disagrees with the tensors (a group size the tensors were not written with)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    described = json.loads(meta["effllm.quant"])
    described["proj"]["config"] = {"type": "Int4WeightOnly", "group_size": 32, "symmetric": False,
                                   "act_aware": False, "version": 1}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "effllm.quant": json.dumps(described)})
    target = _mixed_model()
    with pytest.raises(ValueError, match=r"proj.qweight: file has I8 \(64, 64\), expected U8 \(64, 32\)"):
        load(target, bad)
    assert type(target.proj) is nn.Linear

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not written by effllm.quant.save"):
        load(_mixed_model(), plain)
    with pytest.raises(ValueError, match="no quantized modules"):
        save(_mixed_model(), tmp_path / "none.safetensors")


@pytest.mark.parametrize("weights", ["tensor", "row"])
def test_fp8_scaled_mm_matches_the_dequantized_product(weights):
    # torch 2.13's _scaled_mm also runs on CPU (slowly), so the CUDA route's scale layout is
    # checked everywhere.
    from effllm.quant.linear import fp8_scaled_mm

    gen = torch.Generator().manual_seed(21)
    w, x = torch.randn(48, 64, generator=gen).to(DEVICE), (torch.randn(5, 64, generator=gen) * 3).to(DEVICE)
    wq, ws = formats.fp8_quantize(w, weights)
    xq, xs = formats.fp8_quantize_activations(x, "token")
    out = fp8_scaled_mm(xq, xs, wq, ws, out_dtype=torch.bfloat16)
    want = _dequantize_activations(xq, xs) @ formats.fp8_dequantize(wq, ws, dtype=torch.float32).t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    # where cuBLASLt's FP8 GEMM does not apply, the caller keeps the Triton kernel
    assert fp8_scaled_mm(xq, xs, wq, ws, out_dtype=torch.float32) is None
    assert fp8_scaled_mm(xq[:, :60], xs, wq[:, :60], ws, out_dtype=torch.bfloat16) is None
    bq, bs = formats.fp8_quantize(torch.randn(256, 64, generator=gen).to(DEVICE), "block")  # 2 x 1 blocks
    assert fp8_scaled_mm(xq, xs, bq, bs, out_dtype=torch.bfloat16) is None


@pytest.mark.interpret
@pytest.mark.parametrize("m,k", [(1, 64), (5, 300), (3, 4100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_row_quantization_kernel_matches_torch(m, k, dtype):
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from effllm.kernels.triton.fp8_quant import fp8_quantize_rows

    gen = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]).to(dtype)
    x[0, 0] = 0.0
    q, scales = fp8_quantize_rows(x.to(DEVICE))
    want_q, want_scales = formats.fp8_quantize_activations(x, "token")
    assert q.dtype == formats.FP8_DTYPE and q.shape == (m, k) and scales.shape == (m, 1)
    torch.testing.assert_close(scales.cpu(), want_scales, rtol=0, atol=0)
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))  # bit for bit, ties and subnormals


@pytest.mark.interpret
def test_e4m3_rounding_matches_torch_on_every_boundary():
    # Every e4m3 value, the midpoints between neighbours (ties to even) and values just off them.
    if not HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from effllm.kernels.triton.fp8_quant import fp8_quantize_rows

    grid = torch.arange(256, dtype=torch.uint8).view(formats.FP8_DTYPE).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)])
    x = torch.cat([values, -values, torch.tensor([448.0])])[None]  # the row's amax is 448: scale 1
    q, scales = fp8_quantize_rows(x.to(DEVICE))
    assert float(scales) == 1.0
    assert torch.equal(q.cpu().view(torch.uint8), x.to(formats.FP8_DTYPE).view(torch.uint8))


@pytest.mark.parametrize("config", [Int8WeightOnly(), Fp8("row", None), Fp8("tensor", None), Fp8("block", None)],
                         ids=str)
@pytest.mark.parametrize("in_features", [8, 24, 100, 33, 48])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_odd_in_features_match_dequantized_weight(config, in_features, rows):
    # torch's CPU int8 kernel crashes (or returns garbage) for K not a multiple of 16: every
    # weight-only module must route such shapes elsewhere and still give x @ dequant(W).T.
    # (INT4 refuses K that its group does not divide at quantize time: test_bad_input.py.)
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 17)
    module = handler_for(config).from_linear(linear, config)
    x = torch.randn(rows, in_features)
    expected = x @ module.dequantize(torch.float32).t() + linear.bias.detach()
    torch.testing.assert_close(module(x), expected, rtol=2e-2, atol=2e-2)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def _unchanged(model, before):
    tensors, kinds = before
    return ({n: type(m) for n, m in model.named_modules()} == kinds
            and all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items()))


@pytest.mark.parametrize("case", ["other vocab", "missing module", "extra module"])
def test_load_is_all_or_nothing(tmp_path, case):
    # Mismatches outside the quantized modules used to raise after some modules were swapped in.
    model = _mixed_model()
    quantize_(model, Int8WeightOnly())
    path = tmp_path / "q.safetensors"
    save(model, path)
    target = _mixed_model()
    if case == "other vocab":  # a tied embedding of another size
        target.embed = nn.Embedding(51, 64)
        target.head = nn.Linear(64, 51, bias=False)
        target.head.weight = target.embed.weight
        match = "embed.weight: file has"
    elif case == "missing module":
        del target.extra
        match = "extra"
    else:
        target.more = nn.Linear(64, 8)
        match = "more.weight: missing from the file"
    before = _state(target)
    with pytest.raises(ValueError, match=match):
        load(target, path)
    assert _unchanged(target, before)


@pytest.mark.parametrize("meta", ["not json {", "[1, 2]", "{}", '{"proj": 3}',
                                  '{"proj": {"config": {}, "in_features": 64, "out_features": 64, "bias": true, '
                                  '"dtype": "float32"}}',
                                  '{"proj": {"config": {"type": "Int8WeightOnly"}, "in_features": 64, '
                                  '"out_features": 64, "bias": true, "dtype": "not_a_dtype"}}'])
def test_load_names_the_bad_metadata_field(tmp_path, meta):
    model = _mixed_model()
    quantize_(model, Int8WeightOnly())
    path = tmp_path / "q.safetensors"
    save(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={**metadata, "effllm.quant": meta})
    target = _mixed_model()
    before = _state(target)
    with pytest.raises(ValueError, match="not a valid effllm checkpoint"):
        load(target, bad)
    assert _unchanged(target, before)


def test_quantize_reports_already_quantized_and_linear_subclasses():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(nn.Linear(64, 64), ScaledLinear(64, 64))
    quantize_(net, Int8WeightOnly())
    report = quantize_(net, Int8WeightOnly())
    assert not report.quantized
    assert "already quantized" in report.skipped["0"] and "ScaledLinear" in report.skipped["1"]


def test_load_needs_every_quantized_tensor_even_when_not_strict(tmp_path):
    # strict=False may skip plain tensors, never a quantized module's: its shell starts empty.
    model = _mixed_model()
    quantize_(model, Int8WeightOnly())
    path = tmp_path / "q.safetensors"
    save(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors["proj.qweight"]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    target = _mixed_model()
    before = _state(target)
    with pytest.raises(ValueError, match="proj.qweight: missing from the file"):
        load(target, bad, strict=False)
    assert _unchanged(target, before)


def test_a_new_format_is_one_registered_class(monkeypatch, tmp_path):
    """A config and its module, registered together, work through quantize_, ModuleConfigs and
    save/load with no other change (the registry is what every entry point consults)."""
    from dataclasses import dataclass

    from effllm.quant import QuantConfig, QuantLinear, register
    from effllm.quant import registry

    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))  # undone after the test

    @dataclass(frozen=True)
    class HalfWeights(QuantConfig):
        version: int = 1

    @register(HalfWeights)
    class HalfLinear(QuantLinear):
        def __init__(self, in_features, out_features, bias=True, *, config=HalfWeights(), dtype=torch.float32,
                     device=None):
            super().__init__(in_features, out_features, bias, dtype, device)
            self.config = config
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float16, device=device))

        @classmethod
        def shape_error(cls, linear, config):
            return "in_features must be even" if linear.in_features % 2 else None

        @classmethod
        def from_linear(cls, linear, config):
            module = cls._empty_like(linear, config)
            module.qweight.copy_(linear.weight.detach().half())
            return module

        def dequantize(self, dtype=None):
            return self.qweight.to(dtype or self.dtype)

        def _matmul(self, x2):
            return torch.nn.functional.linear(x2, self.dequantize(x2.dtype))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(3, 8)
    report = quantize_(model, ModuleConfigs({"default": HalfWeights()}))
    assert set(report.quantized) == {"0", "2"} and isinstance(model[0], HalfLinear)
    save(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    load(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="in_features must be even"):
        quantize_(nn.Sequential(nn.Linear(7, 4)), HalfWeights())


def test_unregistered_configs_are_refused_with_the_known_names():
    class NotRegistered:
        pass

    with pytest.raises(ValueError, match="Int4WeightOnly, Int8WeightOnly, Fp8|Fp8"):
        quantize_(nn.Sequential(nn.Linear(8, 8)), NotRegistered())
