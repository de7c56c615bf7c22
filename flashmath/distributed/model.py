"""When does the ring hide its transfers? A communication/computation model of ring attention.

Legend: B batch, H query heads, H_kv key/value heads, D head dim, e bytes per element,
W ranks, S the whole sequence, S_r = S / W the shard of one rank.

One ring step, on one rank (flashmath.distributed.ring's schedule):

    compute  t_c = flops / F       flops = 4 B H S_r^2 D    (forward, one block)
                                          x c  (c = 1/2 causal: the zigzag layout gives
                                                every rank half the pairs at every step)
                                          x 2.5 more for the backward (flashmath.measure.flops)
    transfer t_m = latency + bytes / BW
                                   bytes = 2 B H_kv S_r D e (forward: the K and V shard)
                                         + 2 B H_kv S_r D 4 (backward: dK, dV travel, float32)

The next shard's transfer runs during this block's compute, so a step costs
max(t_c, t_m): the ring is compute-bound (transfers hidden) when t_c >= t_m. Compute grows
as S_r^2 and traffic as S_r, so there is a crossover shard length

    S_r* = (2 H_kv e / BW) * F / (4 H c)      (forward, latency ignored)

above which every transfer is hidden; the crossover sequence length is S* = W * S_r*.
It depends only on the ratio F / BW (FLOPs the device does per byte the link moves) and
the head layout: GQA (H_kv < H) moves fewer bytes per FLOP and lowers it; causal halves
the compute per step and doubles it.

Whole pass: W steps, the last without a transfer (forward); no overlap would cost
W t_c + (W - 1) t_m. ``ring_time`` gives both and the efficiency W t_c / time.

Presets: the device throughputs are what FlashAttention-2-class kernels reach (about 40%
of an H100's 989 TFLOP/s dense bf16 peak), the link bandwidths are per direction
(NVLink 4: 900 GB/s per GPU both ways; InfiniBand NDR: 400 Gb/s; Ethernet: 100 Gb/s).
They are round numbers for the shape of the answer, not measurements; the lab adds this
machine's measured kernel throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flashmath.measure.flops import attention_flops

__all__ = [
    "PRESETS",
    "Setup",
    "crossover_seq_len",
    "crossover_shard_len",
    "ring_time",
    "step_bytes",
    "step_flops",
    "step_times",
]


@dataclass(frozen=True)
class Setup:
    """A device and the link between neighbouring ranks.

    flops_per_s: the attention kernel's achieved throughput F; bandwidth: bytes/s one way
    over the link BW; latency_s: per transfer.
    """

    name: str
    flops_per_s: float
    bandwidth: float
    latency_s: float = 0.0
    note: str = ""


PRESETS: dict[str, Setup] = {
    "h100-nvlink": Setup("H100 + NVLink 4", 400e12, 450e9, 5e-6,
                         "400 TFLOP/s bf16 attention; 450 GB/s per direction"),
    "h100-infiniband": Setup("H100 + InfiniBand NDR", 400e12, 50e9, 5e-6,
                             "400 TFLOP/s; 400 Gb/s = 50 GB/s"),
    "h100-ethernet": Setup("H100 + 100 GbE", 400e12, 12.5e9, 20e-6,
                           "400 TFLOP/s; 100 Gb/s = 12.5 GB/s"),
}


def step_flops(shard_len: float, *, batch: int = 1, heads: int = 1, dim: int = 128,
               causal: bool = False, backward: bool = False) -> float:
    """FLOPs of one ring step on one rank: one (S_r x S_r) block, forward or backward;
    :func:`flashmath.measure.cpu.attention_flops` of that block (the one FLOP count)."""
    return attention_flops(batch, heads, shard_len, shard_len, dim, causal=causal,
                           mode="bwd" if backward else "fwd")


def step_bytes(shard_len: float, *, batch: int = 1, kv_heads: int = 1, dim: int = 128,
               elem_bytes: int = 2, backward: bool = False) -> float:
    """Bytes one rank sends in one ring step: its K and V shard (and, in the backward, the
    float32 dK and dV travelling with it)."""
    per = 2.0 * batch * kv_heads * shard_len * dim
    return per * (elem_bytes + (4 if backward else 0))


def step_times(setup: Setup, shard_len: float, *, batch: int = 1, heads: int = 1,
               kv_heads: int | None = None, dim: int = 128, elem_bytes: int = 2,
               causal: bool = False, backward: bool = False) -> tuple[float, float]:
    """(compute seconds, transfer seconds) of one ring step."""
    hk = heads if kv_heads is None else kv_heads
    tc = step_flops(shard_len, batch=batch, heads=heads, dim=dim, causal=causal,
                    backward=backward) / setup.flops_per_s
    tm = setup.latency_s + step_bytes(shard_len, batch=batch, kv_heads=hk, dim=dim,
                                      elem_bytes=elem_bytes, backward=backward) / setup.bandwidth
    return tc, tm


def crossover_shard_len(setup: Setup, *, heads: int = 1, kv_heads: int | None = None,
                        dim: int = 128, elem_bytes: int = 2, causal: bool = False,
                        backward: bool = False) -> float:
    """The shard length S_r* at which a step's compute equals its transfer (latency
    included): longer shards hide every transfer. Independent of B and (without latency)
    of D."""
    hk = heads if kv_heads is None else kv_heads
    # a S^2 = b S + latency, per unit batch
    a = step_flops(1.0, heads=heads, dim=dim, causal=causal, backward=backward) / setup.flops_per_s
    b = step_bytes(1.0, kv_heads=hk, dim=dim, elem_bytes=elem_bytes,
                   backward=backward) / setup.bandwidth
    lat = setup.latency_s
    return (b + math.sqrt(b * b + 4.0 * a * lat)) / (2.0 * a)


def crossover_seq_len(setup: Setup, world_size: int, **kwargs: float | int | bool) -> float:
    """S* = W * S_r*: the whole sequence length above which a ring of ``world_size`` ranks
    hides its transfers (keyword arguments as ``crossover_shard_len``)."""
    return world_size * crossover_shard_len(setup, **kwargs)  # type: ignore[arg-type]


def ring_time(setup: Setup, seq_len: float, world_size: int, *, batch: int = 1,
              heads: int = 1, kv_heads: int | None = None, dim: int = 128, elem_bytes: int = 2,
              causal: bool = False, backward: bool = False) -> dict[str, float]:
    """Modelled seconds of one ring pass over ``seq_len`` positions on ``world_size`` ranks.

    Returns compute_s and transfer_s (one step), overlapped_s ((W-1) max(t_c, t_m) + t_c:
    the transfer of step s runs during the compute of step s), serial_s (W t_c + (W-1) t_m),
    efficiency (W t_c / overlapped_s: 1 when every transfer is hidden), hidden (t_c >= t_m).
    """
    s_r = seq_len / world_size
    tc, tm = step_times(setup, s_r, batch=batch, heads=heads, kv_heads=kv_heads, dim=dim,
                        elem_bytes=elem_bytes, causal=causal, backward=backward)
    w = world_size
    overlapped = (w - 1) * max(tc, tm) + tc
    return {
        "compute_s": tc, "transfer_s": tm, "overlapped_s": overlapped,
        "serial_s": w * tc + (w - 1) * tm, "efficiency": w * tc / overlapped,
        "hidden": float(tc >= tm),
    }
