"""The Sparge Attention node on a REAL ComfyUI 0.3.75 server (CPU) with tiny random-weight models.

One server for the whole module. Every graph is UNETLoader -> [test nodes] -> Sparge Attention ->
KSampler -> SaveLatent, queued over HTTP; what the node did is read back from its end-of-run
readout (GET /sparge/readouts?prompt_id=..., also sent as the "sparge.readout" websocket event).
On the CPU the sparse path runs the PyTorch reference backend ("reference").

Tiny shapes: a 256x256x5 video latent is a (2, 16, 16) token grid = 512 tokens (8 query blocks of
64, 4 key blocks of 128); Wan: 2 blocks, cond+uncond batched (B=2), 16 text tokens;
HunyuanVideo: 1 double + 1 single block, joint attention over 512 image + 16 text tokens.
"""
import json
import os

import pytest
import torch

from devkit.metrics import rel_l2 as rel
from devkit.pack import load_pack

load_pack()
from sparge_attention.sparge_core.params import THRESHOLD_FIELD  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402

from devkit.comfy_harness import (  # noqa: E402
    hunyuan_video_graph,
    only_readout as only,
    run_latent_graph,
    wan21_t2v_graph,
    wan22_two_stage_graph,
)

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(600)]

NODE = "SpargeAttention"
KEEP_ALL = dict(preset="Custom", mode="cdf", simthreshd1=-1.0, cdfthreshd=1.0, topk=0.5, pvthreshd=100.0,
                start_percent=0.0, end_percent=1.0, dense_blocks="", hilbert=True, min_tokens=256, verbose=False,
                fill_skipped=False)  # Custom runs here drop the skipped blocks unless a test says otherwise
GRID = [2, 16, 16]
LATENT = (1, 16, 2, 32, 32)


def sparge(**over):
    return dict(KEEP_ALL, **over)


def wan(srv, seed, sp=None, **kw):
    return wan21_t2v_graph(srv.tiny_models["wan21"].name, seed=seed, model_node=(NODE, sp) if sp else None, **kw)


def hunyuan(srv, seed, sp=None, **kw):
    return hunyuan_video_graph(srv.tiny_models["hunyuan"].name, seed=seed, model_node=(NODE, sp) if sp else None, **kw)


def run(srv, graph, timeout=300):
    """Queue, wait; returns (latent, readouts of this prompt in order, prompt_id)."""
    lat, readouts, _, pid = run_latent_graph(srv, graph, LATENT, timeout)
    return lat, readouts, pid


_BASELINES = {}


def baseline(srv, kind, seed, **kw):
    """Latent of the same graph without the node (cached per module)."""
    key = (kind, seed, tuple(sorted(kw.items())))
    if key not in _BASELINES:
        g = (wan if kind == "wan" else hunyuan)(srv, seed, None, prefix=f"plain_{kind}_{seed}", **kw)
        _BASELINES[key] = run(srv, g)[0]
    return _BASELINES[key]


def check_common(r, sparse_calls):
    assert r["completed"] is True
    assert r["backend"] == "reference"  # the CPU runs the PyTorch reference of the sparse kernel
    assert r["sparse_calls"] == sparse_calls
    assert r["total_blocks"] > 0 and 0 <= r["kept_blocks"] <= r["total_blocks"]
    assert r["steps_run"] == r["n_steps"] == len(r["per_step"]) == len(r["per_step_sparsity"])
    assert json.loads(json.dumps(r)) == r  # plain JSON


# ----------------------------------------------------------------------------- schema
def test_node_schema(comfy_server):
    info = comfy_server.object_info(NODE)
    assert info["display_name"] == "Sparge Attention"
    assert info["category"] == "model_patches/attention"
    assert info["output"] == ["MODEL"]
    req = info["input"]["required"]
    order = info["input_order"]["required"]
    assert order == ["model", "preset", "mode", "simthreshd1", "cdfthreshd", "topk", "pvthreshd",
                     "start_percent", "end_percent", "dense_blocks", "hilbert", "min_tokens", "verbose"]
    assert req["preset"][0] == ["Quality", "Balanced", "Fast", "Turbo", "Custom"] or \
        req["preset"][1].get("options") == ["Quality", "Balanced", "Fast", "Turbo", "Custom"]
    assert (req["simthreshd1"][1]["min"], req["simthreshd1"][1]["max"]) == (-1.0, 1.0)
    assert (req["cdfthreshd"][1]["min"], req["cdfthreshd"][1]["max"]) == (0.01, 1.0)
    assert (req["pvthreshd"][1]["min"], req["pvthreshd"][1]["max"]) == (1.0, 100.0)
    assert "off" in req["pvthreshd"][1]["tooltip"]
    for name in order:
        assert len(req[name][1].get("tooltip", "")) > 20, name
    assert "unique_id" in info["input_order"].get("hidden", [])  # the readout names its node


# ----------------------------------------------------------------------------- sparse path, quality
def test_keep_all_matches_unpatched_and_topk_differs(comfy_server):
    srv = comfy_server
    plain = baseline(srv, "wan", 101)
    keep, rs, _ = run(srv, wan(srv, 101, sparge(), prefix="keep"))
    r = only(rs)
    check_common(r, sparse_calls=4)  # 2 steps x 2 blocks; cond+uncond batched (B=2)
    assert r["dense_calls"] == {"cross attention": 4}
    assert r["kept_blocks"] == r["total_blocks"] == 4 * 2 * 2 * 8 * 4  # calls x B x H x NQ x NK
    assert r["sparsity"] == 0.0 and r["flops_saved_fraction"] == 0.0
    assert r["hilbert_used"] and r["hilbert"]["grid"] == GRID and r["hilbert"]["text_tokens_in_place"] == 0
    assert r["layers_seen"] == 2
    assert [s["step"] for s in r["per_step"]] == [0, 1]
    assert rel(keep, plain) < 5e-3, rel(keep, plain)  # only the int8 / fp16 quantization differs

    heavy, rs, _ = run(srv, wan(srv, 101, sparge(mode="topk", topk=0.1), prefix="topk01"))
    r = only(rs)
    check_common(r, sparse_calls=4)
    assert r["settings"]["mode"] == "topk" and r["settings"]["topk"] == 0.1
    # topk 0.1 of 4 key blocks keeps 1 per query block: 3/4 of the blocks are skipped
    assert r["sparsity"] == pytest.approx(0.75)
    assert r["per_step_sparsity"] == [pytest.approx(0.75)] * 2
    assert r["flops_saved_fraction"] > 0.3 and r["est_attention_speedup"] > 1.4
    assert rel(heavy, plain) > 2e-2 and rel(heavy, plain) > 10 * rel(keep, plain), (rel(heavy, plain), rel(keep, plain))

    # share mode: minshare 4 of 4 key blocks keeps only blocks holding all the predicted mass, i.e. the top one
    filled, rs, _ = run(srv, wan(srv, 101, dict(sparge(mode="share"), minshare=4.0, fill_skipped=True), prefix="share4"))
    r = only(rs)
    check_common(r, sparse_calls=4)
    assert r["settings"]["mode"] == "share" and r["settings"]["minshare"] == 4.0
    assert r["settings"]["cdfthreshd"] is None and r["settings"]["topk"] is None
    assert r["settings"]["fill_skipped"] is True
    assert r["sparsity"] == pytest.approx(0.75, abs=0.02)
    # the same blocks without the skipped-block estimate: a different image, the same sparsity
    dropped, rs, _ = run(srv, wan(srv, 101, dict(sparge(mode="share"), minshare=4.0, fill_skipped=False),
                                  prefix="share4_drop"))
    r2 = only(rs)
    assert r2["settings"]["fill_skipped"] is False and r2["sparsity"] == r["sparsity"]
    assert rel(filled, dropped) > 1e-3


def test_short_calls_stay_dense_and_exact(comfy_server):
    srv = comfy_server
    plain = baseline(srv, "wan", 101)
    lat, rs, _ = run(srv, wan(srv, 101, sparge(preset="Turbo", min_tokens=2048), prefix="short"))
    r = only(rs)
    assert r["sparse_calls"] == 0 and r["backend"] == "none"
    assert r["dense_calls"] == {"cross attention": 4, "short": 4}
    assert r["flops_saved_fraction"] == 0.0
    assert any("min_tokens" in n for n in r["notes"])
    assert torch.equal(lat, plain)  # dense fallback = ComfyUI's own attention, bit for bit


def test_schedule_dense_blocks_and_hilbert_off(comfy_server):
    srv = comfy_server
    sp = sparge(mode="topk", topk=0.25, start_percent=0.5, dense_blocks="1, 5-7", hilbert=False)
    _, rs, _ = run(srv, wan(srv, 102, sp, prefix="sched"))
    r = only(rs)
    check_common(r, sparse_calls=1)
    s0, s1 = r["per_step"]
    assert s0["sparse_calls"] == 0 and s0["dense_calls"] == {"cross attention": 2, "schedule": 2}
    assert s1["sparse_calls"] == 1 and s1["dense_calls"] == {"cross attention": 2, "dense block": 1}
    assert r["per_step_sparsity"] == [None, pytest.approx(0.75)]
    assert r["settings"]["dense_blocks"] == [1, 5, 6, 7]
    assert r["hilbert"] == {"requested": False, "used_calls": 0, "not_used": {"off": 1}, "grid": None,
                            "text_tokens_in_place": None}
    assert any("5-7" in n and "not in this model" in n for n in r["notes"])


def test_preset_overrides_sliders(comfy_server):
    srv = comfy_server
    turbo = PRESETS["Turbo"]
    # sliders say "keep everything"; the Turbo preset wins
    _, rs, _ = run(srv, wan(srv, 103, sparge(preset="Turbo", mode="topk", topk=1.0, cdfthreshd=1.0, minshare=0.0),
                            prefix="turbo"))
    r = only(rs)
    check_common(r, sparse_calls=4)
    s = r["settings"]
    assert (s["preset"], s["mode"], s["simthreshd1"], s["scoring"]) == ("Turbo", turbo.mode, turbo.simthreshd1, turbo.scoring)
    assert s[THRESHOLD_FIELD[turbo.mode]] == turbo.threshold


# ----------------------------------------------------------------------------- Wan 2.2: two models
def test_wan22_two_models_two_readouts(comfy_server):
    srv = comfy_server
    g = wan22_two_stage_graph(srv.tiny_models["wan22_high"].name, srv.tiny_models["wan22_low"].name,
                              seed=104, steps=4, switch_at=2)
    g["10"] = {"class_type": NODE, "inputs": dict(sparge(mode="topk", topk=0.1), model=["1", 0])}
    g["11"] = {"class_type": NODE, "inputs": dict(sparge(dense_blocks="0"), model=["7", 0])}
    g["5"]["inputs"]["model"] = ["10", 0]
    g["8"]["inputs"]["model"] = ["11", 0]
    _, rs, _ = run(srv, g)
    assert len(rs) == 2  # the end-of-run hook fired once per sampler run
    high, low = only(rs, "10"), only(rs, "11")
    check_common(high, sparse_calls=4)
    check_common(low, sparse_calls=2)
    assert high["settings"]["topk"] == 0.1 and high["sparsity"] == pytest.approx(0.75)
    assert high["dense_calls"] == {"cross attention": 4}
    assert low["settings"]["cdfthreshd"] == 1.0 and low["sparsity"] == 0.0
    assert low["dense_calls"] == {"cross attention": 4, "dense block": 2}
    # each sampler runs 2 of the 4 steps: steps count within each run, sigmas continue
    assert [s["step"] for s in high["per_step"]] == [0, 1] == [s["step"] for s in low["per_step"]]
    assert high["per_step"][-1]["sigma"] > low["per_step"][0]["sigma"] > low["per_step"][-1]["sigma"]


# ----------------------------------------------------------------------------- chained overrides
def _chain_calls(srv, name):
    return [json.loads(line) for line in open(srv.output_dir / f"{name}.jsonl")]


def test_dense_fallback_chains_to_previous_override(comfy_server):
    srv = comfy_server
    g = wan(srv, 105, sparge(dense_blocks="1"), prefix="chain")
    g["12"] = {"class_type": "SpargeTestChainOverride", "inputs": {"model": ["1", 0], "log_name": "chain_before"}}
    g["10"]["inputs"]["model"] = ["12", 0]
    _, rs, _ = run(srv, g)
    r = only(rs)
    check_common(r, sparse_calls=2)
    assert r["dense_calls"] == {"cross attention": 4, "dense block": 2}
    calls = _chain_calls(srv, "chain_before")
    # every dense call (and only those) went through the override set before ours
    assert len(calls) == 6
    assert sum(c["shapes"][1][1] == 16 for c in calls) == 4  # cross-attention (16 text tokens)
    assert sum(c["shapes"][1][1] == 512 for c in calls) == 2  # block 1 self-attention, kept dense


def test_override_set_after_ours_sees_everything(comfy_server):
    srv = comfy_server
    g = wan(srv, 106, sparge(), prefix="chain_after")
    g["12"] = {"class_type": "SpargeTestChainOverride", "inputs": {"model": ["10", 0], "log_name": "chain_after"}}
    g["5"]["inputs"]["model"] = ["12", 0]
    _, rs, _ = run(srv, g)
    check_common(only(rs), sparse_calls=4)  # it chained to us: our sparse path still ran
    assert len(_chain_calls(srv, "chain_after")) == 8


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("field,value,needle", [
    ("dense_blocks", "3-", "'3-'"),
    ("dense_blocks", "a,b", "'a'"),
    ("dense_blocks", "5-2", "backwards"),
    ("dense_blocks", "-1", "'-1'"),
    ("simthreshd1", 1.5, "bigger than max"),
    ("cdfthreshd", 0.0, "smaller than min"),
    ("topk", 2.0, "bigger than max"),
    ("pvthreshd", 0.5, "smaller than min"),
    ("pvthreshd", 101.0, "bigger than max"),
    ("min_tokens", -5, "smaller than min"),
    ("start_percent", 1.5, "between 0 and 1"),
    ("end_percent", 0.2, "after end_percent"),  # start 0.6 > end 0.2
    ("preset", "Ludicrous", "not in"),
    ("mode", "random", "not in"),
])
def test_bad_widget_values_rejected(comfy_server, field, value, needle):
    srv = comfy_server
    sp = sparge(**{field: value})
    if field == "end_percent":
        sp["start_percent"] = 0.6
    status, body = srv.post_prompt_raw(wan(srv, 107, sp))
    assert status == 400, body
    errs = body["node_errors"]["10"]
    assert errs["class_type"] == NODE
    text = json.dumps(errs["errors"])
    assert needle in text, text
    assert srv.is_alive()


def test_server_still_works_after_rejections(comfy_server):
    srv = comfy_server
    for bad in ("3-", "x", "9-1"):
        assert srv.post_prompt_raw(hunyuan(srv, 108, sparge(dense_blocks=bad)))[0] == 400
    assert srv.get_json("/system_stats")["system"]["comfyui_version"] == "0.3.75"
    _, rs, _ = run(srv, hunyuan(srv, 108, sparge(dense_blocks=" 0 , 1-1 ")))
    assert only(rs)["settings"]["dense_blocks"] == [0, 1]


# ----------------------------------------------------------------------------- HunyuanVideo
def test_hunyuan_joint_attention_keeps_text_tokens(comfy_server):
    srv = comfy_server
    plain = baseline(srv, "hy", 109)
    lat, rs, _ = run(srv, hunyuan(srv, 109, sparge(), prefix="hy_keep"))
    r = only(rs)
    check_common(r, sparse_calls=4)  # per step: 1 double + 1 single block, joint image+text
    assert r["dense_calls"] == {"short": 4}  # the text token refiner's 16-token self-attention
    assert r["hilbert_used"] and r["hilbert"]["grid"] == GRID
    assert r["hilbert"]["text_tokens_in_place"] == 16  # text tokens after the grid, left in place
    # 528 tokens: 9 query blocks of 64 (last one partial) x 5 key blocks of 128, B=1, H=2
    assert r["kept_blocks"] == r["total_blocks"] == 4 * 2 * 9 * 5
    assert r["layers_seen"] == 2  # double block 0 = layer 0, single block 0 = layer 1
    assert rel(lat, plain) < 5e-3, rel(lat, plain)

    _, rs, _ = run(srv, hunyuan(srv, 109, sparge(dense_blocks="1"), prefix="hy_db"))
    r = only(rs)
    assert r["sparse_calls"] == 2 and r["dense_calls"] == {"short": 4, "dense block": 2}


def _with_text_mask(g, masked):
    g["13"] = {"class_type": "SpargeTestMaskConditioning", "inputs": {"conditioning": ["2", 0], "masked": masked}}
    g["5"]["inputs"]["positive"] = ["13", 0]
    return g


def test_hunyuan_text_padding_mask(comfy_server):
    srv = comfy_server
    plain, _, _ = run(srv, _with_text_mask(hunyuan(srv, 110, None, prefix="hy_mask_plain"), 6))
    lat, rs, _ = run(srv, _with_text_mask(hunyuan(srv, 110, sparge(), prefix="hy_mask"), 6))
    r = only(rs)
    # the key-padding mask is handled by attending to the unmasked keys only: still sparse
    check_common(r, sparse_calls=4)
    assert "mask" not in r["dense_calls"]
    assert r["hilbert_used"] and r["hilbert"]["text_tokens_in_place"] == 16
    assert r["kept_blocks"] == r["total_blocks"]  # 522 keys still make 5 key blocks
    assert rel(lat, plain) < 5e-3, rel(lat, plain)
    unmasked = baseline(srv, "hy", 110)
    assert rel(plain, unmasked) > 10 * rel(lat, plain)  # the mask matters, and we honoured it


# ----------------------------------------------------------------------------- error targets
@pytest.mark.parametrize("kind", ["wan", "hy"])
@pytest.mark.parametrize("preset", ["Quality", "Balanced", "Fast", "Turbo"])
def test_presets_hold_their_error_target(comfy_server, kind, preset):
    """Each preset through /prompt on the tiny models: the readout's measured error (pooled over the
    run's sampled measurements) within 25% above the preset's target, and the line says so."""
    srv = comfy_server
    build = wan if kind == "wan" else hunyuan
    sp = sparge(preset=preset, min_tokens=256)
    _, rs, _ = run(srv, build(srv, 120, sp, steps=6, prefix=f"target_{kind}_{preset}"))
    r = only(rs)
    assert r["target_rel_l1"] == {"Quality": 0.02, "Balanced": 0.04, "Fast": 0.06, "Turbo": 0.09}[preset]
    assert r["measured_rel_l1"] is not None and r["adaptation"]["measured_calls"] > 0
    assert r["measured_rel_l1"] <= 1.25 * r["target_rel_l1"], (r["measured_rel_l1"], r["adaptation"])
    line = [ln for ln in srv.log_text().splitlines() if f"[node 10]: {preset}, 6 steps" in ln]
    assert line and f"(target {r['target_rel_l1']:.4f})" in line[-1]


# ----------------------------------------------------------------------------- failures, events
def test_kernel_error_falls_back_to_dense(comfy_server):
    srv = comfy_server
    plain = baseline(srv, "hy", 111)
    g = hunyuan(srv, 111, sparge(), prefix="hy_fail")
    g["14"] = {"class_type": "SpargeTestFailKernel", "inputs": {"model": ["10", 0]}}
    g["5"]["inputs"]["model"] = ["14", 0]
    lat, rs, _ = run(srv, g)
    r = only(rs)
    assert r["completed"] and r["sparse_calls"] == 0
    assert r["dense_calls"] == {"short": 4, "kernel error": 4}
    assert torch.equal(lat, plain)
    warnings = [line for line in srv.log_text().splitlines() if "sparse kernel failed" in line]
    assert len(warnings) == 1, warnings  # warned once, then quietly dense


def test_readout_event_and_endpoint(comfy_server):
    srv = comfy_server
    pid, messages = srv.queue_and_listen(hunyuan(srv, 112, sparge(verbose=True), prefix="hy_ws"), timeout=120)
    events = [m["data"] for m in messages if m["type"] == "sparge.readout"]
    assert len(events) == 1
    ev = events[0]
    assert ev["node_id"] == "10" and ev["prompt_id"] == pid and ev["settings"]["verbose"] is True
    assert srv.get_json("/sparge/last_readout?node_id=10") == ev
    assert srv.get_json("/sparge/last_readout")["10"] == ev
    assert srv.get_json(f"/sparge/readouts?prompt_id={pid}")["readouts"] == [ev]
    status, _ = srv._request("GET", "/sparge/last_readout?node_id=nope")
    assert status == 404
    line = [ln for ln in srv.log_text().splitlines() if ln.startswith("Sparge Attention [node 10]: Custom, 2 steps")]
    assert line and "backend reference" in line[-1] and "Hilbert on (2, 16, 16)" in line[-1]


# ----------------------------------------------------------------------------- the demo
def _demo_module():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "demo.py")
    spec = importlib.util.spec_from_file_location("sparge_demo_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_ui_workflow_roundtrip_and_run(comfy_server, tmp_path):
    """scripts/demo.py: the built-in graph as a UI-format workflow (what the frontend saves:
    widgets_values in schema order, a "control after generate" value after seeds, links table)
    converts back to the same API graph, and the demo runs it on the server."""
    srv = comfy_server
    demo = _demo_module()
    info = srv.object_info()
    small = dict(width=256, height=256, length=5, steps=2)
    api = demo.demo_graph(srv.tiny_models["wan21"].name, **small)
    ui = demo.api_to_ui(api, info)
    sp = next(n for n in ui["nodes"] if n["type"] == NODE)
    # the frontend saves required widgets, then optional ones (map_layer, error_check; not the profile socket)
    opt = info[NODE]["input"].get("optional", {})
    opt_widgets = [opt[k][1]["default"] for k in info[NODE]["input_order"].get("optional", []) if demo._is_widget(opt[k])]
    assert sp["widgets_values"] == [demo.SPARGE_WIDGETS[k] for k in info[NODE]["input_order"]["required"][1:]] + opt_widgets
    ks = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    assert ks["widgets_values"][:2] == [demo.DEMO["seed"], "fixed"]
    back = demo.ui_to_api(ui, info)
    assert set(back) == set(api)
    for nid, node in api.items():
        assert back[nid]["class_type"] == node["class_type"]
        for k, v in node["inputs"].items():
            assert back[nid]["inputs"][k] == v, (nid, k)
    wf = tmp_path / "tiny_wan_demo.json"
    wf.write_text(json.dumps(ui))
    lines = []
    res = demo.run_demo(srv, wf, out=lines.append)
    r = res["readouts"][0]
    assert len(res["readouts"]) == 1 and r["node_id"] == demo.SPARGE_ID and r["settings"]["preset"] == "Fast"
    assert r["sparse_calls"] == 4 and r["backend"] == "reference" and res["rel_diff"] < 0.05
    assert any(ln.startswith("  Sparge Attention [node 10]") for ln in lines)
