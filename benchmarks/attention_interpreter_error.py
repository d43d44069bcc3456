"""Max error of the Triton attention kernel vs the float32 reference, per dtype, under the
Triton interpreter on CPU (or on a GPU when one is present).

    python benchmarks/attention_interpreter_error.py

Shapes are small and odd on purpose (the interpreter runs every program as numpy code).
Also prints torch's own error at the same dtype: the tests allow the kernel twice that.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from effllm.kernels import attention, attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # (B, Sq, Sk, H, Hkv, D, causal, window, softcap)
    (2, 37, 37, 6, 2, 64, True, None, None),
    (1, 5, 53, 4, 1, 80, True, None, None),
    (1, 17, 70, 4, 4, 96, False, (5, 3), None),
    (2, 29, 29, 4, 2, 64, True, None, 30.0),
    (1, 100, 100, 4, 2, 128, True, (20, 0), None),
]


def main() -> None:
    print(f"{'dtype':<9} {'kernel max err':>14} {'torch same-dtype err':>20}   (worst over {len(CASES)} shapes, {DEVICE})")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kernel_err = torch_err = 0.0
        for i, (b, sq, sk, h, hkv, d, causal, window, cap) in enumerate(CASES):
            gen = torch.Generator().manual_seed(i)
            q = torch.randn(b, sq, h, d, generator=gen).to(DEVICE, dtype)
            k = torch.randn(b, sk, hkv, d, generator=gen).to(DEVICE, dtype)
            v = torch.randn(b, sk, hkv, d, generator=gen).to(DEVICE, dtype)
            kw = dict(causal=causal, window=window, softcap=cap)
            out = attention(q, k, v, backend="triton", **kw)
            ref, _ = attention_reference(q, k, v, **kw)
            same, _ = attention_reference(q, k, v, compute_dtype=dtype, **kw)
            kernel_err = max(kernel_err, float((out.float() - ref).abs().max()))
            torch_err = max(torch_err, float((same.to(dtype).float() - ref).abs().max()))
        print(f"{str(dtype).replace('torch.', ''):<9} {kernel_err:>14.2e} {torch_err:>20.2e}")


if __name__ == "__main__":
    main()
