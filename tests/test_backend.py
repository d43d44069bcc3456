import pytest
import torch

from effllm._backend import interpreting, resolve_backend


def test_auto_on_cpu_is_torch():
    x = torch.zeros(2)
    assert resolve_backend("auto", x, op="t") == "torch"
    assert resolve_backend("torch", x, op="t") == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        resolve_backend("cuda", torch.zeros(1), op="t")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1), op="myop")


def test_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.zeros(1), op="myop") == "triton"


def test_triton_requested_for_op_without_kernel():
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        resolve_backend("triton", torch.zeros(1), op="myop", has_triton_kernel=False)


def test_triton_not_installed(monkeypatch):
    import effllm._backend as backend

    monkeypatch.setattr(backend, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        resolve_backend("triton", torch.zeros(1), op="myop")
    assert resolve_backend("auto", torch.zeros(1), op="myop") == "torch"


def test_mixed_devices_rejected():
    meta = torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="one device"):
        resolve_backend("auto", torch.zeros(1), meta, op="myop")


def test_op_without_triton_kernel():
    from effllm.kernels import rms_norm

    with pytest.raises(RuntimeError, match="rms_norm: there is no Triton kernel"):
        rms_norm(torch.randn(2, 8), backend="triton")
