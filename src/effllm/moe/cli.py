"""``effllm moe {simulate,locality}``: replay a routing trace through expert caches; SRP / SCH."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"effllm moe: {flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"effllm moe: {flag} expects at least one integer")
    return values


def _name_list(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"effllm moe: {flag} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .policies import POLICIES
    from .predictors import PREDICTORS

    p = sub.add_parser("moe", help="MoE routing traces: cache simulation and locality metrics",
                       description="MoE routing traces: replay a trace through expert caches (simulate) or measure "
                                   "its local routing consistency, SRP and SCH (locality).")
    msub = p.add_subparsers(dest="moe_cmd", required=True)

    sim = msub.add_parser("simulate", help="replay a routing trace through expert caches",
                          description="Replay a routing trace (effllm safetensors trace or JSON lines) through an "
                                      "expert cache and print hit rates as percentages.")
    sim.add_argument("trace", help="trace file (.safetensors written by effllm, or JSON lines)")
    sim.add_argument("--cache", default="16", help="cache size(s) in experts, comma-separated (default 16); "
                                                   "per layer with --per-layer, in total with --global")
    sim.add_argument("--policies", default="lru,lfu,belady", help=f"comma-separated: {', '.join(POLICIES)}")
    sim.add_argument("--prefetch", default="none",
                     help=f"comma-separated predictors to prefetch with: none, {', '.join(PREDICTORS)}")
    sim.add_argument("--lookahead", type=int, default=1, help="layers ahead to prefetch (default 1)")
    scope = sim.add_mutually_exclusive_group()
    scope.add_argument("--per-layer", dest="scope", action="store_const", const="per_layer",
                       help="one cache of --cache experts per layer (default)")
    scope.add_argument("--global", dest="scope", action="store_const", const="global",
                       help="one cache of --cache experts shared by all layers")
    sim.set_defaults(scope="per_layer")
    sim.add_argument("--reset-per-request", action="store_true", help="empty the cache at each new request")
    sim.add_argument("--expert-mb", type=float, default=None, help="cost model: MiB per expert")
    sim.add_argument("--bandwidth-gbs", type=float, default=None, help="cost model: link GB/s (1e9 bytes/s)")
    sim.add_argument("--compute-ms", type=float, default=0.0, help="cost model: ms one layer computes per token")
    sim.add_argument("--plot", default=None, metavar="PNG", help="also draw hit rate against cache size")
    sim.add_argument("--json", default=None, metavar="JSONL", help="also append one JSON record per row to this file")
    sim.add_argument("--keep-warmup", action="store_true", help="keep vLLM warm-up rows of a route-row JSONL trace")

    loc = msub.add_parser("locality", help="SRP and SCH local-routing-consistency metrics of a trace",
                          description="Print SRP and SCH (local routing consistency) of a routing trace for each "
                                      "segment length, pooled over layers.")
    loc.add_argument("trace", help="trace file (.safetensors written by effllm, or JSON lines)")
    loc.add_argument("--windows", default="4,16,64", help="segment lengths m (default 4,16,64)")
    loc.add_argument("--cache-ratio", default="1,2,4", help="SCH cache sizes in units of top-k (default 1,2,4)")
    loc.add_argument("--keep-warmup", action="store_true", help="keep vLLM warm-up rows of a route-row JSONL trace")


def _load(path: str, keep_warmup: bool):
    from .traces import TraceFormatError, load_trace

    try:
        return load_trace(path, drop_warmup=not keep_warmup)
    except (FileNotFoundError, TraceFormatError) as exc:
        print(f"effllm moe: {exc}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    if args.moe_cmd == "simulate":
        return _simulate(args)
    if args.moe_cmd == "locality":
        return _locality(args)
    raise AssertionError(args.moe_cmd)


def _simulate(args) -> int:
    from .policies import POLICIES
    from .predictors import PREDICTORS
    from .simulate import CostModel, simulate

    caches = _int_list(args.cache, "--cache")
    policies = _name_list(args.policies, "--policies", POLICIES)
    predictors = _name_list(args.prefetch, "--prefetch", ("none", *PREDICTORS))
    cost = None
    if (args.expert_mb is None) != (args.bandwidth_gbs is None):
        raise SystemExit("effllm moe: the cost model needs both --expert-mb and --bandwidth-gbs")
    if args.expert_mb is not None:
        try:
            cost = CostModel(args.expert_mb * 2**20, args.bandwidth_gbs * 1e9, args.compute_ms / 1e3)
        except ValueError as exc:
            raise SystemExit(f"effllm moe: {exc}") from None
    trace = _load(args.trace, args.keep_warmup)
    if trace is None:
        return 2
    small = [c for c in caches if c < trace.top_k]
    if small:
        raise SystemExit(f"effllm moe: --cache {small[0]} is smaller than one token's top-k ({trace.top_k})")

    print(f"{args.trace}: {trace.num_tokens} tokens, {trace.num_layers} layer(s), top-{trace.top_k} of "
          f"{trace.num_experts} experts, {len(trace.requests)} request(s); cache "
          f"{'per layer' if args.scope == 'per_layer' else 'global'}")
    header = f"{'cache':>6}  {'policy':<13} {'prefetch':<12} {'hit %':>6} {'cached %':>8} {'prefetch %':>10} " \
             f"{'precision %':>11}"
    if cost:
        header += f" {'stall ms/token':>14} {'MiB moved':>10}"
    print(header)
    results = []
    for capacity in caches:
        for policy in policies:
            for predictor in predictors:
                pred = None if predictor == "none" else predictor
                r = simulate(trace, capacity, policy, scope=args.scope, predictor=pred, lookahead=args.lookahead,
                             cost=cost, reset_per_request=args.reset_per_request)
                results.append(r)
                line = (f"{capacity:>6}  {policy:<13} {predictor:<12} {100 * r.hit_rate:6.1f} "
                        f"{100 * r.hits / r.accesses:8.1f} {100 * r.prefetch_hits / r.accesses:10.1f} "
                        f"{(f'{100 * r.prefetch_precision:.1f}' if pred else '-'):>11}")
                if cost:
                    line += f" {1e3 * r.stall_s / trace.num_tokens:14.3f} {r.bytes_moved / 2**20:10.1f}"
                print(line)
    if args.plot:
        print(f"wrote {_plot(results, args.plot, args.trace)}")
    if args.json:
        import json

        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({"trace": args.trace, "tokens": trace.num_tokens, **r.as_dict()}) + "\n")
        print(f"records appended to {args.json}")
    return 0


def _plot(results, out: str, title: str) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("effllm moe simulate --plot needs matplotlib: pip install 'effllm[bench]'") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list] = {}
    for r in results:
        series.setdefault(f"{r.policy}" + (f" + {r.predictor}" if r.predictor else ""), []).append(r)
    for label, rs in series.items():
        ax.plot([r.capacity for r in rs], [100 * r.hit_rate for r in rs], marker="o", label=label)
    ax.set_xlabel(f"cache size (experts, {results[0].scope.replace('_', ' ')})")
    ax.set_ylabel("hit rate (%)")
    ax.set_title(Path(title).name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def _locality(args) -> int:
    from .locality import sch, srp

    windows = _int_list(args.windows, "--windows")
    ratios = _int_list(args.cache_ratio, "--cache-ratio")
    trace = _load(args.trace, args.keep_warmup)
    if trace is None:
        return 2
    longest = max(int((trace.request == r).sum()) for r in range(len(trace.requests)))
    print(f"{args.trace}: {trace.num_tokens} tokens, {trace.num_layers} layer(s), top-{trace.top_k} of "
          f"{trace.num_experts} experts")
    print(f"{'m':>5} {'SRP':>6}  " + " ".join(f"{f'SCH rho={r}':>10}" for r in ratios))
    for m in windows:
        if m > longest:
            print(f"{m:>5}  (longer than every request: {longest} tokens)")
            continue
        row = f"{m:>5} {srp(trace, m)['model']:6.3f}  "
        row += " ".join(f"{sch(trace, r * trace.top_k, m)['model']:10.3f}" for r in ratios)
        print(row)
    return 0
