"""The softmax family: the max-shift rule, the stable functions, online softmax with
mergeable state, the naive twins, overflow analysis and the mpmath oracle.

Owns: rule (row_shift, rescale), stable (softmax, log_softmax, logsumexp,
cross_entropy), online (SoftmaxState, merge, merge_outputs), naive, safety, mp_oracle.
May import: dtypes (and NumPy, ml_dtypes; mpmath in mp_oracle only).
"""
