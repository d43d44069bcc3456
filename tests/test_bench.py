import json

import pytest
import torch

from effllm.bench import CASES, Setup, case, get_case, read_jsonl, run_case
from effllm.bench.cli import main as bench_main
from effllm.bench.compare import compare_records, format_comparison
from effllm.bench.records import REQUIRED_KEYS, make_record


@pytest.fixture
def scratch_case():
    name = "test.scratch"

    @case(name, shapes=[{"N": 7}], dtypes=("float32",))
    def build(shape, dtype, device):
        x = torch.arange(shape["N"], dtype=dtype, device=device)
        return Setup(
            providers={"good": lambda: x * 2, "bad": lambda: x * 2 + 1},
            reference=lambda: (x * 2).double(),
            unavailable={"gpu-only": "needs CUDA"},
        )

    yield get_case(name)
    CASES.pop(name)


def test_registry_rejects_duplicates(scratch_case):
    with pytest.raises(ValueError, match="already registered"):
        case(scratch_case.name, shapes=[{"N": 1}])(lambda *a: None)
    with pytest.raises(KeyError, match="unknown bench case 'nope'"):
        get_case("nope")


def test_refcheck_separates_good_and_bad(scratch_case):
    recs = run_case(scratch_case, device=torch.device("cpu"), do_refcheck=True, repeats=3, warmup=1, progress=False)
    by_provider = {r["provider"]: r for r in recs}
    assert set(by_provider) == {"good", "bad"}
    assert by_provider["good"]["refcheck"]["passed"] is True
    assert by_provider["bad"]["refcheck"] == {"max_abs": 1.0, "passed": False,
                                              "detail": by_provider["bad"]["refcheck"]["detail"]}
    for rec in recs:
        assert all(k in rec for k in REQUIRED_KEYS)
        lat = rec["metric"]["latency_ms"]
        assert 0 < lat["p20"] <= lat["p50"] <= lat["p80"]
        assert rec["timer"].startswith("perf_counter") and rec["device"].startswith("cpu:")


def test_gpu_shapes_are_timed_only_on_cuda():
    name = "test.gpu_shapes"

    @case(name, shapes=[{"N": 3}], gpu_shapes=[{"N": 4096}])
    def build(shape, dtype, device):
        x = torch.ones(shape["N"], dtype=dtype, device=device)
        return Setup(providers={"double": lambda: x * 2})

    try:
        scratch = get_case(name)
        assert scratch.shapes_for(torch.device("cuda")) == [{"N": 3}, {"N": 4096}]
        recs = run_case(scratch, device=torch.device("cpu"), repeats=2, warmup=1, progress=False)
        assert [r["shape"] for r in recs] == [{"N": 3}]
        with pytest.raises(ValueError, match="shapes on cpu are"):
            run_case(scratch, device=torch.device("cpu"), shape_filter={"N": 4096}, progress=False)
    finally:
        CASES.pop(name)


def test_builtin_cases_pass_refcheck():
    for name, shape in (("rms_norm", {"T": 1}), ("attention.prefill", {"S": 512, "H": 9})):
        recs = run_case(get_case(name), device=torch.device("cpu"), shape_filter=shape, do_refcheck=True,
                        repeats=2, warmup=1, progress=False)
        assert recs and all(r["refcheck"]["passed"] for r in recs), [r["refcheck"] for r in recs]


def test_cli_run_list_compare_plot(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert bench_main(["run", "rms_norm", "--shape", "T=1", "--refcheck", "--out", str(out),
                       "--repeats", "3", "--warmup", "1", "--quiet"]) == 0
    recs = read_jsonl(out)
    assert {r["provider"] for r in recs} == {"effllm", "hf-eager"} and {r["dtype"] for r in recs} == {"float32", "bfloat16"}

    assert bench_main(["list"]) == 0
    assert "attention.prefill" in capsys.readouterr().out

    slower = tmp_path / "slow.jsonl"
    with slower.open("w") as f:
        for r in recs:
            r = json.loads(json.dumps(r))
            r["metric"]["latency_ms"]["p50"] *= 3
            f.write(json.dumps(r) + "\n")
    assert bench_main(["compare", str(out), str(out), "--fail-on-regression"]) == 0
    assert bench_main(["compare", str(out), str(slower), "--fail-on-regression"]) == 1
    assert f"{len(recs)} regression(s)" in capsys.readouterr().out

    png = tmp_path / "r.png"
    assert bench_main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_flags_only_beyond_threshold():
    def rec(p50):
        return make_record(op="x", provider="p", dtype=torch.float32, shape={"N": 1},
                           metric={"latency_ms": {"p20": p50, "p50": p50, "p80": p50}},
                           refcheck={}, device="cpu", timer="perf_counter")

    rows, only_a, only_b = compare_records([rec(1.0)], [rec(1.05)])
    assert format_comparison(rows, 0.10)[1] == 0 and not only_a and not only_b
    rows, _, _ = compare_records([rec(1.0)], [rec(1.5)])
    text, n = format_comparison(rows, 0.10)
    assert n == 1 and "REGRESSION" in text


def test_read_jsonl_rejects_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "x"}\n')
    with pytest.raises(ValueError, match="lacks"):
        read_jsonl(bad)


def test_result_rows_keep_other_cases_only_when_asked(tmp_path):
    from effllm.bench.records import write_result_rows

    path = tmp_path / "rows.jsonl"
    write_result_rows(path, [{"policy": "a", "x": 1}, {"policy": "b", "x": 2}], run=1)
    write_result_rows(path, [{"policy": "b", "x": 3}], keep_others=("policy",), run=2)
    rows = {r["policy"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert (rows["a"]["x"], rows["a"]["run"]) == (1, 1)  # kept with its own stamp
    assert (rows["b"]["x"], rows["b"]["run"]) == (3, 2)  # replaced
    write_result_rows(path, [{"policy": "c", "x": 4}], run=3)
    assert [json.loads(line)["policy"] for line in path.read_text().splitlines()] == ["c"]
