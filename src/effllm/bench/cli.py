"""The ``effllm bench`` command: list, run, compare, plot and render benchmark records."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

DESCRIPTION = (
    "Benchmark effllm: kernel cases (one op against its baselines) and model cases (a whole model: "
    "tokens/s, first-token latency, memory, quality). Every result is one JSONL record in one schema "
    "(see docs/benchmarks.md)."
)


def _parse_shape_filter(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"effllm bench: --shape expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark kernels and models, write JSONL records",
                       description=DESCRIPTION)
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="COMMAND")

    ls = bsub.add_parser("list", help="list registered cases with a one-line description",
                         description="List every registered case: its kind (kernel or model), what it measures "
                                     "and its metrics.")
    ls.add_argument("--verbose", "-v", action="store_true", help="also show shapes/params, dtypes and baseline")

    run = bsub.add_parser("run", help="run cases and append JSONL records",
                          description="Run cases and append one record per (case, shape, dtype, provider).")
    run.add_argument("cases", nargs="+", help="case names or globs (kv.*), or 'all' (see 'effllm bench list')")
    run.add_argument("--dtype", action="append", help="dtype(s) to run (default: the case's)")
    run.add_argument("--provider", action="append", help="provider(s) to run (default: all available)")
    run.add_argument("--shape", action="append", metavar="KEY=VALUE", help="only shapes/params with these values")
    run.add_argument("--kind", choices=("kernel", "model"), default=None, help="only cases of this kind")
    run.add_argument("--quick", action="store_true", help="smoke run: each case's quick shapes, few repeats")
    run.add_argument("--refcheck", action="store_true", help="check each kernel provider against the reference first")
    run.add_argument("--out", default="bench.jsonl", help="JSONL file to append records to (default bench.jsonl)")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: the case's)")
    run.add_argument("--repeats", type=int, default=None, help="timed calls / rounds (default: the case's)")
    run.add_argument("--baseline-rev", metavar="REV", default=None,
                     help="also run the same cases on the library code of git revision REV, alternating sides")
    run.add_argument("--rounds", type=int, default=2, help="with --baseline-rev: alternations of the two sides (2)")
    run.add_argument("--control", metavar="PROVIDER", default=None,
                     help="with --baseline-rev: a provider neither side changed; ratios are also shown relative to it")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    cmp = bsub.add_parser("compare", help="B against A per matching record and metric",
                          description="Compare two record files: for every record both have (same case, provider, "
                                      "dtype, shape), B / A of the kernel p50 latency or of each model metric, "
                                      "judged in the metric's direction.")
    cmp.add_argument("a", help="JSONL records of the reference run")
    cmp.add_argument("b", help="JSONL records of the run to judge")
    cmp.add_argument("--threshold", type=float, default=0.10, help="flag B worse than A by more than this (0.10)")
    cmp.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any regression is flagged")

    plot = bsub.add_parser("plot", help="draw kernel records as a PNG bar chart",
                           description="Draw p50 latency per shape, one bar per provider, one panel per case and "
                                       "dtype.")
    plot.add_argument("jsonl", help="JSONL records")
    plot.add_argument("--out", default=None, help="PNG path (default: JSONL path with .png)")

    render = bsub.add_parser("render", help="rebuild the README and docs tables from records",
                             description="Rewrite the generated tables in README.md and docs/benchmarks.md from "
                                         "the records in benchmarks/results/ (--check: exit 1 when stale).")
    render.add_argument("--check", action="store_true", help="only check that the files are up to date")
    render.add_argument("--root", default=None, help="repository root (default: the checkout effllm runs from)")


def _list(verbose: bool) -> int:
    from .registry import LOAD_ERRORS, load_builtin_cases

    for name, c in sorted(load_builtin_cases().items()):
        print(f"{name:<26} {c.kind:<6} {c.description}")
        if verbose:
            gpu = f" (+{len(c.gpu_shapes)} on GPU)" if c.gpu_shapes else ""
            print(f"{'':<33} dtypes {','.join(c.dtypes)}; {len(c.shapes)} shapes{gpu}; baseline {c.baseline}; "
                  f"metrics {','.join(c.metrics)}")
    for module, err in sorted(LOAD_ERRORS.items()):
        print(f"(cases/{module}.py did not load: {err})", file=sys.stderr)
    return 0


def _check_expected_root() -> None:
    """Under --baseline-rev, the subprocess must import effllm from the exported tree."""
    expect = os.environ.get("EFFLLM_BENCH_EXPECT_ROOT")
    if expect:
        import effllm

        here = os.path.realpath(os.path.dirname(effllm.__file__))
        if here != os.path.realpath(expect):
            raise SystemExit(f"effllm bench: imported effllm from {here}, expected {expect}")


def _print_record(rec: dict) -> None:
    shape = " ".join(f"{k}={v}" for k, v in rec["shape"].items())
    if rec.get("kind") == "model":
        values = "  ".join(f"{k} {v:.4g}" for k, v in rec["metric"].items() if k != "samples")
        print(f"{rec['op']:<20} {rec['provider']:<18} {rec['dtype']:<9} {shape:<30} {values}")
        return
    lat = rec["metric"]["latency_ms"]
    check = rec["refcheck"]
    status = "" if check["passed"] is None else ("  ref ok" if check["passed"] else "  REF MISMATCH")
    extra = f"  {rec['metric']['tflops']:.3f} TFLOP/s" if rec["metric"].get("tflops") else ""
    print(f"{rec['op']:<20} {rec['provider']:<18} {rec['dtype']:<9} {shape:<30} "
          f"p50 {lat['p50']:9.3f} ms  [p20 {lat['p20']:.3f}, p80 {lat['p80']:.3f}]{extra}{status}")


def _run(args: argparse.Namespace) -> int:
    from .records import write_jsonl
    from .registry import select_cases
    from .runner import run_case

    _check_expected_root()
    if args.baseline_rev:
        from .baseline import BaselineError, run_against

        try:
            return run_against(args.baseline_rev, _passthrough(args), args.out, rounds=args.rounds,
                               control=args.control)
        except BaselineError as exc:
            print(f"effllm bench: {exc}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cases = select_cases(args.cases)
    except KeyError as exc:
        print(f"effllm bench: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.kind:
        cases = [c for c in cases if c.kind == args.kind]
    failed, broken = 0, []
    for c in cases:
        warmup, repeats = args.warmup, args.repeats
        if args.quick:
            warmup = 1 if warmup is None else warmup
            repeats = (3 if c.kind == "kernel" else 1) if repeats is None else repeats
        written: list[dict] = []

        def sink(batch: list[dict], written: list[dict] = written) -> None:
            write_jsonl(args.out, batch)  # as each part finishes: a later failure keeps it
            written.extend(batch)
            for rec in batch:
                _print_record(rec)

        try:
            run_case(
                c, device=device, dtypes=args.dtype, providers=args.provider,
                shape_filter=_parse_shape_filter(args.shape), do_refcheck=args.refcheck,
                warmup=warmup, repeats=repeats, progress=not args.quiet, quick=args.quick, sink=sink,
            )
        except Exception:  # noqa: BLE001 - one broken case must not lose the others' records
            print(f"effllm bench: case {c.name} failed:\n{traceback.format_exc()}", file=sys.stderr)
            broken.append(c.name)
        failed += sum(rec["refcheck"].get("passed") is False for rec in written)
    print(f"records appended to {args.out}")
    if broken:
        print(f"effllm bench: {len(broken)} case(s) failed: {', '.join(broken)}", file=sys.stderr)
    return 1 if failed or broken else 0


def _passthrough(args: argparse.Namespace) -> list[str]:
    """The ``run`` options to repeat in each --baseline-rev subprocess (all but the rev's own)."""
    out = list(args.cases)
    for flag, values in (("--dtype", args.dtype), ("--provider", args.provider), ("--shape", args.shape)):
        for v in values or []:
            out += [flag, v]
    for flag, value in (("--device", args.device), ("--threads", args.threads), ("--warmup", args.warmup),
                        ("--repeats", args.repeats)):
        if value is not None:
            out += [flag, str(value)]
    if args.kind:
        out += ["--kind", args.kind]
    if args.quick:
        out.append("--quick")
    if args.refcheck:
        out.append("--refcheck")
    return out


def run(args: argparse.Namespace) -> int:
    if args.bench_cmd == "list":
        return _list(args.verbose)
    if args.bench_cmd == "run":
        return _run(args)

    if args.bench_cmd == "compare":
        from .compare import compare_records, format_comparison
        from .records import read_jsonl

        rows, only_a, only_b = compare_records(read_jsonl(args.a), read_jsonl(args.b))
        if not rows:
            print("no matching records (op, provider, dtype, shape) between the two files", file=sys.stderr)
            return 2
        text, regressions = format_comparison(rows, args.threshold)
        print(text)
        if only_a or only_b:
            print(f"\n{len(only_a)} record(s) only in A, {len(only_b)} only in B")
        print(f"\n{regressions} regression(s) beyond {args.threshold:.0%}")
        return 1 if (regressions and args.fail_on_regression) else 0

    if args.bench_cmd == "plot":
        from pathlib import Path

        from .plot import plot_records
        from .records import read_jsonl

        out = args.out or str(Path(args.jsonl).with_suffix(".png"))
        print(f"wrote {plot_records(read_jsonl(args.jsonl), out)}")
        return 0

    if args.bench_cmd == "render":
        from .render import render_all

        return render_all(root=args.root, check=args.check)
    raise AssertionError(args.bench_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="effllm")
    add_parser(parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args)
