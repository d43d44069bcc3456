"""Test configuration shared by every tier.

The Triton interpreter must be chosen before any kernel module is imported (``@triton.jit``
picks interpreted or compiled at decoration time), so it is set here, first thing.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

# CI runs a fixed set of examples (derandomized) so a run is reproducible; locally the default
# profile explores new examples each time.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    # EFFLLM_FAILURE_LOG=path: every failure is appended as it happens, so a run stopped by a time
    # limit (a GPU lease) keeps its tracebacks. Written by the controller only (xdist workers'
    # reports reach it too).
    path = os.environ.get("EFFLLM_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as log:
            log.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def _load_or_skip(loader):
    from effllm.testing.models import ModelNotInstalledError

    try:
        return loader()
    except ModelNotInstalledError as exc:
        if os.environ.get("EFFLLM_REQUIRE_MODEL") == "1":
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, shared by the whole session."""
    from effllm.testing.models import smollm2 as load

    return _load_or_skip(load)


@pytest.fixture(scope="session")
def minilm():
    from effllm.testing.models import minilm as load

    return _load_or_skip(load)


@pytest.fixture(params=["native loops", "native loops, 3 threads", "torch ops"])
def cpu_path(request, monkeypatch):
    """Runs a CPU test through ``native``'s loops (on one thread, then with every call cut into
    3 ranges a head on 3 threads however small), then with them off (``EFFLLM_NATIVE=0``)."""
    import shutil

    from effllm import native

    if request.param == "torch ops":
        monkeypatch.setenv("EFFLLM_NATIVE", "0")
    else:
        monkeypatch.delenv("EFFLLM_NATIVE", raising=False)
        if shutil.which(os.environ.get("CC") or "cc") is None:
            pytest.skip("no C compiler on PATH: the torch path is all there is")
        assert native.available(), native.why_unavailable()
    threaded = request.param.endswith("3 threads")
    if threaded:
        monkeypatch.setattr(native, "TOKENS_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3 if threaded else 1)
    yield request.param
    torch.set_num_threads(threads)
