"""The ``effllm`` command: ``effllm demo``, ``effllm bench ...``, ``effllm moe ...``, ``effllm version``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import demo
    from ._version import __version__
    from .bench import cli as bench_cli
    from .moe import cli as moe_cli

    parser = argparse.ArgumentParser(prog="effllm", description="effllm: composable LLM efficiency primitives")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo.add_parser(sub)
    bench_cli.add_parser(sub)
    moe_cli.add_parser(sub)
    sub.add_parser("version", help="print the effllm version")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "demo":
        return demo.run(args)
    if args.cmd == "bench":
        return bench_cli.run(args)
    if args.cmd == "moe":
        return moe_cli.run(args)
    print(__version__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
