"""What decides a CUDA graph's key (sparge_core/call_graphs.py, SpargeParams.device_key) and the
kernels' address table (kernels/caller_addrs.py), on the CPU. The graphs themselves need a GPU:
tests/test_call_graphs_gpu.py compares them with the launched calls."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

sys.path.insert(0, os.path.dirname(__file__))
from data import clustered  # noqa: E402

from devkit.pack import load_pack  # noqa: E402

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402

from sparge_attention.sparge_core import SpargeParams, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.call_graphs import CallGraphs, layout_key  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402

CPU = torch.device("cpu")


def test_device_key_holds_settings_and_threshold_addresses():
    p = PRESETS["Balanced"].params()
    key, keep = p.device_key(4, CPU)
    assert p.device_key(4, CPU)[0] == key  # cached per-head tensors: the same addresses
    names = [k for k, _ in key]
    assert {"simthreshd1", "minshare", "pvthreshd", "scoring", "fill_skipped", "is_causal", "attention_sink"} <= set(names)
    assert "topk" not in names and "cdfthreshd" not in names  # unset thresholds read nothing
    assert len(keep) == 3 and all(t.shape == (4,) and t.dtype == torch.float32 for t in keep)
    assert dict(key)["minshare"] == p.per_head("minshare", 4, CPU).data_ptr()
    # a setting that is not a threshold changes the key by value
    assert dict(p.replace(is_causal=True).device_key(4, CPU)[0])["is_causal"] is True


def test_device_key_reads_a_threshold_moved_in_place_live():
    """The adaptation moves a CPU threshold tensor in place. On the CPU per_head hands out that tensor
    itself, so the key stays and what it names holds the new values (a graph reads contents when it
    replays). On another device per_head copies the new values into its device tensor, so the key
    stays there too (meta stands in for a GPU here; the replay with the new values runs in
    tests/test_call_graphs_gpu.py)."""
    ms = torch.full((4,), 1.5)
    p = PRESETS["Balanced"].params().replace(minshare=ms)
    key, keep = p.device_key(4, CPU)
    ms.mul_(2.0)
    key2, _ = p.device_key(4, CPU)
    assert key2 == key
    named = {k: t for (k, _), t in zip([x for x in key if x[0] in ("simthreshd1", "minshare", "pvthreshd")], keep)}
    assert torch.equal(named["minshare"], torch.full((4,), 3.0))
    meta = p.device_key(4, torch.device("meta"))[0]
    ms.mul_(2.0)
    assert p.device_key(4, torch.device("meta"))[0] == meta


def test_layout_key_and_what_graphs_take():
    x = torch.zeros(2, 3, 8, 4)
    assert layout_key(x) == ((2, 3, 8, 4), x.stride(), torch.float32)
    assert layout_key(x.transpose(1, 2)) != layout_key(x)  # other strides
    assert layout_key(x.clone()) == layout_key(x)  # another address: the same graph
    assert not CallGraphs().wants(x, x, x)  # CPU tensors: no graphs


@pytest.mark.parametrize("grid, params", [
    # Hilbert order, lse scores, the estimate of skipped blocks, P.V skipping
    ((3, 5, 40), SpargeParams(minshare=2.0, simthreshd1=-1.0, scoring="lse", fill_skipped=True, pvthreshd=4.0)),
    (None, SpargeParams(cdfthreshd=0.6, simthreshd1=0.3, is_causal=True)),  # pooled scores, similarity rule, causal
])
def test_kernels_read_and_write_the_tensors_the_table_names(grid, params):
    """With an address table, every kernel of the call reads q, k, v and writes the output at the
    addresses the table holds (a graph replayed on other tensors); the tensors passed only give
    their type and layout. In ComfyUI's (B, N, H, D) memory layout, as the node passes it."""
    from sparge_attention.sparge_core.api import _triton_forward
    from sparge_attention.sparge_core.hilbert import TokenPermutation

    def bnhd(seed):  # (B, H, N, D) views of (B, N, H, D) memory
        return [x.transpose(1, 2).contiguous().transpose(1, 2) for x in clustered(1, 2, 600, 64, seed)]

    carriers, real = bnhd(0), bnhd(1)
    out_c, out_r = (torch.full((1, 600, 2, 64), 7.0).transpose(1, 2) for _ in range(2))
    perms = (None, None)
    if grid is not None:
        perm = TokenPermutation.for_grid(grid, 600, device=CPU).perm32
        perms = (perm, perm)
    table = torch.tensor([t.data_ptr() for t in (*real, out_r)], dtype=torch.int64)
    got = _triton_forward(*carriers, params, 0.125, None, "auto", *perms, out=out_c, addrs=table)
    want = _triton_forward(*real, params, 0.125, None, "auto", *perms)
    assert torch.equal(out_r, want[0]) and torch.equal(got[1].kv_num_blocks, want[1].kv_num_blocks)
    assert int(want[1].kv_num_blocks.sum()) < want[1].kv_num_blocks.numel() * want[1].kv_indices.shape[-1]  # sparse
    assert bool((out_c == 7.0).all())  # the tensor passed for the output's layout is not written


def test_address_table_arguments_are_checked():
    from sparge_attention.kernels.quantize import quant_pool

    x = torch.zeros(1, 1, 64, 64)
    for addr in [(torch.zeros(4, dtype=torch.int32), 0), (torch.zeros(4, dtype=torch.int64), 4), ([1, 2], 0)]:
        with pytest.raises(ValueError, match="address table"):
            quant_pool(x, 64, 64, addr=addr)


def test_graphs_leave_cpu_calls_alone():
    """A CallGraphs passed with CPU tensors changes nothing: the reference (and the Triton interpreter)
    run as without it, and it counts no call."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 64, generator=g) for _ in range(3))
    p = SpargeParams(minshare=1.0, scoring="lse", fill_skipped=True)
    graphs = CallGraphs(capture_at=1)
    a, sa = sparge_attention(q, k, v, p, return_stats=True, graphs=graphs)
    b, sb = sparge_attention(q, k, v, p, return_stats=True)
    assert torch.equal(a, b) and int(sa.kept_blocks) == int(sb.kept_blocks)
    assert graphs.summary() == {"replays": 0, "captures": 0, "eager": 0, "graphs": 0, "disabled": None}


def test_a_launch_that_would_check_addresses_raises_inside_addresses_unchecked():
    """Inside kernels.launch.addresses_unchecked (a capture's launches) a launch that would go through
    Triton's own path (here the interpreter's, as on a first launch of a specialization) raises before
    it launches, instead of running the address check a capture under cudaMallocAsync fails; outside,
    the same call runs."""
    from sparge_attention.kernels.launch import addresses_unchecked

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 300, 64, generator=g) for _ in range(3))
    p = SpargeParams(minshare=1.0, scoring="lse", fill_skipped=True)
    with addresses_unchecked(), pytest.raises(RuntimeError, match="addresses_unchecked"):
        sparge_attention(q, k, v, p, backend="triton")
    assert sparge_attention(q, k, v, p, backend="triton").shape == q.shape


def test_a_pool_without_live_graphs_is_not_captured_into_again():
    """torch's allocator forgets a graph pool once no graph captured into it lives, and a capture into
    that id then fails an internal assert (seen on an H200). A capture dropped (a kernel variant not
    launched yet) while no held graph uses the pool takes a fresh pool id; while one does, the pool
    stays (the graphs share it). Only the ids are looked at here: a graph needs a GPU."""
    graphs = CallGraphs()
    dev = torch.device("cuda", 0)
    first = graphs._pool(dev)
    assert graphs._pool(dev) == first
    fresh = graphs._pool(dev, renew=True)
    assert fresh != first and graphs._pool(dev) == fresh
    graphs._graphs[("held",)] = (None, (), fresh)
    assert graphs._pool(dev, renew=True) == fresh


def test_addresses_go_in_and_counts_come_out_through_the_rings():
    """pull_table copies the ring row the counter names into the table; push_counts copies a call's
    counts into that row of the counts ring and steps the counter, wrapping at the ring's end (under
    the interpreter the host ring is plain CPU memory, as pinned memory is to the GPU)."""
    from sparge_attention.kernels.caller_addrs import pull_table, push_counts

    rows = 3
    addresses = torch.arange(rows * 8, dtype=torch.int64).view(rows, 8) * 16 + 1000
    counts = torch.full((rows, 8), -1, dtype=torch.int64)
    table, ctr = torch.zeros(8, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    for call in range(5):
        row = call % rows
        pull_table(addresses, ctr, table)
        assert torch.equal(table, addresses[row])
        push_counts(torch.tensor([call, 10 * call], dtype=torch.int64), ctr, counts)
        assert counts[row, :2].tolist() == [call, 10 * call] and int(ctr) == (call + 1) % rows
    assert bool((counts[:, 2:] == -1).all())  # only the counts' own columns are written
    with pytest.raises(ValueError, match="power of two"):
        pull_table(addresses[:, :6].contiguous(), ctr, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="no wider"):
        push_counts(torch.zeros(9, dtype=torch.int64), ctr, counts)
    with pytest.raises(ValueError, match="counter"):
        push_counts(torch.zeros(2, dtype=torch.int64), ctr.int(), counts)


class _KeyRecorder:
    """Stands in for CallGraphs.run where graphs cannot run (the CPU): keeps the key a call asks for."""

    def __init__(self):
        self.keys = []

    def run(self, key, keep, body, counts, device, addresses=()):
        self.keys.append(key)
        return torch.zeros(counts, dtype=torch.int64)


@pytest.mark.parametrize("grid, n, nk, heads", [
    ((2, 8, 16), 256, 256, 3),  # Hilbert order, self-attention
    ((2, 8, 16), 296, 296, 3),  # text tokens after the grid
    (None, 300, 300, 2),  # no grid
])
def test_a_replay_looks_up_the_key_its_call_was_captured_under(grid, n, nk, heads):
    """replay_graphed builds the graph key from the caller's (B, N, H*D) tensors, or its (B, H, N, D)
    views, without making a view or checking them again. It must be the very key sparge_attention's
    graphed call captures under, or the node's calls would never replay (their results would still
    be right: this is the test that sees it). Also for a threshold moved in place (the error target),
    a non-contiguous layout, and other settings (another key)."""
    from sparge_attention.sparge_core.api import _graphed_forward, _permutations, _replay_key
    from sparge_attention.sparge_core.layout import split_heads

    B, D = 2, 64
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(B, n, 3 * heads * D, generator=g)
    packed = wide[..., :heads * D], wide[..., heads * D:2 * heads * D], wide[..., 2 * heads * D:]  # strided
    for q, k, v in (packed, [t.contiguous() for t in packed]):
        views = [split_heads(t, heads) for t in (q, k, v)]
        ms = torch.full((heads,), 1.5)
        for p in (PRESETS["Balanced"].params(), PRESETS["Balanced"].params().replace(minshare=ms)):
            rec = _KeyRecorder()
            perm, perm_k = _permutations(grid, n, nk, CPU)
            perms = (perm.perm32, perm_k.perm32) if perm is not None else (None, None)
            _graphed_forward(rec, *views, p, D ** -0.5, "auto", perms)
            captured = rec.keys[0]
            assert _replay_key(q, k, v, p, heads, grid)[0] == captured
            assert _replay_key(*views, p, None, grid)[0] == captured
            ms.mul_(3.0)
            assert _replay_key(q, k, v, p, heads, grid)[0] == captured
            assert _replay_key(q, k, v, p.replace(pvthreshd=9.0), heads, grid)[0] != captured
    assert _replay_key(q, k, v, p, heads, None if grid else (1, 1, n))[0] != captured
