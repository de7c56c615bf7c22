"""Measurement: how flashmath counts and times its work.

Owns: ``flops`` (the one FLOP count, :func:`~flashmath.measure.flops.attention_flops`),
``timing`` (the one timing helper, :func:`~flashmath.measure.timing.time_calls`),
``iomodel`` (exact HBM byte counts, and the bytes the tiled forward's schedule moves),
``cpu`` (flashmath vs torch SDPA on CPU: times, ratios, peak memory) and ``gpu`` (what the
GPU benchmarks say where there is no GPU). The GPU benchmark itself is
:mod:`flashmath.triton.bench` (it needs the Triton op, a layer above).

May import: dtypes, text, softmax, attention; torch only lazily, inside a benchmark.
Imported by: triton, distributed, lab, cli. Never imports triton, distributed, lab or cli.
"""
