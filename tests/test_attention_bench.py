"""`flashmath bench attention` and the functions the lab calls: they run at small sizes and
return what they promise (no timing is asserted), and the original loop really is attention."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import flashmath as fm
from flashmath import cli
from flashmath.attention.threads import one_blas_thread, run_units
from flashmath.measure import cpu as bench
from flashmath.measure.flops import attention_flops
from flashmath.measure.timing import time_calls


def test_seed003_loop_is_attention():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 40, 8)) for _ in range(3))
    for causal in (True, False):
        np.testing.assert_allclose(bench.seed003_forward(q, k, v, 16, causal),
                                   fm.attention_reference(q, k, v, causal=causal), atol=1e-13)


def test_flops_follow_design():
    assert attention_flops(2, 8, 4096, 4096, 64, causal=False) == 4 * 2 * 8 * 4096**2 * 64
    assert attention_flops(1, 1, 8, 8, 2, causal=True) == 4 * 8 * 8 * 2 / 2
    assert attention_flops(1, 1, 4, 8, 2, causal=True) == 4 * 4 * 8 * 2  # not square
    assert attention_flops(1, 1, 8, 8, 2, causal=False, mode="fwd_bwd") == 3.5 * 4 * 64 * 2
    with pytest.raises(ValueError, match="mode: expected one of"):
        attention_flops(1, 1, 8, 8, 2, causal=False, mode="forward")


def test_time_calls_alternates_and_honours_repeat_and_budget():
    order: list[str] = []
    times = time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b"] * 4  # one warm-up each, then 3 rounds in turn
    assert [len(t) for t in times.values()] == [3, 3] and all(x >= 0 for x in times["a"])
    assert len(time_calls({"f": lambda: None}, 0, warmup=False)["f"]) == 1
    slow = time_calls({"f": lambda: time.sleep(0.01)}, 50, budget=0.0, warmup=False)
    assert len(slow["f"]) == 2  # the budget stops after the second round


@pytest.mark.parametrize("use_torch", [True, False])
def test_time_attention_record(use_torch):
    rec = bench.time_attention(1, 2, 64, 8, causal=True, repeat=1, torch=use_torch)
    for key in ("fm_fwd_s", "fm_fwdbwd_s", "fm_fwd_gflops", "fwd_ratio_time", "fwdbwd_ratio_time"):
        assert key in rec
    assert rec["fm_fwd_s"] > 0
    assert (rec["torch_fwd_s"] is not None) == (use_torch and bench._torch() is not None)


def test_seed003_and_memory_records():
    rec = bench.time_seed003(1, 1, 64, 8, tile=16)
    assert rec["seed003_fwd_s"] > 0 and rec["seed003_vs_fm_ratio_time"] > 0
    mem = bench.peak_memory(2048, d=16)  # tiles of a few hundred KB: far below S^2
    assert mem["scores_bytes"] == 2048 * 2048 * 4
    assert 0 < mem["peak_bytes"] < mem["scores_bytes"]
    assert mem["scratch_bytes"] == mem["peak_bytes"] - mem["output_bytes"]


def test_cli_prints_the_table(capsys):
    code = cli.main(["bench", "attention", "--seq", "64", "--batch", "1", "--heads", "1",
                     "--dim", "8", "--repeat", "1", "--seed003-seq", "32", "--memory-seq", "64"])
    text = capsys.readouterr().out
    assert code == 0
    assert "fm fwd ms" in text and "original per-row-exp loop" in text and "peak/scores" in text


@pytest.mark.parametrize("argv", [
    ["--seq", "0"], ["--seq", "-8"], ["--dtype", "int32"], ["--block-q", "0"], ["--repeat", "0"],
])
def test_regression_bench_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "attention", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_version_and_help_speak_to_users(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"flashmath {fm.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "flashmath COMMAND --help" in text and "owned by its module" not in text
    assert cli.COMMANDS["bench"][0] == "flashmath.cli.bench"


def test_threads_run_every_unit_and_raise():
    seen: list[int] = []
    run_units(list(range(7)), seen.append)
    assert sorted(seen) == list(range(7))

    def boom(unit: int) -> None:
        raise RuntimeError(f"unit {unit}")

    with pytest.raises(RuntimeError, match="unit"):
        run_units([1, 2, 3], boom)
    with one_blas_thread():  # a no-op where NumPy's BLAS is not OpenBLAS
        assert np.allclose(np.ones((3, 3)) @ np.ones(3), 3)


def test_python_dash_m_flashmath_is_the_command():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(fm.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    for module in ("flashmath", "flashmath.cli"):  # the README's torchrun line uses the second
        done = subprocess.run([sys.executable, "-m", module, "--version"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and done.stdout.strip() == f"flashmath {fm.__version__}"


def test_the_machine_line_names_the_cpu_family_and_its_vector_unit() -> None:
    """Two "AMD EPYC" machines read 1.0x and 2.1x torch on one benchmark: one had AVX-512
    (NumPy's exp2 vectorised), the other AVX2 only. The line tells them apart."""
    from flashmath.measure import machine

    line = machine.describe(torch=False)
    assert machine.simd() in line and machine.simd() in ("AVX-512", "AVX2", "NEON", "baseline")
    assert line.startswith(machine.cpu_model())
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "cpu family" in cpuinfo.read_text():
        assert "family" in machine.cpu_model()
