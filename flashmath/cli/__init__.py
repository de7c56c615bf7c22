"""`flashmath lab | check | bench | ring`: one parser, each command owned by its module.

A command module defines ``configure(parser)`` (adds its arguments) and
``main(args) -> int`` (the exit code). Modules are imported only when their
command runs, so `flashmath --help` stays fast and torch stays optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "lab": ("flashmath.cli.lab", "run the experiments and write results, plots and a report"),
    "check": ("flashmath.cli.check", "check a softmax or attention kernel against the oracle"),
    "bench": ("flashmath.measure.cpu", "time flashmath against its peers (ratios, GFLOP/s)"),
    "ring": ("flashmath.cli.ring", "ring attention demo over torch.distributed"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmath", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # only the chosen command's module is imported
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(args))


if __name__ == "__main__":
    sys.exit(main())
