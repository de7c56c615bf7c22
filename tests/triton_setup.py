"""The set-up every Triton test file shares; import it before flashmath.triton.

torch and triton, or a skip of the importing file; without a GPU, Triton's CPU interpreter
(TRITON_INTERPRET=1 is read when the kernels are decorated, so it is set here, first).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install 'flashmath[gpu]')")

DEVICE = "cuda" if CUDA else "cpu"
