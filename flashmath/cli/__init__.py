"""The ``flashmath`` command (also ``python -m flashmath``).

Owns the command line: one module per command (``lab``, ``check``, ``bench``, ``ring``),
each with ``configure(parser)`` and ``main(args) -> int`` (the exit status). May import
every layer below it (lab, distributed, triton, measure, conformance, attention, softmax,
dtypes, text); nothing in flashmath imports cli. A command's module is imported only when
that command runs, so ``flashmath --help`` is fast and torch stays optional.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "console", "main"]

DESCRIPTION = """\
flashmath: exact, numerically safe softmax and attention (NumPy on CPU, Triton on GPU,
ring attention over torch.distributed), and a lab that measures them.

Run `flashmath COMMAND --help` for a command's options."""

EPILOG = """\
examples:
  flashmath lab --quick                          run every experiment, write a report
  flashmath check attention flashmath            judge a kernel against the float64 oracle
  flashmath bench attention --seq 1024           time NumPy attention against torch SDPA
  flashmath ring --world-size 2 --seq 2048       ring attention across 2 local processes"""

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "lab": ("flashmath.cli.lab", "run the experiments and write results, plots and a report"),
    "check": ("flashmath.cli.check", "check a softmax or attention kernel against the oracle"),
    "bench": ("flashmath.cli.bench", "time flashmath against its peers (ratios, GFLOP/s)"),
    "ring": ("flashmath.cli.ring", "ring attention demo over torch.distributed"),
}


def _version() -> str:
    from flashmath import __version__

    return __version__


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The top-level parser; only the command named first in ``argv`` gets its options."""
    parser = argparse.ArgumentParser(
        prog="flashmath", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"flashmath {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # only the chosen command's module is imported
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the command; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(args))


def console() -> int:
    """The ``flashmath`` executable (and ``python -m flashmath``): :func:`main`, then
    ``gc.freeze()``, as the process is about to exit. The heap then skips the collector's
    last pass over every object, which takes 0.5 s once torch is loaded; the exit runs its
    handlers and flushes as usual."""
    code = main()
    gc.freeze()
    return code
