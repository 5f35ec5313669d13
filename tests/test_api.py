"""The public entry point sparge_attention: layouts, Hilbert grids, stats, input validation and
the dense fallback. Mostly the PyTorch reference backend; the Hilbert grid is also checked on the
Triton backend in the CPU interpreter (its gather/scatter is fused into the kernels)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

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

from sparge_attention.sparge_core import SpargeBlockMask, SpargeParams, block_sizes, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.blockmask import causal_block_mask, num_blocks  # noqa: E402
from sparge_attention.sparge_core.hilbert import hilbert_order  # noqa: E402
from sparge_attention.sparge_core.reference import sparge_reference  # noqa: E402
from sparge_attention.sparge_core.reference_quant import expand_kv  # noqa: E402

CPU = torch.device("cpu")
BQ, BK = block_sizes(CPU, "reference")
INF = float("inf")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"




def smooth_grid(grid, n_tail, B, H, D, seed, amp=3.0, freq=0.2, dtype=torch.float32):
    """q and k share one smooth random field over the (t, h, w) grid (plus `n_tail` random text
    tokens): a token attends to tokens where the field is similar, i.e. nearby ones. In raster
    order a block mixes distant rows and is not self-similar; in Hilbert order blocks are compact."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    coords = coords.reshape(-1, 3).float()
    f = torch.sin(coords @ (torch.randn(3, D, generator=g) * freq) + torch.rand(D, generator=g) * 6.28)
    f = f[None, None].expand(B, H, -1, -1)

    def make():
        x = amp * f + 0.2 * torch.randn(B, H, f.shape[2], D, generator=g)
        return torch.cat([x, torch.randn(B, H, n_tail, D, generator=g)], 2).to(dtype)

    return make(), make(), torch.randn(B, H, t * h * w + n_tail, D, generator=g).to(dtype)


def grid_perm(grid, n_tokens):
    n_grid = math.prod(grid)
    return torch.cat([hilbert_order(*grid), torch.arange(n_grid, n_tokens)])


PARAMS = SpargeParams(simthreshd1=0.3, cdfthreshd=0.9, pvthreshd=8.0)


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("Hkv", [2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_hnd_and_nhd_give_the_same_result(Hkv, causal):
    q, k, v = clustered(2, 2, 300, 64, seed=1, Hkv=Hkv)
    params = PARAMS.replace(is_causal=causal)
    out_h, st_h = sparge_attention(q, k, v, params, return_stats=True)
    nhd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    out_n, st_n = sparge_attention(*nhd, params, layout="NHD", return_stats=True)
    assert out_n.shape == (2, 300, 2, 64)
    torch.testing.assert_close(out_n.transpose(1, 2), out_h, rtol=0, atol=0)
    assert torch.equal(st_h.block_mask.to_dense(), st_n.block_mask.to_dense())
    # a non-contiguous NHD view (ComfyUI's (B, N, H*D) reshaped) works the same
    views = [x.transpose(1, 2) for x in (q, k, v)]
    out_v = sparge_attention(*views, params, layout="NHD")
    torch.testing.assert_close(out_v, out_n, rtol=0, atol=0)


def test_reference_backend_is_the_reference():
    q, k, v = clustered(1, 2, 300, 64, seed=2)
    out, st = sparge_attention(q, k, v, PARAMS, return_stats=True)
    ref, mask, skipped = sparge_reference(q, k, v, PARAMS, BQ, BK, pv_dtype="fp16")
    assert st.backend == "reference"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(st.block_mask.to_dense(), mask)
    assert int(st.pv_skipped) == int(skipped.sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_and_explicit_scale(dtype):
    q, k, v = clustered(1, 2, 256, 64, seed=3, dtype=dtype)
    out = sparge_attention(q, k, v, PARAMS, scale=0.05)
    assert out.dtype == dtype and out.shape == q.shape
    ref, _, _ = sparge_reference(q, k, v, PARAMS, BQ, BK, scale=0.05, pv_dtype="fp16")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Hilbert grid
@pytest.mark.parametrize("grid,n_tail", [((2, 12, 20), 0), ((3, 10, 15), 0), ((2, 10, 19), 40)])
def test_grid_equals_reference_on_permuted_tokens(grid, n_tail):
    q, k, v = smooth_grid(grid, n_tail, 1, 2, 64, seed=sum(grid))
    N = q.shape[2]
    out, st = sparge_attention(q, k, v, PARAMS, grid=grid, return_stats=True)
    assert st.sparsity > 0.2  # the mask is not trivially dense
    perm = grid_perm(grid, N)
    assert torch.equal(perm[math.prod(grid):], torch.arange(math.prod(grid), N))  # text tokens stay
    ref_p, mask, _ = sparge_reference(q[:, :, perm], k[:, :, perm], v[:, :, perm], PARAMS, BQ, BK, pv_dtype="fp16")
    ref = torch.empty_like(ref_p)
    ref[:, :, perm] = ref_p  # back to raster order
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(st.block_mask.to_dense(), mask)
    # n_grid_tokens, when given, must agree
    out2 = sparge_attention(q, k, v, PARAMS, grid=grid, n_grid_tokens=math.prod(grid))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_grid_order_raises_sparsity_on_grid_data():
    grid = (2, 12, 20)
    q, k, v = smooth_grid(grid, 0, 1, 2, 64, seed=4)
    _, raster = sparge_attention(q, k, v, PARAMS, return_stats=True)
    _, hilbert = sparge_attention(q, k, v, PARAMS, grid=grid, return_stats=True)
    assert hilbert.sparsity > raster.sparsity + 0.2, (hilbert.sparsity, raster.sparsity)


@pytest.mark.skipif(not INTERPRET, reason="needs the Triton CPU interpreter")
@pytest.mark.parametrize("grid,n_tail,nk_tail", [((2, 12, 16), 0, 0), ((2, 10, 19), 40, 40), ((2, 10, 19), 20, 75)])
def test_grid_on_triton_matches_reference_on_permuted_tokens(grid, n_tail, nk_tail):
    """The Triton path gathers/scatters the Hilbert order inside its kernels; the reference
    backend permutes tensors. Same tokens in the same blocks: same mask, same output."""
    q, _, _ = smooth_grid(grid, n_tail, 1, 2, 64, seed=5, dtype=torch.bfloat16)
    _, k, v = smooth_grid(grid, nk_tail, 1, 2, 64, seed=5, dtype=torch.bfloat16)  # same field, other tail
    N, Nk = q.shape[2], k.shape[2]
    tq, tk = block_sizes(CPU, "triton")
    params = PARAMS.replace(pvthreshd=2.0)
    out, st = sparge_attention(q, k, v, params, grid=grid, backend="triton", return_stats=True)
    assert st.sparsity > 0.1
    pq, pk = grid_perm(grid, N), grid_perm(grid, Nk)
    ref_p, mask, skipped = sparge_reference(q[:, :, pq], k[:, :, pk], v[:, :, pk], params, tq, tk, pv_dtype="fp8")
    ref = torch.empty_like(ref_p)
    ref[:, :, pq] = ref_p
    assert torch.equal(st.block_mask.to_dense(), mask)
    assert int(st.pv_skipped) == int(skipped.sum())
    assert rel_l1(out, ref) < 0.01


# ----------------------------------------------------------------------------- stats
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hkv", [2, 1])
def test_stats_fields(causal, Hkv):
    B, H, N = 2, 2, 300
    q, k, v = clustered(B, H, N, 64, seed=7, Hkv=Hkv)
    out, st = sparge_attention(q, k, v, PARAMS.replace(is_causal=causal), return_stats=True)
    NQ, NK = num_blocks(N, BQ), num_blocks(N, BK)
    assert st.backend == "reference" and st.dense_reason is None
    assert (st.block_q, st.block_k, st.heads) == (BQ, BK, H)
    assert isinstance(st.block_mask, SpargeBlockMask) and st.block_mask.shape == (B, H, NQ, NK)
    per_head = int(causal_block_mask(NQ, NK, BQ, BK, N, N).sum()) if causal else NQ * NK
    assert st.total_blocks == B * H * per_head
    assert int(st.kept_blocks) == st.block_mask.kept() <= st.total_blocks
    assert 0.0 <= st.sparsity <= 1.0
    assert st.sparsity == pytest.approx(1 - int(st.kept_blocks) / st.total_blocks)
    assert 0 <= int(st.pv_skipped) <= int(st.kept_blocks)
    assert 0.0 <= st.pv_skip_fraction <= 1.0
    d = st.as_dict()
    assert d["backend"] == "reference" and d["kept_blocks"] == int(st.kept_blocks)
    assert d["total_blocks"] == st.total_blocks and d["sparsity"] == st.sparsity
    if causal:  # the block mask never reaches into the future
        assert not (st.block_mask.to_dense() & ~causal_block_mask(NQ, NK, BQ, BK, N, N)).any()


def test_stats_with_user_mask_and_triton_name():
    q, k, v = clustered(1, 2, 256, 64, seed=8)
    NQ, NK = num_blocks(256, BQ), num_blocks(256, BK)
    mask = torch.zeros(1, 1, NQ, NK, dtype=torch.bool)
    mask[..., 0] = True
    _, st = sparge_attention(q, k, v, PARAMS, block_mask=mask, return_stats=True)
    assert int(st.kept_blocks) == 2 * NQ and st.total_blocks == 2 * NQ * NK
    assert st.sparsity == pytest.approx(1 - 1 / NK)
    if INTERPRET:
        tq, tk = block_sizes(CPU, "triton")
        _, st_t = sparge_attention(q, k, v, PARAMS, backend="triton", return_stats=True)
        assert st_t.backend == "triton" and (st_t.block_q, st_t.block_k) == (tq, tk)
        assert 0.0 <= st_t.sparsity <= 1.0


# ----------------------------------------------------------------------------- dense fallback
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hkv", [2, 1])
def test_short_sequence_falls_back_to_dense(causal, Hkv):
    n = BQ - 1
    q, k, v = clustered(1, 2, n, 64, seed=9, Hkv=Hkv)
    out, st = sparge_attention(q, k, v, PARAMS.replace(is_causal=causal), return_stats=True)
    assert st.backend == "dense"
    assert "block" in st.dense_reason and str(n) in st.dense_reason
    assert st.sparsity == 0.0 and st.as_dict()["dense_reason"] == st.dense_reason
    ref = F.scaled_dot_product_attention(q, expand_kv(k, 2), expand_kv(v, 2), is_causal=causal)
    torch.testing.assert_close(out, ref)
    # NHD too, and without stats
    out_n = sparge_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), PARAMS.replace(is_causal=causal),
                             layout="NHD")
    torch.testing.assert_close(out_n, ref.transpose(1, 2))


def test_large_head_dim_falls_back_to_dense():
    q, k, v = clustered(1, 1, 256, 160, seed=10)
    out, st = sparge_attention(q, k, v, PARAMS, return_stats=True)
    assert st.backend == "dense" and "head dim" in st.dense_reason
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


# ----------------------------------------------------------------------------- bad inputs
def qkv(B=1, H=2, N=256, D=64, dtype=torch.float32, Hkv=None):
    g = torch.Generator().manual_seed(0)
    Hkv = Hkv or H
    return (torch.randn(B, H, N, D, generator=g).to(dtype), torch.randn(B, Hkv, N, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, D, generator=g).to(dtype))


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4-D"):
        sparge_attention(q[0], k, v)
    with pytest.raises(ValueError, match="4-D"):
        sparge_attention(q, k[0], v)
    with pytest.raises(ValueError, match="4-D"):
        sparge_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), layout="NHD")
    with pytest.raises(ValueError, match="4-D"):
        sparge_attention(q[None], k[None], v[None])
    with pytest.raises(ValueError):
        sparge_attention([1.0], k, v)


def test_mismatched_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same shape"):
        sparge_attention(q, k, v[:, :, :200])
    with pytest.raises(ValueError, match="head dim"):
        sparge_attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="batch"):
        sparge_attention(q, torch.cat([k, k]), torch.cat([v, v]))
    q3 = torch.randn(1, 3, 256, 64)
    with pytest.raises(ValueError, match="GQA"):
        sparge_attention(q3, k, v)  # 3 query heads cannot share 2 kv heads


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int8])
def test_unsupported_dtype(dtype):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dtype"):
        sparge_attention(q.to(dtype), k.to(dtype), v.to(dtype))


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dtype"):
        sparge_attention(q.half(), k, v)


@pytest.mark.parametrize("name", ["simthreshd1", "cdfthreshd", "topk", "minshare", "pvthreshd"])
def test_nan_thresholds(name):
    kw = {name: float("nan")}
    if name in ("topk", "minshare"):
        kw["cdfthreshd"] = None
    with pytest.raises(ValueError, match="NaN"):
        SpargeParams(**kw)
    kw[name] = torch.tensor([0.5, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        SpargeParams(**kw)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01, INF])
def test_cdf_outside_range(value):
    with pytest.raises(ValueError, match="cdfthreshd"):
        SpargeParams(cdfthreshd=value)
    with pytest.raises(ValueError, match="cdfthreshd"):
        SpargeParams(cdfthreshd=torch.tensor([0.5, value]))


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_topk_outside_range(value):
    with pytest.raises(ValueError, match="topk"):
        SpargeParams(topk=value)


def test_other_param_ranges():
    with pytest.raises(ValueError, match="simthreshd1"):
        SpargeParams(simthreshd1=1.5)
    with pytest.raises(ValueError, match="simthreshd1"):
        SpargeParams(simthreshd1=-1.5)
    with pytest.raises(ValueError, match="pvthreshd"):
        SpargeParams(pvthreshd=0.0)
    with pytest.raises(ValueError, match="pvthreshd"):
        SpargeParams(pvthreshd=-3.0)
    with pytest.raises(ValueError, match="is_causal"):
        SpargeParams(is_causal=1)
    with pytest.raises(ValueError):
        SpargeParams(cdfthreshd=torch.ones(2, 2) * 0.5)  # not 1-D
    # the extremes are legal
    SpargeParams(simthreshd1=-1, cdfthreshd=1.0, pvthreshd=INF)
    SpargeParams(simthreshd1=1.0, topk=1.0)


def test_both_cdf_and_topk():
    with pytest.raises(ValueError, match="exactly one"):
        SpargeParams(cdfthreshd=0.9, topk=0.5)
    assert SpargeParams().mode == "cdf" and SpargeParams(topk=0.5).mode == "topk"


@pytest.mark.parametrize("name,values", [
    ("cdfthreshd", [0.9, 0.95, 0.99]),
    ("simthreshd1", [0.1, 0.2, 0.3]),
    ("pvthreshd", [4.0, 8.0, 16.0]),
])
def test_per_head_wrong_length(name, values):
    q, k, v = qkv(H=2)
    params = SpargeParams(**{name: torch.tensor(values)})
    with pytest.raises(ValueError, match="per-head"):
        sparge_attention(q, k, v, params)
    # the right length works
    sparge_attention(q, k, v, SpargeParams(**{name: torch.tensor(values[:2])}))


def test_per_head_copies_follow_thresholds_moved_in_place():
    """The error-target adaptation moves a SpargeParams' threshold tensor in place; a device copy
    cached from its old values would keep the kernel on them (a GPU's copy is not the CPU tensor
    itself). The meta device stands in for a GPU: its copies are separate tensors. New values go
    into the same device tensor, so its address (which a CUDA graph of the call reads) stays."""
    t = torch.tensor([1.0, 2.0])
    p = SpargeParams(minshare=t)
    first = p.per_head("minshare", 2, "meta")
    assert p.per_head("minshare", 2, "meta") is first  # unchanged values: the cached copy, no new transfer
    t.mul_(2.0)
    moved = p.per_head("minshare", 2, "meta")
    assert moved is first  # the new values copied into the device tensor
    assert torch.equal(p.per_head("minshare", 2), torch.tensor([2.0, 4.0]))
    assert p.per_head("pvthreshd", 2, "meta") is p.per_head("pvthreshd", 2, "meta")  # numbers: cached once


def test_per_head_topk_wrong_length():
    q, k, v = qkv(H=2)
    with pytest.raises(ValueError, match="per-head"):
        sparge_attention(q, k, v, SpargeParams(topk=torch.tensor([0.5, 0.5, 0.5, 0.5])))


def test_grid_not_matching_token_count():
    q, k, v = qkv(N=256)
    with pytest.raises(ValueError, match="grid"):
        sparge_attention(q, k, v, PARAMS, grid=(2, 16, 9))  # 288 > 256 tokens
    with pytest.raises(ValueError, match="n_grid_tokens"):
        sparge_attention(q, k, v, PARAMS, grid=(2, 8, 16), n_grid_tokens=200)
    with pytest.raises(ValueError, match="grid"):
        sparge_attention(q, k, v, PARAMS, grid=(0, 8, 16))
    with pytest.raises(ValueError, match="grid"):
        sparge_attention(q, k, v, PARAMS, grid=(16, 16))
    # a grid smaller than the sequence is legal: the rest are tail (text) tokens
    sparge_attention(q, k, v, PARAMS, grid=(2, 8, 15))


def test_block_mask_of_wrong_shape():
    q, k, v = qkv(N=256)
    NQ, NK = num_blocks(256, BQ), num_blocks(256, BK)
    with pytest.raises(ValueError, match="blocks"):
        sparge_attention(q, k, v, PARAMS, block_mask=torch.ones(1, 2, NQ + 1, NK, dtype=torch.bool))
    with pytest.raises(ValueError, match="blocks"):
        sparge_attention(q, k, v, PARAMS, block_mask=torch.ones(1, 2, NQ, NK - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        sparge_attention(q, k, v, PARAMS, block_mask=torch.ones(1, 2, NQ, NK))
    with pytest.raises(ValueError, match="4-D"):
        sparge_attention(q, k, v, PARAMS, block_mask=torch.ones(NQ, NK, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        sparge_attention(q, k, v, PARAMS, block_mask=torch.ones(1, 3, NQ, NK, dtype=torch.bool))
    wrong_blocks = SpargeBlockMask.from_dense(torch.ones(1, 2, num_blocks(256, BK), num_blocks(256, BQ), dtype=torch.bool),
                                              BK, BQ, 256, 256)
    if (BQ, BK) != (BK, BQ):
        with pytest.raises(ValueError, match="blocks"):
            sparge_attention(q, k, v, PARAMS, block_mask=wrong_blocks)
    # broadcasting a (1, 1) mask over batch and heads is fine
    sparge_attention(q, k, v, PARAMS, block_mask=torch.ones(1, 1, NQ, NK, dtype=torch.bool))


@pytest.mark.parametrize("nk_delta", [-1, 1])
def test_compact_block_mask_with_wrong_key_blocks(nk_delta):
    """A SpargeBlockMask built for another key length: too few key blocks used to raise an
    IndexError in the reference, too many were accepted (and would send the kernel past K/V)."""
    q, k, v = qkv(N=256)
    NQ, NK = num_blocks(256, BQ), num_blocks(256, BK)
    nk = NK + nk_delta
    bm = SpargeBlockMask.from_dense(torch.ones(1, 2, NQ, nk, dtype=torch.bool), BQ, BK, 256, nk * BK)
    with pytest.raises(ValueError, match="block mask"):
        sparge_attention(q, k, v, PARAMS, block_mask=bm)
    with pytest.raises(ValueError, match="block mask"):  # wrong heads
        sparge_attention(q, k, v, PARAMS,
                         block_mask=SpargeBlockMask.from_dense(torch.ones(1, 1, NQ, NK, dtype=torch.bool), BQ, BK, 256, 256))
    good = SpargeBlockMask.from_dense(torch.ones(1, 2, NQ, NK, dtype=torch.bool), BQ, BK, 256, 256)
    out = sparge_attention(q, k, v, PARAMS, block_mask=good)
    torch.testing.assert_close(out, sparge_attention(q, k, v, PARAMS, block_mask=torch.ones(1, 1, NQ, NK, dtype=torch.bool)))


def test_other_bad_arguments():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout"):
        sparge_attention(q, k, v, layout="BHND")
    with pytest.raises(ValueError, match="backend"):
        sparge_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="pv_dtype"):
        sparge_attention(q, k, v, pv_dtype="int8")
    with pytest.raises(ValueError, match="scale"):
        sparge_attention(q, k, v, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        sparge_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="SpargeParams"):
        sparge_attention(q, k, v, {"cdfthreshd": 0.9})
    with pytest.raises(ValueError, match="empty"):
        sparge_attention(q[:, :, :0], k, v)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET a CPU tensor cannot run the Triton backend: a clear ValueError
    (the check reads the environment at call time, so no subprocess is needed)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="CUDA"):
        sparge_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        block_sizes(CPU, "triton")
    # "auto" quietly uses the reference on the CPU
    _, st = sparge_attention(q, k, v, return_stats=True)
    assert st.backend == "reference"
