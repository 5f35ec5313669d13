"""The graph editor in a REAL headless Chromium (/usr/bin/chromium via the python `playwright`
package, never `playwright install`) on a REAL ComfyUI 0.3.75 server (CPU) with this pack and its
web extension (web/sparge.js), on the frontend 0.3.75 pins (1.32.9) in classic mode (the other
frontend and modes: test_frontends.py). One browser page for the whole module, on the session's
1.32.9 server (conftest.py).

What is checked:
* every workflow in workflows/ loads with no missing node type, no validation toast and no console
  error from our extension, and app.graphToPrompt() of it is a valid prompt: checked against
  /object_info (tests/browser/validate.py) and by the server's own validation (POST /prompt), with
  the model file names replaced by the harness's tiny models. For the text encoder, VAE and CLIP
  vision files (which the tests cannot provide) empty stand-in files with the workflow's names are
  put into the server's model folders: enough for POST /prompt's validation, which only checks that
  the names exist; the queued run then stops at the first loader that reads one (expected, and
  waited for so the queue is empty again). The tiny demo workflow runs for real (last test).
* presets move the sliders to the server's values; moving a slider (also with a real mouse click)
  switches the preset to Custom; the mode greys out the threshold it does not use;
* copy/paste, serialize + load, a LiteGraph group, a subgraph, and older workflows with fewer / more /
  odd widget values keep working;
* the tiny workflow queued from the page (app.queuePrompt): the readout appears on the node with the
  numbers of GET /sparge/last_readout, the Sparsity Map previews arrive, and a screenshot of the node
  is saved under test-artifacts/.
"""
from __future__ import annotations

import copy
import json
import re
import sys
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from browser import CHROMIUM, EditorPage, require_chromium  # noqa: E402
from servers import ARTIFACTS, SLIDERS, THRESHOLD_FIELD, TINY, WORKFLOWS  # noqa: E402
from validate import check_prompt  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(900)]

# model file names in the workflows -> the harness's tiny models (by architecture)
TINY_UNET = {
    "wan2.1_t2v_1.3B_fp16.safetensors": "wan21",
    "wan2.1_i2v_480p_14B_fp16.safetensors": "wan21",
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "wan22_high",
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": "wan22_low",
    "hunyuan_video_t2v_720p_bf16.safetensors": "hunyuan",
}
STAND_IN_FOLDERS = {"clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
                    "vae_name": "vae"}


@pytest.fixture(scope="module")
def editor(server):  # the session's 1.32.9 server (conftest.py), in classic mode
    with EditorPage(server.url, nodes2=False) as ed:
        yield ed


@pytest.fixture(scope="module")
def presets(server):
    return server.get_json("/sparge/presets")


def no_errors_from_us(ed: EditorPage):
    ours = ed.ours(("error",))
    assert not ours, ours


def toasts(ed: EditorPage) -> list[str]:
    return ed.js("() => Array.from(document.querySelectorAll('.p-toast-message')).map(e => e.innerText)")


def clear_toasts(ed: EditorPage):
    ed.js("() => document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach(b => b.click())")


def new_node(ed: EditorPage, ctype="SpargeAttention", pos=(100, 100)) -> int:
    return ed.js("""([t, pos]) => { const n = LiteGraph.createNode(t); n.pos = pos; app.graph.add(n);
                    return n.id; }""", [ctype, list(pos)])


def assert_only_mode_slider_enabled(w: dict, mode: str) -> None:
    """Of the three threshold sliders, only the one the mode reads is enabled."""
    for m, field in THRESHOLD_FIELD.items():
        assert w[field]["disabled"] == (m != mode), (mode, field, w[field])


def widgets(ed: EditorPage, node_id) -> dict:
    return ed.js("""(id) => { const n = app.graph.getNodeById(id);
        return Object.fromEntries(n.widgets.map(w => [w.name, {value: w.value, disabled: !!w.disabled}])); }""",
                 node_id)


def values(ed, node_id) -> dict:
    return {k: v["value"] for k, v in widgets(ed, node_id).items()}


def set_widget(ed: EditorPage, node_id, name, value):
    """As the editor does when a user changes a widget: BaseWidget.setValue -> callback."""
    ed.js("""([id, name, value]) => { const n = app.graph.getNodeById(id);
        const w = n.widgets.find(w => w.name === name);
        w.setValue(value, {e: new PointerEvent('pointerup'), node: n, canvas: app.canvas}); }""",
          [node_id, name, value])


def wait_presets_applied(ed, node_id, presets, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        v = values(ed, node_id)
        want = presets["presets"].get(v["preset"])
        if want is None or all(v[k] == want[k] for k in SLIDERS):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"sliders {v} never took preset {v['preset']} {want}")
        time.sleep(0.1)


def graph_to_prompt(ed) -> dict:
    return ed.js("async () => (await app.graphToPrompt()).output")


def pct(x) -> str:
    """JavaScript's (100 * x).toFixed(1) + '%' (round half up on the exact double)."""
    return str(Decimal(100 * x).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)) + "%"


def fixed(x, digits) -> str:
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


# ----------------------------------------------------------------------------- set-up
def test_system_chromium_is_used():
    assert require_chromium() == CHROMIUM  # raises (fails) when missing: setup.sh installs it


def test_presets_come_from_the_server(server, presets):
    from devkit.pack import load_pack

    load_pack()
    from sparge_attention.sparge_core.params import THRESHOLD_FIELD as CORE_FIELDS
    from sparge_attention.sparge_core.presets import PRESET_NAMES, PRESETS

    assert dict(CORE_FIELDS) == THRESHOLD_FIELD
    assert presets["names"] == PRESET_NAMES and presets["custom"] == "Custom"
    for name, p in PRESETS.items():
        got = presets["presets"][name]
        assert (got["mode"], got["simthreshd1"], got["cdfthreshd"], got["topk"], got["minshare"]) == \
            (p.mode, p.simthreshd1, p.cdfthreshd, p.topk, p.minshare)
        assert got["pvthreshd"] == (100.0 if p.pvthreshd == float("inf") else p.pvthreshd)
    # the browser code keeps no copy of the numbers
    for js in (REPO / "web").glob("*.js"):
        code = re.sub(r"//[^\n]*", "", js.read_text())
        for name, p in PRESETS.items():
            for v in {p.cdfthreshd, p.topk, p.minshare, p.simthreshd1} - {-1.0, 1.0}:
                assert not re.search(rf"(?<![\d.]){re.escape(repr(v))}(?![\d])", code), (js.name, name, v)


# ----------------------------------------------------------------------------- example workflows
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_loads_and_validates(server, editor, presets, path):
    ed = editor
    wf = json.loads(path.read_text())
    clear_toasts(ed)
    res = ed.load_workflow(wf)
    assert res["missing"] == [], res
    assert res["nodes"] == len(wf["nodes"]) and res["links"] == len(wf["links"]), res
    ed.page.wait_for_timeout(300)
    bad = [t for t in toasts(ed) if re.search(r"valid|error|missing|fail", t, re.I)]
    assert not bad, bad
    sparge_ids = ed.js("() => app.graph.nodes.filter(n => n.type === 'SpargeAttention').map(n => n.id)")
    assert sparge_ids, "every example workflow has a Sparge Attention node"
    for nid in sparge_ids:
        v = wait_presets_applied(ed, nid, presets)
        w = widgets(ed, nid)
        assert_only_mode_slider_enabled(w, v["mode"])
        assert "sparge_readout" in w
    # every node has a socket for each of its definition's link inputs (optional ones too)
    info = server.object_info(refresh=False)
    for node in wf["nodes"]:
        if node["type"] in info:
            names = ed.js("(id) => app.graph.getNodeById(id).inputs.map(i => i.name)", node["id"])
            links = [n for sec in ("required", "optional") for n, spec in (info[node["type"]]["input"].get(sec) or {}).items()
                     if not (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))]
            assert set(links) <= set(names), (node["type"], links, names)
    # loading changed no widget value of the file (a node that gained widgets since the file was
    # written appends their defaults)
    for node in wf["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        got = ed.js("(id) => app.graph.getNodeById(id).serialize().widgets_values", node["id"])
        assert got[:len(node["widgets_values"])] == node["widgets_values"], (node["type"], got, node["widgets_values"])

    prompt = graph_to_prompt(ed)
    assert check_prompt(prompt, info) == []
    assert {n["class_type"] for n in prompt.values()} >= {"SpargeAttention"}
    if path != TINY:
        assert any(n["class_type"] == "SpargeSparsityMap" for n in prompt.values())

    # the server's own validation, with the tiny models in the UNET loaders
    for node in prompt.values():
        if node["class_type"] == "UNETLoader":
            node["inputs"]["unet_name"] = server.tiny_models[TINY_UNET.get(node["inputs"]["unet_name"], "wan21")].name
    if path == TINY:
        for node in prompt.values():  # validate only: a zero-step-like cheap run is not needed here
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 1
            if node["class_type"] == "EmptyHunyuanLatentVideo":
                node["inputs"].update(width=256, height=256, length=5)
    status, body = server.post_prompt_raw(prompt, client_id="sparge-validate")
    assert status == 200 and "prompt_id" in body, body
    try:
        server.wait(body["prompt_id"], timeout=120)
        assert path == TINY, "the real workflow should have stopped at a stand-in model file"
    except Exception as e:  # the stand-in files are empty: a loader fails (expected for real workflows)
        if path == TINY:
            raise
        assert "Loader" in str(e) or "safetensors" in str(e).lower() or "header" in str(e).lower(), str(e)[:2000]
    no_errors_from_us(ed)


# ----------------------------------------------------------------------------- presets and sliders
def test_preset_moves_sliders_and_a_slider_switches_to_custom(editor, presets):
    ed = editor
    ed.js("() => app.graph.clear()")
    nid = new_node(ed)
    wait_presets_applied(ed, nid, presets)
    assert values(ed, nid)["preset"] == presets["default"]
    for name in presets["names"]:
        if name == presets["custom"]:
            continue
        set_widget(ed, nid, "preset", name)
        v = values(ed, nid)
        assert v["preset"] == name
        assert {k: v[k] for k in SLIDERS} == {k: presets["presets"][name][k] for k in SLIDERS}, name
    # a slider moved by hand -> Custom, and the moved value stays
    set_widget(ed, nid, "cdfthreshd", 0.42)
    v = values(ed, nid)
    assert v["preset"] == "Custom" and v["cdfthreshd"] == 0.42
    # back to a preset: the sliders follow again
    set_widget(ed, nid, "preset", "Quality")
    assert {k: values(ed, nid)[k] for k in SLIDERS} == {k: presets["presets"]["Quality"][k] for k in SLIDERS}
    for key, val in (("simthreshd1", 0.3), ("pvthreshd", 20.0), ("mode", "topk")):
        set_widget(ed, nid, "preset", "Fast")
        set_widget(ed, nid, key, val)
        assert values(ed, nid)["preset"] == "Custom", key
    # the prompt carries what the widgets show
    prompt = graph_to_prompt(ed)
    assert prompt[str(nid)]["inputs"]["preset"] == "Custom" and prompt[str(nid)]["inputs"]["mode"] == "topk"
    no_errors_from_us(ed)


def test_real_mouse_click_on_a_slider_switches_to_custom(editor, presets):
    ed = editor
    ed.js("() => app.graph.clear()")
    nid = new_node(ed, pos=(200, 150))
    wait_presets_applied(ed, nid, presets)
    before = values(ed, nid)
    pt = ed.js("""(id) => { const n = app.graph.getNodeById(id);
        app.canvas.ds.scale = 1; app.canvas.ds.offset[0] = 0; app.canvas.ds.offset[1] = 0;
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const w = n.widgets.find(w => w.name === 'simthreshd1');
        const gx = n.pos[0] + n.size[0] - 22, gy = n.pos[1] + w.y + LiteGraph.NODE_WIDGET_HEIGHT / 2;
        const c = app.canvas.ds.convertOffsetToCanvas([gx, gy]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + c[0] / (window.devicePixelRatio || 1), r.top + c[1] / (window.devicePixelRatio || 1)]; }""",
               nid)
    ed.page.mouse.click(pt[0], pt[1])  # the right arrow of simthreshd1: one step up
    ed.page.wait_for_timeout(200)
    after = values(ed, nid)
    assert after["simthreshd1"] > before["simthreshd1"], (before, after)
    assert after["preset"] == "Custom"
    no_errors_from_us(ed)


def test_mode_greys_out_the_threshold_it_does_not_use(editor, presets):
    ed = editor
    ed.js("() => app.graph.clear()")
    nid = new_node(ed)
    wait_presets_applied(ed, nid, presets)
    w = widgets(ed, nid)
    default_mode = presets["presets"][presets["default"]]["mode"]
    assert w["mode"]["value"] == default_mode
    assert_only_mode_slider_enabled(w, default_mode)
    for mode in [m for m in THRESHOLD_FIELD if m != default_mode] + [default_mode]:
        set_widget(ed, nid, "mode", mode)
        w = widgets(ed, nid)
        assert w["preset"]["value"] == "Custom"
        assert_only_mode_slider_enabled(w, mode)
        for other in ("simthreshd1", "pvthreshd", "start_percent", "map_layer"):
            assert not w[other]["disabled"], other
    # a greyed slider keeps its value (the preset's), it is only not used
    unused = next(f for m, f in THRESHOLD_FIELD.items() if m != default_mode)
    assert w[unused]["value"] == presets["presets"][presets["default"]][unused]
    # a greyed widget is still sent (the server ignores it), so the prompt stays complete
    assert "topk" in graph_to_prompt(ed)[str(nid)]["inputs"]
    no_errors_from_us(ed)


# ----------------------------------------------------------------------------- copy, save, reload, old files
def test_copy_paste_group_save_and_reload(server, editor, presets):
    ed = editor
    ed.js("() => app.graph.clear()")
    nid = new_node(ed, pos=(100, 100))
    wait_presets_applied(ed, nid, presets)
    set_widget(ed, nid, "preset", "Turbo")
    set_widget(ed, nid, "dense_blocks", "0, 1")
    # copy + paste
    new_ids = ed.js("""(id) => { const n = app.graph.getNodeById(id);
        app.canvas.selectItems([n]); app.canvas.copyToClipboard();
        const before = new Set(app.graph.nodes.map(n => n.id));
        app.canvas.graph_mouse[0] = 600; app.canvas.graph_mouse[1] = 120;
        app.canvas.pasteFromClipboard({});
        return app.graph.nodes.filter(n => !before.has(n.id)).map(n => n.id); }""", nid)
    assert len(new_ids) == 1
    cid = new_ids[0]
    assert values(ed, cid) == values(ed, nid)
    assert ed.js("(id) => app.graph.getNodeById(id).widgets.filter(w => w.name === 'sparge_readout').length", cid) == 1
    set_widget(ed, cid, "preset", "Quality")  # the copy has its own behaviour ...
    assert values(ed, cid)["cdfthreshd"] == presets["presets"]["Quality"]["cdfthreshd"]
    assert values(ed, nid)["preset"] == "Turbo"  # ... and leaves the original alone
    set_widget(ed, cid, "topk", 0.33)
    assert values(ed, cid)["preset"] == "Custom" and values(ed, nid)["preset"] == "Turbo"

    # a LiteGraph group around both, then save (serialize) and load again
    ed.js("""() => { const g = new LGraphGroup('Sparge nodes'); app.graph.add(g);
        g.resizeTo(app.graph.nodes); }""")
    saved = ed.js("() => app.graph.serialize()")
    sp = [n for n in saved["nodes"] if n["type"] == "SpargeAttention"]
    n_widgets = sum(1 for sec in ("required", "optional")
                    for spec in (server.object_info("SpargeAttention")["input"].get(sec) or {}).values()
                    if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))
    assert len(sp) == 2 and all(len(n["widgets_values"]) == n_widgets for n in sp)  # the readout is not saved
    assert saved["groups"] and saved["groups"][0]["title"] == "Sparge nodes"
    before = {n["id"]: values(ed, n["id"]) for n in sp}
    res = ed.load_workflow(saved)
    assert res["missing"] == []
    for n in sp:
        assert values(ed, n["id"]) == before[n["id"]]
        assert ed.js("(id) => app.graph.getNodeById(id).widgets.filter(w => w.name === 'sparge_readout').length",
                     n["id"]) == 1
    assert ed.js("() => app.graph.groups.length") == 1
    # still behaves after the reload
    set_widget(ed, nid, "preset", "Balanced")
    assert values(ed, nid)["cdfthreshd"] == presets["presets"]["Balanced"]["cdfthreshd"]
    set_widget(ed, cid, "cdfthreshd", 0.5)
    assert values(ed, cid)["preset"] == "Custom"
    no_errors_from_us(ed)


def test_node_inside_a_subgraph_gets_its_readout(editor, presets):
    ed = editor
    ed.js("() => app.graph.clear()")
    nid = new_node(ed, pos=(100, 100))
    wait_presets_applied(ed, nid, presets)
    res = ed.js("""(id) => { const n = app.graph.getNodeById(id);
        const {node} = app.graph.convertToSubgraph(new Set([n]));
        const inner = node.subgraph.nodes.find(m => m.type === 'SpargeAttention');
        const fake = {node_id: `${node.id}:${inner.id}`, prompt_id: 'p1', completed: true, sparsity: 0.5,
            pv_skipped_fraction: 0, est_attention_speedup: 2, sparse_calls: 3, steps_run: 1, dense_calls: {},
            attention_time_ms: null, backend: 'reference', per_step_sparsity: [0.5]};
        app.api.dispatchCustomEvent('sparge.readout', fake);
        return {outer: node.id, lines: inner.getSpargeReadout().lines,
                values: inner.widgets.map(w => w.value)}; }""", nid)
    assert res["lines"][0].startswith("Sparsity 50.0%"), res
    # and the subgraph round-trips through save + load
    saved = ed.js("() => app.graph.serialize()")
    assert ed.load_workflow(saved)["missing"] == []
    no_errors_from_us(ed)


def test_older_and_odd_workflows_load(server, editor, presets):
    ed = editor
    base = json.loads(TINY.read_text())
    node = next(n for n in base["nodes"] if n["type"] == "SpargeAttention")
    nid = node["id"]
    info = server.object_info(refresh=False)
    cases = {
        # saved before map_layer existed: 12 values
        "fewer": node["widgets_values"][:12],
        # a newer version with two more widgets at the end
        "more": node["widgets_values"] + [0.5, "future"],
        # shifted / broken values: an unknown preset, a string slider, a number in a combo
        "odd": ["Ludicrous", 7, "abc", 3.5, None, 1e9, 0.0, 1.0, 5, "yes", 2048.7, False, -1],
        # no widgets_values at all
        "none": None,
    }
    for case, vals in cases.items():
        wf = copy.deepcopy(base)
        n = next(n for n in wf["nodes"] if n["id"] == nid)
        if vals is None:
            del n["widgets_values"]
        else:
            n["widgets_values"] = vals
        res = ed.load_workflow(wf)
        assert res["missing"] == [], case
        v = wait_presets_applied(ed, nid, presets)
        assert v["preset"] in presets["names"] and v["mode"] in THRESHOLD_FIELD, (case, v)
        for k in ("simthreshd1", "cdfthreshd", "topk", "minshare", "pvthreshd", "start_percent", "end_percent", "min_tokens",
                  "map_layer"):
            assert isinstance(v[k], (int, float)) and not isinstance(v[k], bool), (case, k, v[k])
        assert isinstance(v["hilbert"], bool) and isinstance(v["dense_blocks"], str), (case, v)
        prompt = graph_to_prompt(ed)
        assert check_prompt(prompt, info) == [], (case, check_prompt(prompt, info))
        if case == "fewer":
            assert v["map_layer"] == -1 and v["preset"] == "Fast"
            assert {k: v[k] for k in SLIDERS} == {k: presets["presets"]["Fast"][k] for k in SLIDERS}
        if case == "odd":
            assert v["preset"] == presets["default"] and v["cdfthreshd"] <= 1.0 and v["min_tokens"] == 2049
    no_errors_from_us(ed)


# ----------------------------------------------------------------------------- a real run from the page
def test_queue_from_the_page_shows_the_readout(server, editor, presets):
    ed = editor
    wf = json.loads(TINY.read_text())
    for node in wf["nodes"]:
        if node["type"] == "UNETLoader":
            node["widgets_values"][0] = server.tiny_models["wan21"].name
    assert ed.load_workflow(wf)["missing"] == []
    sid = next(n["id"] for n in wf["nodes"] if n["type"] == "SpargeAttention")
    ks = next(n["id"] for n in wf["nodes"] if n["type"] == "KSampler")
    assert ed.js("(id) => app.graph.getNodeById(id).getSpargeReadout().readout", sid) is None
    size_before = ed.js("(id) => [...app.graph.getNodeById(id).size]", sid)
    # add a Sparsity Map and two previews in the page, as a user would
    ids = ed.js("""([sid, ks]) => {
        const s = app.graph.getNodeById(sid), k = app.graph.getNodeById(ks);
        const m = LiteGraph.createNode('SpargeSparsityMap'); m.pos = [1220, 600]; app.graph.add(m);
        s.connect(0, m, 0); k.connect(0, m, 1);
        const p1 = LiteGraph.createNode('PreviewImage'); p1.pos = [1560, 600]; app.graph.add(p1);
        const p2 = LiteGraph.createNode('PreviewImage'); p2.pos = [2240, 600]; app.graph.add(p2);
        p1.setSize([640, 860]); p2.setSize([640, 320]);
        m.connect(0, p1, 0); m.connect(1, p2, 0);
        return [m.id, p1.id, p2.id]; }""", [sid, ks])
    ed.js("""() => { window.__spargeExecuted = {};
        app.api.addEventListener('executed', (e) => { window.__spargeExecuted[e.detail.node] = e.detail.output; }); }""")
    ed.js("() => app.queuePrompt(0, 1)")
    deadline = time.monotonic() + 180
    while True:
        r = ed.js("(id) => app.graph.getNodeById(id).getSpargeReadout()", sid)
        imgs = ed.js("(ids) => ids.map(id => ((window.__spargeExecuted[String(id)] || {}).images || []).length)",
                     ids[1:])
        if r["readout"] is not None and all(imgs):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"no readout / previews after 180 s: {r} {imgs}\n{server.log_tail(40)}")
        time.sleep(0.5)
    got = r["readout"]
    want = server.get_json(f"/sparge/last_readout?node_id={sid}")
    assert got == want  # the websocket event and the HTTP readout are the same numbers
    assert got["node_id"] == str(sid) and got["completed"] is True and got["sparse_calls"] > 0
    lines = r["lines"]
    assert lines[0] == f"Sparsity {pct(want['sparsity'])} \u00b7 est. attention speed-up " \
                       f"{fixed(want['est_attention_speedup'], 2)}x"
    assert lines[1].startswith(f"PV skipped {pct(want['pv_skipped_fraction'])} \u00b7 {want['sparse_calls']} sparse calls")
    dense = ", ".join(f"{k} {v}" for k, v in sorted(want["dense_calls"].items()))
    assert lines[2] == f"Dense fallbacks: {dense}"
    assert "cross attention" in dense  # the text cross-attention of Wan always runs dense
    if want["attention_time_ms"] is None:  # CPU: not measured, so not shown
        assert not any("attention time" in ln for ln in lines)
    assert lines[-1].startswith(f"backend {want['backend']}")
    # the node grew to show it, and keeps it until the next readout of this node
    size_after = ed.js("(id) => [...app.graph.getNodeById(id).size]", sid)
    need = ed.js("(id) => app.graph.getNodeById(id).computeSize()", sid)
    assert size_after[1] >= need[1] and size_after[1] >= size_before[1]
    ed.page.wait_for_timeout(500)
    assert ed.js("(id) => app.graph.getNodeById(id).getSpargeReadout().readout !== null", sid)
    # screenshots for a human (test-artifacts/ is git-ignored)
    ed.js("() => { app.canvas.deselectAll && app.canvas.deselectAll(); }")
    shot = ed.screenshot_node(sid, ARTIFACTS / "sparge_node_after_run.png", scale=1.5)
    assert shot.stat().st_size > 10_000
    for nid, name in ((ids[1], "sparsity_map_block_mask_preview.png"), (ids[2], "sparsity_map_layer_step_preview.png")):
        ed.screenshot_node(nid, ARTIFACTS / name, scale=1.0)
    no_errors_from_us(ed)


def test_no_console_errors_from_the_extension(editor):
    errors = editor.ours(("error",))
    assert not errors, errors
    loaded = editor.js("() => (app.extensions || []).filter(e => e.name === 'Sparge.Attention').length")
    assert loaded == 1
