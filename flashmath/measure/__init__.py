"""Measurement: the one FLOP count, the timing helper, the HBM IO model and the CPU
attention benchmark.

Owns: flops, timing, iomodel (exact byte counts, and the bytes the tiled forward's
schedule moves), cpu (flashmath vs torch SDPA on CPU: time, ratios, peak memory).
May import: dtypes, softmax, attention (torch only lazily, inside a benchmark).
"""
