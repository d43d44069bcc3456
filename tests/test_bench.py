import json

import pytest
import torch

from effllm.bench import (
    CASES,
    ModelSetup,
    Setup,
    case,
    get_case,
    model_case,
    read_jsonl,
    run_case,
)
from effllm.bench.cli import main as bench_main
from effllm.bench.compare import compare_records, format_comparison
from effllm.bench.records import REQUIRED_KEYS, make_record


@pytest.fixture
def scratch_case():
    name = "test.scratch"

    @case(name, shapes=[{"N": 7}], dtypes=("float32",), description="scratch: doubles a vector")
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

    @case(name, shapes=[{"N": 3}], gpu_shapes=[{"N": 4096}], description="scratch")
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


def test_compare_model_records_judges_each_metric_in_its_direction():
    def rec(tps, ppl):
        return make_record(kind="model", op="m", provider="p", dtype=torch.float32, shape={"prompt": 8},
                           metric={"decode_tokens_per_s": tps, "perplexity": ppl, "samples": 3},
                           refcheck={}, device="cpu", timer="t")

    rows, _, _ = compare_records([rec(10.0, 40.0)], [rec(12.0, 40.1)])
    assert {r.metric for r in rows} == {"decode_tokens_per_s", "perplexity"}  # samples is not compared
    text, n = format_comparison(rows, 0.10)
    assert n == 0 and "better" in text  # more tokens/s is better, +0.25% perplexity is within 10%
    rows, _, _ = compare_records([rec(10.0, 40.0)], [rec(8.0, 48.0)])
    assert format_comparison(rows, 0.10)[1] == 2


def test_read_jsonl_rejects_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "x"}\n')
    with pytest.raises(ValueError, match="lacks"):
        read_jsonl(bad)


@pytest.fixture
def tiny_model_case():
    """A model case on a tiny random Llama: baseline (plain) against a variant whose runs also
    report kv_bytes, and an exact measure per provider."""
    from effllm.bench.model import time_generate, weight_bytes
    from effllm.testing.models import tiny_causal_lm

    name = "test.tiny_model"
    built = []

    @model_case(name, params=[{"prompt": 9, "new_tokens": 3}, {"prompt": 17, "new_tokens": 3}],
                metrics=("decode_tokens_per_s", "first_token_ms", "prefill_tokens_per_s", "peak_mem_mb", "kv_bytes",
                         "weight_bytes"),
                baseline="plain", description="tiny Llama greedy decode (test)")
    def build(params, dtype, device):
        model = tiny_causal_lm("llama").to(dtype)
        built.append(params)
        ids = torch.arange(1, params["prompt"] + 1).unsqueeze(0)
        run = lambda: time_generate(model, ids, params["new_tokens"], pad_token_id=0)
        return ModelSetup(runs={"plain": run, "again": run}, measures={"plain": lambda: {"weight_bytes": weight_bytes(model)}},
                          unavailable={"gpu": "needs CUDA"})

    yield get_case(name), built
    CASES.pop(name)


def test_model_case_through_cli(tiny_model_case, tmp_path, capsys):
    c, built = tiny_model_case
    out = tmp_path / "m.jsonl"
    assert bench_main(["run", c.name, "--quick", "--out", str(out), "--quiet", "--repeats", "2"]) == 0
    assert built == [{"prompt": 9, "new_tokens": 3}]  # --quick: the first params only
    recs = read_jsonl(out)
    by = {r["provider"]: r for r in recs}
    assert set(by) == {"plain", "again"}
    for r in recs:
        assert r["kind"] == "model" and r["op"] == c.name and r["shape"] == {"prompt": 9, "new_tokens": 3}
        assert set(r["metric"]) <= set(c.metrics) | {"samples"} and r["metric"]["samples"] == 2
        q = r["quantiles"]["decode_tokens_per_s"]
        assert q["p20"] <= r["metric"]["decode_tokens_per_s"] == q["p50"] <= q["p80"]
        assert r["metric"]["kv_bytes"] > 0 and r["host"]["loadavg"] is not None and r["host"]["cpu"]
    assert by["plain"]["baseline"] is None and by["again"]["baseline"] == "plain"
    assert by["plain"]["metric"]["weight_bytes"] == sum(p.numel() * p.element_size()
                                                        for p in tiny_causal_lm_params())
    assert "weight_bytes" not in by["again"]["metric"]
    text = capsys.readouterr().out
    assert "decode_tokens_per_s" in text and "records appended" in text

    png = tmp_path / "m.png"
    assert bench_main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --shape filters params by value, as text
    assert bench_main(["run", c.name, "--shape", "prompt=17", "--out", str(out), "--quiet", "--repeats", "1",
                       "--warmup", "0"]) == 0
    assert built[-1] == {"prompt": 17, "new_tokens": 3}


def tiny_causal_lm_params():
    from effllm.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama")
    seen, out = set(), []
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t)
    return out


def test_model_case_metrics_are_checked():
    with pytest.raises(ValueError, match="unknown metric"):
        model_case("test.bad_metric", params=[{"n": 1}], metrics=("speed",), description="x")(lambda *a: None)
    with pytest.raises(ValueError, match="one-line description"):
        model_case("test.no_description", params=[{"n": 1}], metrics=("perplexity",))(lambda *a: None)

    @model_case("test.undeclared", params=[{"n": 1}], metrics=("perplexity",), description="returns too much")
    def build(params, dtype, device):
        return ModelSetup(measures={"a": lambda: {"perplexity": 1.0, "nll": 0.5}})

    try:
        with pytest.raises(ValueError, match=r"undeclared metric\(s\) \['nll'\]"):
            run_case(get_case("test.undeclared"), device=torch.device("cpu"), progress=False)
    finally:
        CASES.pop("test.undeclared")
    assert "test.bad_metric" not in CASES and "test.no_description" not in CASES


def test_define_metric_extends_the_schema():
    from effllm.bench import METRICS, define_metric

    try:
        define_metric("test_hit_rate", unit="fraction", better="higher", doc="share of expert loads served from cache")
        define_metric("test_hit_rate", unit="fraction", better="higher", doc="share of expert loads served from cache")
        with pytest.raises(ValueError, match="already defined differently"):
            define_metric("test_hit_rate", unit="%", better="higher", doc="other")
        with pytest.raises(ValueError, match="better must be"):
            define_metric("test_other", unit="x", better="up", doc="x")
    finally:
        METRICS.pop("test_hit_rate", None)


def test_help_and_list_are_plain_text(capsys):
    for argv in (["--help"], ["list", "--help"], ["run", "--help"], ["compare", "--help"], ["plot", "--help"],
                 ["render", "--help"]):
        with pytest.raises(SystemExit) as exc:
            bench_main(argv)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text and "``" not in text and ":func:" not in text, argv
    assert bench_main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = {line.split()[0] for line in lines}
    assert {"attention.decode", "rms_norm", "quant.smollm2", "attention.smollm2"} <= names
    for line in lines:
        _, kind, description = line.split(None, 2)
        assert kind in ("kernel", "model") and description.strip() and "``" not in description, line


def test_run_selects_by_glob_and_names_unknown_cases(capsys):
    from effllm.bench.registry import select_cases

    assert {c.name for c in select_cases(["attention.decode*"])} == {"attention.decode", "attention.decode_paged"}
    assert bench_main(["run", "no.such.case", "--quiet"]) == 2
    assert "unknown bench case 'no.such.case'" in capsys.readouterr().err
    assert bench_main(["run", "nothing*", "--quiet"]) == 2


def test_a_failing_case_does_not_lose_the_others(scratch_case, tmp_path, capsys):
    @case("test.broken", shapes=[{"N": 1}], description="raises while building")
    def build(shape, dtype, device):
        raise RuntimeError("inputs could not be built")

    @model_case("test.half_broken", params=[{"n": 1}, {"n": 2}], metrics=("perplexity",), description="2nd fails")
    def build_model(params, dtype, device):
        if params["n"] == 2:
            raise RuntimeError("second params failed")
        return ModelSetup(measures={"a": lambda: {"perplexity": 3.0}})

    try:
        out = tmp_path / "r.jsonl"
        assert bench_main(["run", "test.broken", "test.half_broken", scratch_case.name, "--out", str(out), "--quiet",
                           "--repeats", "1", "--warmup", "0"]) == 1
        recs = read_jsonl(out)
        assert {r["op"] for r in recs} == {scratch_case.name, "test.half_broken"}
        assert [r["shape"] for r in recs if r["op"] == "test.half_broken"] == [{"n": 1}]  # kept before the failure
        err = capsys.readouterr().err
        assert "case test.broken failed" in err and "inputs could not be built" in err
        assert "2 case(s) failed: test.broken, test.half_broken" in err
    finally:
        CASES.pop("test.broken")
        CASES.pop("test.half_broken")


def test_nan_check_case_through_cli(tmp_path):
    out = tmp_path / "n.jsonl"
    assert bench_main(["run", "checks.nan_query_rows", "--quick", "--out", str(out), "--quiet"]) == 0
    recs = read_jsonl(out)
    assert {r["provider"]: r["baseline"] for r in recs} == {"attention": None, "nan-check": "attention",
                                                            "per-call-mask": "attention"}
    assert all(r["shape"] == {"call": "decode", "L": 128} and r["metric"]["samples"] == 3 for r in recs)


def test_render_tables_from_records(tmp_path, capsys):
    from effllm.bench.records import write_jsonl

    def rec(kind, op, provider, baseline, metric, shape):
        return make_record(kind=kind, op=op, provider=provider, baseline=baseline, dtype=torch.float32, shape=shape,
                           metric=metric, refcheck={"max_abs": None, "passed": True}, device="cpu:Test CPU (1 thread)",
                           timer="t", host={"cpu": "Test CPU", "cores": 2, "flags": ["avx2"], "threads": 1,
                                            "loadavg": 1.5, "loadavg_end": 2.5})

    results = tmp_path / "benchmarks" / "results"
    write_jsonl(results / "cpu-models.jsonl", [
        rec("model", "quant.smollm2", "bf16", None, {"decode_tokens_per_s": 10.0, "perplexity": 40.0, "samples": 3},
            {"prompt": 8}),
        rec("model", "quant.smollm2", "int4", "bf16", {"decode_tokens_per_s": 25.0, "perplexity": 44.0, "samples": 3},
            {"prompt": 8}),
    ])
    write_jsonl(results / "cpu-kernels.jsonl", [
        rec("kernel", "rms_norm", "hf-eager", None, {"latency_ms": {"p20": 1.0, "p50": 1.0, "p80": 1.0}}, {"T": 1}),
        rec("kernel", "rms_norm", "effllm", "hf-eager", {"latency_ms": {"p20": 2.0, "p50": 2.0, "p80": 2.0}}, {"T": 1}),
    ])
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("intro\n<!-- results:start -->\nOLD-TABLE\n<!-- results:end -->\nrest\n")
    (tmp_path / "docs" / "benchmarks.md").write_text("<!-- kernels:start -->\n<!-- kernels:end -->\n")
    assert bench_main(["render", "--root", str(tmp_path), "--check"]) == 1
    assert bench_main(["render", "--root", str(tmp_path)]) == 0
    assert bench_main(["render", "--root", str(tmp_path), "--check"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n") and readme.endswith("rest\n") and "OLD-TABLE" not in readme
    assert "| bf16 (baseline) | 10.0 | 40.0 |" in readme
    assert "| int4 | 25.0 (2.50x) | 44.0 (+10.00%, worse) |" in readme
    assert "load average 1.5-2.5" in readme and "flags avx2" in readme
    assert "placeholder: no model-level records yet; `effllm bench run 'kv.*'" in readme  # no KV records yet
    docs = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| float32 | T=1 | effllm | 2.000 | hf-eager | 1.000 | 0.50x (slower) | pass |" in docs
    assert "effllm slower than the baseline in 1 of 1 rows" in docs
    (tmp_path / "README.md").write_text("no markers\n")
    assert bench_main(["render", "--root", str(tmp_path)]) == 2
    assert "lacks the <!-- results:start -->" in capsys.readouterr().err


def test_committed_tables_match_the_committed_records(capsys):
    """README.md's and docs/benchmarks.md's generated tables are what the records say (run
    'effllm bench render' after adding records)."""
    from effllm.bench.render import default_root

    root = default_root()
    if not (root / "benchmarks" / "results").is_dir() or not (root / "README.md").exists():
        pytest.skip("not running from a checkout with benchmarks/results")
    assert bench_main(["render", "--check", "--root", str(root)]) == 0, capsys.readouterr().err


def _git_root():
    import subprocess
    from pathlib import Path

    import effllm

    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=Path(effllm.__file__).parent,
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.mark.slow
def test_baseline_rev_runs_both_sides(tmp_path, capsys):
    if _git_root() is None:
        pytest.skip("effllm is not running from a git checkout")
    out = tmp_path / "ab.jsonl"
    code = bench_main(["run", "rms_norm", "--shape", "T=1", "--dtype", "float32", "--repeats", "2", "--warmup", "1",
                       "--baseline-rev", "HEAD", "--rounds", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    recs = read_jsonl(out)
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=_git_root(), capture_output=True,
                          text=True, check=False).stdout.strip()
    assert {r["rev"] for r in recs} == {None, head}
    assert all(r["round"] == 0 for r in recs)
    assert {(r["rev"], r["provider"]) for r in recs} == {(rev, p) for rev in (None, head) for p in ("effllm", "hf-eager")}
    assert next(r for r in recs if r["rev"] == head)["git_sha"] == head
    text = capsys.readouterr().out
    assert "rev/now" in text and "latency_ms" in text


@pytest.mark.slow
def test_baseline_rev_reports_a_case_missing_there(tmp_path, capsys):
    if _git_root() is None:
        pytest.skip("effllm is not running from a git checkout")
    import subprocess

    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=_git_root(), capture_output=True,
                           text=True, check=False).stdout.split()[0]
    out = tmp_path / "ab.jsonl"
    code = bench_main(["run", "attention.decode", "--shape", "B=1", "--shape", "D=64", "--dtype", "float32",
                       "--repeats", "1", "--warmup", "0", "--baseline-rev", first, "--rounds", "1", "--out", str(out)])
    assert code == 2
    assert "no records at " + first[:12] in capsys.readouterr().out
    assert {r["rev"] for r in read_jsonl(out)} == {None}  # the current side still ran


def test_rev_comparison_relative_to_a_control():
    from effllm.bench.baseline import format_rev_comparison

    def rec(provider, rev, ms):
        r = make_record(op="x", provider=provider, dtype=torch.float32, shape={"N": 1},
                        metric={"latency_ms": {"p20": ms, "p50": ms, "p80": ms}}, refcheck={}, device="cpu",
                        timer="t", rev=rev)
        r["rev"] = rev
        return r

    # The REV side ran on a machine 1.5x busier: the control is 1.5x slower there, the changed
    # provider 3x: 2x of it is the change.
    recs = [rec("changed", None, 1.0), rec("changed", "abc", 3.0), rec("ctl", None, 2.0), rec("ctl", "abc", 3.0)]
    text = format_rev_comparison(recs, "abc", control="ctl")
    row = next(line for line in text.splitlines() if line.startswith("x") and " changed " in line)
    assert row.split()[-2:] == ["3.000", "2.000"]
    assert "/ ctl" in text.splitlines()[0]


def test_baseline_rev_refuses_an_unknown_revision(capsys):
    if _git_root() is None:
        pytest.skip("effllm is not running from a git checkout")
    assert bench_main(["run", "rms_norm", "--baseline-rev", "no-such-rev-xyz"]) == 2
    assert "'no-such-rev-xyz' is not a commit" in capsys.readouterr().err


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


def test_kv_bytes_counts_every_storage_once_however_deep_or_shared():
    """The memory walk behind ``kv_bytes``: a storage reached through several objects, views or
    a cycle counts once; tensors deep in nested objects count (a ragged quantized layer's codes
    lie 7 levels below the cache), also when the same object is first reached deeper."""
    from types import SimpleNamespace

    from effllm.bench.model import _WALK_DEPTH, kv_bytes

    leaf = torch.zeros(256)  # 1024 bytes
    deep = SimpleNamespace(tensor=leaf[:10])  # a view: its storage's bytes
    chain = deep
    for _ in range(40):
        chain = SimpleNamespace(inner=chain)
    assert kv_bytes(chain) == 1024
    top = SimpleNamespace(first=chain, again=deep, view=leaf[100:], other=torch.zeros(8, dtype=torch.float64))
    top.cycle = top
    assert kv_bytes(top) == 1024 + 64
    # reached first at (or past) the depth where the walk stops guarding against runaway nesting,
    # then near the top: walked there
    for wrappers in (_WALK_DEPTH - 2, _WALK_DEPTH - 1, _WALK_DEPTH):
        chain = deep
        for _ in range(wrappers):
            chain = SimpleNamespace(inner=chain)
        assert kv_bytes(SimpleNamespace(deep_first=chain, shallow=deep)) == 1024, wrappers
