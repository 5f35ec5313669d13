"""The launchers' plain-Python grid helpers give what Triton's own would (they replace them on the
host only to save their call cost)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402

from kernels.host_math import cdiv, next_pow2  # noqa: E402

triton = pytest.importorskip("triton")


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 20))
def test_cdiv_equals_tritons(a, b):
    assert cdiv(a, b) == triton.cdiv(a, b)


@given(st.integers(0, 1 << 40))
def test_next_pow2_equals_tritons(n):
    assert next_pow2(n) == triton.next_power_of_2(n)
