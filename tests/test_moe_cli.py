"""``effllm moe simulate`` and ``effllm moe locality`` through ``effllm.cli.main``."""

import json
from pathlib import Path

import pytest
import torch

from effllm.cli import main
from effllm.moe import RoutingTrace

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
OLMOE = DATA / "olmoe_layer0_routes.jsonl"


def _rows(out: str) -> dict:
    """(cache, policy, prefetch) -> hit % from the printed table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            rows[(int(parts[0]), parts[1], parts[2])] = float(parts[3])
    return rows


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["moe", "simulate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--policies" in out and "--per-layer" in out and "--global" in out and "--plot" in out


@pytest.mark.skipif(not OLMOE.is_file(), reason=f"the shipped routing traces are not in {DATA}")
def test_simulate_prints_hit_rates_and_plots(capsys, tmp_path):
    png = tmp_path / "hits.png"
    assert main(["moe", "simulate", str(OLMOE), "--cache", "16,32", "--policies", "lru,lfu,belady",
                 "--plot", str(png)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows == {(16, "lru", "none"): 39.7, (16, "lfu", "none"): 46.7, (16, "belady", "none"): 59.2,
                    (32, "lru", "none"): 64.7, (32, "lfu", "none"): 70.6, (32, "belady", "none"): 83.3}
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_with_prefetch_cost_and_scope(capsys, tmp_path):
    trace = RoutingTrace(torch.tensor([[[t % 2], [2 + t % 2]] for t in range(12)]), 4)
    path = trace.save(tmp_path / "t.safetensors")
    assert main(["moe", "simulate", str(path), "--cache", "1", "--policies", "lru", "--prefetch",
                 "none,transition", "--expert-mb", "1", "--bandwidth-gbs", "1", "--compute-ms", "5"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows[(1, "lru", "none")] == 0.0 and rows[(1, "lru", "transition")] > 80
    assert "stall ms/token" in out and "per layer" in out
    records = tmp_path / "sim.jsonl"
    assert main(["moe", "simulate", str(path), "--cache", "2", "--global", "--policies", "belady",
                 "--json", str(records)]) == 0
    assert "global" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert record["scope"] == "global" and record["policy"] == "belady" and record["accesses"] == 24


def test_bad_trace_and_bad_flags(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"experts": [[0, 1]]}) + "\n{oops\n")
    assert main(["moe", "simulate", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert main(["moe", "simulate", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    good = RoutingTrace(torch.tensor([[[0, 1]]]), 4).save(tmp_path / "g.safetensors")
    with pytest.raises(SystemExit, match="smaller than one token's top-k"):
        main(["moe", "simulate", str(good), "--cache", "1"])
    with pytest.raises(SystemExit, match="--policies takes a comma-separated list"):
        main(["moe", "simulate", str(good), "--policies", "lru,mru"])
    with pytest.raises(SystemExit, match="--cache expects comma-separated integers"):
        main(["moe", "simulate", str(good), "--cache", "big"])
    with pytest.raises(SystemExit, match="needs both --expert-mb and --bandwidth-gbs"):
        main(["moe", "simulate", str(good), "--expert-mb", "3"])


def test_locality(capsys, tmp_path):
    trace = RoutingTrace(torch.tensor([[[0]], [[0]], [[1]]]), 2).save(tmp_path / "t.safetensors")
    assert main(["moe", "locality", str(trace), "--windows", "1,2,8", "--cache-ratio", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert lines["1"][0] == "1.000" and lines["2"][0] == "0.800"  # SRP, worked by hand in test_moe_simulate
    assert "longer than every request" in out
