"""V's quantization on CUDA against the reference (the CPU tests run the same kernels in the
Triton interpreter): the per-channel scale from the stats sample with headroom, and quant_v's
overflow check, which quantizes a head again at its exact scale. Skipped without a GPU.
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
