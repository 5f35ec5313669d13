"""CUDA graphs of whole sparse calls (sparge_core/call_graphs.py) against the same calls launched one
by one, on CUDA (skipped without a GPU: a graph needs one).
Also runs without pytest:  python tests/test_call_graphs_gpu.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devkit, also as a script
from devkit.pack import load_pack  # noqa: E402

load_pack()

import torch  # noqa: E402

from devkit.gpu_script import compiled_kernels_mark  # noqa: E402

pytestmark = compiled_kernels_mark()

from sparge_attention.sparge_core import SpargeParams, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.call_graphs import CallGraphs  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402

GRID = (3, 10, 50)  # 1,500 tokens in Hilbert order


def _qkv(seed, shape=(2, 4, 1500, 128), dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*shape, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _run(q, k, v, params, graphs=None, grid=GRID):
    out, st = sparge_attention(q, k, v, params, grid=grid, return_stats=True, graphs=graphs)
    return out, int(st.kept_blocks), int(st.pv_skipped)


def _same(a, b, what):
    assert a[1:] == b[1:], f"{what}: counts {a[1:]} vs {b[1:]}"
    assert torch.equal(a[0], b[0]), f"{what}: max diff {(a[0].float() - b[0].float()).abs().max().item()}"


def test_replay_equals_the_launched_call_and_follows_new_contents():
    """Seen once (launched), captured on the second sighting, replayed after: each result equals the
    call launched one by one; new values written into the same q, k, v are what a replay computes."""
    q, k, v = _qkv(0)
    p = PRESETS["Balanced"].params()
    graphs = CallGraphs()
    want = _run(q, k, v, p)
    for i in range(3):
        _same(_run(q, k, v, p, graphs), want, f"call {i}")
    assert (graphs.eager, graphs.captures, graphs.replays) == (1, 1, 1), graphs.summary()
    for src, dst in zip(_qkv(1), (q, k, v)):
        dst.copy_(src)
    got = _run(q, k, v, p, graphs)  # first: its output takes the address the graph writes
    want2 = _run(q, k, v, p)
    assert want2[1] != want[1] or not torch.equal(want2[0], want[0])
    _same(got, want2, "new contents")
    assert graphs.replays == 2, graphs.summary()


def test_other_addresses_settings_and_thresholds_are_other_graphs():
    """Another tensor, another preset, a threshold moved in place (the error-target adaptation) or a
    call shape each miss the graph and get their own; every result equals the launched call."""
    q, k, v = _qkv(0)
    q2 = q.clone()
    ms = torch.full((4,), 1.5)  # a CPU threshold tensor, moved in place like nodes/adapt.py does
    moving = PRESETS["Balanced"].params().replace(minshare=ms)
    graphs = CallGraphs()
    cases = [("Balanced", (q, k, v), PRESETS["Balanced"].params()), ("Fast", (q, k, v), PRESETS["Fast"].params()),
             ("other q", (q2, k, v), PRESETS["Balanced"].params()), ("moving", (q, k, v), moving)]
    for rep in range(3):
        for name, x, p in cases:
            _same(_run(*x, p, graphs), _run(*x, p), f"{name}, pass {rep}")
    assert graphs.captures == len(cases) and graphs.replays == len(cases), graphs.summary()
    ms.mul_(4.0)  # sparser: a new per-head tensor, so a new key
    _same(_run(q, k, v, moving, graphs), _run(q, k, v, moving), "moved threshold, first")
    _same(_run(q, k, v, moving, graphs), _run(q, k, v, moving), "moved threshold, captured")
    assert graphs.captures == len(cases) + 1, graphs.summary()


def test_what_is_not_graphed():
    """lse, a user mask, a call above the byte budget and fp16 / head dim 64 inputs: the first two
    and the third launch as usual; the last is graphed. All equal the launched call."""
    q, k, v = _qkv(2, (1, 2, 700, 64), torch.float16)
    p = SpargeParams(cdfthreshd=0.9, is_causal=True)
    graphs = CallGraphs()
    for _ in range(3):
        a = sparge_attention(q, k, v, p, return_lse=True, graphs=graphs)
        b = sparge_attention(q, k, v, p, return_lse=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    mask = torch.rand(1, 1, 11, 6, device="cuda") < 0.4
    for _ in range(3):
        assert torch.equal(sparge_attention(q, k, v, p, block_mask=mask, graphs=graphs),
                           sparge_attention(q, k, v, p, block_mask=mask))
    assert graphs.summary()["graphs"] == 0 and graphs.eager == 0
    small = CallGraphs(max_bytes=1000)
    for _ in range(3):
        assert torch.equal(sparge_attention(q, k, v, p, graphs=small), sparge_attention(q, k, v, p))
    assert small.summary()["graphs"] == 0
    for _ in range(3):
        assert torch.equal(sparge_attention(q, k, v, p, graphs=graphs), sparge_attention(q, k, v, p))
    assert graphs.replays == 1


def test_pool_is_one_call_and_is_freed():
    """Many graphs share one pool: it holds about one call's intermediates, not one per graph, and
    dropping the CallGraphs gives it back."""
    xs = [_qkv(s, (2, 12, 7800, 128)) for s in range(6)]
    p = PRESETS["Balanced"].params()
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    graphs = CallGraphs(capture_at=1)
    for x in xs:
        _run(*x, p, graphs, grid=(5, 30, 52))
    torch.cuda.synchronize()
    held = torch.cuda.memory_reserved() - base
    one = sum(t.numel() * t.element_size() for t in xs[0])
    assert graphs.captures == len(xs)
    assert held < 2 * one, f"the pool holds {held / 2**20:.1f} MiB for {len(xs)} graphs (q+k+v {one / 2**20:.1f} MiB)"
    del graphs
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= base + one // 4


if __name__ == "__main__":
    from devkit.gpu_script import run_tests

    run_tests(globals())
