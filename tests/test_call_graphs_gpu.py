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

from devkit.gpu_script import compiled_kernels_mark, skip  # noqa: E402

pytestmark = compiled_kernels_mark()

from sparge_attention.sparge_core import SpargeParams, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.call_graphs import ALLOCATOR_OFF, CallGraphs  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402

GRID = (3, 10, 50)  # 1,500 tokens in Hilbert order


def _qkv(seed, shape=(2, 4, 1500, 128), dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*shape, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _run(q, k, v, params, graphs=None, grid=GRID):
    out, st = sparge_attention(q, k, v, params, grid=grid, return_stats=True, graphs=graphs)
    return out, int(st.kept_blocks), int(st.pv_skipped)


def _native():
    """Graphs need torch's native allocator; the other tests of this file skip under another one."""
    if torch.cuda.get_allocator_backend() != "native":
        skip(f"allocator {torch.cuda.get_allocator_backend()}: graphs are off (test_other_allocators_run_as_usual)")


def _same(a, b, what):
    assert a[1:] == b[1:], f"{what}: counts {a[1:]} vs {b[1:]}"
    assert torch.equal(a[0], b[0]), f"{what}: max diff {(a[0].float() - b[0].float()).abs().max().item()}"


def test_replay_equals_the_launched_call_and_follows_new_contents():
    """Seen once (launched), captured on the second sighting, replayed after: each result equals the
    call launched one by one; new values written into the same q, k, v are what a replay computes."""
    _native()
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
    """Another tensor or another preset each miss the graph and get their own; a threshold moved in
    place (the error-target adaptation) replays its graph with the new values. Every result equals
    the launched call."""
    _native()
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
    before = _run(q, k, v, moving)
    ms.mul_(4.0)  # sparser, moved in place: its device copy takes the new values at the same address
    after = _run(q, k, v, moving)
    assert after[1] < before[1], (before[1:], after[1:])
    _same(_run(q, k, v, moving, graphs), after, "moved threshold, first")
    _same(_run(q, k, v, moving, graphs), after, "moved threshold, again")
    assert graphs.captures == len(cases) and graphs.replays == len(cases) + 2, graphs.summary()


def test_what_is_not_graphed():
    """lse, a user mask, a call above the byte budget and fp16 / head dim 64 inputs: the first two
    and the third launch as usual; the last is graphed. All equal the launched call."""
    _native()
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


def _device_used() -> int:
    """Bytes in use on the device as the driver sees them: the caching allocator's segments and, under
    cudaMallocAsync, its pool and the graphs' own memory (which torch.cuda.memory_reserved omits)."""
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def test_pool_is_one_call_and_is_freed():
    """Many graphs share one pool: it holds about one call's intermediates, not one per graph, and
    dropping the CallGraphs gives it back (measured as the driver sees the device's memory)."""
    _native()
    xs = [_qkv(s, (2, 12, 7800, 128)) for s in range(6)]
    p = PRESETS["Balanced"].params()
    for x in xs[:1]:  # the eager call's own cache, so that base holds it
        _run(*x, p, grid=(5, 30, 52))
    base = _device_used()
    graphs = CallGraphs(capture_at=1)
    for rep in range(2):
        for x in xs:
            _run(*x, p, graphs, grid=(5, 30, 52))
    held = _device_used() - base
    one = sum(t.numel() * t.element_size() for t in xs[0])
    print(f"  {torch.cuda.get_allocator_backend()}: {len(xs)} graphs hold {held / 2**20:.1f} MiB "
          f"(q+k+v of one call {one / 2**20:.1f} MiB)")
    assert graphs.captures == len(xs) and graphs.replays == len(xs), graphs.summary()
    assert held < 2 * one, f"the pool holds {held / 2**20:.1f} MiB for {len(xs)} graphs (q+k+v {one / 2**20:.1f} MiB)"
    del graphs
    torch.cuda.empty_cache()
    left = _device_used() - base
    print(f"  after the CallGraphs is dropped: {left / 2**20:.1f} MiB")
    assert left <= one // 4, f"{left / 2**20:.1f} MiB stay after the graphs are gone"


def test_other_allocators_run_as_usual():
    """Under cudaMallocAsync (ComfyUI's default) no capture is tried (Triton refuses the graph memory a
    capture allocates, and freeing it after a failed capture aborts the process): graphs turn off with
    the reason, and every call equals the launched one. Run with
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync."""
    if torch.cuda.get_allocator_backend() == "native":
        skip("native allocator: run with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync")
    q, k, v = _qkv(0)
    p = PRESETS["Balanced"].params()
    graphs = CallGraphs(capture_at=1)
    for i in range(3):
        _same(_run(q, k, v, p, graphs), _run(q, k, v, p), f"call {i}")
    assert graphs.disabled == ALLOCATOR_OFF and graphs.summary()["graphs"] == 0, graphs.summary()


if __name__ == "__main__":
    from devkit.gpu_script import run_tests

    run_tests(globals())
