"""The Triton kernels against the PyTorch reference, run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported (kernels/fp8.py also reads it at
import time), hence the first lines of this module."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from data import clustered  # noqa: E402
from devkit.metrics import rel_l1  # noqa: E402
from devkit.pack import load_pack  # noqa: E402

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparge_attention.sparge_core import SpargeParams, block_sizes, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.blockmask import num_blocks  # noqa: E402
from sparge_attention.sparge_core.reference import sparge_reference  # noqa: E402
from sparge_attention.sparge_core.reference_predict import energy_similarity, pool_and_similarity  # noqa: E402
from sparge_attention.sparge_core.reference_quant import (  # noqa: E402
    FP8_MAX,
    LOG2E,
    key_mean,
    quantize_int8_per_block,
    quantize_v,
    smooth_k,
    value_scale,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tests run in the Triton CPU interpreter"
)

from sparge_attention.kernels.block_index import block_map_to_index  # noqa: E402
from sparge_attention.kernels.fp8 import INTERPRET, fp8_v_columns, v_in_key_order, v_key  # noqa: E402
from sparge_attention.kernels.quantize import quant_pool  # noqa: E402
from sparge_attention.kernels.quantize_v import quant_v  # noqa: E402

BQ, BK = block_sizes(torch.device("cpu"), "triton")  # the interpreter's tiles (kernels.config)
# the forward tests are slow in the interpreter: no shrinking (a failure prints its example)
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
INF = float("inf")




def with_sink(B, H, N, D, seed, Hkv=None, sink=8.0, dtype=torch.float32):
    """Weakly clustered tokens plus an attention sink: every query has a strong component along
    u and so do the first 32 keys. Later key blocks sit far below the sink's running max, so
    P.V skipping fires for small pvthreshd."""
    q, k, v = clustered(B, H, N, D, seed, Hkv=Hkv, amp=1.0, noise=1.0)
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = q + sink * u
    k[..., :32, :] += sink * u
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_interpreter_flag_seen_by_kernels():
    assert INTERPRET, "kernels/fp8.py was imported before TRITON_INTERPRET=1 was set"


# ----------------------------------------------------------------------------- quant_pool
def check_quant_pool(x, block, hd, mean=None, extra_scale=1.0):
    B, H, N, D = x.shape
    nb = num_blocks(N, block)
    xq, scale, pooled, sim = quant_pool(x, block, hd, extra_scale=extra_scale, mean=mean)
    assert xq.shape == (B, H, nb * block, hd) and xq.dtype == torch.int8
    assert scale.shape == (B, H, nb) and pooled.shape == (B, H, nb, D) and sim.shape == (B, H, nb)

    xs = x.float() if mean is None else x.float() - mean[:, :, None, :]
    rq, rscale = quantize_int8_per_block(xs, block)
    rpool, rsim = pool_and_similarity(xs, block)
    # the same integers: x * (127 / amax) exact, rounded once to the nearest (ties to even) in both
    assert torch.equal(xq[:, :, :N, :D], rq)
    assert (xq[:, :, N:] == 0).all() and (xq[..., D:] == 0).all()  # padding is written as zeros
    torch.testing.assert_close(scale, rscale * extra_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(pooled, rpool, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sim, rsim, rtol=1e-5, atol=1e-5)
    # no pooling requested: same int8 and scales, no pool/sim
    xq2, scale2, p2, s2 = quant_pool(x, block, hd, extra_scale=extra_scale, mean=mean, want_pool=False)
    assert p2 is None and s2 is None
    assert torch.equal(xq2, xq) and torch.equal(scale2, scale)
    # pooled means without the similarity (the lse scoring path): the same means
    xq3, scale3, p3, s3 = quant_pool(x, block, hd, extra_scale=extra_scale, mean=mean, want_sim=False)
    assert s3 is None and torch.equal(p3, pooled) and torch.equal(xq3, xq) and torch.equal(scale3, scale)
    # the lse guard's similarity from the block's sums (energy_similarity): same integers and scales
    xq4, scale4, _, s4 = quant_pool(x, block, hd, extra_scale=extra_scale, mean=mean, want_pool=False,
                                    want_sim=True, sim_kind="energy")
    assert torch.equal(xq4, xq) and torch.equal(scale4, scale)
    torch.testing.assert_close(s4, energy_similarity(xs, block), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D,hd", [(64, 64), (48, 64), (96, 128), (128, 128), (80, 128)])
@pytest.mark.parametrize("N,block", [(300, 64), (257, 128), (128, 128), (17, 64)])
def test_quant_pool_matches_reference(D, hd, N, block):
    g = torch.Generator().manual_seed(N * D + block)
    x = torch.randn(2, 2, N, D, generator=g) * torch.linspace(0.1, 4, N)[:, None]
    check_quant_pool(x, block, hd)


def test_quant_pool_rounds_ties_to_even():
    """A block whose largest |x| is 127 scales by exactly 1: its halves are ties, which go to the
    even integer (the one FFMA of kernels.numerics.round_to_i32; the reference rounds alike)."""
    vals = torch.tensor([127.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5, -1.5, 126.5, 0.25, -0.75])
    x = torch.zeros(1, 1, 64, 64)
    x[0, 0, :len(vals), 0] = vals
    xq = quant_pool(x, 64, 64)[0]
    want = torch.tensor([127, 2, -2, 4, -4, 0, 0, 2, -2, 126, 0, -1], dtype=torch.int8)
    assert torch.equal(xq[0, 0, :len(vals), 0], want)
    assert torch.equal(quantize_int8_per_block(x, 64)[0][0, 0, :len(vals), 0], want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quant_pool_dtypes_and_extra_scale(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 3, 200, 64, generator=g) * 3).to(dtype)
    check_quant_pool(x, 128, 64, extra_scale=64 ** -0.5 * LOG2E)


@pytest.mark.parametrize("D,hd", [(64, 64), (48, 64), (96, 128)])
def test_quant_pool_k_smoothing(D, hd):
    g = torch.Generator().manual_seed(D)
    k = (torch.randn(1, 2, 333, D, generator=g) + 7.0).to(torch.bfloat16)  # big shared offset
    mean = key_mean(k.float())[:, :, 0]
    check_quant_pool(k, 64, hd, mean=mean)
    # the smoothed int8 keys are what the reference quantizes after smooth_k
    xq, _, _, _ = quant_pool(k, 64, hd, mean=mean, want_pool=False)
    rq, _ = quantize_int8_per_block(smooth_k(k.float()), 64)
    assert torch.equal(xq[:, :, :333, :D], rq)


@pytest.fixture
def garbage_empty(monkeypatch):
    """torch.empty returns memory full of garbage (NaN, 77), as a GPU's caching allocator may: a
    kernel that leaves part of an output unwritten fails the test instead of reading fresh zeros."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(77)
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("D,hd,pad", [(64, 64, 2), (80, 128, 2), (64, 64, 9)])
def test_quant_pool_int8_means_match_reference(D, hd, pad, garbage_empty):
    """fill_skipped's mean keys: the smoothed block means in int8 with one scale per block, and
    the smoothed keys' per-channel variances in fp16; the kernel writes the zero padding itself,
    also when it is longer than the real blocks."""
    from sparge_attention.sparge_core.reference_predict import FILL_VAR_GROUPS, block_means, key_variances

    _, k, v = clustered(1, 2, 333, D, seed=D)
    nb = num_blocks(333, BK)
    out = quant_pool(k, BK, hd, mean=key_mean(k)[:, :, 0], want_pool=True, want_sim=False, pool_i8_blocks=nb + pad)
    kq, ks = out[4]
    assert kq.shape == (1, 2, nb + pad, hd) and kq.dtype == torch.int8 and ks.shape == (1, 2, nb + pad)
    assert (kq[:, :, nb:] == 0).all() and (ks[:, :, nb:] == 0).all() and (kq[..., D:] == 0).all()
    want, _ = block_means(k, v, BK, "fp8")
    got = kq[:, :, :nb, :D].float() * ks[:, :, :nb, None]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=float(ks.max()) * 1.01)  # at most one int8 step
    assert (got - want).abs().max() <= float(ks.max()) * 1.01
    kv = out[5]  # the variances summed per channel group (FILL_VAR_GROUPS of them)
    assert kv.shape == (1, 2, nb + pad, FILL_VAR_GROUPS) and kv.dtype == torch.float16
    assert (kv[:, :, nb:] == 0).all() and (kv >= 0).all()
    if D < hd:  # the zero padded channels add nothing: the last groups are empty
        assert (kv[:, :, :nb, D * FILL_VAR_GROUPS // hd:] == 0).all()
    # fp32 sums in another order, then fp16: one fp16 step at most
    torch.testing.assert_close(kv[:, :, :nb].float(), key_variances(k, BK), rtol=2 ** -9, atol=1e-6)
    with pytest.raises(ValueError):
        quant_pool(k, BK, hd, want_pool=True, pool_i8_blocks=nb - 1)


def test_quant_pool_non_contiguous_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 300, 2, 64, generator=g).transpose(1, 2)  # an NHD view
    assert not x.is_contiguous()
    check_quant_pool(x, 64, 64)


def test_quant_pool_rejects_bad_input():
    with pytest.raises(ValueError):
        quant_pool(torch.randn(2, 100, 64), 64, 64)
    with pytest.raises(ValueError):
        quant_pool(torch.randn(1, 1, 100, 64, dtype=torch.float64), 64, 64)
    with pytest.raises(ValueError, match="head_dim"):
        quant_pool(torch.randn(1, 1, 100, 80), 64, 64)


def test_helper_launches_pass_their_warps_and_register_cap():
    """A Launch's register cap reaches every helper kernel it shapes (before v53 the quantizers
    dropped it, and a sweep over caps timed the same kernel under different names)."""
    from devkit.launches import capture_launches
    from sparge_attention.kernels.config import Launch
    from sparge_attention.kernels.kv_stats import kv_stats

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 130, 64, generator=g)
    cap = Launch(num_warps=2, maxnreg=80)
    log = capture_launches(lambda: (quant_pool(x, 64, 64, launch=cap), quant_v(x, torch.ones(1, 2, 64), 128, 64, True,
                                                                                launch=cap),
                                    kv_stats(x, x, launch=Launch(num_warps=2, num_stages=1, block=32, maxnreg=80))))
    main = [kw for name, _, _, _, kw in log if not name.endswith(("fix", "finish"))]
    assert len(main) == 3 and all(kw["num_warps"] == 2 and kw["maxnreg"] == 80 for kw in main), main
    assert Launch().warps_and_cap() == {"num_warps": 4}


# ----------------------------------------------------------------------------- quant_v
def test_fp8_v_columns_permute_within_32_key_groups():
    cols = fp8_v_columns(128)
    assert torch.equal(torch.sort(cols).values, torch.arange(128))
    assert torch.equal(cols // 32, torch.arange(128) // 32)
    # the operand's k = 4t..4t+3 of a group are the tile's columns 2t, 2t+1, 2t+8, 2t+9 (t = 1)
    assert cols[[2, 3, 10, 11]].tolist() == [4, 5, 6, 7]
    # quant_v reads V in that order (v_key) and stores it in place: v_key inverts v_column
    assert torch.equal(v_key.fn(cols, True), torch.arange(128))
    assert torch.equal(v_key.fn(torch.arange(128), False), torch.arange(128))


@pytest.mark.parametrize("pv_fp8", [True, False])
@pytest.mark.parametrize("D,hd", [(64, 64), (48, 64), (80, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_v_matches_reference(pv_fp8, D, hd, dtype, garbage_empty):
    g = torch.Generator().manual_seed(D + pv_fp8)
    N = 201
    v = (torch.randn(2, 2, N, D, generator=g) * torch.linspace(0.01, 5, D)).to(dtype)
    scale = value_scale(v)
    vt = quant_v(v, scale, BK, hd, pv_fp8)
    nb = num_blocks(N, BK)
    assert vt.shape == (2, 2, hd, nb * BK)
    assert vt.dtype == (torch.float8_e4m3fn if pv_fp8 else torch.float16)
    ref, rscale = quantize_v(v, "fp8" if pv_fp8 else "fp16")
    torch.testing.assert_close(scale, rscale, rtol=0, atol=0)
    got = v_in_key_order(vt).float()[:, :, :D, :N].transpose(-1, -2)
    assert torch.equal(got, ref), f"{(got != ref).sum().item()} values differ"
    assert (v_in_key_order(vt).float()[:, :, :, N:] == 0).all() and (vt.float()[:, :, D:] == 0).all()
    # the block means of v / scale for fill_skipped: transposed and typed like V, zero-padded
    vt2, vbar = quant_v(v, scale, BK, hd, pv_fp8, mean_blocks=64)  # padding longer than the real blocks
    assert torch.equal(vt2.float(), vt.float()) and vbar.shape == (2, 2, hd, 64) and vbar.dtype == vt.dtype
    vbar = v_in_key_order(vbar)  # fp8: in the operand's order over the mean blocks too
    from sparge_attention.sparge_core.reference_predict import block_means
    _, want_vbar = block_means(v, v, BK, "fp8" if pv_fp8 else "fp16")
    got_vbar = vbar.float()[:, :, :D, :nb].transpose(-1, -2)
    # one rounding step apart at most where the fp32 sums' order differs
    torch.testing.assert_close(got_vbar, want_vbar, rtol=0.07 if pv_fp8 else 2e-3, atol=1e-3)
    assert (got_vbar == want_vbar).float().mean() > 0.95
    assert (vbar.float()[..., nb:] == 0).all() and (vbar.float()[:, :, D:] == 0).all()
    with pytest.raises(ValueError):
        quant_v(v, scale, BK, hd, pv_fp8, mean_blocks=nb - 1)
    if pv_fp8:
        with pytest.raises(ValueError, match="32-block groups"):
            quant_v(v, scale, BK, hd, pv_fp8, mean_blocks=4 * nb + 1)
    else:  # fp16 keeps the blocks' order: any length
        assert quant_v(v, scale, BK, hd, pv_fp8, mean_blocks=4 * nb + 1)[1].shape[-1] == 4 * nb + 1


@pytest.mark.parametrize("pv_fp8", [True, False])
def test_v_scale_from_the_sample_and_its_overflow_check(pv_fp8):
    """The sparse call's V: the scale from kv_stats' sample with headroom, checked against every
    value by quant_v. A head whose largest value the sample missed by more than the headroom is
    quantized again at its exact scale (written back into the scale tensor); the others keep the
    sampled one. Both as reference_quant.value_scale / quantize_v, through a permutation and with the
    fill means."""
    from sparge_attention.kernels.kv_stats import kv_stats
    from sparge_attention.sparge_core.reference_predict import block_means
    from sparge_attention.sparge_core.reference_quant import KMEAN_SAMPLE, V_HEADROOM, sampled_rows

    g = torch.Generator().manual_seed(11 + pv_fp8)
    B, H, N, D = 1, 3, 700, 80
    k = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g) * torch.linspace(0.05, 3, D)
    perm = torch.randperm(N, generator=g).to(torch.int32)
    vp = v[:, :, perm.long()]  # the order the kernels visit the tokens in (the reference's)
    outside = (~sampled_rows(N)).nonzero()[:, 0]
    vp[0, 1, outside[5], 7] = 50.0 * vp[0, 1, sampled_rows(N), 7].abs().max()  # head 1: one value far out
    v[:, :, perm.long()] = vp
    _, scale = kv_stats(k, v, v_format_max=FP8_MAX, k_sample=KMEAN_SAMPLE, perm=perm, v_headroom=V_HEADROOM)
    sampled = (vp[:, :, sampled_rows(N)].abs().amax(2) * V_HEADROOM / FP8_MAX).clamp_min(1e-20)
    assert torch.equal(scale, sampled)
    nb = num_blocks(N, BK)
    vt, vbar = quant_v(v, scale, BK, 128, pv_fp8, perm=perm, mean_blocks=32, rescale_above=FP8_MAX)
    vbar = v_in_key_order(vbar)
    want = value_scale(vp)
    assert torch.equal(scale, want)  # written in place: head 1 exact, heads 0 and 2 the sample's
    assert torch.equal(want[0, 1], (vp[0, 1].abs().amax(0) / FP8_MAX).clamp_min(1e-20))
    assert torch.equal(want[0, ::2], sampled[0, ::2]) and not torch.equal(want[0, 1], sampled[0, 1])
    ref, _ = quantize_v(vp, "fp8" if pv_fp8 else "fp16")
    assert torch.equal(v_in_key_order(vt).float()[:, :, :D, :N].transpose(-1, -2), ref)
    _, want_vbar = block_means(vp, vp, BK, "fp8" if pv_fp8 else "fp16")
    got_vbar = vbar.float()[:, :, :D, :nb].transpose(-1, -2)
    torch.testing.assert_close(got_vbar, want_vbar, rtol=0.07 if pv_fp8 else 2e-3, atol=1e-3)
    assert (vbar.float()[..., nb:] == 0).all()
    # no head over: one launch's result, the scale untouched
    v2 = v.clone()
    v2[:, :, perm.long()[outside[5]]] = 0.0
    _, scale2 = kv_stats(k, v2, v_format_max=FP8_MAX, k_sample=KMEAN_SAMPLE, perm=perm, v_headroom=V_HEADROOM)
    before = scale2.clone()
    quant_v(v2, scale2, BK, 128, pv_fp8, perm=perm, rescale_above=FP8_MAX)
    assert torch.equal(scale2, before) and torch.equal(scale2, value_scale(v2[:, :, perm.long()]))
    with pytest.raises(ValueError, match="contiguous"):
        quant_v(v, scale.transpose(1, 2).contiguous().transpose(1, 2), BK, 128, pv_fp8, rescale_above=FP8_MAX)
    with pytest.raises(ValueError, match="v_format_max"):
        kv_stats(k, v, v_headroom=V_HEADROOM)


@pytest.mark.parametrize("rows", [16, 64])  # 32, the default for V, runs in every other test
def test_quantizer_row_steps_give_the_whole_blocks_results(rows):
    """The quantizers' rows per step (launch.block) is a speed setting: the int8 and fp8 values,
    scales, top keys and V's overflow-checked scale are the whole block's bit for bit (a V head
    over the limit runs the fix kernel); sums (means, self-similarity) only add in another order."""
    from sparge_attention.kernels.config import Launch

    g = torch.Generator().manual_seed(rows)
    B, H, N, D = 1, 2, 300, 48  # a partial last block
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    perm = torch.randperm(N, generator=g).to(torch.int32)
    p = perm.long()
    k[:, :, p[5]] = k[:, :, p[100]] = 9.0  # block 0's top key tied between rows 5 and 100: the first wins
    nb = num_blocks(N, BK)
    kmean = k.mean(2)
    outs = []
    for step in (0, rows):
        scale = (v.abs().amax(2) / FP8_MAX).clamp_min(1e-20)
        scale[0, 1] /= 3  # head 1 overflows: the fix kernel quantizes it again
        L = Launch(block=step)
        outs.append(dict(
            v=quant_v(v, scale, BK, 64, True, perm=perm, mean_blocks=32, rescale_above=FP8_MAX, launch=L),
            vscale=scale,
            q=quant_pool(q, BQ, 64, extra_scale=0.3, want_pool=True, want_sim=False, perm=perm, launch=L),
            k=quant_pool(k, BK, 64, mean=kmean, want_pool=False, want_sim=True, perm=perm, pool_i8_blocks=nb + 2,
                         want_top=True, launch=L),
            k_energy=quant_pool(k, BK, 64, mean=kmean, want_pool=False, want_sim=True, perm=perm,
                                pool_i8_blocks=nb + 2, want_top=True, launch=L, sim_kind="energy")))
    a, b = outs
    assert torch.equal(a["vscale"], b["vscale"])
    assert torch.equal(b["vscale"][0, 1], (v[0, 1].abs().amax(0) / FP8_MAX).clamp_min(1e-20))
    assert torch.equal(a["v"][0].float(), b["v"][0].float())
    torch.testing.assert_close(b["v"][1].float(), a["v"][1].float(), rtol=0.07, atol=1e-3)
    for name in ("q", "k"):  # int8 values and scales exact
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
    torch.testing.assert_close(b["q"][2], a["q"][2], rtol=1e-5, atol=1e-6)  # pooled means
    torch.testing.assert_close(b["k"][3], a["k"][3], rtol=1e-5, atol=1e-6)  # self-similarity
    assert torch.equal(b["k"][6], a["k"][6]) and (b["k"][6][:, :, 0] == 5).all()  # top keys
    (pq_a, ps_a), (pq_b, ps_b) = a["k"][4], b["k"][4]  # int8 means: one rounding step at most
    assert (pq_a.int() - pq_b.int()).abs().max() <= 1
    torch.testing.assert_close(ps_b, ps_a, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b["k"][5].float(), a["k"][5].float(), rtol=2 ** -9, atol=1e-6)  # variances, fp16
    for i in (0, 1, 4, 5, 6):  # the energy similarity changes nothing else K's quantizer writes
        for r in (a, b):
            x, y = r["k"][i], r["k_energy"][i]
            assert all(torch.equal(u, w) for u, w in zip(x, y)) if isinstance(x, tuple) else torch.equal(x, y), i
    torch.testing.assert_close(b["k_energy"][3], a["k_energy"][3], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="power of two dividing"):
        quant_v(v, a["vscale"], BK, 64, True, launch=Launch(block=48))
    with pytest.raises(ValueError, match="power of two dividing"):
        quant_pool(q, BQ, 64, launch=Launch(block=24))


def test_quant_v_fp8_rounding_near_powers_of_two():
    """The interpreter's own fp32->fp8 cast mis-rounds just below powers of two; the emulated
    rounding must agree with torch's round-to-nearest-even everywhere on the e4m3 range."""
    grid = torch.linspace(-448, 448, 64 * 60)
    special = torch.tensor([125.9, 127.99, 63.9, 31.99, 0.0155, 0.001, -240.5, 448.0, -448.0, 0.0])
    vals = torch.cat([grid, special])
    n = vals.numel() // 2 * 2
    v = vals[:n].reshape(1, 1, -1, 2)
    scale = torch.ones(1, 1, 2)
    vt = quant_v(v, scale, BK, 16, True)
    got = v_in_key_order(vt).float()[0, 0, :2, : v.shape[2]].T
    want = v.to(torch.float8_e4m3fn).float()
    assert torch.equal(got, want[0, 0])


def test_quant_v_rejects_bad_scale():
    v = torch.randn(1, 2, 100, 64)
    with pytest.raises(ValueError, match="scale"):
        quant_v(v, torch.ones(1, 2, 32), BK, 64, True)


# ----------------------------------------------------------------------------- block_map_to_index
@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 40)),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_block_map_to_index(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    counts, idx = block_map_to_index(mask)
    assert counts.dtype == torch.int32 and idx.dtype == torch.int32 and idx.shape == mask.shape
    assert torch.equal(counts, mask.sum(-1, dtype=torch.int32))
    for row in itertools.product(*(range(s) for s in shape[:3])):
        c = int(counts[row])
        assert idx[row][:c].tolist() == mask[row].nonzero().flatten().tolist()  # ascending, exact


def test_block_map_to_index_non_contiguous_and_bad_input():
    mask = torch.rand(2, 3, 4, 6) < 0.5
    t = mask.transpose(0, 1)  # non-contiguous view
    counts, idx = block_map_to_index(t)
    assert torch.equal(counts, t.sum(-1, dtype=torch.int32))
    for row in itertools.product(range(3), range(2), range(4)):
        assert idx[row][: int(counts[row])].tolist() == t[row].nonzero().flatten().tolist()
    with pytest.raises(ValueError):
        block_map_to_index(mask.int())
    with pytest.raises(ValueError):
        block_map_to_index(mask[0])


# ----------------------------------------------------------------------------- attention forward
def run_both(q, k, v, params, pv_dtype="auto", block_mask=None):
    """Triton through the public API; the reference on the same inputs with the P.V type the
    kernel uses (fp8 under the interpreter unless asked for fp16)."""
    out, st = sparge_attention(q, k, v, params, backend="triton", return_stats=True, pv_dtype=pv_dtype,
                               block_mask=block_mask)
    assert st.backend == "triton"
    mask = None if block_mask is None else st.block_mask.to_dense()
    ref, ref_mask, skipped = sparge_reference(q, k, v, params, BQ, BK, pv_dtype="fp16" if pv_dtype == "fp16" else "fp8",
                                              mask=mask)
    return out, st, ref.to(q.dtype), ref_mask, skipped


@settings(max_examples=14, deadline=None, phases=NO_SHRINK)
@given(
    n=st.integers(129, 400),
    D=st.sampled_from([64, 128, 80]),
    heads=st.sampled_from([(1, 1, 1), (1, 2, 2), (1, 4, 2), (2, 2, 1), (1, 4, 1)]),  # (B, H, Hkv)
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    causal=st.booleans(),
    mode=st.sampled_from(["cdf", "topk", "share"]),
    theta=st.sampled_from([-1.0, 0.3, 0.6]),
    pvthreshd=st.sampled_from([INF, 50.0, 4.0, 1.0]),
    data=st.sampled_from([clustered, with_sink]),
    scoring=st.sampled_from(["pooled", "pooled", "lse"]),
    seed=st.integers(0, 2**16),
)
def test_triton_forward_matches_reference(n, D, heads, dtype, causal, mode, theta, pvthreshd, data, scoring, seed):
    B, H, Hkv = heads
    q, k, v = data(B, H, n, D, seed, Hkv=Hkv, dtype=dtype)
    extra = {"cdf": {"cdfthreshd": 0.9}, "topk": {"topk": 0.4}, "share": {"minshare": 0.6}}[mode]
    params = SpargeParams(simthreshd1=theta, pvthreshd=pvthreshd, is_causal=causal, scoring=scoring, **extra)
    out, st, ref, ref_mask, skipped = run_both(q, k, v, params)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert torch.equal(st.block_mask.to_dense(), ref_mask)
    assert int(st.pv_skipped) == int(skipped.sum())
    if pvthreshd == INF:
        assert int(st.pv_skipped) == 0
    assert rel_l1(out, ref) < 0.01


def test_triton_forward_sparse_and_skipping_actually_happen():
    """A fixed case where the mask is sparse and P.V skipping fires, so the equalities above
    are not vacuous."""
    q, k, v = with_sink(1, 2, 512, 64, seed=7, sink=10.0, dtype=torch.bfloat16)
    params = SpargeParams(simthreshd1=-1, cdfthreshd=0.9, pvthreshd=1.0)
    out, st, ref, ref_mask, skipped = run_both(q, k, v, params)
    assert torch.equal(st.block_mask.to_dense(), ref_mask)
    assert 0.2 < st.sparsity < 1.0
    assert int(st.pv_skipped) == int(skipped.sum()) > 0
    assert rel_l1(out, ref) < 0.01


@pytest.mark.parametrize("causal,Hkv,D,n,pv", [(False, 2, 64, 700, "auto"), (True, 2, 64, 650, "auto"),
                                                (False, 1, 80, 777, "auto"), (False, 2, 64, 600, "fp16")])
def test_triton_fill_skipped_matches_reference(causal, Hkv, D, n, pv):
    """fill_skipped: the kernel's pass over the block means against the reference, on inputs
    where most blocks are skipped, so the estimate is a large part of the output (fp8 P.V, and
    the fp16 path of GPUs without fp8)."""
    q, k, v = clustered(1, 2, n, D, seed=n, Hkv=Hkv, dtype=torch.bfloat16)
    base = dict(simthreshd1=-1.0, minshare=2.0, pvthreshd=INF, is_causal=causal, scoring="lse")
    out0, st0, ref0, _, _ = run_both(q, k, v, SpargeParams(**base), pv_dtype=pv)
    out, st, ref, ref_mask, _ = run_both(q, k, v, SpargeParams(**base, fill_skipped=True), pv_dtype=pv)
    assert torch.equal(st.block_mask.to_dense(), ref_mask) and torch.equal(ref_mask, st0.block_mask.to_dense())
    assert st.sparsity > 0.3
    assert rel_l1(out, ref) < 0.01
    assert rel_l1(out, out0) > 0.02  # the estimate changed the output (not vacuous)


def test_fill_second_order_bound_matches_reference(monkeypatch):
    """Key variances far beyond real ones (x 1000): the second-order term is held within its bound
    through the capped variances in the kernel as in the reference, so both stay together and the
    output moves only by what the bound lets through."""
    from sparge_attention.kernels import quantize
    from sparge_attention.sparge_core import reference, reference_predict

    q, k, v = clustered(1, 2, 300, 64, seed=9, dtype=torch.bfloat16)
    params = SpargeParams(simthreshd1=-1.0, minshare=2.0, pvthreshd=INF, scoring="lse", fill_skipped=True)
    out0, _, ref0, _, _ = run_both(q, k, v, params)
    real_kv = reference.key_variances

    def big_kv(*a, **kw):
        return (real_kv(*a, **kw) * 1000).clamp(max=65504.0)
    monkeypatch.setattr(reference, "key_variances", big_kv)
    real_quant_pool = quantize.quant_pool

    def quant_pool_big(*a, **kw):
        out = real_quant_pool(*a, **kw)
        if kw.get("pool_i8_blocks", 0):
            out = (*out[:5], (out[5].float() * 1000).clamp(max=65504.0).half(), *out[6:])
        return out
    monkeypatch.setattr(quantize, "quant_pool", quant_pool_big)
    out, _, ref, _, _ = run_both(q, k, v, params)
    assert rel_l1(out, ref) < 0.01
    assert rel_l1(ref, ref0) > 0.005  # the term moved the output (0.025 here): the bound was reached, not vacuous
    # at most a factor 2^clamp on each estimated block's weight
    b = reference_predict.FILL_ORDER2_CLAMP
    assert rel_l1(ref, ref0) < 2 ** b - 1


def _fill_inputs():
    """prepare_sparse's inputs of the attention kernel with the fill pass's: 300 tokens (3 key
    blocks), head dim 64, most blocks skipped."""
    from sparge_attention.sparge_core.triton_call import prepare_sparse

    q, k, v = clustered(1, 2, 300, 64, seed=4, dtype=torch.bfloat16)
    params = SpargeParams(simthreshd1=-1.0, minshare=2.0, pvthreshd=INF, scoring="lse", fill_skipped=True)
    return prepare_sparse(q, k, v, params, 64 ** -0.5)


def _fill_attention(P, counts, fill, out_dtype=torch.bfloat16, cfg=None):
    """The attention kernel on _fill_inputs' P with these key-block counts and fill inputs (and
    another kernel config)."""
    from sparge_attention.kernels.attn_fwd import sparse_attn_fwd

    return sparse_attn_fwd(P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"], counts,
                           P["block_mask"].kv_indices, torch.full((2,), INF), 300, 300, 64, out_dtype, False, False,
                           cfg or P["cfg"], fill=fill, fill_clamp=2.0)[0]


def test_fill_pass_reads_only_the_key_blocks_columns():
    """The means are padded to FILL_PAD columns; the fill pass runs only the steps that hold key
    blocks (3 here, of 128 columns: one step of 64 means), so what the padding holds cannot matter."""
    from dataclasses import replace

    P = _fill_inputs()
    kbar, kbs, kvar, vbar, bias = P["fill"]
    assert bias.shape[-1] == 128 and num_blocks(300, BK) == 3 and torch.isinf(bias[..., 3:]).all()
    junk = (kbar.clone(), kbs.clone(), kvar.clone(), vbar.clone(), bias.clone())
    cfg = replace(P["cfg"], fill_block=64)
    c = cfg.fill_block  # the first column of the padding's steps
    junk[0][:, :, c:] = 100
    junk[1][:, :, c:] = 1.0
    junk[2][:, :, c:] = 9.0
    junk[3][..., c:] = 64.0
    junk[4][..., c:] = 50.0  # a finite bias, far above the rest, in the padding's steps
    outs = [_fill_attention(P, P["block_mask"].kv_num_blocks, f, cfg=cfg) for f in (P["fill"], junk)]
    assert torch.equal(outs[0], outs[1])


def test_fill_steps_of_64_and_128_means_agree():
    """The fill pass's means per step (the config's fill_block: 128 on Hopper, 64 elsewhere) only
    change the order of its online softmax (and so where fp8 rounds P): over 131 key blocks
    (three steps of 64, two of 128, the last partly padding) both stay close to the reference.
    (test_triton_fill_skipped_matches_reference checks more cases at the CPU config's 128.)"""
    from dataclasses import replace

    from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
    from sparge_attention.sparge_core.reference_predict import FILL_ORDER2_CLAMP
    from sparge_attention.sparge_core.triton_call import prepare_sparse

    n = 131 * BK - 40
    q, k, v = clustered(1, 1, n, 16, seed=31, dtype=torch.bfloat16)
    q = q[:, :, n - 5 * BQ:]  # few query blocks (the interpreter's time), every key
    params = SpargeParams(simthreshd1=-1.0, minshare=2.0, pvthreshd=INF, scoring="lse", fill_skipped=True)
    P = prepare_sparse(q, k, v, params, 16 ** -0.5)
    bm = P["block_mask"]
    assert P["fill"][4].shape[-1] == 256 and 0.5 < 1 - float(bm.kv_num_blocks.sum()) / bm.kv_indices.numel()
    outs = [sparse_attn_fwd(P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"], bm.kv_num_blocks,
                            bm.kv_indices, torch.full((1,), INF), 5 * BQ, n, 16, q.dtype, False, False,
                            replace(P["cfg"], fill_block=fb, fill_stages=1), fill=P["fill"],
                            fill_clamp=FILL_ORDER2_CLAMP)[0] for fb in (64, 128)]
    ref, ref_mask, _ = sparge_reference(q, k, v, params, BQ, BK, pv_dtype="fp8")
    assert torch.equal(ref_mask, bm.to_dense())
    errs = [rel_l1(o, ref.to(q.dtype)) for o in outs]
    # here 0.0079 (64) and 0.0049 (128), 0.0043 apart
    assert 0 < rel_l1(outs[0], outs[1]) and max(errs) < 0.01


def test_fill_biases_keep_their_precision():
    """The biases enter the fill pass's scores through an fp16 product, as a high and a low part.
    With no kept block the output is a softmax over the means alone, which moving every bias by
    1000.3 must leave as it was, to what fp32 scores near 1000 allow; a single fp16 part would
    round each bias by up to 0.25 log2 units there (rel-L1 0.016 with the high part alone)."""
    P = _fill_inputs()
    kbar, kbs, kvar, vbar, bias = P["fill"]
    real = torch.arange(bias.shape[-1]) < num_blocks(300, BK)
    b0 = torch.where(real & torch.isinf(bias), 1.5, bias)  # the kept blocks estimated too
    none = torch.zeros_like(P["block_mask"].kv_num_blocks)

    def run(b):
        return _fill_attention(P, none, (kbar, kbs, kvar, vbar, b.contiguous()), torch.float32)
    out0, out1 = run(b0), run(torch.where(real, b0 + 1000.3, b0))
    assert torch.isfinite(out0).all() and out0.abs().max() > 0
    assert rel_l1(out1, out0) < 2e-3


@pytest.mark.parametrize("causal", [False, True])
def test_triton_forward_fp16_pv(causal):
    q, k, v = clustered(1, 2, 300, 64, seed=3, dtype=torch.float16)
    params = SpargeParams(simthreshd1=0.3, cdfthreshd=0.9, pvthreshd=4.0, is_causal=causal)
    out, st, ref, ref_mask, skipped = run_both(q, k, v, params, pv_dtype="fp16")
    assert torch.equal(st.block_mask.to_dense(), ref_mask)
    assert int(st.pv_skipped) == int(skipped.sum())
    assert rel_l1(out, ref) < 0.01


@pytest.mark.parametrize("density", [0.5, 0.25])
@pytest.mark.parametrize("causal", [False, True])
def test_user_block_mask_same_on_both_backends(density, causal):
    q, k, v = clustered(1, 2, 320, 64, seed=11, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(int(density * 100) + causal)
    NQ, NK = num_blocks(320, BQ), num_blocks(320, BK)
    mask = torch.rand(1, 2, NQ, NK, generator=g) < density
    mask[..., 0] = True  # every row keeps something (block 0 is never in the future)
    params = SpargeParams(pvthreshd=INF, is_causal=causal)
    out_t, st_t = sparge_attention(q, k, v, params, backend="triton", block_mask=mask, return_stats=True)
    out_r, st_r = sparge_attention(q, k, v, params, backend="reference", block_mask=mask, pv_dtype="fp8",
                                   return_stats=True)
    assert torch.equal(st_t.block_mask.to_dense(), st_r.block_mask.to_dense())
    assert int(st_t.kept_blocks) == int(st_r.kept_blocks)
    assert rel_l1(out_t, out_r) < 0.01
    # and it is really the mask that was applied: a different mask gives a different result
    out_full = sparge_attention(q, k, v, params, backend="triton", block_mask=torch.ones_like(mask))
    assert rel_l1(out_t, out_full) > 0.05


def test_user_block_mask_broadcast_over_heads():
    q, k, v = clustered(1, 2, 256, 64, seed=12, dtype=torch.float16)
    NQ, NK = num_blocks(256, BQ), num_blocks(256, BK)
    mask = (torch.arange(NQ)[:, None] + torch.arange(NK)[None, :]) % 2 == 0  # a checkerboard
    mask = mask[None, None]
    params = SpargeParams(pvthreshd=INF)
    out_t = sparge_attention(q, k, v, params, backend="triton", block_mask=mask)
    out_r = sparge_attention(q, k, v, params, backend="reference", block_mask=mask, pv_dtype="fp8")
    assert rel_l1(out_t, out_r) < 0.01


def test_empty_row_gives_zeros_on_both_backends():
    q, k, v = clustered(1, 1, 256, 64, seed=13, dtype=torch.float16)
    mask = torch.zeros(1, 1, num_blocks(256, BQ), num_blocks(256, BK), dtype=torch.bool)
    mask[..., 0, :] = True  # only query block 0 keeps anything
    params = SpargeParams(pvthreshd=INF)
    out_t = sparge_attention(q, k, v, params, backend="triton", block_mask=mask)
    out_r = sparge_attention(q, k, v, params, backend="reference", block_mask=mask, pv_dtype="fp8")
    assert (out_t[..., BQ:, :] == 0).all() and (out_r[..., BQ:, :] == 0).all()
    assert rel_l1(out_t[..., :BQ, :], out_r[..., :BQ, :]) < 0.01


@pytest.mark.parametrize("causal,fill", [(False, False), (True, False), (False, True), (True, True)])
def test_tma_and_pointer_loads_agree(causal, fill):
    """Hopper loads K/V tiles (and the fill pass's mean keys and values) by tensor descriptors,
    older GPUs by pointers: same numbers, bit for bit (GQA, a partial last block, P.V skipping and
    the skipped-block estimate included)."""
    from dataclasses import replace

    from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
    from sparge_attention.sparge_core.reference_predict import FILL_ORDER2_CLAMP
    from sparge_attention.sparge_core.triton_call import prepare_sparse

    q, k, v = clustered(1, 4, 300, 64, seed=21, Hkv=2, dtype=torch.bfloat16)
    if fill:
        params = SpargeParams(simthreshd1=-1.0, minshare=2.0, pvthreshd=4.0, scoring="lse", fill_skipped=True,
                              is_causal=causal)
    else:
        params = SpargeParams(simthreshd1=0.3, cdfthreshd=0.9, pvthreshd=4.0, is_causal=causal)
    P = prepare_sparse(q, k, v, params, 64 ** -0.5)
    assert (P["fill"] is not None) == fill
    bm = P["block_mask"]
    outs = [sparse_attn_fwd(P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"], bm.kv_num_blocks,
                            bm.kv_indices, torch.full((4,), 4.0), 300, 300, 64, q.dtype, causal, True,
                            replace(P["cfg"], tma=tma), fill=P["fill"], fill_clamp=FILL_ORDER2_CLAMP)
            for tma in (False, True)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert 0 < int(bm.kv_num_blocks.sum()) < bm.kv_num_blocks.numel() * num_blocks(300, BK)


@pytest.mark.parametrize("n_q,n_k", [(300, 300), (200, 450)])
def test_causal_masks_the_blocks_across_the_diagonal_only(n_q, n_k):
    """Causal calls mask only the key blocks that reach past a query block's first row (the last
    entries of its ascending list); the others run unmasked. A list holding every key block, the
    future ones included, must give the causal list's output bit for bit (future blocks add exact
    zeros), and the reference's causal attention, queries and keys aligned at the end."""
    from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
    from sparge_attention.sparge_core.blockmask import SpargeBlockMask, causal_block_mask
    from sparge_attention.sparge_core.triton_call import prepare_sparse

    q, _, _ = clustered(1, 4, n_q, 64, seed=31, Hkv=2, dtype=torch.bfloat16)
    _, k, v = clustered(1, 4, n_k, 64, seed=32, Hkv=2, dtype=torch.bfloat16)
    params = SpargeParams(pvthreshd=INF, is_causal=True)
    NQ, NK = num_blocks(n_q, BQ), num_blocks(n_k, BK)
    causal = causal_block_mask(NQ, NK, BQ, BK, n_q, n_k).expand(1, 4, NQ, NK)
    masks = [SpargeBlockMask.from_dense(d, BQ, BK, n_q, n_k) for d in (causal, torch.ones_like(causal))]
    P = prepare_sparse(q, k, v, params, 64 ** -0.5, block_mask=masks[0])
    outs = [sparse_attn_fwd(P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"], bm.kv_num_blocks,
                            bm.kv_indices, torch.full((4,), INF), n_q, n_k, 64, q.dtype, True, False, P["cfg"])[0]
            for bm in masks]
    assert not causal.all() and torch.equal(outs[0], outs[1])
    ref = sparge_attention(q, k, v, params, backend="reference", block_mask=causal, pv_dtype="fp8")
    assert rel_l1(outs[0], ref) < 0.01


def test_attention_launcher_wants_a_kernel_config():
    from sparge_attention.kernels.attn_fwd import sparse_attn_fwd

    x = torch.zeros(1)
    with pytest.raises(TypeError, match="KernelConfig"):
        sparse_attn_fwd(*[x] * 9, 64, 64, 64, torch.float16, False, False, (BQ, BK, 4, 3))


def test_triton_rejects_fp32_pv():
    q = torch.randn(1, 1, 256, 64)
    with pytest.raises(ValueError, match="fp32"):
        sparge_attention(q, q, q, backend="triton", pv_dtype="fp32")


# ----------------------------------------------------------------------------- stage-1 kernels
def _select_inputs(B, H, NQ, NK, seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, NQ, NK, generator=g) * 4
    if ties:  # whole runs of equal scores, and some -inf (non-self-similar key blocks)
        scores = torch.round(scores)
    q_ss = torch.rand(B, H, NQ, generator=g) < 0.8
    k_ss = torch.rand(B, H, NK, generator=g) < 0.8
    scores = scores.masked_fill(~k_ss[:, :, None, :], -INF)
    return scores, q_ss, k_ss


@settings(max_examples=15, deadline=None)
@given(  # rows (B, H, query blocks) are independent programs: few of them, any number of key blocks
    shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 37)),
    mode=st.sampled_from(["cdf", "topk", "share"]),
    causal=st.booleans(),
    sink=st.booleans(),
    ties=st.booleans(),
    with_kss=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_select_fused_matches_reference(shape, mode, causal, sink, ties, with_kss, seed):
    """kernels.select (softmax, sort, CDF/top-k/share, fix rules, compaction in one launch) against
    reference_predict.keep_from_scores + the fix rules of select_blocks."""
    select = pytest.importorskip("sparge_attention.kernels.select")
    from sparge_attention.sparge_core.blockmask import causal_block_mask
    from sparge_attention.sparge_core.reference_predict import keep_from_scores

    B, H, NQ, NK = shape
    scores, q_ss, k_ss = _select_inputs(B, H, NQ, NK, seed, ties)
    if not with_kss:
        k_ss = None
    g = torch.Generator().manual_seed(seed + 1)
    thr = torch.rand(H, generator=g) * 0.9 + 0.1  # per-head cdfthreshd or topk
    if mode == "share":
        thr = thr * 3 - 0.3  # minshare 0 .. 2.4: 0 keeps everything, above 1 only above-uniform blocks
        thr = thr.clamp_min(0)
    params = SpargeParams.for_mode(mode, thr, simthreshd1=0.0, is_causal=causal, attention_sink=sink)
    n_q, n_k = NQ * BQ - 3, NK * BK - 5  # partial last blocks; n_q < n_k aligns queries at the end
    n_q = min(n_q, n_k)
    NQ = num_blocks(n_q, BQ)
    scores, q_ss = scores[:, :, :NQ], q_ss[:, :, :NQ]

    cm = causal_block_mask(NQ, NK, BQ, BK, n_q, n_k) if causal else None
    want = keep_from_scores(scores, params, cm)
    want |= ~q_ss[..., :, None]
    if k_ss is not None:
        want |= ~k_ss[..., None, :]
    if sink:
        want[..., 0] = True
    if cm is not None:
        want &= cm

    counts, idx = select.select_blocks_fused(scores, q_ss, k_ss, thr, mode, sink, causal, n_q, n_k, BQ, BK)
    assert torch.equal(counts, want.sum(-1, dtype=torch.int32))
    for row in itertools.product(range(B), range(H), range(NQ)):
        assert idx[row][: int(counts[row])].tolist() == want[row].nonzero().flatten().tolist()

    # fill_skipped: the same selection, plus the estimate's bias (reference_predict.fill_bias), padded
    from sparge_attention.sparge_core.reference_predict import fill_bias

    mean = scores.clamp_min(-50) - torch.rand(scores.shape, generator=g) * 3  # any finite mean scores
    c2, i2, bias = select.select_blocks_fused(scores, q_ss, k_ss, thr, mode, sink, causal, n_q, n_k, BQ, BK,
                                              fill_mean=mean, fill_blocks=NK + 5)
    assert torch.equal(c2, counts) and bias.shape == (B, H, NQ, NK + 5)
    for row in itertools.product(range(B), range(H), range(NQ)):  # (entries past the count are unset)
        assert torch.equal(i2[row][: int(c2[row])], idx[row][: int(counts[row])])
    want_bias = fill_bias(scores, mean, want, params, n_q, n_k, BQ, BK)
    torch.testing.assert_close(bias[..., :NK], want_bias, rtol=0, atol=1e-5)
    assert (bias[..., NK:] == -INF).all()

    # q_ss None (lse scoring without the rule): every query block passes, as an all-true mask does
    all_q = torch.ones_like(q_ss)
    c3, i3 = select.select_blocks_fused(scores, None, k_ss, thr, mode, sink, causal, n_q, n_k, BQ, BK)
    c4, i4 = select.select_blocks_fused(scores, all_q, k_ss, thr, mode, sink, causal, n_q, n_k, BQ, BK)
    assert torch.equal(c3, c4)
    for row in itertools.product(range(B), range(H), range(NQ)):
        assert torch.equal(i3[row][: int(c3[row])], i4[row][: int(c4[row])])


def _lse_inputs(q, k, hd, n_kbar=0):
    """What prepare_sparse gives the scoring kernel: pooled queries, smoothed int8 keys with their
    top keys, and the int8 mean keys (n_kbar rows, zero past the real blocks)."""
    _, _, q_pool, _ = quant_pool(q, BQ, hd)
    k_out = quant_pool(k, BK, hd, mean=k.mean(2), want_pool=False, pool_i8_blocks=n_kbar or num_blocks(k.shape[2], BK),
                       want_top=True)
    return q_pool, k_out[0], k_out[1], k_out[-1], k_out[4]


@pytest.mark.parametrize("D,hd", [(64, 64), (80, 128)])
@pytest.mark.parametrize("Hkv", [2, 1])
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_block_lse_scores_matches_reference(D, hd, Hkv, stride):
    kern = pytest.importorskip("sparge_attention.kernels.block_scores")
    from sparge_attention.sparge_core.reference_predict import block_lse_scores, block_top_keys

    n = 333
    q, k, _ = clustered(1, 2, n, D, seed=D + Hkv, Hkv=Hkv)
    q_pool, k_i8, k_s, top, kbar = _lse_inputs(q, k, hd, n_kbar=64)
    assert torch.equal(top.long(), block_top_keys(k.float() - k.float().mean(2, keepdim=True), BK, n))
    got = kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, key_stride=stride, key_top=top)
    want = block_lse_scores(q_pool, k_i8[..., :D], k_s, D ** -0.5, n, BK, stride=stride, top=top)
    assert got.shape == (1, 2, num_blocks(n, BQ), num_blocks(n, BK))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # with the mean-key score per block (fill_skipped)
    got2, got_mean = kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, want_mean=True, key_stride=stride,
                                           key_top=top, kbar=kbar)
    want2, want_mean = block_lse_scores(q_pool, k_i8[..., :D], k_s, D ** -0.5, n, BK, want_mean=True, stride=stride,
                                        kbar=(kbar[0][..., :D].float(), kbar[1]), top=top)
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-5, atol=1e-4)
    assert (got_mean < got).all()  # one key's score never reaches the log-sum-exp of 100+ keys
    if stride == 1:  # every key: the exact sum, whatever the top key
        exact = block_lse_scores(q_pool, k_i8[..., :D], k_s, D ** -0.5, n, BK, stride=1)
        torch.testing.assert_close(kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK), exact,
                                   rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="key_top"):
        kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, key_stride=2)
    with pytest.raises(ValueError, match="kbar"):
        kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, want_mean=True)


def test_lse_estimate_keeps_the_top_key_and_weights_the_rest():
    """Stride 2 on a block whose mass sits on one odd-position key: the top key is read exactly
    (a plain every-other-key sample would miss it), the other keys stand for the unread ones, and
    a partial last block weights its real keys only."""
    from sparge_attention.sparge_core.reference_predict import block_lse_scores, lse_key_rows

    BKs, D = 32, 16
    n = BKs + 5  # a full block and a partial one of 5 keys
    k_i8 = torch.ones(1, 1, 2 * BKs, D, dtype=torch.int8)
    k_i8[0, 0, 7] = 100  # block 0's top key, at an odd position
    k_i8[0, 0, BKs + 3] = 50  # block 1's
    k_i8[0, 0, BKs + 5:] = 0  # padding
    q_pool = torch.ones(1, 1, 1, D)  # int8 127 in every channel, row scale 1 / 127
    k_s = torch.full((1, 1, 2), 0.05)
    scale = 1.0
    rows = lse_key_rows(torch.tensor([[[7, 3]]]), BKs, 2)
    assert rows[0, 0, 0, 3] == 7 and rows[0, 0, 0, 2] == 4 and rows[0, 0, 1, 1] == 3
    got = block_lse_scores(q_pool, k_i8, k_s, scale, n, BKs, stride=2, top=torch.tensor([[[7, 3]]]))
    exact = block_lse_scores(q_pool, k_i8, k_s, scale, n, BKs, stride=1)
    with pytest.raises(ValueError, match="top key"):
        block_lse_scores(q_pool, k_i8, k_s, scale, n, BKs, stride=2)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-5)  # the other keys are all alike
    c = 1 / 127 * 0.05 * 1.4426950408889634  # one unit of the int8 dot in log2 units
    s_top, s_one = 100 * D * 127 * c, D * 127 * c  # 115.4 and 1.15
    want0 = math.log2(2 ** s_top + 31 * 2 ** s_one)
    want1 = math.log2(2 ** (50 * D * 127 * c) + 4 * 2 ** s_one)
    every_other = math.log2(16 * 2 ** s_one) + 1  # what a plain sample of the even keys would say
    assert want0 - every_other > 100
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([want0, want1]), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("stride,Hkv", [(2, 2), (4, 1)])
def test_block_lse_scores_guard_reads_low_similarity_blocks_in_full(stride, Hkv):
    """With key_sim, a key block whose keys' self-similarity is below exact_below is read in full
    (the exact sum), and so is the partial last block; the others are estimated from every
    stride-th key and the top one: the reference's lse_exact_blocks. Random keys in block 1 (low
    similarity), clustered ones elsewhere; with and without the mean scores."""
    kern = pytest.importorskip("sparge_attention.kernels.block_scores")
    from sparge_attention.sparge_core.reference_predict import LSE_EXACT_SIM, block_lse_scores

    n, D = 3 * BK + 77, 64
    q, k, _ = clustered(1, 2, n, D, seed=11, Hkv=Hkv, seg=BK, noise=0.2)
    k[:, :, BK:2 * BK] = 6.0 * torch.randn(k[:, :, BK:2 * BK].shape, generator=torch.Generator().manual_seed(3))
    q_pool, k_i8, k_s, top, kbar = _lse_inputs(q, k, D)
    sim = quant_pool(k, BK, D, mean=k.mean(2), want_pool=False, want_sim=True, sim_kind="energy")[3]
    torch.testing.assert_close(sim, energy_similarity(k - k.mean(2, keepdim=True), BK), rtol=1e-5, atol=1e-6)
    exact = sim < LSE_EXACT_SIM
    assert exact[..., 1].all() and not exact[..., [0, 2, 3]].any()
    exact[..., 3] = True  # the partial block
    kw = dict(key_stride=stride, key_top=top, key_sim=sim, exact_below=LSE_EXACT_SIM)
    got = kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, **kw)
    want = block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, stride=stride, exact=exact, top=top)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    full = block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, stride=1)
    est = block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, stride=stride, top=top)
    pick = exact.repeat_interleave(2 // Hkv, 1)[:, :, None, :]
    assert torch.equal(want, torch.where(pick, full, est))
    assert not torch.equal(full[..., 1], est[..., 1]) and not torch.equal(full[..., 3], est[..., 3])
    got2, got_mean = kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, want_mean=True, kbar=kbar, **kw)
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    torch.testing.assert_close(got_mean, block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, want_mean=True,
                                                          kbar=(kbar[0].float(), kbar[1]))[1], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="key_sim"):
        kern.block_lse_scores(q_pool, k_i8, k_s, D ** -0.5, n, BK, key_stride=stride, key_top=top,
                              key_sim=sim[..., :2], exact_below=LSE_EXACT_SIM)


@pytest.mark.parametrize("D", [64, 80])
def test_quant_pool_top_keys(D):
    """Each block's top key: the token that holds its largest |value| (less the mean; the first on
    ties), through a permutation, for a partial last block, in one pass and in row steps."""
    from sparge_attention.kernels.config import Launch
    from sparge_attention.sparge_core.reference_predict import block_top_keys

    g = torch.Generator().manual_seed(D)
    n = 3 * BK + 17
    k = torch.randn(1, 2, n, D, generator=g)
    k[0, 1, BK + 9] *= 20
    perm = torch.randperm(n, generator=g).to(torch.int32)
    xq, _, _, _, top = quant_pool(k, BK, 128, mean=k.mean(2), perm=perm, want_pool=False, want_top=True)
    assert top.dtype == torch.int32 and top.shape == (1, 2, 4)
    assert torch.equal(top.long(), block_top_keys((k - k.mean(2, keepdim=True))[:, :, perm.long()], BK, n))
    for rows in (32, 64):  # row steps carry the top over steps, the first step's on ties
        got = quant_pool(k, BK, 128, mean=k.mean(2), want_pool=False, perm=perm, want_top=True,
                         launch=Launch(block=rows))[-1]
        assert torch.equal(got, top), rows
    assert int(top[0, 1, (perm == BK + 9).nonzero()[0, 0] // BK]) == (perm == BK + 9).nonzero()[0, 0] % BK
    ties = torch.zeros(1, 1, 2 * BK, 64)
    ties[0, 0, [5, 9, BK + 2, BK + 30]] = 1.0
    assert quant_pool(ties, BK, 64, want_pool=False, want_top=True)[-1].flatten().tolist() == [5, 2]


@pytest.mark.parametrize("stride,guard", [(1, False), (2, True), (4, False)])
def test_block_lse_scores_across_programs_and_launch_shapes(stride, guard):
    """Key blocks split over several programs (result tiles of 16 blocks) or one (a 32-block tile, part
    filled), a partial last block, 64- and 128-row tiles: the same numbers as the reference in each.
    Every key, or every stride-th and the top one, with the guard's full reads (low-similarity
    blocks, one of them a tile's first and one later in its tile; the partial block)."""
    kern = pytest.importorskip("sparge_attention.kernels.block_scores")
    from sparge_attention.kernels.config import Launch, helper_launches_for
    from sparge_attention.sparge_core.reference_predict import LSE_EXACT_SIM, block_lse_scores

    n = 17 * BK + 50  # 18 key blocks, the last partial
    q, k, _ = clustered(1, 2, n, 64, seed=5)
    q_pool, k_i8, k_s, top, kbar = _lse_inputs(q, k, 64)
    kw, exact = dict(key_stride=stride, key_top=top), None
    if guard:
        sim = quant_pool(k, BK, 64, mean=k.mean(2), want_pool=False, want_sim=True, sim_kind="energy")[3]
        sim[..., [3, 16]] = 0.0  # block 16: the first of the second 16-block tile
        kw.update(key_sim=sim, exact_below=LSE_EXACT_SIM)
        exact = sim < LSE_EXACT_SIM
        exact[..., -1] = True
        assert 2 <= int(exact[0, 0].sum()) < 18
    want, want_mean = block_lse_scores(q_pool, k_i8, k_s, 0.125, n, BK, want_mean=True,
                                       kbar=(kbar[0].float(), kbar[1]), stride=stride, exact=exact, top=top)
    for launch in (Launch(block=64), Launch(block=128, num_warps=8), Launch(block=64, programs=1),
                   helper_launches_for(9)["block_lse"]):
        got, got_mean = kern.block_lse_scores(q_pool, k_i8, k_s, 0.125, n, BK, want_mean=True, launch=launch,
                                              kbar=kbar, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_mean, want_mean, rtol=1e-5, atol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on exp2 overflow, log2(0)
def test_block_lse_scores_far_from_the_first_block_stay_finite():
    """Every block's lse is taken relative to its program's first block (no max of its own): a
    block 300 log2 units above it is clamped at +128 (it still outranks every other), one 300
    below at -126 (negligible either way), the blocks in between match the reference; by pointers
    and by TMA alike."""
    kern = pytest.importorskip("sparge_attention.kernels.block_scores")
    from sparge_attention.kernels.config import Launch
    from sparge_attention.sparge_core.reference_predict import block_lse_scores

    g = torch.Generator().manual_seed(3)
    D, n = 64, 4 * BK
    q_pool = torch.randn(1, 1, 2, D, generator=g)
    k_i8 = torch.randint(-127, 128, (1, 1, n, D), generator=g, dtype=torch.int8)
    k_i8[0, 0, BK:2 * BK] = (q_pool[0, 0, 0] / q_pool[0, 0, 0].abs().max() * 127).round().to(torch.int8)  # aligned
    k_i8[0, 0, 2 * BK:3 * BK] = -k_i8[0, 0, BK:2 * BK]  # anti-aligned
    k_s = torch.tensor([[[0.01, 0.05, 0.05, 0.01]]])
    scale = 1.0
    exact = block_lse_scores(q_pool, k_i8, k_s, scale, n, BK, stride=1)[0, 0]
    assert exact[0, 1] - exact[0, 0] > 200 and exact[0, 0] - exact[0, 2] > 200  # the regimes this test is about
    for launch in (Launch(block=64), Launch(block=64, tma=True)):
        got = kern.block_lse_scores(q_pool, k_i8, k_s, scale, n, BK, launch=launch)[0, 0]
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[:, [0, 3]], exact[:, [0, 3]], rtol=1e-5, atol=1e-4)
        ref = got[0, 0]  # the clamps sit at the kernel's own rounding of ref (a few of the scores' units)
        torch.testing.assert_close(got[0, 1], ref + 128, rtol=0, atol=1e-2)
        torch.testing.assert_close(got[0, 2], ref - 126, rtol=0, atol=1e-2)
        assert got[0].argmax() == 1


# ----------------------------------------------------------------------------- K mean + V max
@settings(max_examples=10, deadline=None, phases=NO_SHRINK)
@given(n=st.integers(1, 700), dk=st.sampled_from([64, 80, 128]), dv=st.sampled_from([64, 80, 128]),
       heads=st.sampled_from([(1, 1), (2, 3)]), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       seed=st.integers(0, 2**16))
def test_kv_stats_matches_torch(n, dk, dv, heads, dtype, seed):
    from sparge_attention.kernels.kv_stats import kv_stats

    g = torch.Generator().manual_seed(seed)
    B, H = heads
    k = (torch.randn(B, H, n, dk, generator=g) * 3 + 1).to(dtype)
    v = (torch.randn(B, H, n, dv, generator=g) * 5).to(dtype)
    if seed % 2:  # strided views are read in place
        k = torch.randn(B, n, H, dk, generator=g).to(dtype).transpose(1, 2)
    mean, amax = kv_stats(k, v)
    assert mean.dtype == amax.dtype == torch.float32
    torch.testing.assert_close(mean, k.float().mean(dim=2), rtol=1e-5, atol=1e-5)
    assert torch.equal(amax, v.float().abs().amax(dim=2))
    # the sampled mean the sparse call uses: the reference's smoothing vector (short sequences: the
    # first run alone)
    from sparge_attention.sparge_core.reference_quant import KMEAN_SAMPLE

    mean_s, amax_s = kv_stats(k, v, k_sample=KMEAN_SAMPLE)
    torch.testing.assert_close(mean_s, key_mean(k.float())[:, :, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(amax_s, amax)
    # V's fp8 scale as the reference quantizer computes it (zero channels at its floor)
    from sparge_attention.sparge_core.reference_quant import FP8_MAX, TINY

    v[..., :3] = 0
    _, v_scale = kv_stats(k, v, v_format_max=FP8_MAX)
    torch.testing.assert_close(v_scale, (v.float().abs().amax(dim=2) / FP8_MAX).clamp_min(TINY), rtol=1e-6, atol=0)


@pytest.mark.parametrize("stages,block,programs", [(1, 32, 1024), (3, 32, 3), (2, 64, 5)])
def test_kv_stats_same_for_every_launch_shape(stages, block, programs):
    """Loads in flight ahead (cp.async on a GPU) or not, other row steps and chunk counts: the same
    mean and scale up to the summation order."""
    from sparge_attention.kernels.config import Launch
    from sparge_attention.kernels.kv_stats import kv_stats

    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(1, 2, 9 * 64 + 13, 64, generator=g) for _ in range(2))
    want_mean, want_vmax = k.mean(2), v.abs().amax(2)
    got_mean, got_vmax = kv_stats(k, v, launch=Launch(num_stages=stages, block=block, programs=programs))
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_vmax, want_vmax)
    # K's sampled mean (the reference's key_mean), runs of 32 and 64 rows
    for sample in ((32, 8), (64, 2)):
        got_mean, got_vmax = kv_stats(k, v, launch=Launch(num_stages=stages, block=block, programs=programs),
                                      k_sample=sample)
        rows, every = sample
        want = k[:, :, (torch.arange(k.shape[2]) // rows) % every == 0].mean(2)
        torch.testing.assert_close(got_mean, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got_vmax, want_vmax)


def test_kv_stats_sampled_mean_through_a_permutation():
    """With a token permutation (Hilbert order) the sample is taken in the permuted order, as the
    reference smooths the permuted keys; the full mean and V's max do not depend on the order."""
    from sparge_attention.kernels.kv_stats import kv_stats
    from sparge_attention.sparge_core.reference_quant import KMEAN_SAMPLE

    g = torch.Generator().manual_seed(6)
    n = 700
    k, v = (torch.randn(1, 2, n, 64, generator=g) + torch.linspace(-3, 3, n)[:, None] for _ in range(2))
    perm = torch.randperm(n, generator=g).to(torch.int32)
    got_mean, got_vmax = kv_stats(k, v, k_sample=KMEAN_SAMPLE, perm=perm)
    torch.testing.assert_close(got_mean, key_mean(k[:, :, perm.long()])[:, :, 0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got_mean, key_mean(k)[:, :, 0], atol=1e-2)  # the order matters for a sample
    assert torch.equal(got_vmax, v.abs().amax(2))
    full_mean, _ = kv_stats(k, v, perm=perm)
    torch.testing.assert_close(full_mean, k.mean(2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="perm"):
        kv_stats(k, v, k_sample=KMEAN_SAMPLE, perm=perm[:-1])


def test_kv_stats_rejects_bad_input():
    from sparge_attention.kernels.kv_stats import kv_stats

    with pytest.raises(ValueError):
        kv_stats(torch.randn(1, 2, 10, 64), torch.randn(1, 2, 11, 64))
    with pytest.raises(ValueError):
        kv_stats(torch.randn(2, 10, 64), torch.randn(2, 10, 64))


# ---------------------------------------------------------------------------------------
# the error target's measurement (kernels/sampled_error.py) against its torch ops
# ---------------------------------------------------------------------------------------

def _measured_call(B, H, Hkv, N, Nk, D, dtype, seed, token_major=False):
    g = torch.Generator().manual_seed(seed)
    if token_major:  # ComfyUI's (B, N, H*D) activations seen as (B, H, N, D)
        q = torch.randn(B, N, H * D, generator=g).to(dtype).view(B, N, H, D).transpose(1, 2)
        k, v = (torch.randn(B, Nk, Hkv * D, generator=g).to(dtype).view(B, Nk, Hkv, D).transpose(1, 2)
                for _ in range(2))
    else:
        q = torch.randn(B, H, N, D, generator=g).to(dtype)
        k, v = (torch.randn(B, Hkv, Nk, D, generator=g).to(dtype) for _ in range(2))
    k = k * 2  # peakier rows than N(0, 1) keys give
    exact = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(H // Hkv, 1),
                                           v.float().repeat_interleave(H // Hkv, 1))
    # head h errs by about 0.02 * (h + 1)
    noise = torch.randn(exact.shape, generator=g) * (0.02 * torch.arange(1, H + 1))[None, :, None, None]
    return q, k, v, (exact + noise * exact.abs().mean()).to(dtype)


@pytest.mark.parametrize("B,H,Hkv,N,Nk,D,R,token_major,programs", [
    (1, 2, 2, 70, 130, 32, 5, False, 1024),  # a few rows, two key splits with a ragged end
    (2, 4, 2, 100, 257, 40, 80, True, 1024),  # GQA, D padded to 64, two row tiles, five splits
    (1, 2, 1, 64, 64, 16, 70, False, 1),  # MQA, more rows than tokens (repeats), one split
    (1, 1, 1, 40, 70, 160, 9, True, 1024),  # past 128 channels: 32-row, 32-key tiles
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sampled_error_kernels_match_torch(B, H, Hkv, N, Nk, D, R, token_major, programs, dtype):
    from sparge_attention.kernels.sampled_error import sampled_error_sums

    q, k, v, out = _measured_call(B, H, Hkv, N, Nk, D, dtype, seed=R, token_major=token_major)
    rows = torch.randint(0, N, (R,), generator=torch.Generator().manual_seed(1))
    rows[1] = rows[0]  # a repeated row counts twice

    def want(scale):  # exact attention in float64, rounded to the model's dtype
        kk, vv = (t.double().repeat_interleave(H // Hkv, 1) for t in (k, v))
        exact = torch.softmax(q.double()[:, :, rows] @ kk.transpose(-1, -2) * scale, -1) @ vv
        exact = exact.to(dtype).double()
        return torch.stack([(out.double()[:, :, rows] - exact).abs().sum((0, 2, 3)), exact.abs().sum((0, 2, 3))])

    start = torch.tensor([[1.0] * H, [2.0] * H], dtype=torch.float64)
    got = sampled_error_sums(q, k, v, out, rows, start.clone(), programs=programs) - start  # adds into acc
    # fp32 scores, P.V at about fp32: the exact rows round to the dtype as float64's do but for a
    # value or two on a rounding boundary
    assert torch.allclose(got, want(D ** -0.5), rtol=2e-3), (got, want(D ** -0.5))
    ratio = (got[0] / got[1]).tolist()
    assert ratio == sorted(ratio)  # the heads' errors grow as built
    scaled = sampled_error_sums(q, k, v, out, rows, scale=0.05)  # a fresh accumulator, zeroed by the kernel
    assert torch.allclose(scaled, want(0.05), rtol=2e-3)


def test_sampled_error_kernels_reject_bad_input():
    from sparge_attention.kernels.sampled_error import sampled_error_sums

    q, k, v, out = _measured_call(1, 2, 2, 64, 64, 16, torch.float16, seed=0)
    rows, acc = torch.arange(4), torch.zeros(2, 2, dtype=torch.float64)
    for args, what in [((q.float(), k, v, out, rows, acc), "fp16 or bf16"),
                       ((q, k[:, :, :, :8], v, out, rows, acc), "k and v"),
                       ((q, k, v, out, rows, acc.float()), "acc"),
                       ((q, k, v, out, rows.float(), acc), "rows"),
                       ((q, k.transpose(2, 3), v, out, rows, acc), "k and v")]:
        with pytest.raises(ValueError, match=what):
            sampled_error_sums(*args)


def test_sampled_error_kernels_draw_rows_from_a_seed_and_read_a_table():
    """Rows drawn in the kernels from a seed are `sampled_rows`' rows; with an address table the
    kernels read q, k, v, out, the sums and the seed from it (a CUDA graph replayed on other
    tensors: the tensors passed only give layouts)."""
    from sparge_attention.kernels.sampled_error import sampled_error_sums, sampled_rows

    B, H, N, D = 2, 2, 90, 32
    q, k, v, out = _measured_call(B, H, H, N, N, D, torch.bfloat16, seed=4, token_major=True)
    rows = sampled_rows(12345, 70, N, "cpu")
    assert rows.dtype == torch.int64 and rows.shape == (70,) and 0 <= int(rows.min()) and int(rows.max()) < N
    assert torch.equal(rows, sampled_rows(12345, 70, N, "cpu"))
    assert not torch.equal(rows, sampled_rows(12346, 70, N, "cpu"))
    assert len(set(rows.tolist())) > 40  # spread over the tokens, not a few repeated
    want = sampled_error_sums(q, k, v, out, rows)
    assert torch.allclose(sampled_error_sums(q, k, v, out, (70, 12345)), want, rtol=1e-12)
    # the table: the real tensors' addresses; the tensors passed are stand-ins of the same layouts
    acc = torch.full((2, H), 7.0, dtype=torch.float64)  # garbage: fresh=True zeroes it
    table = torch.zeros(8, dtype=torch.int64)
    table[:6] = torch.tensor([q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), acc.data_ptr(), 12345])
    stand = [torch.zeros_like(t) for t in (q, k, v, out)]
    assert all(s.stride() == t.stride() for s, t in zip(stand, (q, k, v, out)))
    ret = sampled_error_sums(*stand, (70, None), torch.zeros(2, H, dtype=torch.float64), fresh=True, table=table)
    assert torch.allclose(acc, want, rtol=1e-12) and not ret.any()  # written through the table only
    sampled_error_sums(*stand, (70, None), torch.zeros(2, H, dtype=torch.float64), table=table)
    assert torch.allclose(acc, 2 * want, rtol=1e-12)  # not fresh: added
    # a sparse call's table that measures too: three thresholds' slots before the sums and the seed
    wide = torch.zeros(16, dtype=torch.int64)
    wide[:4], wide[7:9] = table[:4], torch.tensor([acc.data_ptr(), 12345])
    sampled_error_sums(*stand, (70, None), torch.zeros(2, H, dtype=torch.float64), fresh=True, table=wide,
                       sums_slot=7)
    assert torch.allclose(acc, want, rtol=1e-12)
    with pytest.raises(ValueError, match="slot"):
        sampled_error_sums(*stand, (70, None), acc, table=table, sums_slot=7)  # the seed's slot past the table
    with pytest.raises(ValueError, match="seed"):
        sampled_error_sums(q, k, v, out, (70, None))
