"""`flashmath lab`: run the experiments and write results, plots and a report.

    flashmath lab                      # every experiment -> ./lab-runs/<run-id>/report.md
    flashmath lab --quick              # smaller grids, every section still measured
    flashmath lab --only overflow      # some experiments (the others are marked skipped)
    flashmath lab --seed 7 --out DIR   # another seed, another folder
    flashmath lab --serial             # one experiment at a time, all in this process
    flashmath lab --list               # names, titles and seed labs

Exit codes: 0 all ran, 1 an experiment failed, 2 bad arguments, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["configure", "main"]


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed must be >= 0, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--out", type=Path, default=Path("lab-runs"), metavar="DIR",
                        help="where run folders are created (default: ./lab-runs)")
    parser.add_argument("--only", nargs="+", action="extend", metavar="NAME",
                        help="run only these experiments (see --list)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller grids and fewer trials (a few seconds in all)")
    parser.add_argument("--seed", type=_seed, default=42,
                        help="seed of every random stream (default: 42)")
    parser.add_argument("--serial", action="store_true",
                        help="run one experiment at a time in this process (by default, on "
                             "2+ cores, those that time nothing run two at a time)")
    parser.add_argument("--list", action="store_true",
                        help="list the experiments and exit")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bar (by default shown on a terminal)")


def main(args: argparse.Namespace) -> int:
    from flashmath.lab import registry, runner

    modules = registry.experiments()
    try:
        chosen = runner.select(list(modules), args.only)
    except runner.UnknownExperimentError as exc:
        print(f"flashmath lab: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print(runner.listing({name: modules[name] for name in chosen}))
        return 0
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"flashmath lab: error: --out: {args.out} exists and is not a folder",
              file=sys.stderr)
        return 2
    problem = _prepare_out(Path(args.out))
    if problem:
        print(f"flashmath lab: error: --out: {problem}", file=sys.stderr)
        return 2
    config = {"out": str(args.out), "only": list(args.only or []), "quick": args.quick,
              "seed": args.seed, "serial": args.serial}
    try:
        outcome = runner.run_lab(args.out, only=args.only, quick=args.quick, seed=args.seed,
                                 config=config, progress=args.progress,
                                 parallel=False if args.serial else None)
    except OSError as exc:  # a full disk, a folder removed under us: one line, not a trace
        where = f" ({exc.filename})" if exc.filename else ""
        recorded = getattr(exc, "recorded", None)
        manifest = ("manifest.json marks the run failed" if recorded else
                    "manifest.json could not be updated (no room), it may still say "
                    "'running'" if recorded is False else "")
        print(f"flashmath lab: error: writing the run failed: {exc.strerror or exc}{where}; "
              f"finished experiments are kept" + (f"; {manifest}" if manifest else ""),
              file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for status in outcome.statuses.values():
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"flashmath lab: {summary} -> {outcome.run_dir / 'report.md'}")
    if outcome.exit_code == runner.EXIT_INTERRUPTED:
        print("flashmath lab: interrupted; finished experiments are kept", file=sys.stderr)
    return outcome.exit_code


def _prepare_out(out: Path) -> str | None:
    """Create ``out`` (saying so when folders are made) and check that it takes files;
    the reason it cannot, or None."""
    if not out.exists():
        missing = [p for p in (out, *out.parents) if not p.exists()]
        try:
            out.mkdir(parents=True)
        except OSError as exc:
            return f"cannot create {out}: {exc.strerror or exc}"
        print(f"flashmath lab: created {len(missing)} folder(s) for {out}", file=sys.stderr)
    probe = out / f".flashmath-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{out} is not writable: {exc.strerror or exc}"
    return None
