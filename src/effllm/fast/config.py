"""``FastDecode``: the options of ``effllm.patch(model, decode=...)``."""

from __future__ import annotations

from dataclasses import dataclass

COMPILE_MODES = (False, "layer", "step")
WEIGHT_MODES = ("model", "bf16")
LM_HEAD_MODES = ("auto", "model", "int8")


@dataclass(frozen=True)
class FastDecode:
    """How ``generate()`` of a decode-patched model runs.

    - ``compile``: "layer" (default) compiles one decoder layer with ``torch.compile`` and runs
      it for every layer (one graph per shape bucket, compiled in tens of seconds); "step"
      compiles the whole decode step (fewer calls per token, minutes of compilation for a
      30-layer model); False runs the same step eagerly (the fused ops still apply).
    - ``weights``: "model" multiplies float linears in the model's dtype; "bf16" keeps a
      bfloat16 copy of them for the fast path. Quantized linears (``quant=``) keep their format.
    - ``lm_head``: "int8" multiplies the output projection with an INT8 copy of it; "model"
      keeps it as the model has it; "auto" is "int8" when the model's other linears are
      quantized (the float head then dominates the bytes read per token), else "model".
    - ``min_capacity``: the smallest static cache (tokens); capacities are powers of two above it.
    """

    compile: bool | str = "layer"
    weights: str = "model"
    lm_head: str = "auto"
    min_capacity: int = 256

    def __post_init__(self):
        if self.compile is True:
            object.__setattr__(self, "compile", "layer")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"FastDecode: compile must be one of {COMPILE_MODES} (or True), got {self.compile!r}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"FastDecode: weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"FastDecode: lm_head must be one of {LM_HEAD_MODES}, got {self.lm_head!r}")
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 1:
            raise ValueError(f"FastDecode: min_capacity must be a positive int, got {self.min_capacity!r}")
