"""Importing effllm initialises no device, imports neither transformers nor triton, patches nothing."""

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_is_lean():
    out = _run("""
        import sys
        import torch
        import effllm
        print(effllm.__version__)
        print("transformers" in sys.modules, "triton" in sys.modules, torch.cuda.is_initialized())
    """)
    version, flags = out.strip().splitlines()
    assert version and version[0].isdigit()
    assert flags == "False False False"


def test_subpackages_load_lazily_without_transformers():
    out = _run("""
        import sys
        import effllm
        effllm.kernels, effllm.hf, effllm.bench, effllm.testing.tolerances
        effllm.quant, effllm.kv, effllm.moe, effllm.parallel
        print("transformers" in sys.modules, "triton" in sys.modules)
    """)
    assert out.strip() == "False False"


def test_import_registers_nothing_with_transformers():
    out = _run("""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        before = (sorted(AttentionInterface._global_mapping), sorted(AttentionMaskInterface._global_mapping))
        import effllm
        effllm.hf, effllm.kernels, effllm.patch
        after = (sorted(AttentionInterface._global_mapping), sorted(AttentionMaskInterface._global_mapping))
        print(before == after, "effllm" in after[0])
    """)
    assert out.strip() == "True False"


def test_unknown_attribute_raises():
    import effllm

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        effllm.nope
