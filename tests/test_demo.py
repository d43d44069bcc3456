"""effllm demo on the real model, small enough for CI."""

import argparse

import pytest
import torch

from effllm import demo

pytestmark = pytest.mark.model


def _args(**overrides):
    values = {"features": "baseline,attention", "prompt_tokens": 200, "new_tokens": 4, "repeats": 2, "threads": 1,
              "seed": 0}
    return argparse.Namespace(**(values | overrides))


def test_prompt_has_the_key_and_the_requested_length(smollm2):
    _, tok = smollm2
    prompt = demo.build_prompt(tok, 300, seed=3)
    n = prompt.input_ids.shape[1]
    assert 250 <= n <= 300
    assert f"pass key is {prompt.key}" in tok.decode(prompt.input_ids[0])
    assert tok.decode(prompt.answer_ids[0]).strip() == f"The secret pass key is {prompt.key}."


def _rows(out: str) -> dict[str, list[str]]:
    table = [line.split() for line in out.splitlines() if len(line.split()) == 9]
    return {parts[0]: parts for parts in table if parts[0] in demo.FEATURES}


def test_demo_prints_a_row_per_feature_with_runs_progress_and_legend(smollm2, capsys):
    assert demo.run(_args()) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"baseline", "attention"}
    # The torch attention path computes the same thing: greedy tokens agree fully.
    assert rows["attention"][-1] == "1.00"
    assert rows["attention"][3:5] == rows["baseline"][3:5]  # same weight and KV bytes
    assert "median of 2 run(s)" in out and "warm-up done" in out
    assert out.count("run 1/2") == 2 and out.count("run 2/2") == 2  # progress, interleaved
    assert out.index("run 1/2 attention") < out.index("run 2/2 baseline")
    assert "legend:" in out and "answer NLL" in out.split("legend:")[1]


def test_quantized_rows_hold_fewer_weight_bytes(smollm2, capsys):
    assert demo.run(_args(features="baseline,attention+int8", repeats=1, new_tokens=2)) == 0
    rows = _rows(capsys.readouterr().out)
    assert float(rows["attention+int8"][3]) < 0.5 * float(rows["baseline"][3])


def test_weight_nbytes_counts_shared_storage_once():
    linear = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(linear, linear)
    assert demo.weight_nbytes(model) == 4 * 4 * 4


def test_demo_rejects_unknown_features():
    with pytest.raises(SystemExit, match="unknown feature"):
        demo.run(_args(features="baseline,warp"))


def test_default_threads_leave_busy_cpus_alone(monkeypatch):
    monkeypatch.setattr(demo, "_usable_cpus", lambda: 8)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert demo.default_threads() == 5
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (15.0, 0.0, 0.0))
    assert demo.default_threads() == 1


def test_first_run_says_it_converts_and_where(smollm2, capsys, monkeypatch):
    import effllm.models

    monkeypatch.setattr(effllm.models, "smollm2_converted", lambda: False)
    assert demo.run(_args(features="baseline", prompt_tokens=64, new_tokens=2, repeats=1)) == 0
    out = capsys.readouterr().out
    assert "first run: converting SmolLM2" in out and "~517 MB" in out and str(effllm.models.cache_dir()) in out


def test_smollm2_converted_reads_the_cache(smollm2, tmp_path, monkeypatch):
    import effllm.models

    assert effllm.models.smollm2_converted()  # the fixture loaded (so converted) it
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    assert not effllm.models.smollm2_converted()
