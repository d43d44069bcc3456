"""``effllm bench {list,run,compare,plot}``."""

from __future__ import annotations

import argparse
import sys

import torch


def _parse_shape_filter(items: list[str] | None) -> dict[str, int] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise SystemExit(f"effllm bench: --shape expects KEY=INT, got {item!r}")
        out[key] = int(value)
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark kernels and modules", description=__doc__)
    bsub = p.add_subparsers(dest="bench_cmd", required=True)

    bsub.add_parser("list", help="list registered cases")

    run = bsub.add_parser("run", help="run cases and write JSONL records")
    run.add_argument("cases", nargs="+", help="case names (see 'effllm bench list'), or 'all'")
    run.add_argument("--dtype", action="append", help="dtype(s) to run (default: the case's)")
    run.add_argument("--provider", action="append", help="provider(s) to run (default: all available)")
    run.add_argument("--shape", action="append", metavar="KEY=INT", help="only shapes with these values")
    run.add_argument("--refcheck", action="store_true", help="check each provider against the reference first")
    run.add_argument("--out", default="bench.jsonl", help="JSONL file to append records to (default bench.jsonl)")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--warmup", type=int, default=3)
    run.add_argument("--repeats", type=int, default=20)
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    cmp = bsub.add_parser("compare", help="latency ratio B/A per matching record")
    cmp.add_argument("a")
    cmp.add_argument("b")
    cmp.add_argument("--threshold", type=float, default=0.10, help="flag B slower than A by more than this (0.10)")
    cmp.add_argument("--fail-on-regression", action="store_true", help="exit 1 when any regression is flagged")

    plot = bsub.add_parser("plot", help="draw records as a PNG bar chart")
    plot.add_argument("jsonl")
    plot.add_argument("--out", default=None, help="PNG path (default: JSONL path with .png)")


def run(args: argparse.Namespace) -> int:
    from .registry import get_case, load_builtin_cases

    if args.bench_cmd == "list":
        for name, c in sorted(load_builtin_cases().items()):
            gpu = f" (+{len(c.gpu_shapes)} on GPU)" if c.gpu_shapes else ""
            print(f"{name:<22} dtypes={','.join(c.dtypes):<18} {len(c.shapes)} shapes{gpu}  {c.description}")
        return 0

    if args.bench_cmd == "run":
        from .records import write_jsonl
        from .runner import run_case

        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        names = sorted(load_builtin_cases()) if args.cases == ["all"] else args.cases
        failed = 0
        for name in names:
            try:
                case = get_case(name)
            except KeyError as exc:
                print(f"effllm bench: {exc.args[0]}", file=sys.stderr)
                return 2
            records = run_case(
                case, device=device, dtypes=args.dtype, providers=args.provider,
                shape_filter=_parse_shape_filter(args.shape), do_refcheck=args.refcheck,
                warmup=args.warmup, repeats=args.repeats, progress=not args.quiet,
            )
            write_jsonl(args.out, records)
            for rec in records:
                lat = rec["metric"]["latency_ms"]
                check = rec["refcheck"]
                status = "" if check["passed"] is None else ("  ref ok" if check["passed"] else "  REF MISMATCH")
                failed += check["passed"] is False
                extra = f"  {rec['metric']['tflops']:.3f} TFLOP/s" if rec["metric"]["tflops"] else ""
                print(
                    f"{rec['op']:<20} {rec['provider']:<11} {rec['dtype']:<9} "
                    f"{' '.join(f'{k}={v}' for k, v in rec['shape'].items()):<34} "
                    f"p50 {lat['p50']:9.3f} ms  [p20 {lat['p20']:.3f}, p80 {lat['p80']:.3f}]{extra}{status}"
                )
        print(f"records appended to {args.out}")
        return 1 if failed else 0

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
    raise AssertionError(args.bench_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="effllm")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args)
