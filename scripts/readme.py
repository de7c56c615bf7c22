#!/usr/bin/env python3
"""Keep the README's measured figures generated, never typed.

README.md holds generated blocks::

    <!-- generated: NAME (docs/figures/NAME.md) -->
    ...the file's content...
    <!-- end: NAME -->

``python scripts/readme.py`` copies each docs/figures/NAME.md (or docs/NAME.md) into its
block; ``--check`` exits 1 and names the blocks that differ (the test suite runs it).
The figure files are written by the commands that measure them, each naming its machine:

    attention-cpu   python benchmarks/bench_attention.py --write docs/figures/attention-cpu.md
    softmax-cpu     python benchmarks/bench_softmax.py --write docs/figures/softmax-cpu.md
    model-cpu       python benchmarks/bench_model.py --write docs/figures/model-cpu.md
    check-torch     python scripts/readme.py --run check-torch
    check-torch-float16  python scripts/readme.py --run check-torch-float16
    lab-times       python scripts/readme.py --run lab-times
    parity          docs/parity.md, written by python tests/test_parity.py
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) \((?P<src>[^)]+)\) -->\n)(?P<body>.*?)"
                   r"(<!-- end: (?P=name) -->)", re.S)


def render(text: str) -> tuple[str, list[str]]:
    """README text with every block replaced by its source file; and the stale names."""
    stale: list[str] = []

    def fill(m: re.Match[str]) -> str:
        body = (ROOT / m["src"]).read_text()
        if not body.endswith("\n"):
            body += "\n"
        if body != m["body"]:
            stale.append(m["name"])
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(fill, text), stale


def _machine() -> str:
    sys.path.insert(0, str(ROOT))
    from flashmath.measure.machine import describe

    return describe()


def run_check_torch() -> str:
    """What the conformance battery says of torch SDPA today, forward and --grads."""
    sys.path.insert(0, str(ROOT))
    from flashmath.conformance import check_attention
    from flashmath.conformance.kernels import load_target

    kernel = load_target("torch", "attention")
    lines = [f"Measured by `python scripts/readme.py --run check-torch` on {_machine()}.", ""]
    for grads in (False, True):
        results = check_attention(kernel, grads=grads) if grads else check_attention(kernel)
        ran = [r for r in results if r.verdict in ("PASS", "FAIL")]
        failed = [r for r in ran if r.verdict == "FAIL"]
        skipped = [r for r in results if r.verdict == "SKIP"]
        what = "with `--grads`" if grads else "forward"
        lines.append(f"- torch SDPA, {what}: {len(ran) - len(failed)} of {len(ran)} cases pass"
                     f" ({len(skipped)} skipped)" + (":" if failed else "."))
        lines += [f"  - FAIL {r.case} [{r.dtype}]: {r.message.split(']: ', 1)[-1]}"
                  for r in failed]
    return "\n".join(lines) + "\n"


def run_check_torch_float16() -> str:
    """`flashmath check attention torch --dtype float16`, as a user sees it."""
    cmd = ["check", "attention", "torch", "--dtype", "float16"]
    done = subprocess.run([sys.executable, "-m", "flashmath", *cmd], cwd=ROOT,
                          capture_output=True, text=True)
    return (f"Measured by `python scripts/readme.py --run check-torch-float16` on {_machine()}:"
            f"\n\n```\n$ flashmath {' '.join(cmd)}\n{done.stdout.rstrip()}\n```\n")


def run_lab_times() -> str:
    """Wall time of `flashmath lab --quick` (median and range of 5 runs) and of the full
    lab (one run) on this machine, each a fresh process as a user starts it."""
    lines = [f"Measured by `python scripts/readme.py --run lab-times` on {_machine()}:", ""]
    for label, extra, runs in (("`flashmath lab --quick`", ["--quick"], 5),
                               ("`flashmath lab`", [], 1)):
        times = sorted(_lab_wall_time(extra) for _ in range(runs))
        if runs == 1:
            lines.append(f"- {label}: {times[0]:.0f} s")
        else:
            lines.append(f"- {label}: median {times[runs // 2]:.1f} s over {runs} runs "
                         f"({times[0]:.1f}-{times[-1]:.1f} s)")
    return "\n".join(lines) + "\n"


def _lab_wall_time(extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flashmath", "lab", "--out", out, *extra],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


RUNS = {"check-torch": run_check_torch, "check-torch-float16": run_check_torch_float16,
        "lab-times": run_lab_times}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    parser.add_argument("--run", nargs="+", choices=sorted(RUNS), default=[],
                        help="remeasure these figure files first")
    args = parser.parse_args(argv)
    for name in args.run:
        path = ROOT / "docs" / "figures" / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(RUNS[name]())
        tmp.replace(path)
    text, stale = render(README.read_text())
    if args.check:
        for name in stale:
            print(f"README.md: block {name!r} differs from its source; run scripts/readme.py")
        return 1 if stale else 0
    if stale:
        tmp = README.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(README)
        print("updated:", ", ".join(stale))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
