"""flashmath as a transformers attention backend, in small randomly initialised models.

Specification, per model family in the installed transformers (Llama; Mistral with a
sliding window; Qwen2; Gemma 2 with softcap and window; GPT-2; gpt-oss, whose attention
sinks are refused): with the same weights,

- float64: flashmath's logits equal the eager model's to 1e-12 (relative to the logits):
  every mask, window, softcap and scale is mapped exactly (any mismatch would show at 1e-2);
- float32: the error against the float64 eager model is within 2x eager float32's (the
  accuracy rule), unpadded and on left- and right-padded batches (valid positions: padded
  positions are outputs nobody reads, and eager gives a fully masked row uniform weights
  where flashmath gives 0); a training step's parameter gradients within 3x;
- bfloat16: logits within 2x of eager bfloat16's error against float64.

Models: 2 layers, hidden 64, 4 query / 2 key-value heads of 16, vocab 128, 16 tokens; the
initializer range is raised so that attention is peaked and its numerics reach the logits
(with transformers' 0.02 the attention output is too small to move them at all).
"""

from __future__ import annotations

import copy
import functools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flashmath.integrations.transformers import (  # noqa: E402
    DEFAULT_NAME,
    attention_forward,
    register,
)

NAME = DEFAULT_NAME
ORACLE = "oracle64"


def oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     softcap=None, s_aux=None, **kwargs):
    """Eager attention in the input dtype throughout: the float64 oracle. transformers'
    eager attention runs its softmax in float32 (and a float64 mask minimum becomes -inf
    there), so its float64 model is only float32-accurate."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    s = query @ key.transpose(2, 3) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is not None:
        s = s + attention_mask
    elif module.is_causal and query.shape[2] > 1:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -torch.inf)
    if s_aux is not None:  # gpt-oss: a value-less logit per head joins each row's softmax
        col = s_aux.reshape(1, -1, 1, 1).expand(*s.shape[:3], 1).to(s.dtype)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :-1]
        return (p @ value).transpose(1, 2).contiguous(), None
    return (torch.softmax(s, dim=-1) @ value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def registered():
    """flashmath and the oracle registered with transformers. Done here, not at import:
    transformers.masking_utils imports triton, and tests/test_triton.py must set
    TRITON_INTERPRET before anything imports triton (collection imports every module)."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    assert register() == NAME
    transformers.AttentionInterface.register(ORACLE, oracle_attention)
    AttentionMaskInterface.register(ORACLE, eager_mask)
SEQ, VOCAB = 16, 128
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 64, "initializer_range": 0.15}
FAMILIES = {
    "llama": ("LlamaConfig", COMMON),
    "mistral": ("MistralConfig", {**COMMON, "sliding_window": 7}),
    "qwen2": ("Qwen2Config", {**COMMON, "use_sliding_window": True, "sliding_window": 9,
                              "max_window_layers": 1}),
    "gemma2": ("Gemma2Config", {**COMMON, "sliding_window": 6, "attn_logit_softcapping": 2.0,
                                "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 12}),
    "gpt2": ("GPT2Config", {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4,
                            "n_positions": 64, "initializer_range": 0.15, "resid_pdrop": 0.0,
                            "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0,
                            "eos_token_id": 0}),
}
SINKS = ("GptOssConfig", {**COMMON, "num_local_experts": 2, "num_experts_per_tok": 1,
                          "sliding_window": 8})


def config(cls_name, kwargs):
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"{cls_name} is not in transformers {transformers.__version__}")
    return cls(**kwargs)


def build(cls_name, kwargs, impls, dtype):
    """{impl: model} sharing one set of weights, in ``dtype``, eval mode. Each model gets
    its own config: from_config writes the implementation into the config it is given."""
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(
        config(cls_name, kwargs), attn_implementation="eager")
    models = {}
    for impl in impls:
        model = transformers.AutoModelForCausalLM.from_config(
            config(cls_name, kwargs), attn_implementation=impl)
        model.load_state_dict(base.state_dict())
        models[impl] = model.to(dtype).eval()
    return models


@functools.cache
def family_models(family, dtype):
    """The family's oracle, eager and flashmath models in ``dtype`` (built once, copied
    to each dtype)."""
    if dtype != torch.float32:
        return {k: copy.deepcopy(m).to(dtype) for k, m in
                family_models(family, torch.float32).items()}
    cls_name, kwargs = FAMILIES[family]
    return build(cls_name, kwargs, [ORACLE, "eager", NAME], dtype)


def batch(padding):
    """input_ids (2, SEQ) and attention_mask (None unpadded; 0 = padding): row 0 padded
    by 6 tokens (more than some windows), row 1 not."""
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    if padding is None:
        return ids, None
    mask = torch.ones(2, SEQ, dtype=torch.long)
    for row, pad in enumerate((6, 0)):
        if pad:
            mask[row, :pad] = 0 if padding == "left" else 1
            if padding == "right":
                mask[row, SEQ - pad:] = 0
    return ids, mask


def valid(mask, row):
    return torch.ones(SEQ, dtype=torch.bool) if mask is None else mask[row].bool()


def labels_of(ids, mask):
    """Labels for the pairs (t, t + 1) with both positions valid (the first valid token of
    a left-padded row would be predicted from a padding position's output)."""
    if mask is None:
        return ids
    keep = mask.bool() & torch.nn.functional.pad(mask.bool(), (1, 0))[:, :-1]
    return ids.masked_fill(~keep, -100)


def logits(model, ids, mask):
    """The valid positions' logits (float64) of the batch, (tokens, VOCAB)."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.double()
    return out.reshape(-1, VOCAB) if mask is None else out[mask.bool()]


def oracle_logits(model, ids, mask):
    """The same logits from a float64 oracle model (oracle_attention) run on each row
    alone, unpadded, at the positions the padded batch gives its tokens (so that no row is
    fully masked)."""
    rows = []
    model.eval()
    with torch.no_grad():
        for row in range(ids.shape[0]):
            keep = valid(mask, row)
            pos = keep.nonzero()[:, 0][None]
            rows.append(model(input_ids=ids[row, keep][None], position_ids=pos).logits[0])
    return torch.cat(rows).double()


def err(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_match_eager(family, padding):
    ids, mask = batch(padding)
    m64 = family_models(family, torch.float64)
    ref = oracle_logits(m64[ORACLE], ids, mask)
    assert err(logits(m64[NAME], ids, mask), ref) <= 1e-12 * ref.abs().max().item()
    m32 = family_models(family, torch.float32)
    base = err(logits(m32["eager"], ids, mask), ref)
    got = err(logits(m32[NAME], ids, mask), ref)
    assert 0 < base and got <= 2 * base, (family, padding, got, base)


def grads(model, ids, mask):
    """Parameter gradients (flat, float64) of the batch's mean next-token loss."""
    model.train()
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels_of(ids, mask)).loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()
                      if p.grad is not None])


def oracle_grads(model, ids, mask):
    """The same gradients from the float64 oracle on each row alone (see oracle_logits):
    each row's mean loss weighted by its share of the batch's labelled tokens."""
    model.train()
    model.zero_grad()
    labels = labels_of(ids, mask)
    total = int((labels[:, 1:] != -100).sum())
    for row in range(ids.shape[0]):
        keep = valid(mask, row)
        pos = keep.nonzero()[:, 0][None]
        row_ids = ids[row, keep][None]
        loss = model(input_ids=row_ids, position_ids=pos, labels=row_ids).loss
        (loss * (row_ids.shape[1] - 1) / total).backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()
                      if p.grad is not None])


@pytest.mark.parametrize("padding", [None, "left"])
def test_training_step_gradients_match_eager(family, padding):
    ids, mask = batch(padding)
    ref = oracle_grads(family_models(family, torch.float64)[ORACLE], ids, mask)
    m32 = family_models(family, torch.float32)
    base = err(grads(m32["eager"], ids, mask), ref)
    got = err(grads(m32[NAME], ids, mask), ref)
    assert 0 < base and got <= 3 * base, (family, padding, got, base)


def test_bfloat16_logits_as_close_to_float64_as_eager(family):
    ids, mask = batch("left")
    ref = oracle_logits(family_models(family, torch.float64)[ORACLE], ids, mask)
    m16 = family_models(family, torch.bfloat16)
    base = err(logits(m16["eager"], ids, mask), ref)
    got = err(logits(m16[NAME], ids, mask), ref)
    assert got <= 2 * base, (family, got, base)


@pytest.mark.parametrize("padding", [None, "left"])
def test_attention_sinks_match_eager(padding):
    """gpt-oss's sinks (s_aux) become flashmath's sinks. gpt-oss's experts run only in
    float32 and narrower (no float64 model to serve as the oracle), so flashmath is judged
    against transformers' eager gpt-oss in float32: no farther from it than the test's
    own eager-style attention (another float32 implementation of the same formula) is, x2;
    and a training step's gradients reach the sinks."""
    ids, mask = batch(padding)
    m32 = build(*SINKS, [NAME, "eager", ORACLE], torch.float32)
    with torch.no_grad():
        for model in m32.values():  # sinks away from 0, so that they matter
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    eager = logits(m32["eager"], ids, mask)
    spread = err(logits(m32[ORACLE], ids, mask), eager)
    got = err(logits(m32[NAME], ids, mask), eager)
    assert got <= max(2 * spread, 1e-5 * eager.abs().max().item()), (got, spread)
    model = m32[NAME]
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grad = model.model.layers[0].self_attn.sinks.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_training_dropout_is_refused():
    cls_name, kwargs = FAMILIES["llama"]
    model = build(cls_name, {**kwargs, "attention_dropout": 0.1}, [NAME], torch.float32)[NAME]
    ids, _ = batch(None)
    model(input_ids=ids)  # eval: dropout is off, fine
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=ids)


def test_names_with_flash_are_refused_and_the_default_works():
    assert NAME == DEFAULT_NAME == register()
    with pytest.raises(ValueError, match="flash"):
        register("flashmath")
    with pytest.raises(ValueError, match="sdpa"):
        register("sdpa")


def test_mask_forms_map_to_the_same_attention():
    """A (B, Sk) padding mask, the 4-D bool mask transformers builds, and its additive
    float form give the same output (direct calls of the attention function)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    module = torch.nn.Module()
    module.is_causal = True
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    bool4 = causal[None, None] & pad.bool()[:, None, None, :]
    additive = torch.zeros(bool4.shape).masked_fill(~bool4, torch.finfo(torch.float32).min)
    outs = [attention_forward(module, q, k, v, m)[0] for m in (pad, bool4, additive)]
    rows = pad.bool()  # valid query rows; the fully masked ones differ (0 vs uniform)
    assert outs[0].shape == (2, 6, 4, 8)
    for out in outs[1:]:
        assert err(out[rows], outs[0][rows]) < 1e-6


def test_logit_errors_table():
    """The model-attention measurement: one row per (dtype, length, implementation), the
    errors positive and finite, flashmath's within 2x eager's (the accuracy rule's bound)."""
    from flashmath.integrations.model_errors import logit_errors

    rows = logit_errors(("bfloat16", "float16"), (32,), ["eager", "sdpa", NAME])
    assert [(r["dtype"], r["impl"]) for r in rows] == [
        (d, i) for d in ("bfloat16", "float16") for i in ("eager", "sdpa", NAME)]
    for row in rows:
        assert row["seq_len"] == 32 and 0 < row["mean_error"] <= row["max_error"] < 1
        assert row["ratio_to_eager"] <= 2 if row["impl"] == NAME else True
    with pytest.raises(ValueError, match="dtypes"):
        logit_errors(("float8",), (32,))
    with pytest.raises(ValueError, match="seq_lens"):
        logit_errors(("bfloat16",), (0,))


def test_docs_examples_run_as_written():
    """docs/torch.md's "Use it in your model" code blocks run exactly as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "torch.md").read_text()
    section = doc.split("## Use it in your model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for i, code in enumerate(blocks):
        scope: dict = {}
        exec(compile(code, f"docs/torch.md example {i + 1}", "exec"), scope)
    assert scope["q"].grad.shape == scope["q"].shape and scope["k"].grad is not None
