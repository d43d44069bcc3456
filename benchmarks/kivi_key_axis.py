"""Why KIVI quantizes keys per channel: perplexity on SmolLM2 (``kv_quality.py``'s continuation:
256 tokens of ``calibration.txt`` after 768 cached) with keys grouped per channel (KIVI) and, as
a diagnostic, per token (how values are grouped), 1 thread; prints, writes nothing.

    python benchmarks/kivi_key_axis.py
"""

from __future__ import annotations

import torch

import effllm.kv.quantizers as quantizers
import kv_quality as kq
from effllm.kv import KIVI
from effllm.testing.models import smollm2
from kv_quant_quality import QuantizedSession


def main() -> None:
    torch.set_num_threads(1)
    model, tok = smollm2()
    full = kq.run_perplexity(model, tok, kq.Session, None)
    per_channel = quantizers.quantize_groups

    def keys_per_token(x, bits, group, axis):
        return per_channel(x, bits, group, -1)

    for config in (KIVI(2, 32, 128), KIVI(2, 16, 128), KIVI(4, 32, 128)):
        for name, quantize in (("keys per channel", per_channel), ("keys per token", keys_per_token)):
            quantizers.quantize_groups = quantize
            try:
                ppl = kq.run_perplexity(model, tok, QuantizedSession, config)
            finally:
                quantizers.quantize_groups = per_channel
            print(f"{config!r:40s} {name:17s} {ppl:.3f} ({100 * (ppl / full - 1):+.2f}%, full {full:.3f})", flush=True)


if __name__ == "__main__":
    main()
