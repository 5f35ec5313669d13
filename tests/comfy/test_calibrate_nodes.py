"""Sparge Calibrate, Load Sparge Profile, the Sparge Attention node's `profile` input and its
`error_check` option, on a REAL ComfyUI 0.3.75 server (CPU, reference backend).

The tiny random-weight Wan of tiny_models.py has near-uniform attention: hardly a block can be
skipped within a useful error, so a calibration of it keeps most heads dense (measured at
target 0.05: block 0 both heads dense, block 1 one head at 0.23 sparsity; checked below) and
an error check of it would see little more than quantization. To make the end-to-end check meaningful
the module also uses a "local attention" variant of the same file (`make_local_wan`): in each
block the self-attention q and k biases are set to the same large vector, so every token's query
and key are nearly that vector rotated by its 3D RoPE position, and attention falls off with
distance in (t, h, w), like the local heads of real video models. At 384x384x5 (a (2, 24, 24)
grid = 1152 tokens: 18 query blocks x 9 key blocks), measured when this test was written:
calibration at target rel-L1 0.05 chose cdf 0.84/0.86 (block 0) and 0.80/0.80 (block 1),
sampled sparsity 0.24 / 0.38 at sampled rel-L1 0.025 / 0.028; the full run with that profile
measured (error check, every call, same prompt) rel-L1 0.025 / 0.028, cosine 0.9996 at overall
sparsity 0.31, where the Balanced preset reached 0.09 sparsity, and topk 0.2 (2 of 9 key
blocks) measured an error well above the target.
"""
import json
import pickle
import struct

import pytest
import torch

from devkit.pack import load_pack

load_pack()
from sparge_attention.sparge_core.profiles import PACK_VERSION, SpargeProfile  # noqa: E402

from devkit.comfy_harness import (  # noqa: E402
    ComfyServer, ExecutionFailed, load_latent_file, only_readout as only, run_latent_graph, wan21_t2v_graph)

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(600)]

LOCAL_WAN = "sparge_tiny_wan21_local_attention.safetensors"
SIZE = dict(width=384, height=384, length=5)  # (2, 24, 24) token grid, 1152 tokens
GRID = [2, 24, 24]
TOKENS = 1152
STEPS = 4
TARGET = 0.05
CAL_ID, SPARGE_ID, LOAD_ID = "10", "10", "20"
CAL = dict(profile_name="tiny_local", target_l1=TARGET, mode="cdf", every_n_steps=2, sample_query_blocks=16,
           min_tokens=256)
SPARGE = dict(preset="Custom", mode="cdf", simthreshd1=-1.0, cdfthreshd=1.0, topk=0.5, pvthreshd=100.0,
              start_percent=0.0, end_percent=1.0, dense_blocks="", hilbert=True, min_tokens=256, verbose=False)


def make_local_wan(src, dst, scale=4.0, seed=7):
    """The tiny Wan with local attention (see the module docstring): q.bias = k.bias = scale * u."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    g = torch.Generator().manual_seed(seed)
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_blocks):
        u = torch.randn(sd[f"blocks.{i}.self_attn.q.bias"].shape, generator=g)
        sd[f"blocks.{i}.self_attn.q.bias"] = scale * u
        sd[f"blocks.{i}.self_attn.k.bias"] = scale * u
    save_file(sd, str(dst))


@pytest.fixture(scope="module")
def srv():
    with ComfyServer(install_tiny_models=True) as s:
        make_local_wan(s.tiny_models["wan21"], s.diffusion_models_dir / LOCAL_WAN)
        yield s


def graph(srv, seed, node=None, model=LOCAL_WAN, prefix="cal", **kw):
    g = wan21_t2v_graph(model, seed=seed, steps=STEPS, model_node=node, prefix=prefix, **dict(SIZE, **kw))
    return g


def with_profile(g, name="tiny_local.safetensors"):
    g[LOAD_ID] = {"class_type": "LoadSpargeProfile", "inputs": {"profile_name": name}}
    g[SPARGE_ID]["inputs"]["profile"] = [LOAD_ID, 0]
    return g


def run(srv, g, client_id=None):
    lat, readouts, _, pid = run_latent_graph(srv, g, client_id=client_id)
    return lat, readouts, pid


def profiles_dir(srv):
    return srv.models_dir / "sparge_profiles"


def run_with_events(srv, g):
    """Queue over a websocket client; returns (prompt_id, progress events, sparge.readout events)."""
    pid, messages = srv.queue_and_listen(g)
    assert messages[-1]["type"] == "execution_success", messages[-1]
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    readouts = [m["data"] for m in messages if m["type"] == "sparge.readout"]
    return pid, progress, readouts


# ----------------------------------------------------------------------------- schemas
def test_schemas(srv):
    cal = srv.object_info("SpargeCalibrate")
    assert cal["display_name"] == "Sparge Calibrate" and cal["output"] == ["MODEL"]
    assert cal["input_order"]["required"] == ["model", "profile_name", "target_l1", "mode", "every_n_steps",
                                              "sample_query_blocks", "min_tokens"]
    req = cal["input"]["required"]
    t = req["target_l1"][1]
    assert t["default"] == 0.05 and t["display"] == "slider" and "sum|sparse - dense|" in t["tooltip"]
    assert req["sample_query_blocks"][1]["default"] == 16 and req["every_n_steps"][1]["default"] == 4
    for name in cal["input_order"]["required"]:
        assert len(req[name][1].get("tooltip", "")) > 20, name

    load = srv.object_info("LoadSpargeProfile")
    assert load["output"] == ["SPARGE_PROFILE"] and list(load["input"]["required"]) == ["profile_name"]

    sp = srv.object_info("SpargeAttention")
    # new inputs are OPTIONAL and come last: saved workflows keep their widgets_values
    assert sp["input_order"]["required"] == ["model", "preset", "mode", "simthreshd1", "cdfthreshd", "topk",
                                             "pvthreshd", "start_percent", "end_percent", "dense_blocks", "hilbert",
                                             "min_tokens", "verbose"]
    assert sp["input_order"]["optional"][-5:] == ["error_check", "minshare", "fill_skipped", "target_rel_l1", "profile"]
    opt = sp["input"]["optional"]
    assert opt["profile"][0] == "SPARGE_PROFILE"
    assert opt["error_check"][1]["default"] == "off"


# ----------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def calibrated(srv):
    """One calibration run (observing steps 0 and 2 of 4) + the plain run of the same prompt."""
    plain, _, _ = run(srv, graph(srv, 301, None, prefix="plain"))
    pid, progress, events = run_with_events(srv, graph(srv, 301, ("SpargeCalibrate", CAL), prefix="calrun"))
    # execution_success can reach the websocket before the history entry is written: wait for it
    entry = srv.wait(pid)
    lat = load_latent_file(srv.output_files(entry)[0])
    readout = only(srv.get_json(f"/sparge/readouts?prompt_id={pid}")["readouts"], CAL_ID)
    return dict(plain=plain, latent=lat, readout=readout, progress=progress, events=events, pid=pid)


def test_calibrate_writes_safetensors_profile(srv, calibrated):
    from safetensors import safe_open

    # the run itself is the normal, dense one
    assert torch.equal(calibrated["latent"], calibrated["plain"])
    r = calibrated["readout"]
    assert r["completed"] and r["sparse_calls"] == 0
    assert r["dense_calls"] == {"calibration": 8, "cross attention": 8}  # 4 steps x 2 blocks each
    c = r["calibration"]
    assert c["file"] == "sparge_profiles/tiny_local.safetensors"
    assert c["steps_observed"] == 2 and c["calls"] == 4  # steps 0, 2; cond+uncond batched (B=2)
    assert c["model_family"] == "WAN21_T2V" and (c["layers"], c["heads"]) == (2, 2)
    assert c["n_tokens"] == TOKENS and c["grid"] == GRID and c["target_l1"] == TARGET
    assert c["calibrated_layers"] == [0, 1] and c["skipped"] == {}
    # local attention: real sparsity within the target (sampled estimate)
    assert all(sp > 0.15 for sp in c["layer_sparsity"]), c
    assert all(0 < e <= TARGET for e in c["layer_rel_l1"]), c

    path = profiles_dir(srv) / "tiny_local.safetensors"
    assert path.is_file() and not list(profiles_dir(srv).glob("*.tmp"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        t = {k: f.get_tensor(k) for k in keys}
    assert keys == {"cdfthreshd", "simthreshd1", "pvthreshd", "dense", "calibrated", "head_sparsity", "head_rel_l1",
                    "sparsity", "rel_l1", "rel_l1_worst"}
    assert t["cdfthreshd"].shape == (2, 2) and t["cdfthreshd"].dtype == torch.float32
    assert t["dense"].dtype == torch.bool and not t["dense"].any() and t["calibrated"].all()
    assert meta["format"] == "sparge-attention-profile" and meta["model_family"] == "WAN21_T2V"
    assert meta["n_tokens"] == str(TOKENS) and float(meta["target_l1"]) == TARGET
    assert meta["steps"] == "2" and meta["pack_version"] == PACK_VERSION and json.loads(meta["grid"]) == GRID
    assert json.loads(meta["layer_sparsity"]) == pytest.approx(t["sparsity"].tolist(), abs=1e-5)
    assert json.loads(meta["layer_sparsity"]) == pytest.approx(c["layer_sparsity"])
    assert meta["every_n_steps"] == "2"
    # measured with the skipped blocks estimated (the default), and the profile runs that way
    assert c["fill_skipped"] is True and meta["fill_skipped"] == "1"
    # the event carried the same summary; the log line names the file
    assert [e["calibration"] for e in calibrated["events"] if e["node_id"] == CAL_ID] == [c]
    line = [ln for ln in srv.log_text().splitlines() if ln.startswith(f"Sparge Attention [node {CAL_ID}]: Calibrate")]
    assert line and "calibration: wrote sparge_profiles/tiny_local.safetensors" in line[-1]


def test_calibration_progress_bar(calibrated):
    mine = [p for p in calibrated["progress"] if p.get("node") == CAL_ID]
    # one tick per observed call, on the calibrate node's own bar: 2 steps x 2 blocks
    assert [p["value"] for p in mine] == [1, 2, 3, 4], calibrated["progress"]
    assert all(p["max"] == 4 and p["prompt_id"] == calibrated["pid"] for p in mine)
    assert any(p.get("node") == "5" for p in calibrated["progress"])  # the sampler keeps its own bar


def test_random_model_calibrates_mostly_dense(srv, calibrated):
    """The plain tiny Wan (near-uniform attention): little can be skipped within 0.05."""
    g = graph(srv, 302, ("SpargeCalibrate", dict(CAL, profile_name="tiny_uniform")),
              model=srv.tiny_models["wan21"].name, prefix="uniform")
    _, rs, _ = run(srv, g)
    c = only(rs, CAL_ID)["calibration"]
    assert c["layer_sparsity"][0] == 0.0 and c["dense_heads"] >= 2  # block 0: every head dense
    assert c["sparsity"] < 0.5 * calibrated["readout"]["calibration"]["sparsity"]


# ----------------------------------------------------------------------------- using the profile
@pytest.fixture(scope="module")
def profiled(srv, calibrated):
    """Same prompt as the calibration: keep-everything settings with and without the profile."""
    _, rs, _ = run(srv, graph(srv, 301, ("SpargeAttention", dict(SPARGE, error_check="every call")), prefix="noprof"))
    without = only(rs)
    lat, rs, _ = run(srv, with_profile(graph(srv, 301, ("SpargeAttention", dict(SPARGE, error_check="every call")),
                                             prefix="prof")))
    return dict(without=without, with_=only(rs), latent=lat)


def test_profile_sets_per_head_params(srv, profiled):
    from safetensors.torch import load_file

    t = load_file(str(profiles_dir(srv) / "tiny_local.safetensors"))
    r, base = profiled["with_"], profiled["without"]
    p = r["profile"]
    assert p["name"] == "tiny_local.safetensors" and p["calibrated_layers"] == [0, 1]
    assert p["fill_skipped"] is True  # the profile's blocks run with the estimate it was calibrated with
    assert p["layers_used"] == [0, 1] and p["notes"] == []  # same resolution
    for layer in (0, 1):
        used = p["params"][str(layer)]
        assert used["threshold"] == pytest.approx(t["cdfthreshd"][layer].tolist())
        assert used["simthreshd1"] == pytest.approx(t["simthreshd1"][layer].tolist())
        assert used["dense_heads"] == []
    assert r["settings"]["profile"] == "tiny_local.safetensors" and base["settings"]["profile"] is None
    # the kernel saw them: keep-everything settings skip nothing, with the profile each block
    # skips what the calibration measured
    assert base["sparsity"] == 0.0
    prof_sp = json.loads(json.dumps(t["sparsity"].tolist()))
    for row in r["layer_step_sparsity"]:
        assert row == pytest.approx(prof_sp, abs=0.05), (row, prof_sp)
    assert r["sparsity"] > 0.2 and r["flops_saved_fraction"] > 0.2


def test_error_check_of_calibrated_run_meets_target(srv, profiled):
    r, base = profiled["with_"], profiled["without"]
    ec = r["error_check"]
    assert ec["mode"] == "every call" and ec["calls"] == 8 and set(ec["per_layer"]) == {"0", "1"}
    for layer, m in ec["per_layer"].items():
        assert m["calls"] == 4
        assert 0.005 < m["rel_l1"] < TARGET, (layer, m)  # real skipping, within the target
        assert m["cosine"] > 0.999
    assert ec["rel_l1"] < TARGET and ec["worst_rel_l1"] < TARGET
    # keep-everything: quantization error only
    assert base["error_check"]["rel_l1"] < 0.015 and base["error_check"]["calls"] == 8
    line = [ln for ln in srv.log_text().splitlines() if ln.startswith(f"Sparge Attention [node {SPARGE_ID}]")]
    assert any("error vs dense (every call, 8 calls): rel-L1" in ln and "profile tiny_local" in ln for ln in line)


def test_error_check_sees_too_much_skipping_and_samples(srv):
    _, rs, _ = run(srv, graph(srv, 303, ("SpargeAttention", dict(SPARGE, mode="topk", topk=0.2, fill_skipped=False,
                                                                 error_check="every call")), prefix="rough"))
    assert only(rs)["error_check"]["rel_l1"] > TARGET  # 2 of 9 key blocks: the check reports it
    _, rs, _ = run(srv, graph(srv, 303, ("SpargeAttention", dict(SPARGE, mode="topk", topk=0.2, fill_skipped=False,
                                                                 error_check="sampled")), prefix="rough_s"))
    ec = only(rs)["error_check"]
    # sampled: step 0 of 4 only, and there block 0 of 2 (block % 4 == (step // 4) % 4)
    assert ec["mode"] == "sampled" and ec["calls"] == 1 and list(ec["per_layer"]) == ["0"]
    _, rs, _ = run(srv, graph(srv, 303, ("SpargeAttention", SPARGE), prefix="off"))
    assert only(rs)["error_check"] is None  # off (the default, also for workflows saved before it)


def test_profile_at_another_resolution(srv, calibrated):
    g = with_profile(graph(srv, 304, ("SpargeAttention", SPARGE), prefix="smaller", width=256, height=256))
    _, rs, _ = run(srv, g)
    p = only(rs)["profile"]
    assert p["layers_used"] == [0, 1]
    assert len(p["notes"]) == 1 and "calibrated at 1,152 tokens" in p["notes"][0] and "512" in p["notes"][0]


# ----------------------------------------------------------------------------- bad files
def _meta_and_tensors(path):
    from safetensors.torch import load_file

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    return meta, load_file(str(path))


def _write(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)


class _Payload:
    """Unpickling this creates the marker file (it must never happen)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _profile(layers, heads, **over):
    thr = torch.full((layers, heads), 0.9)
    kw = dict(mode="cdf", scoring="lse", threshold=thr, simthreshd1=torch.full((layers, heads), -1.0),
              pvthreshd=torch.full((layers, heads), float("inf")), dense=torch.zeros(layers, heads, dtype=torch.bool),
              calibrated=torch.ones(layers, dtype=torch.bool), head_sparsity=torch.full((layers, heads), 0.3),
              head_rel_l1=torch.full((layers, heads), 0.04), sparsity=torch.full((layers,), 0.3),
              rel_l1=torch.full((layers,), 0.04), rel_l1_worst=torch.full((layers,), 0.045),
              model_family="WAN21_T2V", n_tokens=TOKENS, grid=tuple(GRID), target_l1=0.05, steps=2, calls=4)
    kw.update(over)
    return SpargeProfile(**kw)


def test_bad_profiles_are_refused_and_server_keeps_running(srv, calibrated, tmp_path):
    d = profiles_dir(srv)
    good = d / "tiny_local.safetensors"
    data = good.read_bytes()
    meta, tensors = _meta_and_tensors(good)
    marker = tmp_path / "PICKLE_RAN"

    (d / "bad_truncated.safetensors").write_bytes(data[: len(data) - 40])
    (d / "bad_pickle.safetensors").write_bytes(pickle.dumps({"cdfthreshd": _Payload(str(marker))}))
    torch.save({"x": torch.zeros(2)}, d / "bad_torchsave.safetensors")  # a zip of pickles
    (d / "bad_json.safetensors").write_bytes(struct.pack("<Q", 12) + b'{"a": 1,,, }')
    (d / "bad_text.safetensors").write_bytes(b"just some text, not a profile at all")
    _write(d / "bad_meta_layers.safetensors", tensors, dict(meta, layers="3"))  # metadata lies about the shape
    _write(d / "bad_meta_sparsity.safetensors", tensors,
           dict(meta, layer_sparsity=json.dumps([0.9, 0.9])))  # the JSON copy lies about the tensors
    _write(d / "bad_edited.safetensors", dict(tensors, sparsity=tensors["sparsity"] + 0.2), meta)
    expect_400 = {
        "bad_truncated": "truncated",
        "bad_pickle": "pickle",
        "bad_torchsave": "pickle",
        "bad_json": "not valid JSON",
        "bad_text": "not a safetensors file",
        "bad_meta_layers": "metadata says 3 layers",
        "bad_meta_sparsity": "does not match the tensors",
        "bad_edited": "edited or corrupt",
        "no_such_file": "not in models/sparge_profiles",
    }
    for stem, needle in expect_400.items():
        g = with_profile(graph(srv, 305, ("SpargeAttention", SPARGE), prefix="bad"), f"{stem}.safetensors")
        status, body = srv.post_prompt_raw(g)
        assert status == 400, (stem, body)
        errs = body["node_errors"][LOAD_ID]
        assert errs["class_type"] == "LoadSpargeProfile"
        text = json.dumps(errs["errors"])
        assert needle in text, (stem, text)
        assert srv.is_alive()

    # files that are fine on their own but made for another model: the Sparge node fails with the reason
    _profile(2, 3).save(d / "other_heads.safetensors")
    _profile(3, 2).save(d / "other_blocks.safetensors")
    for stem, needle in (("other_heads", "it has 2 attention heads per block, the profile 3"),
                         ("other_blocks", "it has 2 transformer blocks, the profile 3")):
        g = with_profile(graph(srv, 306, ("SpargeAttention", SPARGE), prefix="other"), f"{stem}.safetensors")
        with pytest.raises(ExecutionFailed) as ei:
            run(srv, g)
        err = ei.value.error
        assert err["node_id"] == SPARGE_ID and needle in err["exception_message"], err

    assert not marker.exists()  # nothing in any file was executed
    assert srv.get_json("/system_stats")["system"]["comfyui_version"] == "0.3.75"
    _, rs, _ = run(srv, with_profile(graph(srv, 307, ("SpargeAttention", SPARGE), prefix="after_bad")))
    assert only(rs)["profile"]["layers_used"] == [0, 1]


def test_calibrate_misuse_gives_clear_errors(srv):
    status, body = srv.post_prompt_raw(graph(srv, 308, ("SpargeCalibrate", dict(CAL, profile_name="../escape"))))
    assert status == 400 and "no folders" in json.dumps(body["node_errors"][CAL_ID]["errors"])
    for field, value, needle in (("target_l1", 0.9, "bigger than max"), ("target_l1", 0.0, "smaller than min"),
                                 ("mode", "random", "not in"), ("every_n_steps", 0, "smaller than min"),
                                 ("profile_name", "  ", "empty")):
        status, body = srv.post_prompt_raw(graph(srv, 308, ("SpargeCalibrate", dict(CAL, **{field: value}))))
        assert status == 400 and needle in json.dumps(body["node_errors"][CAL_ID]["errors"]), (field, body)
    # nothing eligible: the sampler fails with the reason instead of silently writing nothing
    with pytest.raises(ExecutionFailed) as ei:
        run(srv, graph(srv, 309, ("SpargeCalibrate", dict(CAL, profile_name="never", min_tokens=4096)), prefix="x"))
    msg = ei.value.error["exception_message"]
    assert "no self-attention call could be calibrated" in msg and "min_tokens=4096" in msg and "short 8" in msg
    assert not (profiles_dir(srv) / "never.safetensors").exists()
    # calibration measures against normal attention: not after Sparge Attention
    g = graph(srv, 310, ("SpargeAttention", SPARGE), prefix="y")
    g["11"] = {"class_type": "SpargeCalibrate", "inputs": dict(CAL, model=["10", 0])}
    g["5"]["inputs"]["model"] = ["11", 0]
    with pytest.raises(ExecutionFailed) as ei:
        run(srv, g)
    assert ei.value.error["node_id"] == "11" and "WITHOUT Sparge Attention" in ei.value.error["exception_message"]
    assert srv.is_alive()


# ----------------------------------------------------------------------------- in-process (no server)
def test_profile_params_reach_the_op_and_compile():
    """A loaded profile's per-head thresholds go to the op; a block whose heads are all dense runs
    ComfyUI's attention ("profile dense layer"); torch.compile(fullgraph=True) traces both."""
    import dataclasses
    import math

    from sparge_attention.nodes.config import SpargeConfig
    from sparge_attention.nodes.override import SpargeOverride
    from sparge_attention.nodes.profile_files import LoadedProfile
    from sparge_attention.nodes.stats import ForwardContext

    dense = torch.zeros(2, 2, dtype=torch.bool)
    dense[1] = True
    prof = _profile(2, 2, mode="topk", threshold=torch.tensor([[0.25, 1.0], [1.0, 1.0]]),
                    simthreshd1=torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), dense=dense,
                    head_sparsity=torch.tensor([[0.75, 0.0], [0.0, 0.0]]), sparsity=torch.tensor([0.375, 0.0]),
                    n_tokens=256, grid=(1, 16, 16), pvthreshd=torch.full((2, 2), math.inf))
    keep_all = SpargeConfig.from_widgets(preset="Custom", mode="cdf", cdfthreshd=1.0, simthreshd1=-1.0, min_tokens=128)
    ov = SpargeOverride(dataclasses.replace(keep_all, profile=LoadedProfile(prof, "t.safetensors")), node_id="1")
    comfy_calls = []

    def comfy_attention(q, k, v, heads, **kw):
        comfy_calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def forward(q, k, v, to):  # block 0, then block 1 (Wan: blocks counted per forward)
        return tuple(ov(comfy_attention, q, k, v, 2, skip_reshape=True, skip_output_reshape=True,
                        transformer_options=to) for _ in range(2))

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=g) for _ in range(3))
    ctx = ForwardContext(0, 1.0, 0.0, True, ((1, 16, 16),), None, 0)
    want = forward(q, k, v, {ov.key: ctx})
    # block 0: head 0 keeps 1 of 2 key blocks per query block (topk 0.25), head 1 all: 4 + 8 of 16
    assert [int(r.kept) for r in ctx.records] == [12] and ctx.record_layers == [0]
    assert ctx.dense == {"profile dense layer": 1} and comfy_calls == [1]
    assert torch.equal(want[1], torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch._dynamo.reset()
    ctx2 = ForwardContext(0, 1.0, 0.0, True, ((1, 16, 16),), None, 0)
    got = torch.compile(forward, fullgraph=True, backend="aot_eager")(q, k, v, {ov.key: ctx2})
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert [int(r.kept) for r in ctx2.records] == [12] and ctx2.dense == {"profile dense layer": 1}


def test_error_check_schedule_and_sums():
    from sparge_attention.nodes import error_check as ec

    sampled = [(s, b) for s in range(16) for b in range(8) if ec.wants_check("sampled", s, b)]
    assert {s for s, _ in sampled} == {0, 4, 8, 12}
    assert sorted(b for _, b in sampled) == list(range(8))  # every block once per 16 steps
    assert len(sampled) == 8 and not ec.wants_check("off", 0, 0) and ec.wants_check("every call", 3, 5)
    g = torch.Generator().manual_seed(1)
    out, ref = torch.randn(3, 1000, 64, generator=g), torch.randn(3, 1000, 64, generator=g)
    old = ec._CHUNK_ELEMS
    ec._CHUNK_ELEMS = 4096  # many chunks
    try:
        s = ec.call_sums(out.half(), ref.half())
    finally:
        ec._CHUNK_ELEMS = old
    o, r = out.half().double(), ref.half().double()
    want = torch.stack([(o - r).abs().sum(), r.abs().sum(), (o * r).sum(), (o * o).sum(), (r * r).sum()])
    assert torch.allclose(s, want, rtol=1e-5)
