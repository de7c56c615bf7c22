"""The seed labs' questions the lab answers: one Question per thing a seed asks.

The seed labs are five hand-done exercises ("seed 000" ... "seed 004"); docs/seeds.md says
what each asks and which experiment answers it, from this table (a test keeps the two in
step). Experiments that go beyond the seeds (ring-attention, fp8-attention) pose their own
questions with ``seed=""``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LABS", "QUESTIONS", "Question", "questions"]


@dataclass(frozen=True)
class Question:
    """One question: the seed lab (``"000"``.., or ``""`` for the lab's own), where in it
    (``"Block F, question 1"``), and its text, quoted briefly or summarised."""

    seed: str
    where: str
    text: str

    @property
    def label(self) -> str:
        """``Block F, question 1 of seed 000`` (or just ``where`` for the lab's own)."""
        return f"{self.where} of seed {self.seed}" if self.seed else self.where


#: Seed lab -> its title.
LABS: dict[str, str] = {
    "000": "Lab 00, online softmax in pure Python (fp32, fp16, bf16; chunk sizes)",
    "001": "Lab 01, break naive softmax, then implement the stable version",
    "002": "Day 21 notebook, online softmax and FlashAttention (stable and online softmax, "
           "HBM traffic estimate, optional SDPA benchmark)",
    "003": "Tiled (flash) attention forward pass with online softmax, in NumPy",
    "004": "Why softmax overflows: exp thresholds per dtype, quiz and reflection",
}

Q = Question

#: Experiment NAME -> the questions its README opens with, in the order it answers them.
QUESTIONS: dict[str, tuple[Question, ...]] = {
    "softmax-stability": (
        Q("001", "Block D", "Predict naive NaN?, stable NaN? and the cross-entropy (y = 1) "
          "for each case, then run, and explain every divergence in a sentence."),
        Q("001", "Block F", "At float64, does stable softmax agree with scipy.special.softmax "
          "to within 1e-15 on the non-adversarial inputs, and log_sum_exp with "
          "scipy.special.logsumexp? Note any disagreement on the adversarial cases."),
        Q("001", "stop condition 2", "results.json shows naive NaN on at least two cases and "
          "stable NaN on zero cases."),
        Q("001", "stop condition 5", "Recite in one sentence why the -max trick eliminates "
          "overflow without changing the mathematical result."),
        Q("001", "pitfalls, hint of last resort", "An all -inf row: -inf - (-inf) = NaN. "
          "Return uniform, NaN or another sentinel? Document and defend the choice."),
        Q("001", "pitfalls, masked label", "Cross-entropy when the true label's logit is "
          "-inf: the loss is +inf; note it."),
    ),
    "overflow": (
        Q("004", "quiz Q2", "At what approximate input does exp() overflow in FP16: 5, 11, 88 "
          "or 709?"),
        Q("004", "exercise, find the breaking point", "Find the value at which naive softmax "
          "breaks, in each dtype."),
        Q("004", "quiz Q3", "What does naive softmax of [1, 1000, 1, 1] return? (The key: "
          "[nan, nan, nan, nan].)"),
        Q("004", "quiz Q4 and the outlier case", "Why does scaling QK^T by 1/sqrt(d) help "
          "prevent overflow, and what do outliers (K[5] = Q[10] * 3) do to it?"),
        Q("004", "reflection 1", "Why can't we just use FP64 everywhere? (Memory bandwidth, "
          "Tensor Core support.)"),
        Q("004", "reflection 2", "The sqrt(d) scaling helps but does not solve the problem: "
          "construct an example where scaled scores still overflow."),
        Q("004", "reflection 3", "What if all scores are very negative (like -1000)?"),
    ),
    "online-softmax": (
        Q("000", "Block C", "Online vs batched softmax over N, d, dtype and chunk size: "
          "fp32 < 1e-6, fp16 < 1e-3, bf16 < 5e-3?"),
        Q("000", "Block F, question 2 (Block D)", "Does chunk size affect accuracy (fp16, "
          "chunk sizes 1 to 256)? If you observed sensitivity, why?"),
        Q("000", "Block E", "Pathological inputs: [60, 0, 0, 0], [-100, -100, -100, 0] "
          "(O = V[3]) and all zeros (O = mean(V))."),
        Q("000", "Block E'", "Peaked logits s ~ N(0, 5), N = 64, d = 64, chunk 16: within fp16 "
          "tolerance? Does the peaked distribution help or hurt the recurrence's stability?"),
        Q("000", "Block F, question 1", "What's the worst-case fp16 error you observed? Is it "
          "under 1e-3? If not, where did the extra error come from?"),
        Q("000", "Block F, question 3", "What happens at fp16 when s contains a value > 11? "
          "Does the online recurrence handle it, or do you need fp32 accumulators for m, l, O?"),
        Q("002", "section 2", "Online softmax of [2.0, -1.5, 0.3, 4.2] in blocks of 2: the "
          "per-block (m, d) states, and the match with stable softmax (atol 1e-7)."),
    ),
    "flash-attention": (
        Q("003", "check 1", "B, H, N, D = 1, 1, 256, 64, tile 64, causal, float64: max "
          "relative error against naive attention below 1e-4?"),
        Q("003", "check 2", "B, H, N, D = 2, 8, 4096, 64, tile 128: peak memory below the size "
          "of one (N, N) float64 matrix?"),
        Q("003", "check 3", "N = 512, D = 32, tile 64, causal, float64 (the seed's additional "
          "verification): max relative error below 1e-4?"),
        Q("003", "docstring", "Why rescale by exp(m_old - m_new) and not exp(m_new - m_old)?"),
        Q("", "beyond the seed", "The same kernel in float32, float16 and bfloat16: does it "
          "meet the accuracy rule against the float64 oracle?"),
    ),
    "hbm-traffic": (
        Q("002", "section 3", "HBM traffic per head: standard attention ~ 2 T^2 elements "
          "(S and P), flash ~ 4 T d elements (Q, K, V, O), times 2 bytes in float16, for "
          "T = 512 to 4096, d = 128; the ratio?"),
    ),
    "sdpa-benchmark": (
        Q("002", "section 5", "Optional: time torch's scaled_dot_product_attention (float16, "
          "causal, B, H, T, d = 1, 8, 1024, 64) on CUDA; skipped without CUDA."),
    ),
    "ring-attention": (
        Q("", "correctness", "Does ring attention over W ranks equal the float64 oracle?"),
        Q("", "memory", "How does one rank's peak memory fall with W?"),
        Q("", "overlap", "Above how many tokens per rank does compute hide the transfers, on "
          "each link, and what does GQA change?"),
    ),
    "fp8-attention": (
        Q("", "FlashAttention-3, accuracy table", "On N(0, 1) inputs with 0.1% outliers, how "
          "much lower is the RMSE of FP8 attention with block scaling and a random Hadamard "
          "transform than per-tensor FP8 (the paper: 2.6x)? Which of the two does the work?"),
        Q("", "FlashAttention-3, control", "Without outliers, do block scaling and the "
          "Hadamard transform still help? And FP16's error?"),
        Q("", "P cast under an attention sink", "With a sink in the first key tile, does "
          "forward key order lose probabilities to underflow when P is cast to FP8, and do "
          "reverse order and a P scale of 256 remove it (the follow-up: 3-10x lower MSE)?"),
    ),
    "model-attention": (
        Q("", "bfloat16", "In a small transformers model in bfloat16, which attention "
          "implementation (eager, sdpa, flashmath) gives logits closest to the float64 "
          "model, and by how much?"),
        Q("", "float16", "And in float16?"),
    ),
}


def questions(name: str) -> tuple[Question, ...]:
    """The questions experiment ``name`` answers (KeyError naming the experiment if none)."""
    try:
        return QUESTIONS[name]
    except KeyError:
        raise KeyError(f"no seed questions are listed for experiment {name!r}") from None
