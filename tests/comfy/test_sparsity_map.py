"""The Sparge Sparsity Map: its renderer on hand-built masks, the capture in the override (bounded,
packed, equal to the op's own mask), the "sparge::attention_map" op under torch.compile, and the
node through a REAL ComfyUI 0.3.75 run (CPU, tiny models; one server for the module).

Tiny shapes: a 256x256x5 latent is a (2, 16, 16) token grid = 512 tokens = 8 query blocks of 64 x
4 key blocks of 128. Wan tiny: 2 blocks, 2 heads. Custom topk 0.5 keeps exactly 2 of the 4 key
blocks of every query block, so every block and step has sparsity 0.5.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from devkit.pack import load_pack

load_pack()
from sparge_attention.nodes import override as O  # noqa: E402
from sparge_attention.nodes import capture as C  # noqa: E402
from sparge_attention.nodes import sparsity_render as R  # noqa: E402
from sparge_attention.nodes import sparsity_views as V  # noqa: E402
from sparge_attention.nodes.stats import ForwardContext, RunStats, fold_forward  # noqa: E402
from sparge_attention.nodes.config import SpargeConfig  # noqa: E402
from sparge_attention.nodes.readout import build_readout  # noqa: E402
from sparge_attention.sparge_core import torch_op  # noqa: E402
from sparge_attention.sparge_core.blockmask import pack_mask, unpack_mask  # noqa: E402

from devkit.comfy_harness import hunyuan_video_graph, wan21_t2v_graph  # noqa: E402

NODE = "SpargeAttention"
GRID = (4, 8, 8)  # 256 tokens: 4 query blocks x 2 key blocks


def close(px, colour, tol=2) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, colour))


def cell_colour(img: Image.Image, r: int, c: int, dx=None, dy=None):
    g = img.info["sparge_plot"]
    x = g["left"] + c * g["cell_w"] + (g["cell_w"] // 2 if dx is None else dx)
    y = g["top"] + r * g["cell_h"] + (g["cell_h"] // 2 if dy is None else dy)
    return img.getpixel((x, y))


def capture_data(masks: dict, nk: int, **extra) -> dict:
    """What SpargeOverride.last_map holds, built by hand: masks {step: (H, NQ, NK) bool}."""
    d = {"masks": {s: {"packed": pack_mask(m), "nk": nk, "sigma": 1.0 - 0.1 * s} for s, m in masks.items()},
         "map_layer": 1, "n_layers": 2, "n_steps": max(masks) + 1 if masks else 2, "hilbert": True,
         "block_q": 64, "block_k": 128, "preset": "Custom", "sparsity": 0.5, "dropped_steps": 0, "map_dense": {},
         "steps": sorted(masks), "layer_step_sparsity": [[0.5, 0.5] for _ in masks]}
    d.update(extra)
    return d


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("nk", [1, 4, 8, 13, 256])
def test_pack_unpack_round_trip(nk):
    g = torch.Generator().manual_seed(nk)
    m = torch.rand(3, 5, nk, generator=g) > 0.5
    p = pack_mask(m)
    assert p.dtype == torch.uint8 and tuple(p.shape) == (3, 5, math.ceil(nk / 8))
    assert torch.equal(unpack_mask(p, nk), m)


def test_packing_is_device_only():
    # meta tensors have no data: any host read (.item(), .cpu(), a host-to-device copy) would raise
    p = pack_mask(torch.ones(2, 8, 13, dtype=torch.bool, device="meta"))
    assert p.device.type == "meta" and tuple(p.shape) == (2, 8, 2)


# ----------------------------------------------------------------------------- renderer
def hand_mask():
    m = torch.zeros(2, 8, 4, dtype=torch.bool)
    m[0, :, 0] = True  # head 0: first key block only
    m[1] = torch.tensor([[r % 4 == c or c == 3 for c in range(4)] for r in range(8)])  # diagonal + last column
    return m


def test_block_mask_one_head_cell_by_cell():
    m = hand_mask()
    for head in (0, 1):
        img, info = V.block_mask_image(capture_data({0: m, 1: ~m}, 4), step=0, head=head)
        assert info["ok"] and info["step"] == 0 and info["head"] == head and info["shape"] == (8, 4)
        assert info["kept_fraction"] == pytest.approx(float(m[head].float().mean()))
        geo = img.info["sparge_plot"]
        assert geo["cell_w"] == geo["cell_h"] >= 8 and geo["rows"] == 8 and geo["cols"] == 4
        for r in range(8):
            for c in range(4):
                want = R.KEPT if m[head, r, c] else R.SKIPPED
                assert close(cell_colour(img, r, c), want, 0), (head, r, c)
        t = R.to_tensor(img)
        assert t.dtype == torch.float32 and tuple(t.shape) == (1, img.size[1], img.size[0], 3)
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    # step -1 is the last captured step (here the inverted mask)
    img, info = V.block_mask_image(capture_data({0: m, 1: ~m}, 4), step=-1, head=0)
    assert info["step"] == 1 and close(cell_colour(img, 0, 0), R.SKIPPED, 0) and close(cell_colour(img, 0, 1), R.KEPT, 0)


def test_block_mask_mean_over_heads():
    m = hand_mask()
    img, info = V.block_mask_image(capture_data({0: m}, 4), step=0, head=-1)
    assert info["ok"] and info["head"] is None
    mean = m.float().mean(0)
    half = tuple(int(x) for x in R.ramp(np.array([0.5]), R.MASK_RAMP)[0])
    assert half != R.KEPT and half != R.SKIPPED
    for r in range(8):
        for c in range(4):
            want = {0.0: R.SKIPPED, 0.5: half, 1.0: R.KEPT}[float(mean[r, c])]
            assert close(cell_colour(img, r, c), want, 0), (r, c)


def test_block_mask_messages():
    m = hand_mask()
    for data, step, head, words in (
        (None, -1, -1, "No sparsity map"),
        (capture_data({0: m}, 4), 5, -1, "not captured"),
        (capture_data({0: m}, 4), 0, 2, "does not exist"),
        (capture_data({}, 4, map_dense={"dense block": 4}), -1, -1, "No block mask"),
        (capture_data({}, 4, map_layer=7, n_layers=2), -1, -1, "No block mask"),
    ):
        img, info = V.block_mask_image(data, step, head)
        assert info["ok"] is False and img.size[0] == 640, words


def test_big_masks_are_pooled():
    m = torch.rand(1, 3000, 1500, generator=torch.Generator().manual_seed(0)) > 0.5
    img, info = V.block_mask_image(capture_data({0: m}, 1500), step=0, head=0)
    geo = img.info["sparge_plot"]
    assert geo["pool"] == 3 and geo["rows"] == 1000 and geo["cols"] == 500
    assert max(img.size) <= R.MAX_PLOT + 200


def test_layer_step_view():
    rows = [[0.25, None, 0.9], [0.75, 0.5, None]]  # 2 steps x 3 blocks
    img, info = V.layer_step_image({"layer_step_sparsity": rows, "steps": [0, 1], "preset": "Fast",
                                    "sparsity": 0.6, "map_layer": 1, "masks": {0: None}})
    assert info["ok"]
    geo = img.info["sparge_plot"]
    assert (geo["rows"], geo["cols"]) == (3, 2)
    px = np.asarray(img)
    for s, row in enumerate(rows):
        for b, v in enumerate(row):
            x0, y0 = geo["left"] + s * geo["cell_w"], geo["top"] + b * geo["cell_h"]
            cell = px[y0:y0 + geo["cell_h"] - geo["gap"], x0:x0 + geo["cell_w"] - geo["gap"]].reshape(-1, 3)
            colours, counts = np.unique(cell, axis=0, return_counts=True)
            mode = tuple(int(x) for x in colours[counts.argmax()])
            want = R.DENSE if v is None else tuple(int(x) for x in R.ramp(np.array([v]), R.SPARSITY_RAMP)[0])
            assert mode == want, (s, b, mode, want)
    img2, info2 = V.layer_step_image({"layer_step_sparsity": []})
    assert info2["ok"] is False


# ----------------------------------------------------------------------------- capture in the override
def qkv(n=256, h=2, d=64, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


def dense_fn(q, k, v, heads, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def override(map_layer=1, **widgets):
    w = dict(preset="Custom", mode="cdf", cdfthreshd=0.6, simthreshd1=-1.0, min_tokens=128)
    w.update(widgets)
    return O.SpargeOverride(SpargeConfig.from_widgets(**w), node_id="7", map_layer=map_layer)


def forward(ov, step, inputs):
    """One model forward with two self-attention blocks (layers 0 and 1)."""
    ctx = ForwardContext(step, 1.0 - 0.25 * step, step / 4, True, (GRID,), None, 0, capture_layer=ov.map_layer)
    for q, k, v in inputs:
        ov(dense_fn, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options={ov.key: ctx})
    fold_forward(ov.run, ctx)
    return ctx


def test_capture_matches_the_op_and_feeds_the_readout(monkeypatch):
    ov = override()
    ov.run = RunStats()
    steps = {s: [qkv(seed=10 * s), qkv(seed=10 * s + 1)] for s in range(3)}
    one = None
    for s, inputs in steps.items():
        ctx = forward(ov, s, inputs)
        assert ctx.record_layers == [0, 1] and ctx.map_mask is not None
        one = one or ctx.map_mask[0].numel()
    # the cap: room for two steps' masks only -> the third is dropped
    ov2 = override()
    ov2.run = RunStats()
    monkeypatch.setattr(C, "MAP_MAX_BYTES", 2 * one)
    for s, inputs in steps.items():
        forward(ov2, s, inputs)
    assert sorted(ov2.run.map_masks) == [0, 1] and ov2.run.map_dropped == 1

    readout = build_readout(ov, ov.run)
    data = ov.map_of(ov.run, readout)
    assert data["map_layer"] == 1 and readout["map_layer"] == 1 and sorted(data["masks"]) == [0, 1, 2]
    cfg = ov.config
    for s, inputs in steps.items():
        q, k, v = inputs[1]  # layer 1
        sim, thr, pv = (torch_op.thresholds(x, 2) for x in (cfg.params.simthreshd1, cfg.threshold(),
                                                              cfg.params.pvthreshd))
        _, kept, _, mask = torch.ops.sparge.attention_map(q, k, v, sim, thr, pv, "cdf", False, list(GRID), -1.0,
                                                           cfg.params.scoring, cfg.params.fill_skipped)
        got = unpack_mask(data["masks"][s]["packed"], data["masks"][s]["nk"])
        assert torch.equal(got, mask[0]) and int(got.sum()) == int(kept)
        # the block x step table agrees with the mask of the captured block
        assert readout["layer_step_sparsity"][s][1] == pytest.approx(1 - float(mask.float().mean()))
    assert len(readout["layer_step_sparsity"]) == 3 and all(len(r) == 2 for r in readout["layer_step_sparsity"])
    img, info = V.block_mask_image(data, -1, -1)
    assert info["ok"] and info["step"] == 2 and info["shape"] == (4, 2)


def test_capture_of_a_dense_block_explains_itself():
    ov = override(map_layer=1, dense_blocks="1")
    ov.run = RunStats()
    forward(ov, 0, [qkv(seed=1), qkv(seed=2)])
    readout = build_readout(ov, ov.run)
    data = ov.map_of(ov.run, readout)
    assert data["masks"] == {} and data["map_dense"] == {"dense block": 1}
    assert readout["layer_step_sparsity"][0][1] is None and readout["layer_step_sparsity"][0][0] is not None
    img, info = V.block_mask_image(data, -1, -1)
    assert info["ok"] is False


def test_map_op_opcheck():
    q, k, v = qkv(n=192)
    h = torch_op.thresholds
    args = (q, k, v, h(-1.0, 2), h(0.5, 2), h(float("inf"), 2), "topk", False, [3, 8, 8], -1.0, "lse", True)
    torch.library.opcheck(torch.ops.sparge.attention_map.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    out, kept, skipped, mask = torch.ops.sparge.attention_map(*args)
    ref = torch.ops.sparge.attention(*args)
    assert torch.equal(out, ref[0]) and int(kept) == int(ref[1]) and int(mask.sum()) == int(kept)
    assert mask.dtype == torch.bool and tuple(mask.shape) == torch_op.mask_shape(q, k) == (1, 2, 3, 2)
    # shorter than one query block: sparge_attention runs dense, the mask says "all kept"
    qs, ks, vs = qkv(n=32)
    _, kept, _, mask = torch.ops.sparge.attention_map(qs, ks, vs, *args[3:])
    assert bool(mask.all()) and int(kept) == mask.numel()


def test_fullgraph_compile_with_capture():
    ov = override(map_layer=0, mode="topk", topk=0.5)

    def fn(q, k, v, to):
        return ov(dense_fn, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)

    q, k, v = qkv()
    eager = ForwardContext(0, 1.0, 0.0, True, (GRID,), None, 0, capture_layer=0)
    want = fn(q, k, v, {ov.key: eager})
    torch._dynamo.reset()
    ctx = ForwardContext(0, 1.0, 0.0, True, (GRID,), None, 0, capture_layer=0)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, {ov.key: ctx})
    assert torch.equal(got, want)
    assert ctx.map_mask is not None and torch.equal(ctx.map_mask[0], eager.map_mask[0])
    assert ctx.record_layers == [0]


# ----------------------------------------------------------------------------- through a real run
def sparge(**over):
    w = dict(preset="Custom", mode="topk", simthreshd1=-1.0, cdfthreshd=0.95, topk=0.5, pvthreshd=100.0,
             start_percent=0.0, end_percent=1.0, dense_blocks="", hilbert=True, min_tokens=256, verbose=False)
    w.update(over)
    return w


def add_maps(g, sparge_id="10", sampler="5"):
    g["20"] = {"class_type": "SpargeSparsityMap", "inputs": {"model": [sparge_id, 0], "samples": [sampler, 0],
                                                              "step": -1, "head": 0}}
    g["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "maps/head0"}}
    g["22"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 1], "filename_prefix": "maps/grid"}}
    g["23"] = {"class_type": "SpargeSparsityMap", "inputs": {"model": [sparge_id, 0], "samples": [sampler, 0],
                                                              "step": 0, "head": -1}}
    g["24"] = {"class_type": "SaveImage", "inputs": {"images": ["23", 0], "filename_prefix": "maps/mean"}}
    g["25"] = {"class_type": "SpargeSparsityMap", "inputs": {"model": ["1", 0], "samples": [sampler, 0],
                                                              "step": -1, "head": -1}}  # no Sparge on this model
    g["26"] = {"class_type": "SaveImage", "inputs": {"images": ["25", 0], "filename_prefix": "maps/none"}}
    return g


def run(srv, g):
    pid = srv.queue(g)
    entry = srv.wait(pid, timeout=300)
    images = {}
    for nid, out in entry["outputs"].items():
        for it in out.get("images", []):
            images[nid] = Image.open(srv.output_dir / it.get("subfolder", "") / it["filename"]).convert("RGB")
    readouts = srv.get_json(f"/sparge/readouts?prompt_id={pid}")["readouts"]
    return images, readouts


def plot_cells(img: Image.Image, rows: int, cols: int) -> np.ndarray:
    """Read a saved binary block-mask picture back: find the plot (the pixel rows full of kept /
    skipped colour), cut it into rows x cols cells, return kept (True) per cell."""
    px = np.asarray(img).astype(int)
    kept = (np.abs(px - R.KEPT).max(-1) <= 2)
    skipped = (np.abs(px - R.SKIPPED).max(-1) <= 2)
    either = kept | skipped
    ys = np.where(either.sum(1) > 40)[0]  # the legend swatches are 14 px wide: not a plot row
    xs = np.where(either[ys].any(0))[0]
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ch, cw = (y1 - y0 + 1) / rows, (x1 - x0 + 1) / cols  # + the last cell's gap
    out = np.zeros((rows, cols), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            y, x = int(y0 + (r + 0.4) * ch), int(x0 + (c + 0.4) * cw)
            assert either[y, x], (r, c)
            out[r, c] = kept[y, x]
    return out


def test_map_node_through_a_real_run(comfy_server):
    srv = comfy_server
    info = srv.object_info("SpargeSparsityMap")
    assert info["output"] == ["IMAGE", "IMAGE"] and info["output_name"] == ["block_mask", "layer_x_step"]
    assert info["display_name"] == "Sparge Sparsity Map" and "map_layer" in info["description"]
    sp_info = srv.object_info(NODE)
    assert sp_info["input"]["optional"]["map_layer"][1]["default"] == -1

    # cfg 1.0: one batch item, so the captured mask is the whole call
    g = wan21_t2v_graph(srv.tiny_models["wan21"].name, seed=301, cfg=1.0, model_node=(NODE, sparge(map_layer=1)),
                        prefix="map_run")
    images, readouts = run(srv, add_maps(g))
    r = next(x for x in readouts if x["node_id"] == "10")
    assert r["map_layer"] == 1
    assert r["layer_step_sparsity"] == [[0.5, 0.5], [0.5, 0.5]]  # topk 0.5 of 4 key blocks, every block and step

    cells = plot_cells(images["21"], 8, 4)  # head 0, last step: 8 query blocks x 4 key blocks
    assert (cells.sum(1) == 2).all(), cells  # topk 0.5: exactly 2 kept key blocks per query block

    # the layer x step picture is exactly what the renderer draws from the readout
    data = {"layer_step_sparsity": r["layer_step_sparsity"], "steps": [s["step"] for s in r["per_step"]],
            "preset": "Custom", "sparsity": r["sparsity"], "map_layer": 1, "masks": {1: None}, "dropped_steps": 0}
    want, _ = V.layer_step_image(data)
    got = images["22"]
    assert got.size == want.size
    assert np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int)).max() <= 1

    mean = np.asarray(images["24"]).astype(int)  # step 0, mean of the 2 heads: 0, 1/2 or 2/2 heads keep
    half = R.ramp(np.array([0.5]), R.MASK_RAMP)[0]
    assert (np.abs(mean - R.KEPT).max(-1) <= 1).sum() + (np.abs(mean - half).max(-1) <= 1).sum() > 1000

    none = images["26"]  # the map on a model without Sparge: a message card, not an error
    assert none.size[0] == 640 and none.size[1] < 200


def test_map_of_a_dense_block_and_of_hunyuan(comfy_server):
    srv = comfy_server
    g = wan21_t2v_graph(srv.tiny_models["wan21"].name, seed=302, cfg=1.0,
                        model_node=(NODE, sparge(map_layer=1, dense_blocks="1")), prefix="map_dense")
    images, readouts = run(srv, add_maps(g))
    r = next(x for x in readouts if x["node_id"] == "10")
    assert [row[1] for row in r["layer_step_sparsity"]] == [None, None]
    assert images["21"].size[0] == 640 and images["21"].size[1] < 200  # "block 1 ran normal attention"
    grid = np.asarray(images["22"]).astype(int)  # the layer x step view still draws, block 1 grey (dense)
    assert (np.abs(grid - R.DENSE).max(-1) <= 1).sum() > 500

    # HunyuanVideo: joint attention (512 video + 16 text tokens), map_layer -1 = block 1 (the single block)
    g = hunyuan_video_graph(srv.tiny_models["hunyuan"].name, seed=303, model_node=(NODE, sparge()), prefix="map_hy")
    images, readouts = run(srv, add_maps(g))
    r = next(x for x in readouts if x["node_id"] == "10")
    assert r["map_layer"] == 1 and len(r["layer_step_sparsity"][0]) == 2
    cells = plot_cells(images["21"], 9, 5)  # 528 tokens: 9 query blocks x 5 key blocks
    assert cells.any() and not cells.all()
    json.dumps(r)  # still plain JSON with the new keys
