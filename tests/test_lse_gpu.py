"""The lse scoring kernel on CUDA against the reference (the CPU tests run it in the Triton
interpreter): every key, every 2nd key with each block's top key, and every 2nd and every 4th (production's
stride) with the guard
(blocks of low key self-similarity and the partial last block read in full), on keys whose blocks
are self-similar in places and random in others, through a permutation. Skipped without a GPU.
Also runs without pytest:  python tests/test_lse_gpu.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devkit, also as a script
from devkit.pack import load_pack  # noqa: E402

load_pack()

import torch  # noqa: E402

from devkit.gpu_script import compiled_kernels_mark  # noqa: E402

pytestmark = compiled_kernels_mark()


def test_lse_scores_match_the_reference_at_each_stride_and_with_the_guard():
    from sparge_attention.kernels.block_scores import block_lse_scores as kernel_lse
    from sparge_attention.kernels.config import BLOCK_M, BLOCK_N
    from sparge_attention.kernels.kv_stats import kv_stats
    from sparge_attention.kernels.quantize import quant_pool
    from sparge_attention.sparge_core.reference_predict import (
        LSE_EXACT_SIM,
        block_lse_scores,
        block_top_keys,
        energy_similarity,
        lse_exact_blocks,
    )
    from sparge_attention.sparge_core.reference_quant import FP8_MAX, KMEAN_SAMPLE, smooth_k

    g = torch.Generator(device="cuda").manual_seed(7)
    B, H, N, D = 1, 4, 5000, 128
    dirs = torch.randn(B, H, N // 200 + 1, D, device="cuda", generator=g)
    k = 2.0 * dirs.repeat_interleave(200, 2)[:, :, :N] + 0.4 * torch.randn(B, H, N, D, device="cuda", generator=g)
    k[:, 1:3, 1000:2600] = 3.0 * torch.randn(B, 2, 1600, D, device="cuda", generator=g)  # random blocks
    k = k.to(torch.bfloat16)
    q = (k.float() + torch.randn(B, H, N, D, device="cuda", generator=g)).to(torch.bfloat16)
    # the kernels read the tokens in reverse: blocks stay whole but do not align with the random run
    perm = torch.arange(N - 1, -1, -1, device="cuda", dtype=torch.int32)
    kp = k[:, :, perm.long()]  # the keys in the order the kernels visit them, for the reference
    scale = D ** -0.5
    k_mean, _ = kv_stats(k, k, v_format_max=FP8_MAX, k_sample=KMEAN_SAMPLE, perm=perm)
    q_pool = quant_pool(q, BLOCK_M, D, perm=perm)[2]
    k_i8, k_s, _, k_sim, kbar, _, top = quant_pool(k, BLOCK_N, D, mean=k_mean, want_pool=False, want_sim=True, perm=perm,
                                                pool_i8_blocks=64, want_top=True, sim_kind="energy")
    ksm = smooth_k(kp.float())
    want_sim = energy_similarity(ksm, BLOCK_N)
    torch.testing.assert_close(k_sim, want_sim, rtol=1e-4, atol=1e-5)
    assert torch.equal(top.long(), block_top_keys(ksm, BLOCK_N, N))
    exact = lse_exact_blocks(ksm, BLOCK_N, stride=2)  # the same blocks at any stride > 1
    assert exact.any() and not exact.all()  # both kinds of block
    assert torch.equal(exact[..., :-1], (k_sim < LSE_EXACT_SIM)[..., :-1]) and exact[..., -1].all()
    kbar_ref = (kbar[0].float(), kbar[1])
    for stride, guard in ((1, False), (2, False), (2, True), (4, True)):
        kw = dict(key_sim=k_sim, exact_below=LSE_EXACT_SIM) if guard else {}
        got, got_mean = kernel_lse(q_pool, k_i8, k_s, scale, N, BLOCK_N, want_mean=True, key_stride=stride,
                                   key_top=top if stride > 1 else None, kbar=kbar, **kw)
        want, want_mean = block_lse_scores(q_pool, k_i8, k_s, scale, N, BLOCK_N, want_mean=True, kbar=kbar_ref,
                                           stride=stride, exact=exact if guard else None, top=top)
        # scores up to ~90 (log2 units): fp32 sums in another order differ by a few 1e-5 of that
        torch.testing.assert_close(got, want, rtol=5e-5, atol=1e-3, msg=f"stride {stride}, guard {guard}")
        torch.testing.assert_close(got_mean, want_mean, rtol=5e-5, atol=1e-3)


if __name__ == "__main__":
    from devkit.gpu_script import run_tests

    run_tests(globals())
