"""The Sparge Attention node with what users combine it with, each in a REAL ComfyUI 0.3.75 run
(CPU, tiny random-weight models): fp8 weights, step caches (EasyCache, LazyCache), LoRA loaders, and
the Wan 2.2 high/low pair with a Sparge node and TorchCompileModel on each model.

One server for the module, started with --use-pytorch-cross-attention so that ComfyUI's own (dense)
attention is torch SDPA, as on a GPU. Its CPU default, sub-quadratic attention, asks psutil for free
memory (a file read) inside the block loop, which breaks the torch.compile graph there: dynamo then
compiles module by module, a CPU-only case (a GPU's default is SDPA). TORCH_LOGS puts dynamo's graph
code, graph breaks and recompiles into the server log, so the compile test can see the sparse op
inside a compiled graph.
"""
import json
import re
import time

import pytest
import torch

from devkit.comfy_harness import ComfyServer, only_readout as only, run_latent_graph, wan21_t2v_graph, wan22_two_stage_graph
from devkit.metrics import rel_l2 as rel
from devkit.tiny_models import make_tiny_wan_lora

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(900)]

NODE = "SpargeAttention"
KEEP_ALL = dict(preset="Custom", mode="cdf", simthreshd1=-1.0, cdfthreshd=1.0, topk=0.5, pvthreshd=100.0,
                start_percent=0.0, end_percent=1.0, dense_blocks="", hilbert=True, min_tokens=256, verbose=False,
                fill_skipped=False)
LATENT = (1, 16, 2, 32, 32)
LORA = "sparge_tiny_wan_lora.safetensors"
SELF_ATTN_KEYS = 512  # a 256x256x5 latent: (2, 16, 16) tokens; cross-attention has 16 text keys


def sparge(**over):
    return dict(KEEP_ALL, **over)


@pytest.fixture(scope="module")
def srv():
    server = ComfyServer(install_tiny_models=True, extra_args=["--use-pytorch-cross-attention"],
                         env={"TORCH_LOGS": "graph_breaks,recompiles,graph_code"})
    make_tiny_wan_lora(server.models_dir / "loras" / LORA)  # before start: the loader lists it
    with server:
        yield server


def run(srv, graph, timeout=300):
    """Queue, wait; (latent, readouts of this prompt in order, history entry, log lines it wrote)."""
    log_start = len(srv.log_text().splitlines())
    lat, readouts, entry, _ = run_latent_graph(srv, graph, LATENT, timeout)
    return lat, readouts, entry, srv.log_text().splitlines()[log_start:]


def wan(srv, seed, sp=None, steps=2, prefix="compat", dtype="default"):
    g = wan21_t2v_graph(srv.tiny_models["wan21"].name, seed=seed, steps=steps,
                        model_node=(NODE, sp) if sp is not None else None, prefix=prefix)
    g["1"]["inputs"]["weight_dtype"] = dtype
    return g


def insert_after(g, src, node_id, class_type, **inputs):
    """Put a MODEL -> MODEL node between `src` and whatever took src's model; returns node_id."""
    for node in g.values():
        for name, val in node["inputs"].items():
            if name == "model" and val == [src, 0]:
                node["inputs"][name] = [node_id, 0]
    g[node_id] = {"class_type": class_type, "inputs": dict(inputs, model=[src, 0])}
    return node_id


def jsonl(srv, name):
    return [json.loads(line) for line in open(srv.output_dir / f"{name}.jsonl")]


# ----------------------------------------------------------------------------- fp8 weights
@pytest.mark.parametrize("dtype,torch_name", [("fp8_e4m3fn", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")])
def test_fp8_weights(srv, dtype, torch_name):
    """UNETLoader weight_dtype fp8 -> Sparge -> KSampler. On the CPU ComfyUI keeps the weights in fp8
    and casts each layer's weights to fp32 for its matmul ("manual cast"), so the attention calls
    (and so the sparse path) see fp32 q/k/v: what this tests is that the pack runs sparse on an fp8
    model and matches that model's own dense output, not fp8 attention inputs (on a GPU the compute
    dtype is fp16/bf16)."""
    seed = 301
    fp32, _, _, _ = run(srv, wan(srv, seed, prefix=f"fp32_{dtype}"))
    dense, _, _, log = run(srv, wan(srv, seed, dtype=dtype, prefix=f"dense_{dtype}"))
    assert f"model weight dtype torch.{torch_name}, manual cast: torch.float32" in "\n".join(log)
    assert rel(dense, fp32) > 1e-3, rel(dense, fp32)  # the weights really are fp8 (rounded)

    g = wan(srv, seed, sparge(), dtype=dtype, prefix=f"keep_{dtype}")
    insert_after(g, "10", "12", "SpargeTestAttentionProbe", log_name=f"probe_{dtype}")
    keep, rs, _, _ = run(srv, g)
    r = only(rs)
    assert r["backend"] == "reference" and r["completed"]
    assert r["sparse_calls"] == 4 and r["dense_calls"] == {"cross attention": 4}
    assert r["steps_run"] == r["n_steps"] == 2
    assert rel(keep, dense) < 5e-3, rel(keep, dense)  # keep-all sparse = the fp8 model's dense output
    calls = jsonl(srv, f"probe_{dtype}")
    self_attn = [c for c in calls if c["args"][1]["shape"][1] == SELF_ATTN_KEYS]
    assert len(self_attn) == 4 and {c["args"][0]["dtype"] for c in self_attn} == {"float32"}

    sparse, rs, _, _ = run(srv, wan(srv, seed, sparge(mode="topk", topk=0.5), dtype=dtype, prefix=f"topk_{dtype}"))
    r = only(rs)
    assert r["sparse_calls"] == 4 and r["sparsity"] == pytest.approx(0.5)
    assert rel(sparse, dense) > 10 * rel(keep, dense)  # it really skipped blocks


# ----------------------------------------------------------------------------- step caches
def _cache_skips(log, name):
    lines = [ln for ln in log if ln.startswith(f"{name} - skipped ")]
    assert len(lines) == 1, lines
    m = re.match(rf"{name} - skipped (\d+)/(\d+) steps", lines[0])
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("cache,order", [("EasyCache", "after"), ("EasyCache", "before"), ("LazyCache", "after")])
def test_step_cache_counts_only_steps_that_ran(srv, cache, order):
    """A step cache that skips model calls: the readout's steps_run / per_step / forwards must be the
    forwards the diffusion model really ran, counted independently by SpargeTestForwardCounter (a
    DIFFUSION_MODEL wrapper added after the cache's, so inside it) and by the cache's own log line.
    EasyCache skips INSIDE the forward our APPLY_MODEL wrapper sees (its DIFFUSION_MODEL wrapper
    returns the cached output): such a forward has no attention call and goes to forwards_skipped.
    LazyCache skips in PREDICT_NOISE, before our wrapper: those steps are simply absent."""
    steps, name = 6, f"fwd_{cache}_{order}"
    g = wan(srv, 310, sparge(), steps=steps, prefix=name)
    cache_inputs = dict(reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)
    if order == "after":  # loader -> Sparge -> cache
        last = insert_after(g, "10", "13", cache, **cache_inputs)
    else:  # loader -> cache -> Sparge
        insert_after(g, "1", "13", cache, **cache_inputs)
        last = "10"
    insert_after(g, last, "14", "SpargeTestForwardCounter", log_name=name)
    _, rs, _, log = run(srv, g)
    r = only(rs)
    skipped, total = _cache_skips(log, cache)
    assert total == steps and skipped >= 1, (skipped, total)  # threshold 3.0 skips on this model
    ran = jsonl(srv, name)
    assert len(ran) == steps - skipped  # cond + uncond in one batch: one forward per step
    assert all(f["batch"] == 2 for f in ran)

    assert r["n_steps"] == steps
    assert r["steps_run"] == len(r["per_step"]) == r["forwards"] == len(ran)
    assert [s["sigma"] for s in r["per_step"]] == pytest.approx([f["sigma"] for f in ran])
    assert r["sparse_calls"] == 2 * len(ran) and r["dense_calls"] == {"cross attention": 2 * len(ran)}
    assert all(s["sparse_calls"] == 2 for s in r["per_step"])
    if cache == "EasyCache":
        assert r["forwards_skipped"] == skipped
        assert any("step cache" in n for n in r["notes"])
        line = [ln for ln in log if ln.startswith("Sparge Attention [node 10]: Custom")]
        assert line and f"{len(ran)} steps ({skipped} forwards skipped by a step cache)" in line[-1], line
    else:
        assert r["forwards_skipped"] == 0


# ----------------------------------------------------------------------------- LoRA
def test_lora_before_and_after_sparge(srv):
    """LoraLoaderModelOnly with a tiny LoRA (diffusers-style lora_A / lora_B keys on the self-attention
    q, k, v, o of both blocks) before and after the Sparge node: the LoRA changes the output, the
    Sparge node still runs sparse on the patched weights (keep-all = dense with the LoRA)."""
    seed = 320
    lora = dict(lora_name=LORA, strength_model=1.0)
    plain, _, _, _ = run(srv, wan(srv, seed, prefix="lora_plain"))
    g = wan(srv, seed, prefix="lora_only")
    insert_after(g, "1", "15", "LoraLoaderModelOnly", **lora)
    with_lora, _, _, log = run(srv, g)
    assert not [ln for ln in log if "lora key not loaded" in ln]
    assert rel(with_lora, plain) > 0.05, rel(with_lora, plain)  # the LoRA is applied

    sparge_only, rs, _, _ = run(srv, wan(srv, seed, sparge(), prefix="lora_none_sparge"))
    assert only(rs)["sparse_calls"] == 4

    g = wan(srv, seed, sparge(), prefix="lora_then_sparge")  # loader -> LoRA -> Sparge
    insert_after(g, "1", "15", "LoraLoaderModelOnly", **lora)
    before, rs_before, _, _ = run(srv, g)
    g = wan(srv, seed, sparge(), prefix="sparge_then_lora")  # loader -> Sparge -> LoRA
    insert_after(g, "10", "15", "LoraLoaderModelOnly", **lora)
    after, rs_after, _, _ = run(srv, g)
    for lat, rs in ((before, rs_before), (after, rs_after)):
        r = only(rs)
        assert r["sparse_calls"] == 4 and r["dense_calls"] == {"cross attention": 4} and r["backend"] == "reference"
        assert rel(lat, with_lora) < 5e-3, rel(lat, with_lora)
        assert rel(lat, sparge_only) > 10 * rel(lat, with_lora)
    assert torch.equal(before, after)  # the same patched weights and the same sparse calls

    g = wan(srv, seed, sparge(mode="topk", topk=0.5), prefix="sparge_topk_then_lora")
    insert_after(g, "10", "15", "LoraLoaderModelOnly", **lora)
    _, rs, _, _ = run(srv, g)
    assert only(rs)["sparsity"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- Wan 2.2 + torch.compile
def _wan22(srv, seed, compiled, prefix):
    """workflows/wan22_t2v_14B_high_low.json's model path: UNETLoader -> ModelSamplingSD3 -> Sparge
    -> [TorchCompileModel] -> KSamplerAdvanced, twice; then a dynamo counters snapshot."""
    g = wan22_two_stage_graph(srv.tiny_models["wan22_high"].name, srv.tiny_models["wan22_low"].name,
                              seed=seed, steps=4, switch_at=2, prefix=prefix)
    insert_after(g, "1", "21", "ModelSamplingSD3", shift=8.0)
    insert_after(g, "7", "22", "ModelSamplingSD3", shift=8.0)
    insert_after(g, "21", "10", NODE, **sparge(mode="topk", topk=0.5, dense_blocks="1"))
    insert_after(g, "22", "11", NODE, **sparge(mode="share", minshare=4.0, fill_skipped=True))
    if compiled:
        insert_after(g, "10", "30", "TorchCompileModel", backend="inductor")
        insert_after(g, "11", "31", "TorchCompileModel", backend="inductor")
    g["40"] = {"class_type": "SpargeTestDynamoCounters", "inputs": {"samples": ["8", 0], "label": prefix}}
    return g


def _counters(entry):
    return entry["outputs"]["40"]["dynamo"][0]["counters"]


def _delta(after, before, group, key):
    return after.get(group, {}).get(key, 0) - before.get(group, {}).get(key, 0)


def test_wan22_two_sparge_nodes_with_torch_compile(srv):
    """Two Sparge nodes (one per Wan 2.2 model, each its own readout; the first keeps block 1 dense)
    with TorchCompileModel (inductor) on each model: the compiled run reports what the eager run
    did, the sparse op is inside the compiled graphs (dynamo's graph code in the log), and the
    latents agree. ~1 min on 2 cores, nearly all of it inductor compiling the two models. The
    pack's one test of the TorchCompileModel node."""
    eager, rs, entry, _ = run(srv, _wan22(srv, 330, False, "wan22_eager"))
    assert [r["node_id"] for r in rs] == ["10", "11"]  # one readout per node, in sampling order
    e_high, e_low = only(rs, "10"), only(rs, "11")
    assert e_high["sparsity"] == pytest.approx(0.5)
    assert e_low["sparsity"] == pytest.approx(0.75, abs=0.02) and e_low["settings"]["fill_skipped"] is True
    assert e_high["sparse_calls"] == 2 and e_high["dense_calls"] == {"cross attention": 4, "dense block": 2}
    assert e_low["sparse_calls"] == 4 and e_low["dense_calls"] == {"cross attention": 4}
    for r in (e_high, e_low):
        assert r["n_steps"] == r["steps_run"] == 2 and [s["step"] for s in r["per_step"]] == [0, 1]
    assert e_high["per_step"][-1]["sigma"] > e_low["per_step"][0]["sigma"]
    before = _counters(entry)

    t0 = time.monotonic()
    compiled, rs, entry, log = run(srv, _wan22(srv, 330, True, "wan22_compiled"), timeout=800)
    seconds = time.monotonic() - t0
    after = _counters(entry)
    high, low = only(rs, "10"), only(rs, "11")
    for r, e in ((high, e_high), (low, e_low)):
        for key in ("sparse_calls", "dense_calls", "kept_blocks", "total_blocks", "per_step_sparsity", "n_steps",
                    "steps_run", "forwards", "backend", "hilbert"):
            assert r[key] == e[key], (r["node_id"], key, r[key], e[key])
    assert rel(compiled, eager) < 1e-3, rel(compiled, eager)

    # torch.compile really ran: dynamo compiled frames into graphs during this prompt ...
    assert _delta(after, before, "frames", "ok") >= 2 and _delta(after, before, "stats", "unique_graphs") >= 2, after
    # ... and the sparse op (attention, and attention_map for the sparsity map's block) is in them
    code = [ln for ln in log if "[__graph_code]" in ln]
    assert any("torch.ops.sparge.attention(" in ln for ln in code), "no sparse op in a compiled graph"
    assert any("torch.ops.sparge.attention_map(" in ln for ln in code)
    breaks = sum(after.get("graph_break", {}).values()) - sum(before.get("graph_break", {}).values())
    print(f"\nWan 2.2 compiled run: {seconds:.1f} s, {_delta(after, before, 'stats', 'unique_graphs')} graphs, "
          f"{breaks} graph breaks")

    # the last readout is kept per node: both models' readouts stay readable
    last = srv.get_json("/sparge/last_readout")
    assert last["10"] == high and last["11"] == low
    assert srv.get_json("/sparge/last_readout?node_id=11") == low
