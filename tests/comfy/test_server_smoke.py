"""Smoke tests against a REAL ComfyUI 0.3.75 server (CPU) with tiny random-weight video models."""
import json
import math

import pytest

from devkit.comfy_harness import (
    ExecutionFailed,
    hunyuan_video_graph,
    load_latent_file,
    wan21_t2v_graph,
    wan22_two_stage_graph,
)

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(300)]

CORE_NODES = ["UNETLoader", "KSampler", "KSamplerAdvanced", "SaveLatent", "EmptyHunyuanLatentVideo",
              "ConditioningZeroOut", "SpargeTestConditioning"]


def _check_latent_output(srv, entry, shape):
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = srv.output_files(entry)
    assert len(files) == 1, entry["outputs"]
    assert files[0].exists() and files[0].suffix == ".latent", files
    lat = load_latent_file(files[0])
    assert tuple(lat.shape) == shape
    assert bool(lat.isfinite().all())
    assert float(lat.abs().sum()) > 0
    return lat


def test_server_up_and_lists_nodes(comfy_server):
    info = comfy_server.object_info()
    missing = [n for n in CORE_NODES if n not in info]
    assert not missing, missing
    unets = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    for p in comfy_server.tiny_models.values():
        assert p.name in unets
    stats = comfy_server.get_json("/system_stats")
    assert stats["system"]["comfyui_version"] == "0.3.75"
    assert stats["devices"][0]["type"] == "cpu"
    assert "SpargeTestConditioning" in comfy_server.object_info("SpargeTestConditioning")["name"]


def test_wan21_t2v_two_steps(comfy_server):
    g = wan21_t2v_graph(comfy_server.tiny_models["wan21"].name, seed=11)
    entry = comfy_server.wait(comfy_server.queue(g), timeout=120)
    lat = _check_latent_output(comfy_server, entry, (1, 16, 2, 32, 32))
    assert "Requested to load WAN21" in comfy_server.log_text()
    # The same graph with the same seed is served from cache; a new seed runs again, differently.
    entry2 = comfy_server.run(wan21_t2v_graph(comfy_server.tiny_models["wan21"].name, seed=12), timeout=120)
    lat2 = _check_latent_output(comfy_server, entry2, (1, 16, 2, 32, 32))
    assert not bool((lat - lat2).abs().max() == 0)


def test_hunyuan_video_two_steps(comfy_server):
    g = hunyuan_video_graph(comfy_server.tiny_models["hunyuan"].name, seed=21)
    entry = comfy_server.run(g, timeout=120)
    _check_latent_output(comfy_server, entry, (1, 16, 2, 32, 32))
    assert "Requested to load HunyuanVideo" in comfy_server.log_text()


def test_wan22_two_stage_pair(comfy_server):
    g = wan22_two_stage_graph(comfy_server.tiny_models["wan22_high"].name,
                              comfy_server.tiny_models["wan22_low"].name, seed=31, steps=4, switch_at=2)
    entry = comfy_server.run(g, timeout=120)
    _check_latent_output(comfy_server, entry, (1, 16, 2, 32, 32))


def test_validation_error_is_reported(comfy_server):
    g = wan21_t2v_graph("does_not_exist.safetensors", seed=41)
    status, body = comfy_server.post_prompt_raw(g)
    assert status == 400
    assert "1" in body["node_errors"], body
    assert body["node_errors"]["1"]["class_type"] == "UNETLoader"


def test_execution_error_raises_with_log(comfy_server):
    # Hunyuan conditioning (width 256) into the Wan model: passes validation, fails while sampling.
    g = wan21_t2v_graph(comfy_server.tiny_models["wan21"].name, seed=51)
    g["2"]["inputs"]["width"] = 256
    with pytest.raises(ExecutionFailed) as ei:
        comfy_server.run(g, timeout=120)
    assert ei.value.error.get("node_type") == "KSampler"
    assert "server log tail" in str(ei.value)
    # The server survives and keeps serving.
    assert comfy_server.is_alive()


def _probe_records(srv, name):
    import json

    return [json.loads(line) for line in open(srv.output_dir / f"{name}.jsonl")]


def test_attention_override_hook_wan(comfy_server):
    """ComfyUI 0.3.75 routes Wan attention through transformer_options['optimized_attention_override']."""
    g = wan21_t2v_graph(comfy_server.tiny_models["wan21"].name, seed=61, cfg=5.0,
                        model_node=("SpargeTestAttentionProbe", {"log_name": "probe_wan"}))
    _check_latent_output(comfy_server, comfy_server.run(g, timeout=120), (1, 16, 2, 32, 32))
    recs = _probe_records(comfy_server, "probe_wan")
    # 2 steps x 2 blocks x (self + cross); cfg>1 batches cond+uncond (B=2); (B, N, H*D) layout.
    assert len(recs) == 8
    shapes = {tuple(tuple(a["shape"]) for a in r["args"]) for r in recs}
    assert shapes == {((2, 512, 256),) * 3, ((2, 512, 256), (2, 16, 256), (2, 16, 256))}
    for r in recs:
        assert r["kwargs"]["heads"] == 2 and "skip_reshape" not in r["kwargs"]
        assert r["block_index"] is None  # 0.3.75 Wan gives no block index / token grid
        assert "sigmas" in r["transformer_options_keys"]


def test_attention_override_hook_hunyuan(comfy_server):
    g = hunyuan_video_graph(comfy_server.tiny_models["hunyuan"].name, seed=71, cfg=1.0,
                            model_node=("SpargeTestAttentionProbe", {"log_name": "probe_hy"}))
    _check_latent_output(comfy_server, comfy_server.run(g, timeout=120), (1, 16, 2, 32, 32))
    recs = _probe_records(comfy_server, "probe_hy")
    assert len(recs) == 8  # per step: 2 token-refiner calls (text only) + 1 double + 1 single
    joint = [r for r in recs if r["block_type"] in ("double", "single")]
    refiner = [r for r in recs if r["block_type"] is None]
    assert len(joint) == 4 and len(refiner) == 4
    for r in joint:
        # (B, H, N, D) with image tokens (512) first then text tokens (16); heads passed positionally.
        assert [a["shape"] for a in r["args"][:3]] == [[1, 2, 528, 128]] * 3 and r["args"][3] == 2
        assert r["kwargs"]["skip_reshape"] is True and r["kwargs"]["mask"] is None
        assert r["block_index"] == 0 and r["total_blocks"] == 1
    for r in refiner:
        assert r["args"][0]["shape"] == [1, 2, 16, 128]


def test_templates_are_only_workflows_users_can_run(comfy_server):
    """ComfyUI lists the pack's workflows/ as templates: the demo's test-only graph is not among them,
    and every template uses only node types of a stock ComfyUI plus this pack (never a test node)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    shipped = sorted(p.stem for p in (repo / "workflows").glob("*.json"))
    listed = comfy_server.get_json("/api/workflow_templates")
    ours = [names for names in listed.values() if sorted(names) == shipped]
    assert ours, (listed, shipped)
    assert not any("tiny_wan_demo" in names for names in listed.values())
    info = comfy_server.get_json("/object_info")
    for stem in shipped:
        nodes = json.loads((repo / "workflows" / f"{stem}.json").read_text())["nodes"]
        types = {n["type"] for n in nodes} - {"Note", "MarkdownNote"}
        assert types <= set(info), (stem, types - set(info))
        assert not any(t.startswith("SpargeTest") for t in types), stem
