"""The quantizers on CUDA against the reference (the CPU tests run the same kernels in the Triton
interpreter): Q's and K's int8 values, rounded in one FFMA, and V's per-channel scale from the
stats sample with headroom, with quant_v's overflow check, which quantizes a head again at its
exact scale. Skipped without a GPU.
Also runs without pytest:  python tests/test_quant_gpu.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devkit, also as a script
from devkit.pack import load_pack  # noqa: E402

load_pack()

import torch  # noqa: E402

from devkit.gpu_script import compiled_kernels_mark  # noqa: E402

pytestmark = compiled_kernels_mark()


def test_q_and_k_int8_match_the_reference():
    """Q's and K's int8 values equal the reference's bit for bit: the exact x * (127 / amax)
    rounded once, ties to even (kernels.numerics.round_to_i32: one FFMA on the GPU, float64 in
    the interpreter), with a block of exact ties among random ones."""
    from sparge_attention.kernels.quantize import quant_pool
    from sparge_attention.sparge_core.reference_quant import quantize_int8_per_block

    g = torch.Generator(device="cuda").manual_seed(7)
    B, H, N, D = 1, 3, 3000, 128
    x = torch.randn(B, H, N, D, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    perm = torch.randperm(N, device="cuda", generator=g).to(torch.int32)
    rows = perm[:64].long()  # the first 64-row block in curve order: largest |x| 127, halves elsewhere
    ties = torch.arange(-60, 60, device="cuda", dtype=torch.float32) + 0.5
    x[0, 1, rows] = ties[torch.randint(0, len(ties), (64, D), device="cuda", generator=g)].to(torch.bfloat16)
    x[0, 1, rows[0], 0] = 127.0
    mean = x.float().mean(2)
    xp = x[:, :, perm.long()].float().cpu()
    for block, m in ((64, None), (128, mean)):
        got = quant_pool(x, block, D, mean=m, want_pool=False, perm=perm)[0][:, :, :N].cpu()
        want, _ = quantize_int8_per_block(xp if m is None else xp - m.cpu()[:, :, None, :], block)
        assert torch.equal(got, want), (block, (got != want).float().mean().item())
    tie_block = quant_pool(x, 64, D, want_pool=False, perm=perm)[0][0, 1, :64].cpu()
    assert (tie_block.int() % 2 == 0).float().mean() > 0.99  # the halves went to even integers


def test_v_scale_and_overflow_fix_match_the_reference():
    from sparge_attention.kernels.config import default_config
    from sparge_attention.kernels.fp8 import v_in_key_order
    from sparge_attention.kernels.kv_stats import kv_stats
    from sparge_attention.kernels.quantize_v import quant_v
    from sparge_attention.sparge_core.reference_quant import (
        FP8_MAX,
        KMEAN_SAMPLE,
        V_HEADROOM,
        quantize_v,
        sampled_rows,
        value_scale,
    )

    g = torch.Generator(device="cuda").manual_seed(5)
    B, H, N, D = 2, 3, 5000, 128
    k = torch.randn(B, H, N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, H, N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    perm = torch.randperm(N, device="cuda", generator=g).to(torch.int32)
    outside = (~sampled_rows(N)).nonzero()[:, 0]
    row = perm[outside[77]].long()
    pv_fp8 = default_config(v.device).pv_fp8
    for over in (True, False):
        x = v.clone()
        x[1, 2, row, 9] = 1000.0 if over else 0.5  # head (1, 2): one value far past the sample's headroom, or not
        _, scale = kv_stats(k, x, v_format_max=FP8_MAX, k_sample=KMEAN_SAMPLE, perm=perm, v_headroom=V_HEADROOM)
        vt = quant_v(x, scale, 128, 128, pv_fp8, perm=perm, rescale_above=FP8_MAX)
        # the reference on the CPU: torch divides a CUDA tensor by a Python number as a multiply by
        # its reciprocal (not IEEE division), the kernels (div_rn) and the CPU divide exactly
        xp = x[:, :, perm.long()].cpu()
        want = value_scale(xp)
        assert torch.equal(scale.cpu(), want), over
        assert torch.equal(want[1, 2], (xp[1, 2].float().abs().amax(0) / FP8_MAX).clamp_min(1e-20)) == over
        ref, _ = quantize_v(xp, "fp8" if pv_fp8 else "fp16")
        # fp8 V^T holds each 32-key group in the P.V operand's order (kernels/fp8.py); v times the
        # scale's reciprocal is one rounded multiply on every device (reference_quant.value_reciprocal)
        got = v_in_key_order(vt).float()[:, :, :, :N].transpose(-1, -2).cpu()
        assert torch.equal(got, ref), (over, (got != ref).float().mean().item())


if __name__ == "__main__":
    from devkit.gpu_script import run_tests

    run_tests(globals())
