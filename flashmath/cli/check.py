"""`flashmath check softmax|attention TARGET`: run the conformance battery on a kernel.

TARGET is ``MODULE:FUNC`` (FUNC may be dotted: ``pkg.mod:Class.method``; the current
folder is importable, as with ``python -m``) or one of the built-in targets:

- ``flashmath``: fm.softmax / fm.flash_attention (+ fm.flash_attention_backward);
- ``torch``: torch.softmax / torch.nn.functional.scaled_dot_product_attention (+ autograd),
  when torch is installed;
- ``naive``: fm.naive.softmax / fm.naive.attention, the textbook exp(s) / sum exp(s) in the
  input dtype without the max shift -- it must fail the overflow cases.

Every case of :func:`flashmath.testing.softmax_battery` or ``attention_battery`` is run and
judged by the accuracy rule and the NaN policy (:mod:`flashmath.conformance.judge`). A table
is printed (case, dtype, max error, baseline error, ratio, NaN policy, verdict), then the
message of every failure. Exit status: 0 when every case that ran passed, 1 when one failed
(or none ran), 2 when the target cannot be imported or called (one line on stderr, no
traceback). ``--json FILE`` writes the same results atomically.

This module owns the command: its arguments, the table and the JSON; targets are loaded
by :func:`flashmath.conformance.kernels.load_target`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashmath import conformance as testing
from flashmath.conformance.kernels import BUILTIN_TARGETS, TargetError, load_target
from flashmath.text import MISSING, number

__all__ = ["BUILTIN_TARGETS", "TargetError", "configure", "format_table", "load_target", "main"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add `check`'s arguments: the kind (softmax | attention) and its options."""
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in ("softmax", "attention"):
        p = sub.add_parser(kind, help=f"check a {kind} implementation against the oracle",
                           description=f"Run the {kind} battery on TARGET and judge every case.")
        p.add_argument("target", metavar="TARGET",
                       help="MODULE:FUNC, or a built-in: flashmath, torch, naive")
        p.add_argument("--dtype", action="append", metavar="DTYPE",
                       choices=testing.BATTERY_DTYPES,
                       help="only these dtypes (repeatable; default: those the target "
                            "declares, else all of "
                            f"{', '.join(testing.BATTERY_DTYPES)})")
        if kind == "attention":
            p.add_argument("--grads", action="store_true",
                           help="also judge dq, dk, dv (torch autograd, or the impl's backward)")
        p.add_argument("--json", type=Path, metavar="FILE",
                       help="also write the results as JSON (atomically)")
        p.add_argument("--backend", choices=("numpy", "torch"),
                       help="what the target takes (default: its `backend` attribute, torch "
                            "for callables from torch modules, else numpy)")
        p.add_argument("--supports", metavar="OPTS",
                       help="comma-separated options the target supports, overriding what is "
                            "declared or read from its signature (e.g. causal,mask,gqa)")


def main(args: argparse.Namespace) -> int:
    kind: testing.Kind = args.kind
    try:
        kernel = load_target(args.target, kind)
        overrides: dict[str, Any] = {}
        if args.backend:
            overrides["backend"] = args.backend
        if args.supports is not None:
            overrides["supports"] = [s.strip() for s in args.supports.split(",") if s.strip()]
        kernel = testing.validate_kernel(testing.declare(kernel, **overrides), kind)
        if args.json is not None:
            _check_writable(args.json)  # before the battery runs, not after
    except (TargetError, TypeError, ValueError) as exc:
        print(f"flashmath check: {exc}", file=sys.stderr)
        return 2
    grads = bool(getattr(args, "grads", False))
    dtypes = args.dtype
    if dtypes is None and kernel.dtypes is not None:  # what the impl declares, nothing else
        dtypes = [d for d in testing.BATTERY_DTYPES if d in kernel.dtypes]
    if kind == "softmax":
        results = testing.check_softmax(kernel, dtypes=dtypes)
    else:
        results = testing.check_attention(kernel, dtypes=dtypes, grads=grads)
    print(f"flashmath check {kind} {args.target}" + (" --grads" if grads else "")
          + f"  ({kernel.name}, {kernel.backend})")
    print(format_table(results))
    failures = [r for r in results if r.verdict in ("FAIL", "ERROR")]
    for r in failures:
        print(f"\n{r.verdict}: {r.message}")
    counts = {v: sum(r.verdict == v for r in results) for v in ("PASS", "FAIL", "ERROR", "SKIP")}
    ran = counts["PASS"] + counts["FAIL"] + counts["ERROR"]
    ok = ran > 0 and not failures
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors, "
          f"{counts['SKIP']} skipped: {'PASS' if ok else 'FAIL'}")
    if args.json is not None:
        _write_json(args.json, kind, args.target, kernel, grads, results, counts, ok)
    return 0 if ok else 1


# --------------------------------------------------------------------------- output


COLUMNS = ("case", "dtype", "max error", "baseline error", "ratio", "NaN policy", "verdict")
#: How the table writes an error or a ratio.
NUMBER = ".2e"


def _row(r: testing.CheckResult) -> tuple[str, ...]:
    baseline = number(r.baseline_error, NUMBER)
    if r.baseline_error is not None and not math.isfinite(r.baseline_error):
        baseline += " (floor)"
    policy = MISSING if r.nan_policy_ok is None else ("ok" if r.nan_policy_ok else "BROKEN")
    verdict: str = r.verdict
    if r.verdict == "SKIP":
        verdict += ": " + r.message.split("]: ", 1)[-1]
    elif r.quantity not in (None, "out"):
        verdict += f" ({r.quantity})"
    return (r.case, r.dtype, number(r.max_error, NUMBER), baseline, number(r.ratio, NUMBER),
            policy, verdict)


def format_table(results: Sequence[testing.CheckResult]) -> str:
    """A fixed-width text table, one row per result (columns as ``COLUMNS``)."""
    rows = [COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                 enumerate(zip(row[:-1], widths, strict=True))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in [*widths, len(COLUMNS[-1])]))
    return "\n".join(lines)


def _check_writable(path: Path) -> None:
    """ValueError naming --json unless ``path`` can be written: its folder exists and it
    is not itself a folder."""
    if path.is_dir():
        raise ValueError(f"--json: {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--json: folder {path.parent} does not exist")
    probe = path.parent / f".{path.name}.write-test-{os.getpid()}"
    try:  # the results are written atomically next to path: that folder must take files
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--json: cannot write in {path.parent}: "
                         f"{exc.strerror or exc}") from None


def _write_json(path: Path, kind: str, target: str, kernel: testing.Kernel, grads: bool,
                results: Sequence[testing.CheckResult], counts: dict[str, int],
                ok: bool) -> None:
    from flashmath.files import atomic_write
    from flashmath.lab.runner import dumps_json

    doc = {
        "kind": kind,
        "target": target,
        "impl": kernel.name,
        "backend": kernel.backend,
        "grads": grads,
        "rule": {"out_limit": testing.OUT_LIMIT, "grad_limit": testing.GRAD_LIMIT,
                 "floor_ulps": testing.FLOOR_ULPS},
        "results": [r.to_dict() for r in results],
        "counts": {k.lower(): v for k, v in counts.items()},
        "passed": ok,
    }
    atomic_write(path, dumps_json(doc))

