"""The ``effllm`` command: ``effllm demo``, ``effllm bench ...``, ``effllm moe ...``, ``effllm --version``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree (every subcommand's parser), without running anything."""
    from . import demo
    from ._version import __version__
    from .bench import cli as bench_cli
    from .moe import cli as moe_cli

    parser = argparse.ArgumentParser(prog="effllm", description="effllm: composable LLM efficiency primitives")
    parser.add_argument("--version", action="version", version=f"effllm {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo.add_parser(sub)
    bench_cli.add_parser(sub)
    moe_cli.add_parser(sub)
    sub.add_parser("version", help="print the effllm version", description="Print the effllm version.")
    _name_command_slots(parser)
    return parser


def _name_command_slots(parser: argparse.ArgumentParser) -> None:
    """Call every subcommand slot COMMAND: argparse names a missing one by its dest
    (``cmd``, ``bench_cmd``), an internal name users never typed."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if action.metavar is None:
                action.metavar = "COMMAND"
            if action.help is None:
                action.help = f"'{parser.prog} COMMAND --help' shows a command's options"
            for child in set(action.choices.values()):
                _name_command_slots(child)


def main(argv: list[str] | None = None) -> int:
    from . import demo
    from ._version import __version__
    from .bench import cli as bench_cli
    from .moe import cli as moe_cli

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
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
