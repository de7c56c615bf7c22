"""model-attention: the logit-error table per attention implementation (a small grid)."""

import pytest

from flashmath.lab import experiment, model_attention

pytest.importorskip("transformers")


def test_quick_runs_skip_with_the_reason():
    with pytest.raises(experiment.Skipped, match="--quick"):
        model_attention.run(experiment.Context(name=model_attention.NAME, quick=True))


def test_a_small_grid_answers_both_questions(monkeypatch):
    monkeypatch.setattr(model_attention, "SEQ_LENS", (16, 32))
    result = model_attention.run(experiment.Context(name=model_attention.NAME))
    impls = {r["impl"] for r in result.records}
    assert impls == {"eager", "sdpa", "flashmath"}
    assert len(result.records) == 2 * 2 * 3
    for dt in model_attention.DTYPES:
        assert result.summary[f"{dt}_best_impl"] in impls
        # flashmath is within the accuracy rule of eager end to end
        assert result.summary[f"{dt}_flashmath_over_eager_at_longest"] <= 2.0
    assert "## The questions, answered" in result.readme
    assert "logit_error" in result.figures
