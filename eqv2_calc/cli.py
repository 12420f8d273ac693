"""The ``eqv2`` command line. Each sub-package registers its own sub-command."""

from __future__ import annotations

import argparse
import sys

from eqv2_calc.runtime import CLI_ALLOCATOR_NOTE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqv2", description=__doc__, epilog=CLI_ALLOCATOR_NOTE)
    sub = parser.add_subparsers(dest="command", required=True)
    from eqv2_calc import predict_cli
    from eqv2_calc.relax import cli as relax_cli

    predict_cli.add_parser(sub)
    relax_cli.add_parser(sub)
    from eqv2_calc.train import cli as train_cli

    train_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from eqv2_calc.errors import Eqv2Error
    from eqv2_calc.runtime import tune_allocator

    args = build_parser().parse_args(argv)
    tune_allocator()
    try:
        return int(args.func(args) or 0)
    except Eqv2Error as exc:  # bad input: a message, not a traceback
        print(f"eqv2 {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
