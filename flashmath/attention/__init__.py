"""flashmath.attention: exact attention on NumPy arrays.

Owns: ``masks`` (the one mask builder: causal, windows, lengths, boolean masks, ALiBi),
``mods`` / ``modlib`` / ``blockmask`` (score_mod, mask_mod and block masks), ``options``
(the one validator set every backend uses), ``reference`` (the float64 oracle and the
naive same-dtype baseline), ``naive`` (the textbook formula), ``schedule`` (the tile plan
and loop shared by the forward, the backward and the IO model), ``tiles`` / ``tiled`` /
``backward`` (the tiled kernels and their shard API), ``varlen`` (packed sequences),
``decode`` and ``paged`` (split-KV decoding over contiguous or paged caches), ``threads``
(BLAS on one thread per worker of the shared pool), ``fp8`` (simulated FP8 attention).
May import: dtypes, text, rounding, parallel, files and softmax; never a layer above.
"""
