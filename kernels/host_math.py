"""Integer helpers for the launchers' grids and constexprs, in plain Python: Triton's own
(triton.cdiv, triton.next_power_of_2) are constexpr functions whose host-side call costs a few
microseconds each, and a sparse call makes ~15 of them."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as Triton's)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()
