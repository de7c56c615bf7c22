"""docs/parity.md, the table of which options each attention backend takes, cannot go stale:
it is generated from the backends' signatures (read from the source, so neither torch nor
triton is imported) and this test fails when the file and the code disagree.

    python tests/test_parity.py        # regenerate docs/parity.md after changing a signature
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "parity.md"

#: (column, public name, source file, function): the last definition is read (after overloads).
BACKENDS = [
    ("NumPy tiled", "fm.flash_attention", "flashmath/attention/tiled.py", "flash_attention"),
    ("reference", "fm.attention_reference", "flashmath/attention/reference.py",
     "attention_reference"),
    ("Triton", "flashmath.triton.flash_attention", "flashmath/triton/op.py", "flash_attention"),
    ("decode", "fm.flash_decode", "flashmath/attention/decode.py", "flash_decode"),
    ("Triton decode", "flashmath.triton.flash_decode", "flashmath/triton/decode.py",
     "flash_decode"),
    ("varlen", "fm.flash_attention_varlen", "flashmath/attention/varlen.py",
     "flash_attention_varlen"),
    ("Triton varlen", "flashmath.triton.flash_attention_varlen", "flashmath/triton/varlen.py",
     "flash_attention_varlen"),
    ("ring", "flashmath.distributed.ring_attention", "flashmath/distributed/ring.py",
     "ring_attention"),
]

#: The shared options first, in this order; any other keyword follows, so a new option
#: shows up in the table (and makes this test fail until the file is regenerated).
ORDER = ["causal", "window", "mask", "bias", "alibi_slopes", "sinks", "kv_lengths", "q_lengths",
         "softcap", "scale", "block_q", "block_k", "return_lse"]

#: What each option means, the same for every backend that takes it.
MEANING = {
    "score_mod": "score_mod(score, b, h, q_idx, kv_idx) -> score, after softcap and bias",
    "mask_mod": "mask_mod(b, h, q_idx, kv_idx) -> bool, ANDed with the masks",
    "block_mask": "a BlockMask from create_block_mask (its mask_mod, tiles classified)",
    "block_table": "(B, max_pages) page indices of a paged cache",
    "k_new": "(B, H_kv, S_new, D) keys appended to the cache in place before attending",
    "v_new": "(B, H_kv, S_new, Dv) values appended with k_new",
    "causal": 'False, True (bottom-right aligned) or "top_left" (torch\'s)',
    "window": "(left, right) keys either side of the diagonal, None unbounded",
    "mask": "boolean, broadcastable to (B, H, Sq, Sk); True = may attend",
    "bias": "float, broadcastable to (B, H, Sq, Sk), added to the scores",
    "alibi_slopes": "(H,) or (B, H) ALiBi slopes (distance to the mask's diagonal)",
    "sinks": "(H,) attention-sink logits: a value-less key in every row's denominator",
    "kv_lengths": "(B,) valid keys per batch entry",
    "q_lengths": "(B,) valid queries per batch entry",
    "softcap": "s -> softcap * tanh(s / softcap)",
    "scale": "the factor on q . k (default 1 / sqrt(D))",
    "block_q": "query rows per tile (None: the default, autotuned on a GPU)",
    "block_k": "keys per tile (None: the default, autotuned on a GPU)",
    "return_lse": "also return lse (B, H, Sq), varlen (H, total_q): float32 (float64 for float64)",
    "accum_dtype": "the dtype of the tile arithmetic",
    "upcast": "True: float64 oracle; False: the naive same-dtype formula",
    "num_splits": "key ranges the cache is cut into (None: chosen for the cores)",
    "max_seqlen_q": "checked to be at least the longest packed query sequence",
    "max_seqlen_k": "checked to be at least the longest packed key sequence",
    "cache_lengths": "kv_lengths under its older name (an alias)",
    "group": "the torch.distributed process group",
    "layout": '"contiguous" or "zigzag" (how the sequence is sharded)',
    "timeout": "seconds any transfer may wait before every rank raises",
    "stats": "a RingStats receiving per-step compute and wait times",
}

#: What the signatures do not show, per backend (same column order).
BEHAVIOUR = [
    ("gradients", ["fm.flash_attention_backward (dlse)", "fm.attention_reference_backward (dlse)",
                   "autograd (lse too)", "no", "no", "fm.flash_attention_varlen_backward",
                   "autograd (lse too)", "autograd (lse too)"]),
    ("GQA / MQA (H % H_kv == 0)", ["yes"] * 8),
    ("dtypes", ["float64, float32, float16, bfloat16, float8 (forward)",
                "float64, float32, float16, bfloat16, float8",
                "float32, float16, bfloat16", "float64, float32, float16, bfloat16",
                "float32, float16, bfloat16", "float64, float32, float16, bfloat16",
                "float32, float16, bfloat16", "float64, float32, float16, bfloat16"]),
    ('causal="top_left"', ["yes", "yes", "yes", "yes", "yes", "yes", "yes",
                           "same as True (Sq == Sk)"]),
    ("arrays", ["NumPy", "NumPy", "torch (CUDA)", "NumPy", "torch (CUDA)", "NumPy",
                "torch (CUDA)", "torch (any device)"]),
]


def keywords(path: str, func: str) -> list[str]:
    """The keyword-only parameters of the last top-level ``def func`` in ``path``."""
    tree = ast.parse((ROOT / path).read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
    assert defs, f"{path} defines no {func}"
    return [a.arg for a in defs[-1].args.kwonlyargs]


def table() -> str:
    """The whole of docs/parity.md, from the signatures."""
    kw = [keywords(path, func) for _, _, path, func in BACKENDS]
    extra = sorted({k for ks in kw for k in ks} - set(ORDER))
    head = "| option | " + " | ".join(f"{col} `{name}`" for col, name, _, _ in BACKENDS) + " |"
    rule = "|" + "---|" * (len(BACKENDS) + 1)
    taken = [o for o in ORDER if any(o in ks for ks in kw)] + extra
    rows = [f"| `{o}`: {MEANING.get(o, '')} | " + " | ".join(
        "yes" if o in ks else "-" for ks in kw) + " |" for o in taken]
    behaviour = [f"| {what} | " + " | ".join(cells) + " |" for what, cells in BEHAVIOUR]
    return "\n".join([
        "# Backend parity: which options each attention backend takes",
        "",
        "The same option has the same name and meaning in every backend that takes it;",
        "`-` means the backend does not take it (passing it is a TypeError). Generated from",
        "the signatures by `python tests/test_parity.py`; `tests/test_parity.py` fails when",
        "this file and the code disagree.",
        "",
        head, rule, *rows,
        "",
        "What the signatures do not show:",
        "",
        "| | " + " | ".join(col for col, _, _, _ in BACKENDS) + " |", rule, *behaviour,
        "",
    ])


def test_parity_table_is_current() -> None:
    assert DOC.read_text() == table(), "docs/parity.md is stale: run python tests/test_parity.py"


def test_every_keyword_has_a_meaning() -> None:
    for _, _, path, func in BACKENDS:
        for k in keywords(path, func):
            assert k in MEANING, f"{func} in {path}: say what {k}= means in MEANING"


def test_shared_options_have_one_name_everywhere() -> None:
    """The issue-10 surface: tile sizes are block_q/block_k, lengths are kv_lengths, and
    every backend returns lse on request."""
    kw = {col: keywords(path, func) for col, _, path, func in BACKENDS}
    assert all("return_lse" in ks for ks in kw.values())
    assert all("block_m" not in ks and "block_n" not in ks for ks in kw.values())
    assert {"block_q", "block_k"} <= set(kw["NumPy tiled"]) & set(kw["Triton"])
    assert "kv_lengths" in kw["decode"] and "kv_lengths" in kw["Triton"]


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(table())
    print(f"wrote {DOC.relative_to(ROOT)}")
    sys.exit(0)
