"""The one NumPy <-> torch conversion (flashmath.dtypes.to_torch / from_torch)."""

import numpy as np
import pytest

from flashmath import dtypes

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["float64", "float32", "float16", "bfloat16"])
def test_round_trip_is_bit_for_bit(name):
    dt = dtypes.as_dtype(name)
    bits = np.random.default_rng(0).integers(0, 2**16, 64, dtype=np.uint16)
    a = (bits.view(np.float16).astype(dt) if dt.itemsize > 2 else bits.view(dt))
    t = dtypes.to_torch(a)
    assert str(t.dtype) == f"torch.{name}"
    back = dtypes.from_torch(t)
    assert back.dtype == dt
    np.testing.assert_array_equal(back.view(np.uint8), np.ascontiguousarray(a).view(np.uint8))


def test_shares_memory_unless_asked_to_copy():
    a = np.zeros(4, np.float32)
    dtypes.to_torch(a)[0] = 1.0
    assert a[0] == 1.0
    dtypes.to_torch(a, copy=True)[1] = 1.0
    assert a[1] == 0.0


def test_read_only_input_gives_a_writable_tensor():
    a = np.zeros(3, np.float32)
    a.setflags(write=False)
    t = dtypes.to_torch(a)
    t += 1  # no warning about non-writable memory, and a is untouched
    assert a.sum() == 0


def test_casts_to_a_torch_dtype():
    t = dtypes.to_torch(np.array([1.5, 2.25]), torch.bfloat16)
    assert t.dtype == torch.bfloat16
    assert t.float().tolist() == [1.5, 2.25]
