"""Direct launches (kernels/launch.py) against Triton's own, on CUDA (skipped without a GPU; under
TRITON_INTERPRET every launch goes through the interpreter, which the CPU tests cover).
Also runs without pytest:  python tests/test_launch_gpu.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devkit, also as a script
from devkit.launches import capture_launches  # noqa: E402
from devkit.pack import load_pack  # noqa: E402

load_pack()

import torch  # noqa: E402

from devkit.gpu_script import compiled_kernels_mark  # noqa: E402

pytestmark = compiled_kernels_mark()

from sparge_attention.sparge_core import SpargeParams, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402


def _calls(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, 4, 1500, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    q2, k2, v2 = (torch.randn(2, 2, 700, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    v2[0, 1, 300, 5] = 1000.0  # outside V's stats sample and past its headroom: quant_v's overflow fix runs
    mask = torch.rand(1, 1, 11, 6, device="cuda", generator=g) < 0.4  # 64-row query, 128-key blocks
    return {
        "Balanced, Hilbert grid": lambda: sparge_attention(q, k, v, PRESETS["Balanced"].params(), grid=(3, 10, 50)),
        "cdf, causal, lse": lambda: sparge_attention(q2, k2, v2, SpargeParams(cdfthreshd=0.9, is_causal=True),
                                                     return_lse=True),
        "user mask": lambda: sparge_attention(q2, k2, v2, SpargeParams(scoring="pooled", fill_skipped=False),
                                              block_mask=mask),
    }


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def test_direct_launches_match_triton():
    """Every launch of three kinds of call, from its arguments as they were before it, once through
    the pack's path (a direct launch: the first call compiled the kernel) and once through
    JITFunction.run, each on its own copy: the same compiled kernel, identical outputs, and each
    kernel changed something in at least one of its launches (quant_v's overflow fix writes only
    where a head overflows)."""
    from devkit.launches import twin_args

    # the recorded calls take other inputs than the first ones, so that each output buffer (the
    # allocator hands out the same memory again) holds other values before its launch than after
    wrote = {}
    for (name, first), call in zip(_calls(0).items(), _calls(1).values()):
        first()  # Triton compiles; the direct path keeps its kernels
        log = capture_launches(call)
        torch.cuda.synchronize()
        assert len(log) >= 2, name
        for kname, kern, grid, args, kwargs in log:
            assert kern._direct, f"{name}: {kname} is not launched directly on this Triton"
            a1, a2 = twin_args(args), twin_args(args)
            ck1 = kern[grid](*a1, **kwargs)
            ck2 = kern.fn[grid](*a2, **kwargs)
            torch.cuda.synchronize()
            assert ck1 is ck2, f"{name}: {kname} launched another compiled kernel than Triton would"
            tensors = [(x, y, z) for x, y, z in zip(a1, a2, args) if isinstance(x, torch.Tensor)]
            for x, y, _ in tensors:
                assert torch.equal(_bytes(x), _bytes(y)), f"{name}: {kname} output differs"
            wrote[kname] = wrote.get(kname, False) or any(not torch.equal(_bytes(x), _bytes(z)) for x, _, z in tensors)
    assert all(wrote.values()), f"never wrote anything: {[k for k, w in wrote.items() if not w]}"
    assert "_quant_v_fix" in wrote


def test_specializations_are_kept_apart():
    """A tensor at an address that is not 16-byte aligned, and an int equal to 1, are separate
    specializations in Triton: the direct path must pick the kernel Triton picks for each."""
    from sparge_attention.kernels import select

    kern = select._select
    H, NQ, NK = 2, 3, 40
    base = torch.randn(1 + H * NQ * NK, device="cuda")
    param = torch.full((H,), 0.9, device="cuda")
    outs = {}
    for case, scores, n_q in (("aligned", base[:-1].view(1, H, NQ, NK), 3 * 64),
                              ("unaligned", base[1:].view(1, H, NQ, NK), 3 * 64),
                              ("n_q == 1", base[:-1].view(1, H, NQ, NK), 1)):
        counts = torch.empty(1, H, NQ, dtype=torch.int32, device="cuda")
        idx = torch.zeros(1, H, NQ, NK, dtype=torch.int32, device="cuda")
        args = (scores, scores, scores, param, counts, idx, scores, scores, NQ, NK, 0, H, n_q, NK * 64, 64, 64)
        kw = dict(NK_POW2=64, MODE=0, HAS_QSS=False, HAS_KSS=False, SINK=False, CAUSAL=False, FILL=False, num_warps=4)
        kern[(H * NQ,)](*args, **kw)
        ck = kern[(H * NQ,)](*args, **kw)  # direct
        assert ck is kern.fn[(H * NQ,)](*args, **kw), case
        outs[case] = ck
    assert outs["aligned"] is not outs["unaligned"] and outs["aligned"] is not outs["n_q == 1"]


if __name__ == "__main__":
    from devkit.gpu_script import run_tests

    run_tests(globals())
