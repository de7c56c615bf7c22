"""`flashmath check`: the built-in targets' verdicts, row by row, the table, --json, and
clean errors for targets that cannot be imported or called."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashmath import testing
from flashmath.cli import main

ALL = set(testing.BATTERY_DTYPES)


def _run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str):
    """Run the CLI with --json; return (exit code, stdout, stderr, the JSON document)."""
    out = tmp_path / "results.json"
    code = main(["check", *argv, "--json", str(out)])
    captured = capsys.readouterr()
    doc = json.loads(out.read_text()) if out.exists() else None
    return code, captured.out, captured.err, doc


def _verdicts(doc: dict, verdict: str) -> set[tuple[str, str]]:
    return {(r["case"], r["dtype"]) for r in doc["results"] if r["verdict"] == verdict}


def _cases(names: set[str], dtypes: set[str]) -> set[tuple[str, str]]:
    return {(n, d) for n in names for d in dtypes}


def _printed(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.2e}"


# --------------------------------------------------------------------------- built-ins


def test_flashmath_passes_both_batteries(capsys, tmp_path) -> None:
    code, out, _, doc = _run(capsys, tmp_path, "attention", "flashmath")
    assert code == 0 and doc["passed"], out
    assert not _verdicts(doc, "SKIP") and len(doc["results"]) == len(testing.attention_battery())
    code, out, _, doc = _run(capsys, tmp_path, "softmax", "flashmath")
    assert code == 0 and doc["passed"], out


def test_torch_sdpa_passes_and_skips_only_what_it_cannot_express(capsys, tmp_path) -> None:
    """torch SDPA passes every case it can express, except that in float32 a tiny problem
    with large scores may land over 2x the naive NumPy baseline: there the max error is
    decided by the float32 dot's summation order, which differs between torch's and
    NumPy's BLAS kernels by machine (one machine: 'large logits' 3.9x, 'custom scale'
    2.2x; another: none). Such a FAIL must then be a pure accuracy verdict, within 2x of
    the PyTorch-style baseline (the same formula in torch ops), and nothing else fails."""
    pytest.importorskip("torch")
    from flashmath.conformance.judge import OUT_LIMIT
    from tests.attention_fuzz import torch_style_forward_error

    code, out, _, doc = _run(capsys, tmp_path, "attention", "torch")
    assert _verdicts(doc, "SKIP") == _cases({"softcap", "ALiBi slopes", "attention sinks"}, ALL)
    assert not _verdicts(doc, "ERROR")
    cases = {c.id: c for c in testing.attention_battery()}
    failed = [r for r in doc["results"] if r["verdict"] == "FAIL"]
    for r in failed:
        assert r["dtype"] == "float32" and r["nan_policy_ok"], r["message"]
        torch_style = torch_style_forward_error(cases[f"{r['case']}[float32]"])
        assert r["max_error"] <= OUT_LIMIT * max(torch_style, r["floor"]), r["message"]
    assert "SKIP: needs softcap (not declared by the impl)" in out
    assert "SKIP: needs alibi_slopes (not declared by the impl)" in out
    n = len(failed)
    summary = f"{96 - n} passed, {n} failed, 0 errors, 12 skipped: {'FAIL' if n else 'PASS'}"
    assert out.rstrip().endswith(summary) and code == int(n > 0), out


def test_torch_softmax_breaks_the_policy_only_on_fully_masked_rows(capsys, tmp_path) -> None:
    pytest.importorskip("torch")
    code, _, _, doc = _run(capsys, tmp_path, "softmax", "torch")
    # torch.softmax gives NaN for an all -inf row; flashmath's policy (and SDPA's) is zeros.
    assert code == 1
    assert _verdicts(doc, "FAIL") == _cases({"all -inf", "fully masked row in a batch"}, ALL)
    assert all(r["nan_policy_ok"] is False for r in doc["results"] if r["verdict"] == "FAIL")


def test_naive_attention_fails_exactly_where_it_breaks(capsys, tmp_path) -> None:
    code, out, _, doc = _run(capsys, tmp_path, "attention", "naive")
    assert code == 1
    # exp overflows to inf (inf/inf = NaN), underflows to 0 (0/0), or a row has nothing
    # (0/0): in every dtype. Everything else the textbook formula gets right.
    assert _verdicts(doc, "FAIL") == _cases(
        {"large logits", "large negative logits", "causal Sq > Sk", "boolean mask",
         "padded queries"}, ALL)
    assert not _verdicts(doc, "SKIP") and not _verdicts(doc, "ERROR")
    assert "FAIL: attention case 'large logits' [float16]: NaN policy broken at out[0, 0, 0, 0]" \
        in out


def test_naive_softmax_fails_exactly_where_it_breaks(capsys, tmp_path) -> None:
    code, _, _, doc = _run(capsys, tmp_path, "softmax", "naive")
    assert code == 1
    assert _verdicts(doc, "FAIL") == (
        # in every dtype: exp overflow or underflow at the dtype's own thresholds, rows with
        # nothing left (0/0), and +inf giving [0, nan, 0] instead of a NaN row
        _cases({"above overflow threshold", "below underflow threshold", "all -inf",
                "fully masked row in a batch", "+inf in a row"}, ALL)
        # SEED_001's large positive (exp(92) > float32 max), large negative (exp(-100) = 0)
        | _cases({"large positive"}, {"float32", "float16", "bfloat16"})
        | _cases({"large negative"}, {"float16", "bfloat16"})
        # float16 overflows at exp(11.09): 42, and 3- to 5-sigma random logits
        | _cases({"single element", "long row", "batched 3-D", "axis 0"}, {"float16"})
    )
    assert _verdicts(doc, "SKIP") == _cases({"where mask"}, ALL)  # naive.softmax has no where


# --------------------------------------------------------------------------- user kernels


def test_a_user_kernel_by_module_and_name(capsys, tmp_path) -> None:
    code, out, _, doc = _run(capsys, tmp_path, "attention", "tests._kernels:no_causal_attention",
                             "--dtype", "float16", "--dtype", "bfloat16")
    assert code == 1
    assert _verdicts(doc, "FAIL") == _cases({"causal", "causal Sq > Sk", "causal Sq < Sk"},
                                            {"float16", "bfloat16"})
    assert {r["dtype"] for r in doc["results"]} == {"float16", "bfloat16"}
    skipped = {r["case"] for r in doc["results"] if r["verdict"] == "SKIP"}
    assert {"GQA", "boolean mask", "softcap"} <= skipped
    assert "needs gqa (not declared by the impl)" in out


def test_the_dtypes_a_kernel_declares_are_the_default(capsys, tmp_path) -> None:
    code, _, _, doc = _run(capsys, tmp_path, "attention",
                           "tests._kernels:bfloat16_only_attention")
    assert code == 0 and {r["dtype"] for r in doc["results"]} == {"bfloat16"}


def test_supports_and_grads_from_the_command_line(capsys, tmp_path) -> None:
    code, out, _, doc = _run(capsys, tmp_path, "attention", "tests._kernels:bad_dk_attention",
                             "--dtype", "float32", "--grads", "--supports", "")
    assert code == 1 and doc["grads"] is True
    failed = [r for r in doc["results"] if r["verdict"] == "FAIL"]
    assert failed and all(r["quantity"] == "dk" for r in failed)
    assert "FAIL (dk)" in out
    code, _, _, doc = _run(capsys, tmp_path, "attention", "tests._kernels:good_attention",
                           "--dtype", "bfloat16", "--grads")
    assert code == 0 and _verdicts(doc, "PASS")


def test_json_matches_the_table(capsys, tmp_path) -> None:
    code, out, _, doc = _run(capsys, tmp_path, "softmax", "tests._kernels:uniform_empty_softmax",
                             "--dtype", "float64")
    assert code == 1 and doc["kind"] == "softmax" and doc["passed"] is False
    lines = out.splitlines()
    for result in doc["results"]:
        (line,) = [ln for ln in lines if ln.startswith(result["case"] + "  ")]
        cells = line[len(result["case"]):].split()
        assert cells[0] == result["dtype"]
        assert result["verdict"] in {c.rstrip(":") for c in cells}
        policy = {None: "-", True: "ok", False: "BROKEN"}[result["nan_policy_ok"]]
        assert policy in cells
        if result["max_error"] is not None:  # numbers as printed; JSON writes inf as "inf"
            assert _printed(result["max_error"]) == cells[1]
            assert _printed(result["ratio"]) in cells
    assert doc["counts"] == {"pass": 14, "fail": 2, "error": 0, "skip": 2}
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left


# --------------------------------------------------------------------------- bad targets


@pytest.mark.parametrize(("target", "message"), [
    ("no_such_module_xyz:attn", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
    ("flashmath.numerics:no_such_fn", "'flashmath.numerics' has no attribute 'no_such_fn'"),
    ("flashmath:__version__", "flashmath:__version__ is a str, not a callable"),
    ("tests._kernels:one_arg", "cannot be called as f(q, k, v)"),
    ("just_a_module", "expected MODULE:FUNC or one of flashmath, torch, naive"),
])
def test_targets_that_cannot_be_used_exit_2_with_one_line(capsys, tmp_path, target,
                                                          message) -> None:
    code, out, err, doc = _run(capsys, tmp_path, "attention", target)
    assert code == 2 and doc is None and out == ""
    assert err.startswith("flashmath check: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_supports_override_the_signature_cannot_honour_exits_2(capsys, tmp_path) -> None:
    code, _, err, _ = _run(capsys, tmp_path, "attention", "tests._kernels:no_scale_attention",
                           "--supports", "causal")
    assert code == 2 and "declared to support ['causal'] but takes no such keyword" in err


@pytest.mark.parametrize("where", ["missing-folder/out.json", "."])
def test_regression_unwritable_json_path_is_a_clean_error_before_the_battery(
    capsys, tmp_path, where
) -> None:
    target = tmp_path / where if where != "." else tmp_path
    assert main(["check", "softmax", "flashmath", "--json", str(target)]) == 2
    captured = capsys.readouterr()
    assert "--json" in captured.err and "Traceback" not in captured.err
    assert "passed" not in captured.out  # refused before running anything
