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


def test_device_key_holds_settings_not_threshold_values():
    """A graph's key holds every setting that is not a threshold, which thresholds are set, and the
    switches their values make; the per-head threshold tensors come with it (their addresses go in
    through the address table). Blocks whose thresholds differ share a key (one graph per shape)."""
    p = PRESETS["Balanced"].params()
    key, ths = p.device_key(4, CPU)
    assert p.device_key(4, CPU) == (key, ths)
    names = [k for k, _ in key]
    assert {"scoring", "fill_skipped", "is_causal", "attention_sink", "thresholds", "sim_rule", "pv_skip"} <= set(names)
    assert dict(key)["thresholds"] == ("simthreshd1", "minshare", "pvthreshd")
    assert [n for n, _ in ths] == ["simthreshd1", "minshare", "pvthreshd"]
    assert all(t.shape == (4,) and t.dtype == torch.float32 for _, t in ths)
    assert dict(ths)["minshare"].data_ptr() == p.per_head("minshare", 4, CPU).data_ptr()
    # other threshold values (another preset, a block's own): the same key, their own tensors
    fast = PRESETS["Fast"].params()
    assert fast.device_key(4, CPU)[0] == key and float(dict(fast.device_key(4, CPU)[1])["minshare"][0]) == PRESETS["Fast"].minshare
    assert p.replace(minshare=torch.full((4,), 2.0)).device_key(4, CPU)[0] == key
    # a setting, another mode, or a value that switches a kernel path: another key
    assert dict(p.replace(is_causal=True).device_key(4, CPU)[0])["is_causal"] is True
    assert p.replace(minshare=None, topk=0.2).device_key(4, CPU)[0] != key
    assert p.replace(pvthreshd=8.0).device_key(4, CPU)[0] != key  # P.V skipping on
    assert p.replace(simthreshd1=0.5).device_key(4, CPU)[0] != key  # the similarity rule on


def test_device_key_follows_a_threshold_moved_in_place():
    """The adaptation moves a CPU threshold tensor in place. On the CPU per_head hands out that tensor
    itself; on another device per_head copies the new values into its device tensor (meta stands in
    for a GPU here; the replay with the new values runs in tests/test_call_graphs_gpu.py). Either
    way the key and the tensor stay, and the tensor holds the new values."""
    ms = torch.full((4,), 1.5)
    p = PRESETS["Balanced"].params().replace(minshare=ms)
    key, ths = p.device_key(4, CPU)
    ms.mul_(2.0)
    key2, ths2 = p.device_key(4, CPU)
    assert key2 == key and dict(ths2)["minshare"] is dict(ths)["minshare"]
    assert torch.equal(dict(ths2)["minshare"], torch.full((4,), 3.0))
    meta_key, meta_ths = p.device_key(4, torch.device("meta"))
    ms.mul_(2.0)
    again = p.device_key(4, torch.device("meta"))
    assert again[0] == meta_key and dict(again[1])["minshare"] is dict(meta_ths)["minshare"]


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
    from sparge_attention.sparge_core.triton_call import triton_forward
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
    got = triton_forward(*carriers, params, 0.125, None, "auto", *perms, out=out_c, addrs=table)
    want = triton_forward(*real, params, 0.125, None, "auto", *perms)
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
    """Stands in for CallGraphs.run where graphs cannot run (the CPU): keeps the key a call asks for
    and the addresses of its per-head thresholds (table slots 4 on)."""

    def __init__(self):
        self.keys, self.thresholds = [], []

    def run(self, key, keep, body, counts, device, addresses=(), outputs=()):
        self.keys.append(key)
        self.thresholds.append(tuple(addresses[4:]))
        return torch.zeros(counts, dtype=torch.int64)

    def outputs_of(self, key):
        return None


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
    from sparge_attention.sparge_core.graphed import graphed_forward, replay_key
    from sparge_attention.sparge_core.hilbert import grid_permutations
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
            perm, perm_k = grid_permutations(grid, n, nk, CPU)
            perms = (perm.perm32, perm_k.perm32) if perm is not None else (None, None)
            graphed_forward(rec, *views, p, D ** -0.5, "auto", perms)
            captured = rec.keys[0]
            assert replay_key(q, k, v, p, heads, grid)[0] == captured
            ths = replay_key(q, k, v, p, heads, grid)[2]
            assert tuple(t.data_ptr() for _, t in ths) == rec.thresholds[0] and len(rec.thresholds[0]) == 3
            assert replay_key(*views, p, None, grid)[0] == captured
            ms.mul_(3.0)
            assert replay_key(q, k, v, p, heads, grid)[0] == captured
            assert replay_key(q, k, v, PRESETS["Fast"].params(), heads, grid)[0] == captured  # other thresholds
            assert replay_key(q, k, v, p.replace(pvthreshd=9.0), heads, grid)[0] != captured  # P.V skipping on
            # the sparsity map's block: its own graph, which also writes the first item's packed mask
            graphed_forward(rec, *views, p, D ** -0.5, "auto", perms, map_first=True)
            assert replay_key(q, k, v, p, heads, grid, map_first=True)[0] == rec.keys[-1] != captured
    assert replay_key(q, k, v, p, heads, None if grid else (1, 1, n))[0] != captured


class _ReplayOnCPU:
    """Stands in for CallGraphs.run on the CPU (the interpreter): the first body of a key is what a
    graph captures, and every later call of that key runs that first body again with its own
    addresses in the table, as a replay does (the kernels read them from the table)."""

    def __init__(self):
        self.bodies = {}

    def run(self, key, keep, body, counts, device, addresses=(), outputs=()):
        first = self.bodies.setdefault(key, (body, outputs))[0]  # a graph writes its capture's outputs
        table = torch.zeros(8, dtype=torch.int64)
        table[:len(addresses)] = torch.tensor(addresses, dtype=torch.int64)
        dst = torch.zeros(counts, dtype=torch.int64)
        first(dst, table)
        return dst

    def outputs_of(self, key):
        hit = self.bodies.get(key)
        return None if hit is None else hit[1]


def test_blocks_with_other_thresholds_replay_one_graph_with_their_own():
    """The graph of one block's call, replayed for another block (other per-head thresholds, other
    tensors): its thresholds come in through the table (pull_values), so it computes the other
    block's result exactly, also after a threshold moved in place. In ComfyUI's memory layout."""
    from sparge_attention.sparge_core.graphed import graphed_forward
    from sparge_attention.sparge_core.triton_call import triton_forward
    from sparge_attention.sparge_core.hilbert import TokenPermutation

    def bnhd(seed):
        return [x.transpose(1, 2).contiguous().transpose(1, 2) for x in clustered(1, 2, 264, 64, seed)]

    perm = TokenPermutation.for_grid((2, 4, 33), 264, device=CPU).perm32
    ms = torch.tensor([0.5, 4.0])  # a block's own per-head thresholds, moved in place below
    blocks = [PRESETS["Balanced"].params(), PRESETS["Balanced"].params().replace(minshare=ms)]
    graphs = _ReplayOnCPU()
    kept = []
    for i, (p, seed) in enumerate(zip(blocks + blocks[1:], (0, 1, 1))):
        if i == 2:
            ms.mul_(0.25)
        x = bnhd(seed)
        out, counts = graphed_forward(graphs, *x, p, 0.125, "auto", (perm, perm))
        want = triton_forward(*x, p, 0.125, None, "auto", perm, perm)
        assert torch.equal(out, want[0]), i
        assert int(counts[0]) == int(want[1].kv_num_blocks.sum()), i
        kept.append(int(counts[0]))
    assert len(graphs.bodies) == 1  # one graph served every block
    assert len(set(kept)) == 3, kept  # and each block kept its own blocks


def test_the_sparsity_maps_graph_writes_each_calls_own_mask():
    """The sparsity map's block through a graph (graphed_forward with map_first): the first batch
    item's packed block mask is written by the graph into the buffer of the call it was captured
    from; each call gets a copy equal to its own launched call's mask, not the first call's."""
    from sparge_attention.sparge_core.blockmask import pack_mask
    from sparge_attention.sparge_core.graphed import graphed_forward
    from sparge_attention.sparge_core.hilbert import TokenPermutation
    from sparge_attention.sparge_core.triton_call import triton_forward

    perm = TokenPermutation.for_grid((2, 4, 33), 264, device=CPU).perm32
    p = PRESETS["Balanced"].params()
    graphs = _ReplayOnCPU()
    maps = []
    for seed in (0, 1):
        x = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in clustered(2, 2, 264, 64, seed)]
        out, counts, first_map = graphed_forward(graphs, *x, p, 0.125, "auto", (perm, perm), map_first=True)
        want = triton_forward(*x, p, 0.125, None, "auto", perm, perm)
        assert torch.equal(out, want[0]) and torch.equal(first_map, pack_mask(want[1].to_dense()[0])), seed
        assert first_map.data_ptr() != graphs.outputs_of(next(iter(graphs.bodies)))[0].data_ptr()  # a copy
        maps.append(first_map)
    assert not torch.equal(maps[0], maps[1])  # each call's own


def test_pull_values_arguments_are_checked():
    from sparge_attention.kernels.caller_addrs import pull_values

    table = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="slots"):
        pull_values(table, 6, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="float32"):
        pull_values(table, 4, torch.zeros(3, 4, dtype=torch.float64))


def test_release_drops_every_graph_and_sighting():
    """release() at the end of a run leaves nothing held: no graph, no sighting, no pool (the GPU test
    test_pool_is_one_call_and_is_freed measures the memory it gives back); without a GPU pool it
    touches no device."""
    graphs = CallGraphs()
    graphs._graphs[("held",)] = (None, (), None)
    graphs._seen[("seen",)] = 1
    graphs.release()
    assert graphs.summary()["graphs"] == 0 and not graphs._seen and not graphs._pools
    assert not graphs._graphs
