"""CUDA graphs of whole sparse calls (sparge_core/call_graphs.py) against the same calls launched one
by one, on CUDA (skipped without a GPU: a graph needs one). Run it under both allocators: torch's
native one and PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (ComfyUI's default).
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


def _counts(cg, **want):
    """The graphs' counts: exact under both allocators (the graphs read the caller's tensors through
    their address table, so where the allocator puts them does not matter)."""
    got = cg.summary()
    assert all(got[k] == n for k, n in want.items()) and got["disabled"] is None, (want, got)


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
    _counts(graphs, eager=1, captures=1, replays=1)
    for src, dst in zip(_qkv(1), (q, k, v)):
        dst.copy_(src)
    got = _run(q, k, v, p, graphs)
    want2 = _run(q, k, v, p)
    assert want2[1] != want[1] or not torch.equal(want2[0], want[0])
    _same(got, want2, "new contents")
    _counts(graphs, replays=2)


def test_other_tensors_and_thresholds_replay_the_graph_other_settings_do_not():
    """Other q, k, v and outputs at other addresses replay the graph of their shapes (the address
    table); so do other per-head thresholds (another preset, a threshold tensor moved in place as
    the error target moves it): they come in through the table too. A setting that switches a
    kernel path (P.V skipping) gets its own graph. Every result equals the launched call."""
    q, k, v = _qkv(0)
    others = _qkv(3)
    ms = torch.full((4,), 1.5)  # a CPU threshold tensor, moved in place like nodes/adapt.py does
    moving = PRESETS["Balanced"].params().replace(minshare=ms)
    graphs = CallGraphs()
    cases = [("Balanced", PRESETS["Balanced"].params()), ("Fast", PRESETS["Fast"].params()), ("moving", moving),
             ("P.V skip", PRESETS["Balanced"].params(pvthreshd=8.0))]
    for rep in range(3):
        for name, p in cases:
            _same(_run(q, k, v, p, graphs), _run(q, k, v, p), f"{name}, pass {rep}")
    # one graph for the three threshold settings (first seen, captured, then 7 replays), one for P.V skip
    _counts(graphs, eager=2, captures=2, replays=8, graphs=2)
    p = cases[0][1]
    for i, x in enumerate([others, (q, others[1], v), [t.clone() for t in others]]):
        _same(_run(*x, p, graphs), _run(*x, p), f"other tensors {i}")
    _counts(graphs, captures=2, replays=11)
    before = _run(q, k, v, moving)
    # denser, moved in place: its device copy takes the new values at the same address (at 1.5 these
    # random inputs keep only the blocks every call keeps; a rise changes nothing, measured)
    ms.mul_(0.01)
    after = _run(q, k, v, moving)
    assert after[1] > before[1], (before[1:], after[1:])
    _same(_run(q, k, v, moving, graphs), after, "moved threshold, first")
    _same(_run(q, k, v, moving, graphs), after, "moved threshold, again")
    _counts(graphs, captures=2, replays=13)


def test_a_replay_from_the_inputs_layouts_equals_the_call():
    """replay_graphed: once sparge_attention has captured a call through the graphs, the same call
    replays from the (B, N, H*D) tensors a model passes (or their (B, H, N, D) views) without
    views, checks or stats; out and counts equal the launched call's, also after new contents and on
    other tensors. Before the capture, and for other settings, it runs nothing and says so (None)."""
    from sparge_attention.sparge_core.graphed import replay_graphed
    from sparge_attention.sparge_core.layout import merge_heads, split_heads

    H = 4
    packed = _qkv(5, shape=(2, 1500, H * 128))
    views = [split_heads(t, H) for t in packed]
    p = PRESETS["Balanced"].params()
    graphs = CallGraphs()
    assert replay_graphed(graphs, *packed, p, H, GRID) is None  # nothing captured yet
    for _ in range(2):  # launched, then captured (and replayed once)
        _run(*views, p, graphs)
    _counts(graphs, eager=1, captures=1, replays=0)
    for i, x in enumerate([packed, _qkv(6, shape=(2, 1500, H * 128))]):
        want = _run(*[split_heads(t, H) for t in x], p)
        out, counts = replay_graphed(graphs, *x, p, H, GRID)
        assert out.shape == x[0].shape and counts.tolist() == list(want[1:]), (i, counts.tolist(), want[1:])
        assert torch.equal(out, merge_heads(want[0])), i
        out, counts = replay_graphed(graphs, *[split_heads(t, H) for t in x], p, None, GRID)
        assert torch.equal(out, want[0]) and counts.tolist() == list(want[1:]), i
    _counts(graphs, captures=1, replays=4)
    fast = PRESETS["Fast"].params()  # other thresholds: the same graph, with their values
    want = _run(*views, fast)
    out, counts = replay_graphed(graphs, *packed, fast, H, GRID)
    assert torch.equal(out, merge_heads(want[0])) and counts.tolist() == list(want[1:])
    _counts(graphs, captures=1, replays=5)
    assert replay_graphed(graphs, *packed, PRESETS["Balanced"].params(pvthreshd=8.0), H, GRID) is None  # another key
    assert replay_graphed(graphs, *packed, p, H, None) is None  # no Hilbert order: another key
    _counts(graphs, captures=1, replays=5)


def test_a_measurement_through_graphs_equals_the_launched_one():
    """The error target's measurement through a CallGraphs (sparge_core.graphed.measure_graphed):
    launched, captured, then replayed on other tensors, other seeds and an accumulator at another
    address each time; every result equals the kernels launched directly on the seed's rows, for
    (B, N, H*D) inputs with heads and split (B, H, N, D) ones."""
    from sparge_attention.kernels.sampled_error import sampled_error_sums, sampled_rows
    from sparge_attention.sparge_core.graphed import measure_graphed

    B, N, H, D = 2, 3000, 4, 128
    graphs = CallGraphs()
    for heads in (H, None):
        for i in range(4):
            g = torch.Generator(device="cuda").manual_seed(10 + i)
            x = [torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
            split = [t.view(B, N, H, D).transpose(1, 2) for t in x]
            seed = 1000 + i
            want = sampled_error_sums(*split, sampled_rows(seed, 256, N, "cuda"))
            fresh = measure_graphed(graphs, *(x if heads else split), heads, 256, seed)
            assert torch.allclose(fresh, want, rtol=1e-9), (heads, i)
            prev = torch.randn(2, H, device="cuda", dtype=torch.float64)
            added = measure_graphed(graphs, *(x if heads else split), heads, 256, seed, prev.clone())
            assert torch.allclose(added, prev + want, rtol=1e-9), (heads, i)
    # (B, N, H*D) with heads and its split views share a key (the split layout is computed): fresh and
    # accumulating each launched once, captured once, replayed 6 times
    _counts(graphs, eager=2, captures=2, replays=12)
    assert measure_graphed(graphs, *split[:3], split[3].float(), None, 256, 1) is None  # not its dtype


def test_a_measured_replay_is_the_replay_and_its_measurement_in_one_graph():
    """replay_measured (the error target's measured calls: one replay, not two): before the call's own
    graph is held it runs nothing (None); then its own key is launched once, captured once and
    replayed, on other tensors and seeds each time. Its output and counts equal the plain replay's,
    its sums the measurement kernels' on the seed's rows of that output, fresh and added into an
    accumulator; (B, H, N, D) views replay the same graphs."""
    from sparge_attention.kernels.sampled_error import sampled_error_sums, sampled_rows
    from sparge_attention.sparge_core.graphed import replay_graphed, replay_measured
    from sparge_attention.sparge_core.layout import split_heads

    H, N = 4, 1500
    p = PRESETS["Balanced"].params()
    graphs = CallGraphs()
    packed = _qkv(20, shape=(2, N, H * 128))
    assert replay_measured(graphs, *packed, p, H, GRID, 256, 7) is None  # the call's graph not held yet
    for _ in range(2):
        _run(*[split_heads(t, H) for t in packed], p, graphs)
    _counts(graphs, eager=1, captures=1, replays=0)
    for i in range(4):
        x = _qkv(21 + i, shape=(2, N, H * 128))
        seed = 500 + i
        plain = replay_graphed(graphs, *x, p, H, GRID)
        prev = torch.randn(2, H, device="cuda", dtype=torch.float64)
        for acc in (None, prev.clone()):
            out, counts, sums = replay_measured(graphs, *x, p, H, GRID, 256, seed, acc)
            assert torch.equal(out, plain[0]) and counts.tolist() == plain[1].tolist(), (i, acc is None)
            want = sampled_error_sums(*[split_heads(t, H) for t in (*x, out)], sampled_rows(seed, 256, N, "cuda"))
            if acc is not None:
                assert sums.data_ptr() == acc.data_ptr()
                want = want + prev
            assert torch.allclose(sums, want, rtol=1e-9), (i, acc is None)
    # fresh and accumulating: each launched once, captured once, replayed twice (and 4 plain replays)
    _counts(graphs, eager=3, captures=3, replays=4 + 4)
    out, counts, sums = replay_measured(graphs, *[split_heads(t, H) for t in packed], p, None, GRID, 256, 9)
    assert torch.equal(out, replay_graphed(graphs, *packed, p, H, GRID)[0].view(2, N, H, 128).transpose(1, 2))
    assert sums.shape == (2, H)
    _counts(graphs, eager=3, captures=3, replays=4 + 4 + 2)  # split views: the same graphs


def test_what_is_not_graphed():
    """lse, a user mask, a call above the byte budget, a q not 16-byte aligned and a call on a second
    stream launch as usual; fp16 / head dim 64 inputs are graphed. All equal the launched call."""
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
    assert graphs.replays == 1 and graphs.eager == 1
    q_odd = torch.empty(q.numel() + 8, dtype=q.dtype, device="cuda")[1:q.numel() + 1].view_as(q).copy_(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for _ in range(2):
        assert torch.equal(sparge_attention(q_odd, k, v, p, graphs=graphs), sparge_attention(q_odd, k, v, p))
        with torch.cuda.stream(side):
            assert torch.equal(sparge_attention(q, k, v, p, graphs=graphs), sparge_attention(q, k, v, p))
    torch.cuda.current_stream().wait_stream(side)
    assert graphs.replays == 1 and graphs.eager == 1, graphs.summary()


def test_a_failed_capture_turns_graphs_off_and_runs_the_call():
    """A body that fails while it is captured (after allocating, as a real call would): the call runs
    as usual, graphs turn off with the reason, and the process lives on. Under cudaMallocAsync this is
    the case that aborted the process when the failed body's tensors were freed after the capture."""
    graphs = CallGraphs(capture_at=1)
    x = torch.arange(6.0, device="cuda")

    def body(dst, table):
        y = x * 2  # allocated inside the capture when captured
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("refused in the capture")
        dst.copy_(y[:2].to(torch.int64))

    got = graphs.run(("k",), (), body, 2, x.device)
    assert got.tolist() == [0, 2] and graphs.disabled.startswith("capturing: ValueError"), graphs.summary()
    assert graphs.run(("k",), (), body, 2, x.device).tolist() == [0, 2] and graphs.eager == 2
    torch.cuda.synchronize()


def _device_used() -> int:
    """Bytes in use on the device as the driver sees them: the caching allocator's segments and, under
    cudaMallocAsync, its pool and the graphs' own memory (which torch.cuda.memory_reserved omits)."""
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def test_pool_is_one_call_and_is_freed():
    """Many graphs share one pool: it holds about one call's intermediates, not one per graph, and
    releasing the CallGraphs gives it back (measured as the driver sees the device's memory). Six
    settings (P.V skipping, causal, the estimate: thresholds alone share a graph) make six graphs of
    one shape; each set of tensors replays them."""
    xs = [_qkv(s, (2, 12, 7800, 128)) for s in range(2)]
    base_p = PRESETS["Balanced"].params()
    ps = [base_p.replace(pvthreshd=pv, **kw) for kw in ({}, {"is_causal": True}, {"fill_skipped": False})
          for pv in (float("inf"), 8.0)]
    warm = CallGraphs(capture_at=2)
    for p in ps:  # the eager calls' own caches, and every kernel variant through the table, so that base holds them
        _run(*xs[0], p, grid=(5, 30, 52))
        _run(*xs[0], p, warm, grid=(5, 30, 52))
    del warm
    torch.cuda.empty_cache()
    base = _device_used()
    graphs = CallGraphs(capture_at=1)
    for x in xs:
        for p in ps:
            _run(*x, p, graphs, grid=(5, 30, 52))
    held = _device_used() - base
    one = sum(t.numel() * t.element_size() for t in xs[0])
    print(f"  {torch.cuda.get_allocator_backend()}: {len(ps)} graphs hold {held / 2**20:.1f} MiB "
          f"(q+k+v of one call {one / 2**20:.1f} MiB)")
    got = graphs.summary()
    assert got["captures"] == got["graphs"] == len(ps) and got["disabled"] is None, got
    assert got["eager"] == 0 and got["replays"] == len(ps), got
    assert held < 2 * one, f"the pool holds {held / 2**20:.1f} MiB for {len(ps)} graphs (q+k+v {one / 2**20:.1f} MiB)"
    graphs.release()  # under cudaMallocAsync the driver keeps graph memory until it is trimmed
    del graphs
    torch.cuda.empty_cache()
    left = _device_used() - base
    print(f"  after the CallGraphs is dropped: {left / 2**20:.1f} MiB")
    assert left <= one // 4, f"{left / 2**20:.1f} MiB stay after the graphs are gone"


if __name__ == "__main__":
    from devkit.gpu_script import run_tests

    run_tests(globals())
