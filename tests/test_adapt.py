"""Holding an error target online (sparge_core/adapt.py): the controller's steps, the sampled
measurement, and the adaptation loop on bench/robustness.py's regimes at small grids (CPU,
reference backend)."""
import math

import pytest
import torch
import torch.nn.functional as F

from devkit.metrics import rel_l1
from devkit.pack import load_pack
from devkit.realistic_inputs import make_regime_qkv

load_pack()
from sparge_attention.sparge_core import sparge_attention  # noqa: E402
from sparge_attention.sparge_core.adapt import (  # noqa: E402
    ALPHA, ALPHA_RANGE, DEADBAND, FIRST_STEP, MAX_STEP, MIN_SHARE, SEED_AGE, UP_DAMPING, ThresholdController,
    sample_rows, sampled_error)
from sparge_attention.sparge_core.params import MAX_MINSHARE  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402


def _sums(errors):
    """(2, H) sums that read as the given per-head rel-L1 (reference sum 100 per head)."""
    e = torch.tensor(errors, dtype=torch.float64)
    return torch.stack([e * 100.0, torch.full_like(e, 100.0)])


# ---------------------------------------------------------------------------------------
# ThresholdController
# ---------------------------------------------------------------------------------------

def _step(m, e, target, alpha, first):
    """The documented rule: m * exp(gap / alpha), gap = ln(target / e); steps toward more
    skipping damped by UP_DAMPING; at most FIRST_STEP (the first update) or MAX_STEP (later)."""
    s = math.log(target / e) / alpha
    s = s * UP_DAMPING if s > 0 else s
    lim = FIRST_STEP if first else MAX_STEP
    return m * math.exp(min(max(s, -lim), lim))


def test_moves_down_above_target_and_up_below():
    c = ThresholdController(0.04, 1.5, 2)
    c.update(_sums([0.06, 0.03]))  # head 0 above the target, head 1 below
    m = c.thresholds.tolist()
    assert m[0] < 1.5 < m[1]
    # one power-law step with the default exponent (no limit reached here)
    assert m[0] == pytest.approx(_step(1.5, 0.06, 0.04, ALPHA, True), rel=1e-5)
    assert m[1] == pytest.approx(_step(1.5, 0.03, 0.04, ALPHA, True), rel=1e-5)
    assert c.last_error.tolist() == pytest.approx([0.06, 0.03])
    assert c.updates == 1


def test_deadband_holds():
    c = ThresholdController(0.04, 1.5, 4)
    inside = 1 + 0.9 * DEADBAND
    outside = 1 + 1.2 * DEADBAND
    c.update(_sums([0.04 * inside, 0.04 / inside, 0.04 * outside, 0.04 / outside]))
    m = c.thresholds.tolist()
    assert m[0] == m[1] == 1.5
    assert m[2] < 1.5 < m[3]


def test_thresholds_updated_in_place():
    c = ThresholdController(0.04, 1.5, 3)
    t = c.thresholds
    c.update(_sums([0.1, 0.04, 0.01]))
    assert c.thresholds is t and t.dtype == torch.float32 and t.device.type == "cpu"
    assert t[0] < 1.5 and t[1] == 1.5 and t[2] > 1.5


@pytest.mark.parametrize("a,alpha", [(0.06, 0.1), (0.06, 0.45), (0.1, 0.45), (0.004, 0.45), (0.004, 1.0),
                                     (0.004, 1.3), (0.0005, 3.0)])
def test_secant_step(a, alpha):
    """A head whose error is e = a * m ** alpha, both measurements on one side of the target: the
    first step uses the default exponent, the second the slope through the two measurements (the
    true alpha, clamped to ALPHA_RANGE)."""
    target = 0.04
    err = lambda m: a * m ** alpha  # noqa: E731
    c = ThresholdController(target, 1.0, 1)
    c.update(_sums([err(1.0)]))
    m1 = c.thresholds.item()
    assert m1 == pytest.approx(_step(1.0, err(1.0), target, ALPHA, True), rel=1e-5)
    e1 = err(m1)
    assert (e1 > target) == (err(1.0) > target) and abs(math.log(e1 / target)) > math.log1p(DEADBAND)  # the setup
    c.update(_sums([e1]))
    used = min(max(alpha, ALPHA_RANGE[0]), ALPHA_RANGE[1])
    assert c.thresholds.item() == pytest.approx(_step(m1, e1, target, used, False), rel=1e-4)
    if used == alpha and abs(math.log(e1 / target)) / alpha < MAX_STEP and e1 > target:
        # a full (undamped, unclamped) step with the true slope lands on the target
        assert err(c.thresholds.item()) == pytest.approx(target, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 0.7, 1.0, 1.3, 2.0])
@pytest.mark.parametrize("a", [0.1, 0.3, 0.004])
def test_smooth_head_converges(a, alpha):
    """A smooth head (e = a * m ** alpha) is within the issue's +-25% from the 6th measurement on
    (from 2.5x / 7.5x above or 10x below the target), wherever its minshare for the target is in range."""
    target = 0.04
    need = (target / a) ** (1 / alpha)
    if not 2 * MIN_SHARE <= need <= MAX_MINSHARE / 2:
        pytest.skip(f"the target needs minshare {need:.3g}: outside the searched range")
    c = ThresholdController(target, 1.0, 1)
    errs = []
    for _ in range(10):
        errs.append(a * c.thresholds.item() ** alpha)
        c.update(_sums([errs[-1]]))
    late = [round(x / target, 2) for x in errs[5:]]
    assert all(abs(x - 1) <= 0.25 for x in late), f"e/target per update {[round(x / target, 2) for x in errs]}" \
        " (a smooth slope taken for a cliff?)"


@pytest.mark.parametrize("start", [0.3, 3.0])
def test_cliff_settles_on_the_safe_side(start):
    """Near-uniform attention: the error jumps 50x at minshare 1 (every block's share about even).
    No minshare holds the target; the head must mostly stay where the error is below it, not swing
    across the jump on every update as a plain secant step does."""
    target = 0.04
    c = ThresholdController(target, start, 1)
    miss = 0
    for i in range(23):  # 21 calls after the first two; a plain secant controller misses ~10 of them
        m = c.thresholds.item()
        miss += i >= 2 and m >= 1.0
        c.update(_sums([0.002 if m < 1.0 else 0.1]))
    assert miss <= 3


def test_a_severe_miss_is_not_retried_soon():
    """A minshare that erred 20x the target (the estimate failing on a whole block) is not tried
    again after the plain BRACKET_AGE: each retry costs a forward of that block at that error."""
    c = ThresholdController(0.04, 0.5, 1)
    crossings = []
    for i in range(30):  # about the updates one block gets in a 30-step run
        m = c.thresholds.item()
        if m >= 1.0:
            crossings.append(i)
        c.update(_sums([0.005 if m < 1.0 else 0.9]))
    assert crossings and max(crossings) <= 3, crossings  # found (bisecting) early, never tried again


def test_seed_from_another_block_kept_only_where_it_agrees():
    """A bracket seeded from the first block (a cliff between minshare 0.6 and 1.2) holds a block
    whose own error near 0.6 is like the seed's, and is dropped at once by a block that errs 5x
    less there (a smooth curve): that one climbs past the seed's cliff within a few updates."""
    target = 0.04
    seed = ((0.6, 0.009), (1.2, 0.9))

    def run(curve):
        c = ThresholdController(target, 0.6, 1)
        c.seed(*seed)
        ms = []
        for _ in range(6):
            m = c.thresholds.item()
            ms.append(m)
            c.update(_sums([curve(m)]))
        return ms

    alike = run(lambda m: 0.009 if m < 1.0 else 0.9)  # the seed's own cliff: held while the seed lives
    assert max(alike[:SEED_AGE + 1]) < 1.0, alike
    smooth = run(lambda m: 0.0018 * m ** 0.7)  # 5x below the seed at 0.6, on target near m = 230
    assert smooth[3] > 2.5, smooth


def test_step_limited():
    c = ThresholdController(0.04, 1.0, 2)
    c.update(_sums([1e-4, 1.0]))  # 400x below / 25x above: the power-law step would be far larger
    assert c.thresholds.tolist() == pytest.approx([math.exp(FIRST_STEP), math.exp(-FIRST_STEP)], rel=1e-6)
    c.update(_sums([1e-4, 1.0]))
    assert c.thresholds.tolist() == pytest.approx([math.exp(FIRST_STEP + MAX_STEP), math.exp(-FIRST_STEP - MAX_STEP)],
                                                  rel=1e-6)
    assert FIRST_STEP <= math.log(4.0) + 1e-9 and MAX_STEP <= FIRST_STEP  # the brief: at most 4x a step
    c = ThresholdController(0.04, 40.0, 1)
    c.update(_sums([1e-4]))
    assert c.thresholds.item() == MAX_MINSHARE


def test_keep_all_floor_when_the_target_needs_everything():
    c = ThresholdController(0.02, 0.05, 1)
    c.update(_sums([0.2]))  # the step down from 0.05 ends below MIN_SHARE: keep every block
    assert c.thresholds.item() == 0.0
    c.update(_sums([0.05]))  # still above (quantization floor): stays at keep-all
    assert c.thresholds.item() == 0.0
    c.update(_sums([0.005]))  # below: back to the lowest sparse setting
    assert c.thresholds.item() == pytest.approx(MIN_SHARE)


def test_unmeasured_heads_left_alone():
    c = ThresholdController(0.04, 1.5, 3)
    sums = torch.tensor([[8.0, float("nan"), 1.0], [100.0, 100.0, 0.0]], dtype=torch.float64)
    c.update(sums)
    assert c.thresholds[0] < 1.5 and c.thresholds[1] == 1.5 and c.thresholds[2] == 1.5
    assert math.isnan(c.last_error[1]) and math.isnan(c.last_error[2])


def test_target_must_be_positive():
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            ThresholdController(bad, 1.0, 2)


# ---------------------------------------------------------------------------------------
# sampled_error, sample_rows
# ---------------------------------------------------------------------------------------

def _direct_sums(q, k, v, out, rows, scale):
    """Per head, sum |out - exact| and sum |exact| over the rows, exact in float64 by hand."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(H // Hkv, 1)
    vv = v.double().repeat_interleave(H // Hkv, 1)
    qr = q.double()[:, :, rows]
    p = torch.softmax(qr @ kk.transpose(-1, -2) * scale, -1)
    exact = p @ vv
    o = out.double()[:, :, rows]
    return torch.stack([(o - exact).abs().sum((0, 2, 3)), exact.abs().sum((0, 2, 3))])


@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_sampled_error_matches_direct(hkv, scale):
    g = torch.Generator().manual_seed(3)
    B, H, N, Nk, D = 2, 4, 200, 150, 32
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, hkv, Nk, D, generator=g)
    v = torch.randn(B, hkv, Nk, D, generator=g) + 0.5
    exact = F.scaled_dot_product_attention(q, k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1),
                                           scale=scale)
    # head h gets an error of about 0.02 * (h + 1): the sums must tell the heads apart
    noise = torch.randn(exact.shape, generator=g) * exact.abs().mean()
    out = exact + noise * (0.02 * torch.arange(1, H + 1, dtype=torch.float32))[None, :, None, None]
    rows = torch.tensor([0, 5, 5, 199, 77, 120])  # a repeated row counts twice
    got = sampled_error(q, k, v, out, rows, scale=scale)
    assert got.shape == (2, H) and got.dtype == torch.float64
    want = _direct_sums(q, k, v, out, rows, D ** -0.5 if scale is None else scale)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    ratio = (got[0] / got[1]).tolist()
    assert ratio == sorted(ratio)  # error grows with the head index, as built
    exact_sums = sampled_error(q, k, v, exact, rows, scale=scale)
    assert (exact_sums[0] <= 1e-5 * exact_sums[1]).all()
    acc = torch.ones(2, H, dtype=torch.float64)  # a block's sums of the forward so far: added into
    assert sampled_error(q, k, v, out, rows, scale=scale, acc=acc) is acc
    assert torch.allclose(acc, got + 1, rtol=1e-12)


def test_sample_rows():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r = sample_rows(1000, 256, "cpu", g1)
    assert r.shape == (256,) and r.dtype == torch.int64 and 0 <= r.min() and r.max() < 1000
    assert torch.equal(r, sample_rows(1000, 256, "cpu", g2))  # the generator decides
    assert sample_rows(100, 256, "cpu").shape == (100,)  # never more rows than tokens
    assert len(set(r.tolist())) > 200  # spread over the sequence, not one row repeated


# ---------------------------------------------------------------------------------------
# the adaptation loop on the robustness regimes, small grids
# ---------------------------------------------------------------------------------------
# 4 x 16 x 32 = 2048 video tokens: 16 key blocks of 128 and 32 query blocks of 64. At 4 x 8 x 16
# there are 4 key blocks, one block more or less per row moves the density by 25%, and an earlier
# controller missed Balanced by 60% on the sink regime there. Text: 64 and 128 tokens stand for
# 256 and 512; the large-grid regime (Wan 720p) is a 1.9x larger grid here, with 2 heads.
GRID, HEADS, HEAD_DIM, STEPS = (4, 16, 32), 4, 64, 6
SMALL = {"tuned": {}, "content": {}, "sink": {}, "uniform": {}, "peaked": {},
         "text256": {"n_text": 64}, "text512": {"n_text": 128}, "wan720": {"grid": (4, 24, 40), "heads": 2}}
# Measured here (CPU reference backend, seed 0, 6 steps, 2026-12-02): every regime but "uniform"
# ends at 0.94-1.05x the target for Quality..Turbo (worst head <= 1.17x), while the fixed presets
# land at 1.15-2.44x (at 16 key blocks one preset minshare keeps too little). +-35% leaves room for
# the noise of 256 sampled rows (the sampled estimate differs from the whole-output error by up to
# ~15% per step), for one block of granularity and for controller retuning.
TOL = 0.35
_cache = {}


def _regime(name):
    if name not in _cache:
        kw = dict(SMALL[name])
        grid, heads = kw.pop("grid", GRID), kw.pop("heads", HEADS)
        q, k, v, info = make_regime_qkv(name, grid=grid, heads=heads, head_dim=HEAD_DIM, seed=0, **kw)
        truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        _cache[name] = (q, k, v, truth, info["grid"])
    return _cache[name]


def _run(name, preset, steps=STEPS):
    q, k, v, truth, grid = _regime(name)
    p = PRESETS[preset]
    out, st_f = sparge_attention(q, k, v, p.params(), grid=grid, return_stats=True)
    fixed = rel_l1(out, truth), st_f.sparsity
    ctrl = ThresholdController(p.target_rel_l1, p.minshare, q.shape[1])
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        out = sparge_attention(q, k, v, p.params(minshare=ctrl.thresholds.clone()), grid=grid)
        ctrl.update(sampled_error(q, k, v, out, sample_rows(q.shape[2], 256, q.device, gen)))
    out, st_a = sparge_attention(q, k, v, p.params(minshare=ctrl.thresholds.clone()), grid=grid, return_stats=True)
    per_head = rel_l1(out, truth, dims=(0, 2, 3))
    return fixed, (rel_l1(out, truth), per_head.max().item(), st_a.sparsity), ctrl


def _dist(e, target):
    return abs(math.log(e / target))


@pytest.mark.parametrize("preset", ["Balanced", "Fast"])
@pytest.mark.parametrize("regime", ["tuned", "content", "sink", "peaked", "text256", "text512", "wan720"])
def test_adaptive_holds_the_target(regime, preset):
    target = PRESETS[preset].target_rel_l1
    (e_fixed, _), (e_ad, worst, _), ctrl = _run(regime, preset)
    assert abs(e_ad / target - 1) <= TOL, f"adaptive {e_ad:.4f} vs target {target} (fixed {e_fixed:.4f}, m {ctrl.thresholds.tolist()})"
    assert worst <= 2 * target, f"worst head {worst:.4f} vs target {target}"
    if _dist(e_fixed, target) > math.log1p(TOL):  # where today's preset is far off, the loop must do better
        assert _dist(e_ad, target) < _dist(e_fixed, target), f"adaptive {e_ad:.4f} fixed {e_fixed:.4f}"


def test_fixed_presets_are_off_target_at_small_grids():
    """What the test above relies on to be a real test: on the tuning regime at this grid the
    fixed presets miss their targets by more than the tolerance (so the comparison branch runs)."""
    for preset in ("Balanced", "Fast"):
        (e_fixed, _), _, _ = _run("tuned", preset, steps=0)
        assert _dist(e_fixed, PRESETS[preset].target_rel_l1) > math.log1p(TOL)


def test_uniform_attention():
    """Flat rows (random q/k): every key block carries the same share, so share mode keeps all of
    them up to minshare ~1 and only the top one above: Quality's fixed 0.5 keeps everything (error
    0.0015, 13x below its target) and the loop must move it up; Balanced's 1.5 already skips all it
    can (0.022, half its target) and the loop must neither overshoot nor give speed back."""
    target = PRESETS["Quality"].target_rel_l1
    (e_fixed, sp_fixed), (e_ad, _, sp_ad), _ = _run("uniform", "Quality")
    assert e_fixed < target / 4 and sp_fixed < 0.05
    assert e_ad <= (1 + TOL) * target and _dist(e_ad, target) < _dist(e_fixed, target) and sp_ad > sp_fixed
    (e_fixed, sp_fixed), (e_ad, _, sp_ad), _ = _run("uniform", "Balanced")
    assert e_ad <= (1 + TOL) * PRESETS["Balanced"].target_rel_l1 and sp_ad >= sp_fixed - 0.01


def test_kernel_measures_takes_what_the_kernels_launcher_takes():
    """The one gate of the measurement kernels (sampled_error on a GPU, measure_graphed before a graph
    sees the call): layouts the launcher would refuse never reach it."""
    from sparge_attention.sparge_core.adapt import kernel_measures
    from sparge_attention.sparge_core.availability import triton_status
    from sparge_attention.sparge_core.call_graphs import layout_key

    def lay(*shape, dtype=torch.bfloat16, token_major=False):
        t = torch.empty(shape[0], shape[2], shape[1], shape[3], dtype=dtype).transpose(1, 2) if token_major \
            else torch.empty(*shape, dtype=dtype)
        return layout_key(t)

    q, kv = lay(2, 4, 64, 32, token_major=True), lay(2, 2, 80, 32)
    assert kernel_measures(q, kv, kv, q) == triton_status().available
    if not triton_status().available:
        return
    bad = [
        (lay(2, 4, 64, 32, dtype=torch.float32), kv, kv, lay(2, 4, 64, 32, dtype=torch.float32)),  # dtype
        (q, kv, kv, lay(2, 4, 64, 32, dtype=torch.float16)),  # out's dtype
        (q, lay(2, 3, 80, 32), lay(2, 3, 80, 32), q),  # heads not a multiple
        (q, lay(1, 2, 80, 32), lay(1, 2, 80, 32), q),  # batch
        (q, kv, lay(2, 2, 81, 32), q),  # k and v differ
        (q, lay(2, 2, 80, 16), lay(2, 2, 80, 16), q),  # head dim
        (q, kv, kv, lay(2, 4, 65, 32)),  # out's shape
        (lay(2, 4, 64, 512), lay(2, 2, 80, 512), lay(2, 2, 80, 512), lay(2, 4, 64, 512)),  # D > 256
        (q, ((2, 2, 80, 32), (5120, 2560, 32, 2), torch.bfloat16), kv, q),  # channels not contiguous
        (q, lay(2, 2, 0, 32), lay(2, 2, 0, 32), q),  # no keys
        (((2, 64, 128),) + q[1:], kv, kv, q),  # not (B, H, N, D)
    ]
    for i, args in enumerate(bad):
        assert not kernel_measures(*args), i
