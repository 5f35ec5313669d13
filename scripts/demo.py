"""Sparge Attention demo on a real ComfyUI 0.3.75, CPU only, no downloads of model weights.

    bash scripts/demo.sh            # = bash scripts/setup.sh && .venv/bin/python scripts/demo.py
    .venv/bin/python scripts/demo.py [--workflow FILE] [--preset Fast] [--write-workflow FILE] [--keep]

It makes a tiny random-weight Wan 2.1 model (devkit/tiny_models.py, real architecture, detected
by ComfyUI), starts a real ComfyUI server with this node pack (devkit/comfy_harness.py), runs the
example graph

    UNETLoader -> Sparge Attention -> KSampler (4 steps) -> SaveLatent
    (conditioning: the test pack's random "text encoder" stand-in, SpargeTestConditioning)

once with and once without the node, and prints the node's readout (the same dict the browser gets
as the "sparge.readout" event and GET /sparge/last_readout returns) and how far the two latents are
apart. The graph is devkit/workflows/tiny_wan_demo.json when that UI-format workflow exists (converted to
the API format with the server's /object_info), else the built-in graph below.
--write-workflow FILE writes the built-in graph as a UI-format workflow that ComfyUI's frontend loads.

On the CPU the sparse path runs the PyTorch reference of the kernel, which is slower than dense
attention: the wall times here say nothing about GPU speed; the readout's estimated speed-up does.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # devkit

DEFAULT_WORKFLOW = REPO / "devkit" / "workflows" / "tiny_wan_demo.json"
SPARGE_ID = "10"

# 320x320x9 frames -> a (3, 20, 20) token grid = 1200 tokens per attention call
DEMO = dict(width=320, height=320, length=9, steps=4, cfg=5.0, seed=2026, tokens=16)
SPARGE_WIDGETS = dict(preset="Fast", mode="cdf", simthreshd1=-1.0, cdfthreshd=0.95, topk=0.5, pvthreshd=100.0,
                      start_percent=0.0, end_percent=1.0, dense_blocks="", hilbert=True, min_tokens=256,
                      verbose=False)


def demo_graph(unet_name: str, with_sparge: bool = True, prefix: str = "sparge_demo", **over) -> dict:
    """The example graph in ComfyUI's API format."""
    d = dict(DEMO, **{k: v for k, v in over.items() if k in DEMO})
    widgets = dict(SPARGE_WIDGETS, **{k: v for k, v in over.items() if k in SPARGE_WIDGETS})
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "SpargeTestConditioning",
              "inputs": {"width": 4096, "tokens": d["tokens"], "seed": d["seed"], "pooled_output": False}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": d["width"], "height": d["height"], "length": d["length"], "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": [SPARGE_ID, 0] if with_sparge else ["1", 0], "seed": d["seed"], "steps": d["steps"],
            "cfg": d["cfg"], "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
            "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if with_sparge:
        g[SPARGE_ID] = {"class_type": "SpargeAttention", "inputs": dict(widgets, model=["1", 0])}
    return g


# --------------------------------------------------------------------------- UI <-> API format
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _input_specs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = (info.get("input") or {}).get(section) or {}
        for name in order.get(section, list(specs)):
            out.append((name, specs[name]))
    return out


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES


def _has_control(name: str, spec) -> bool:
    """Does the frontend show a "control after generate" widget (one more widgets_values entry)
    after this one? Its rule: the input's control_after_generate flag, else INT seed / noise_seed."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("control_after_generate") is not None:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (what the frontend saves) -> an API-format prompt."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        ctype = node["type"]
        if node.get("mode", 0) == 2:  # muted
            continue
        if ctype not in object_info:
            if ctype in ("Note", "MarkdownNote"):
                continue
            raise ValueError(f"node {node['id']}: type {ctype!r} is not known to this server")
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} ({ctype}) is bypassed: not supported by this converter")
        inputs = {}
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), int(link[2])]
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            values = list(values.values())
        i = 0
        for name, spec in _input_specs(object_info[ctype]):
            if not _is_widget(spec):
                continue
            if i >= len(values):
                break
            value = values[i]
            i += 1
            if _has_control(name, spec):
                i += 1  # "fixed" / "randomize" / ... shown after seed widgets
            inputs.setdefault(name, value)
        prompt[str(node["id"])] = {"class_type": ctype, "inputs": inputs}
    return prompt


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    """An API-format prompt -> a UI-format workflow for ComfyUI's frontend (simple left-to-right layout)."""
    ids = {nid: int(nid) for nid in prompt}
    depth = {}

    def level(nid):
        if nid not in depth:
            ups = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((level(u) for u in ups), default=-1)
        return depth[nid]

    for nid in prompt:
        level(nid)
    links, nodes, per_col = [], [], {}
    out_links: dict = {}
    for nid in sorted(prompt, key=lambda n: (depth[n], ids[n])):
        node = prompt[nid]
        info = object_info[node["class_type"]]
        for name, v in node["inputs"].items():
            if isinstance(v, list):
                link_id = len(links) + 1
                src_info = object_info[prompt[v[0]]["class_type"]]
                ltype = src_info["output"][v[1]]
                links.append([link_id, ids[v[0]], v[1], ids[nid], None, ltype, name])
                out_links.setdefault((v[0], v[1]), []).append(link_id)
    link_by_target = {(lk[3], lk[6]): lk for lk in links}
    for order, nid in enumerate(sorted(prompt, key=lambda n: (depth[n], ids[n]))):
        node = prompt[nid]
        ctype = node["class_type"]
        info = object_info[ctype]
        col = depth[nid]
        row = per_col.get(col, 0)
        per_col[col] = row + 1
        ui_inputs, widgets = [], []
        for name, spec in _input_specs(info):
            link = link_by_target.get((ids[nid], name))
            if _is_widget(spec):
                value = node["inputs"].get(name, (spec[1] if len(spec) > 1 else {}).get("default"))
                widgets.append(value)
                if _has_control(name, spec):
                    widgets.append("fixed")
                if link is not None:
                    ui_inputs.append({"name": name, "type": spec[0] if not isinstance(spec[0], list) else "COMBO",
                                      "widget": {"name": name}, "link": link[0]})
                continue
            if name not in node["inputs"] and (info.get("input") or {}).get("optional", {}).get(name):
                continue
            ui_inputs.append({"name": name, "type": spec[0], "link": link[0] if link else None})
        for lk in links:
            if lk[3] == ids[nid]:
                lk[4] = next(i for i, u in enumerate(ui_inputs) if u["name"] == lk[6])
        outputs = [{"name": oname, "type": otype, "links": out_links.get((nid, slot), []), "slot_index": slot}
                   for slot, (oname, otype) in enumerate(zip(info.get("output_name", info["output"]), info["output"]))]
        nodes.append({
            "id": ids[nid], "type": ctype, "pos": [40 + 360 * col, 40 + 260 * row], "size": [320, 120 + 26 * len(widgets)],
            "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
            "properties": {"Node name for S&R": ctype}, "widgets_values": widgets,
            **({"title": info["display_name"]} if info.get("display_name") and info["display_name"] != ctype else {}),
        })
    return {
        "id": "5d1c0e0a-5ba7-4e53-9a1d-5b8e2a3d9a10", "revision": 0,
        "last_node_id": max(ids.values()), "last_link_id": len(links),
        "nodes": nodes, "links": [lk[:6] for lk in links], "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


# --------------------------------------------------------------------------- the demo
def load_graph(srv, workflow: Path | None, **over) -> tuple[dict, str]:
    if workflow is not None and workflow.exists():
        ui = json.loads(workflow.read_text())
        g = ui_to_api(ui, srv.object_info())
        # the demo's tiny model lives under this name in the throw-away models folder
        for node in g.values():
            if node["class_type"] == "UNETLoader":
                node["inputs"]["unet_name"] = srv.tiny_models["wan21"].name
        return g, str(workflow.relative_to(REPO) if workflow.is_relative_to(REPO) else workflow)
    return demo_graph(srv.tiny_models["wan21"].name, **over), "built-in graph"


def _summary(r: dict) -> str:
    """A readout in one human line."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    speed = "-" if r.get("est_attention_speedup") is None else f"{r['est_attention_speedup']:.1f}x"
    parts = [f"{pct(r.get('sparsity'))} of attention blocks skipped", f"attention FLOPs ~{speed} fewer",
             f"{r['sparse_calls']} sparse calls", "dense: " + (", ".join(f"{k} {v}" for k, v in
                                                                  sorted(r["dense_calls"].items())) or "none")]
    if r.get("measured_rel_l1") is not None:
        parts.append(f"measured error {r['measured_rel_l1']:.4f} (target {r['target_rel_l1'] or 0:.3f})")
    return "; ".join(parts)


def run_demo(srv, workflow: Path | None = DEFAULT_WORKFLOW, out=print, readout_path: Path | None = None,
             **over) -> dict:
    from devkit.comfy_harness import load_latent_file
    from devkit.metrics import rel_l2

    graph, source = load_graph(srv, workflow, **over)
    sparge_ids = [nid for nid, n in graph.items() if n["class_type"] == "SpargeAttention"]
    if not sparge_ids:
        raise SystemExit(f"{source}: no Sparge Attention node")
    out(f"graph: {source} ({len(graph)} nodes; Sparge Attention node {', '.join(sparge_ids)})")

    t0 = time.monotonic()
    pid = srv.queue(graph)
    entry = srv.wait(pid, timeout=900)
    t_sparse = time.monotonic() - t0
    readouts = srv.get_json(f"/sparge/readouts?prompt_id={pid}")["readouts"]
    sparse_latent = load_latent_file(srv.output_files(entry)[0])

    # the same graph without the node (its consumers take the node's input model instead)
    dense = json.loads(json.dumps(graph))
    for nid in sparge_ids:
        src = dense.pop(nid)["inputs"]["model"]
        for node in dense.values():
            for k, v in node["inputs"].items():
                if v == [nid, 0]:
                    node["inputs"][k] = src
    for node in dense.values():
        if node["class_type"] == "SaveLatent":
            node["inputs"]["filename_prefix"] = "latents/sparge_demo_dense"
    t0 = time.monotonic()
    entry = srv.run(dense, timeout=900)
    t_dense = time.monotonic() - t0
    dense_latent = load_latent_file(srv.output_files(entry)[0])

    log = [ln for ln in srv.log_text().splitlines() if ln.startswith("Sparge Attention [node")]
    out("")
    out("log line(s):")
    for ln in log[-len(readouts):]:
        out("  " + ln)
    out("")
    for r in readouts:
        out(f"node {r['node_id']} ({r['settings']['preset']}): {_summary(r)}")
    if readout_path is not None:
        readout_path.parent.mkdir(parents=True, exist_ok=True)
        readout_path.write_text(json.dumps(readouts, indent=2) + "\n")
        out(f"full readout (the dict GET /sparge/last_readout and the 'sparge.readout' event carry): {readout_path}")
    out("")
    diff = rel_l2(sparse_latent, dense_latent)
    out(f"output latent {tuple(sparse_latent.shape)}: relative difference to the run without the node: {diff:.4f}")
    out(f"wall time: with Sparge {t_sparse:.1f} s, without {t_dense:.1f} s "
        f"(CPU: the sparse path is the PyTorch reference, slower than dense; see est_attention_speedup)")
    return {"readouts": readouts, "rel_diff": diff, "prompt_id": pid, "source": source}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Sparge Attention demo on a real ComfyUI (CPU)")
    ap.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW,
                    help="UI-format workflow to run (default: devkit/workflows/tiny_wan_demo.json if present)")
    ap.add_argument("--builtin", action="store_true", help="ignore --workflow; run the built-in graph")
    ap.add_argument("--preset", choices=["Quality", "Balanced", "Fast", "Turbo", "Custom"], default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--write-workflow", type=Path, default=None,
                    help="write the built-in graph as a UI-format workflow to this file and exit")
    ap.add_argument("--keep", action="store_true", help="keep the server's temporary base directory")
    ap.add_argument("--out", type=Path, default=REPO / "test-artifacts" / "demo",
                    help="folder for the full readout JSON and the ComfyUI log (kept after the demo)")
    a = ap.parse_args(argv)

    from devkit.comfy_harness import ComfyServer

    over = {k: v for k, v in (("preset", a.preset), ("steps", a.steps)) if v is not None}
    print("starting ComfyUI 0.3.75 (CPU) with the Sparge Attention pack and a tiny random-weight Wan 2.1 ...")
    with ComfyServer(install_tiny_models=True, keep_dir=a.keep or None) as srv:
        print(f"server up at {srv.url} in {srv.startup_seconds:.1f} s")
        if a.write_workflow:
            ui = api_to_ui(demo_graph(srv.tiny_models["wan21"].name, **over), srv.object_info())
            a.write_workflow.write_text(json.dumps(ui, indent=2) + "\n")
            print(f"wrote {a.write_workflow}")
            return 0
        try:
            run_demo(srv, None if a.builtin else a.workflow, readout_path=a.out / "readout.json", **over)
        finally:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "comfyui.log").write_text(srv.log_text())
            print(f"ComfyUI's log: {a.out / 'comfyui.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
