"""End-to-end logit error of a small transformers model, per attention implementation.

:func:`small_model` builds the small randomly initialised Llama the tests, the benchmark
and the lab share (no weights downloaded); :func:`logit_errors` measures, for each narrow
dtype, sequence length and attention implementation installed (eager, sdpa, flashmath),
how far the model's logits are from the same model in float64 with eager attention.
transformers' eager attention runs its softmax in float32 even for float64 models, so the
reference carries float32-level rounding in the softmax (about 1e-7), far below the
bfloat16 / float16 errors measured here (1e-3 .. 1e-2).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from flashmath.integrations.transformers import register

__all__ = ["COLUMNS", "DTYPES", "SMALL_CONFIG", "available_implementations", "logit_errors",
           "small_model"]

#: The narrow dtypes measured, by name.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: The small model: 2 layers, hidden 64, 4 query / 2 key-value heads of 16, vocab 128. The
#: initializer range is raised from transformers' 0.02 so that attention is peaked and its
#: rounding reaches the logits (at 0.02 the scores are ~1e-3 and attention is uniform).
SMALL_CONFIG: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 4096, "initializer_range": 0.15,
}


def small_model(attn_implementation: str = "eager", dtype: torch.dtype = torch.float32, *,
                seed: int = 0, **overrides: Any) -> Any:
    """The small Llama (``SMALL_CONFIG`` updated by ``overrides``) with seeded weights: the
    same weights for every ``attn_implementation`` and dtype at one seed. Eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMALL_CONFIG, **overrides})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                            dtype=dtype).eval()


def available_implementations() -> list[str]:
    """eager, sdpa and flashmath's registered name (what :func:`logit_errors` compares)."""
    return ["eager", "sdpa", register()]


def logit_errors(
    dtypes: Iterable[str] = ("bfloat16", "float16"),
    seq_lens: Sequence[int] = (128, 512),
    impls: Iterable[str] | None = None,
    *,
    batch: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Max and mean |logit error| against the float64 eager model, per (dtype, length, impl).

    For each sequence length one random batch of token ids (batch, seq_len) is drawn; each
    implementation runs the same weights cast to each dtype. Returns one dict per
    measurement: dtype, seq_len, impl, max_error, mean_error (float64 logits), and
    ratio_to_eager (max_error over eager's at that dtype and length; None without eager).
    The default grid runs in seconds; the lab's grid is ``seq_lens=(128, 256, 512, 1024,
    2048)``. Raises ValueError naming an unknown dtype or a length outside 1 .. 4096.
    """
    names = list(dtypes)
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"dtypes: unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    for s in seq_lens:
        if not 1 <= s <= SMALL_CONFIG["max_position_embeddings"]:
            raise ValueError(f"seq_lens: {s} is outside 1 .. "
                             f"{SMALL_CONFIG['max_position_embeddings']}")
    impls = available_implementations() if impls is None else list(impls)
    reference = small_model("eager", torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    inputs = {s: torch.randint(0, SMALL_CONFIG["vocab_size"], (batch, s), generator=gen)
              for s in seq_lens}
    with torch.no_grad():
        refs = {s: reference(input_ids=ids).logits for s, ids in inputs.items()}
        found: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        for impl in impls:
            model = small_model(impl, torch.float64, seed=seed)
            for name in names:
                narrow = copy.deepcopy(model).to(DTYPES[name])
                for s, ids in inputs.items():
                    diff = (narrow(input_ids=ids).logits.double() - refs[s]).abs()
                    found.setdefault((name, s), {})[impl] = {
                        "dtype": name, "seq_len": s, "impl": impl,
                        "max_error": diff.max().item(), "mean_error": diff.mean().item()}
    rows: list[dict[str, Any]] = []
    for (_, _), by_impl in sorted(found.items(), key=lambda kv: (names.index(kv[0][0]),
                                                                  kv[0][1])):
        eager = by_impl.get("eager")
        for row in by_impl.values():
            row["ratio_to_eager"] = (None if eager is None or eager["max_error"] == 0
                                     else row["max_error"] / eager["max_error"])
            rows.append(row)
    return rows


#: The columns of :func:`logit_errors`' rows for flashmath.text.markdown_table.
COLUMNS = [("dtype", "dtype"), ("seq_len", "seq_len"), ("attention", "impl"),
           ("max abs logit error", "max_error"), ("mean abs error", "mean_error"),
           ("max error / eager's", "ratio_to_eager")]
