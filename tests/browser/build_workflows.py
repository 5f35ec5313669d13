"""Builds the example workflows in workflows/ (UI format, what ComfyUI's graph editor loads and saves).

    .venv/bin/python tests/browser/build_workflows.py [--check]

It starts a real ComfyUI 0.3.75 with this pack (devkit/comfy_harness.py) to read /object_info, so
every node's inputs, outputs and widget order come from the server, never from memory. --check
only reports whether the files on disk differ from what it would write. The files are committed;
tests/browser/test_graph_editor.py loads each one in a real browser and validates it.

Model file names and download links are those of ComfyUI's official repackaged files
(huggingface.co/Comfy-Org/*_repackaged). The Sparge nodes' settings here are starting points:
each workflow's note explains the sliders and what the readout will show.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # devkit

OUT = REPO / "workflows"
# the tiny demo uses a test-only conditioning node: not a template a user can run, so it lives in devkit/
DEV_OUT = REPO / "devkit" / "workflows"
HF = "https://huggingface.co/Comfy-Org"
WAN21 = f"{HF}/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
WAN22 = f"{HF}/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
HUNYUAN = f"{HF}/HunyuanVideo_repackaged/resolve/main/split_files"
CLIP_L = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"

# model file -> (folder, download url)
MODELS = {
    "wan2.1_t2v_1.3B_fp16.safetensors": ("diffusion_models", f"{WAN21}/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"),
    "wan2.1_i2v_480p_14B_fp16.safetensors": ("diffusion_models", f"{WAN21}/diffusion_models/wan2.1_i2v_480p_14B_fp16.safetensors"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", f"{WAN21}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "wan_2.1_vae.safetensors": ("vae", f"{WAN21}/vae/wan_2.1_vae.safetensors"),
    "clip_vision_h.safetensors": ("clip_vision", f"{WAN21}/clip_vision/clip_vision_h.safetensors"),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": (
        "diffusion_models", f"{WAN22}/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": (
        "diffusion_models", f"{WAN22}/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
    "hunyuan_video_t2v_720p_bf16.safetensors": ("diffusion_models", f"{HUNYUAN}/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors"),
    "llava_llama3_fp8_scaled.safetensors": ("text_encoders", f"{HUNYUAN}/text_encoders/llava_llama3_fp8_scaled.safetensors"),
    "clip_l.safetensors": ("text_encoders", CLIP_L),
    "hunyuan_video_vae_bf16.safetensors": ("vae", f"{HUNYUAN}/vae/hunyuan_video_vae_bf16.safetensors"),
}

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # virtual nodes of the graph editor (one text widget)
# groups' colours (the graph editor's palette)
C_MODELS, C_PROMPT, C_SPARGE, C_SAMPLE, C_MAP = "#3f789e", "#8A8", "#b58b2a", "#a1309b", "#444"
SPARGE_COLOR, SPARGE_BG = "#5a4a1f", "#3d3522"

NEGATIVE_WAN = ("blurry, low quality, worst quality, jpeg artifacts, static, frozen frame, overexposed, "
                "watermark, subtitles, deformed hands, extra fingers, messy background")


def input_specs(info: dict) -> list:
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = (info.get("input") or {}).get(section) or {}
        for name in order.get(section, list(specs)):
            out.append((name, specs[name], section))
    return out


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def spec_opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def has_control(name: str, spec) -> bool:
    opts = spec_opts(spec)
    if opts.get("control_after_generate") is not None:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def combo_options(spec):
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec_opts(spec).get("options")
    return None


class Node:
    def __init__(self, wf, nid, ctype, pos, size, title=None, widgets=None, color=None, bgcolor=None,
                 control="randomize", text=None):
        self.wf, self.id, self.type = wf, nid, ctype
        self.pos, self.size, self.title = list(pos), list(size), title
        self.widgets = dict(widgets or {})
        self.color, self.bgcolor = color, bgcolor
        self.control = control
        self.text = text
        self.in_links = {}  # input name -> link id
        self.out_links = {}  # slot -> [link ids]

    def out(self, slot=0):
        return (self, slot)


class Workflow:
    presets: dict = {}  # GET /sparge/presets of the server (set by build_all)

    def __init__(self, object_info: dict):
        self.oi = object_info
        self.nodes: list[Node] = []
        self.links = []  # [id, from, from_slot, to, to_slot, type]
        self.groups = []

    def add(self, ctype, pos, size, **kw) -> Node:
        if ctype not in self.oi and ctype not in FRONTEND_ONLY:
            raise KeyError(f"{ctype} is not a node type of this server")
        n = Node(self, len(self.nodes) + 1, ctype, pos, size, **kw)
        if ctype == "SpargeAttention":  # the sliders show the preset's values, as the editor sets them
            preset = n.widgets.get("preset", self.presets.get("default"))
            values = (self.presets.get("presets") or {}).get(preset)
            if values:
                for key in self.presets["slider_widgets"]:
                    n.widgets[key] = values[key]
        if ctype in self.oi:
            known = {name for name, spec, _ in input_specs(self.oi[ctype]) if is_widget(spec)}
            unknown = set(n.widgets) - known
            if unknown:
                raise KeyError(f"{ctype}: no widget named {sorted(unknown)}")
        self.nodes.append(n)
        return n

    def note(self, text, pos, size, markdown=True, title=None) -> Node:
        return self.add("MarkdownNote" if markdown else "Note", pos, size, text=text, title=title)

    def connect(self, src, dst: Node, input_name: str):
        node, slot = src if isinstance(src, tuple) else (src, 0)
        info = self.oi[node.type]
        ltype = info["output"][slot]
        specs = {name: spec for name, spec, _ in input_specs(self.oi[dst.type])}
        if input_name not in specs:
            raise KeyError(f"{dst.type} has no input {input_name}")
        want = specs[input_name][0]
        if not isinstance(want, list) and want != ltype and want != "*":
            raise TypeError(f"{node.type}[{slot}] ({ltype}) -> {dst.type}.{input_name} ({want})")
        lid = len(self.links) + 1
        self.links.append([lid, node.id, slot, dst.id, None, ltype, input_name])
        dst.in_links[input_name] = lid
        node.out_links.setdefault(slot, []).append(lid)
        return lid

    def group(self, title, x, y, w, h, color):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x, y, w, h], "color": color,
                            "font_size": 24, "flags": {}})

    # ------------------------------------------------------------------ serialisation
    def _node_json(self, n: Node, order: int) -> dict:
        if n.type in FRONTEND_ONLY:
            d = {"id": n.id, "type": n.type, "pos": n.pos, "size": n.size, "flags": {}, "order": order, "mode": 0,
                 "inputs": [], "outputs": [], "properties": {}, "widgets_values": [n.text]}
            if n.title:
                d["title"] = n.title
            d["color"], d["bgcolor"] = n.color or "#432", n.bgcolor or "#653"
            return d
        info = self.oi[n.type]
        inputs, values = [], []
        for name, spec, section in input_specs(info):
            lid = n.in_links.get(name)
            if is_widget(spec):
                opts = spec_opts(spec)
                value = n.widgets.get(name, opts.get("default"))
                if value is None:
                    opts_list = combo_options(spec)
                    value = opts_list[0] if opts_list else None
                values.append(value)
                if has_control(name, spec):
                    values.append(n.control)
                if opts.get("image_upload"):
                    values.append("image")  # the upload button's value, as the editor saves it
                slot = {"localized_name": name, "name": name, "type": "COMBO" if combo_options(spec) else spec[0],
                        "widget": {"name": name}, "link": lid}
                if section == "optional":
                    slot["shape"] = 7
                inputs.append(slot)
            else:
                slot = {"localized_name": name, "name": name, "type": spec[0], "link": lid}
                if section == "optional":
                    slot["shape"] = 7
                inputs.append(slot)
        for i, slot in enumerate(inputs):
            if slot["link"] is not None:
                link = next(lk for lk in self.links if lk[0] == slot["link"])
                link[4] = i
        names = info.get("output_name") or info["output"]
        outputs = [{"localized_name": oname, "name": oname, "type": otype, "links": n.out_links.get(i, []),
                    "slot_index": i} for i, (oname, otype) in enumerate(zip(names, info["output"]))]
        props = {"Node name for S&R": n.type}
        models = [{"name": v, "url": MODELS[v][1], "directory": MODELS[v][0]} for v in n.widgets.values()
                  if isinstance(v, str) and v in MODELS]
        if models:
            props["models"] = models
        d = {"id": n.id, "type": n.type, "pos": n.pos, "size": n.size, "flags": {}, "order": order, "mode": 0,
             "inputs": inputs, "outputs": outputs, "properties": props, "widgets_values": values}
        title = n.title or (info.get("display_name") if info.get("display_name") not in (None, n.type) else None)
        if title:
            d["title"] = title
        if n.color:
            d["color"] = n.color
        if n.bgcolor:
            d["bgcolor"] = n.bgcolor
        return d

    def _order(self) -> dict:
        deps = {n.id: set() for n in self.nodes}
        for lk in self.links:
            deps[lk[3]].add(lk[1])
        order, done = {}, set()

        def visit(i):
            if i in done:
                return
            for d in sorted(deps[i]):
                visit(d)
            done.add(i)
            order[i] = len(order)

        for n in self.nodes:
            visit(n.id)
        return order

    def to_json(self, wf_id: str) -> dict:
        order = self._order()
        nodes = [self._node_json(n, order[n.id]) for n in self.nodes]  # fills the links' target slots
        return {
            "id": wf_id, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": nodes, "links": [lk[:6] for lk in self.links], "groups": self.groups, "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": "1.32.9"},
            "version": 0.4,
        }


# ---------------------------------------------------------------------------- the notes
SLIDERS_MD = """\
### The sliders
- **preset**: Quality / Balanced / Fast / Turbo are measured settings (Quality skips the least).
  Choosing one moves the sliders below to its values; moving any of them by hand switches to **Custom**.
- **mode**: *share* (the presets) keeps, per query block, every key block predicted to hold at least
  **minshare** times an even share of the attention (adapts to each layer and step); *cdf* keeps the
  fewest key blocks that hold **cdfthreshd** of the predicted attention; *topk* keeps a fixed share
  **topk** of the key blocks (predictable speed). The sliders the mode does not use are greyed out.
- **fill_skipped**: adds an estimate of what the skipped blocks would have contributed (their mean
  key and value) instead of dropping it: about 3x lower error at the same sparsity. On in every preset.
- **simthreshd1**: how alike a block's tokens must be before it may be skipped (-1 = any block).
- **pvthreshd**: skips the value product of hopeless blocks; 100 = off, the best choice (with the
  presets it skips almost nothing and makes each call ~10% slower).
- **start_percent / end_percent**: the part of the sampler's steps that runs sparse. The first steps
  shape the layout; 0.1-0.3 protects quality.
- **dense_blocks**: blocks that always run normal attention, e.g. `0, 1, 29`.
- **hilbert**: reorders video tokens so neighbours share a block. Leave on.
- **min_tokens**: shorter attention calls stay dense.
- **map_layer**: the block the Sparsity Map shows (-1 = the middle one).
"""

READOUT_MD = """\
### What to expect
After a run the Sparge node shows its **readout**: the share of attention blocks skipped, the
estimated attention speed-up (attention FLOPs saved), which calls fell back to normal attention and
why (text cross-attention always does), and one bar per step.

**Sparge Sparsity Map** draws the kept (amber) and skipped (dark) blocks of one block at one step,
and the sparsity of every block at every step.

How much is skipped depends on the model, the prompt and the step: the readout shows it. A step
speeds up less than attention alone (attention is roughly 60% of a Wan step). The presets estimate
the skipped blocks (**fill_skipped**) instead of dropping them; in the project's H100 benchmark on
realistic video attention, Balanced skipped ~0.94 of the blocks at rel-L1 ~0.04 (attention
~10x faster). Turn **error_check** on to measure the error on your model, and bypass the node (Ctrl+B)
to compare the image.
"""


def wan21_t2v(oi, tiny_unet=None, tiny=False) -> Workflow:
    wf = Workflow(oi)
    if tiny:
        # the demo / test variant: tiny random-weight Wan 2.1, random "text" conditioning
        unet = wf.add("UNETLoader", (40, 120), (320, 90),
                      widgets={"unet_name": tiny_unet, "weight_dtype": "default"})
        cond = wf.add("SpargeTestConditioning", (40, 260), (320, 160), title="Random text conditioning (test only)",
                      control="fixed",
                      widgets={"width": 4096, "tokens": 16, "seed": 2026, "pooled_output": False})
        neg = wf.add("ConditioningZeroOut", (40, 470), (320, 50))
        wf.connect(cond, neg, "conditioning")
        sp = wf.add("SpargeAttention", (420, 120), (360, 400), color=SPARGE_COLOR, bgcolor=SPARGE_BG,
                    widgets={"preset": "Fast", "min_tokens": 256})
        wf.connect(unet, sp, "model")
        lat = wf.add("EmptyHunyuanLatentVideo", (840, 120), (320, 130),
                     widgets={"width": 320, "height": 320, "length": 9, "batch_size": 1})
        ks = wf.add("KSampler", (840, 300), (320, 270), control="fixed",
                    widgets={"seed": 2026, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
                             "denoise": 1.0})
        wf.connect(sp, ks, "model")
        wf.connect(cond, ks, "positive")
        wf.connect(neg, ks, "negative")
        wf.connect(lat, ks, "latent_image")
        save = wf.add("SaveLatent", (1220, 120), (320, 60), widgets={"filename_prefix": "latents/sparge_demo"})
        wf.connect(ks, save, "samples")
        wf.note(
            "## Tiny Wan 2.1 demo (CPU)\n"
            "The graph that `scripts/demo.py` runs: a tiny random-weight Wan 2.1 (made by "
            "`devkit/tiny_models.py`) and a random stand-in for the text encoder "
            "(**SpargeTestConditioning**, a test-only node from `devkit/comfy_test_nodes`). It "
            "exists to show the Sparge Attention node and its readout without downloading models; "
            "the output is noise. For a real video use **wan21_t2v_1.3B_480p.json**.\n\n"
            "320x320x9 frames = a 3x20x20 token grid (1,200 tokens); **min_tokens** is lowered to 256 "
            "so these short calls run sparse.", (1220, 240), (420, 300))
        return wf

    wf.group("Models", 20, 20, 400, 560, C_MODELS)
    unet = wf.add("UNETLoader", (40, 80), (360, 90),
                  widgets={"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"})
    shift = wf.add("ModelSamplingSD3", (40, 220), (360, 60), widgets={"shift": 8.0})
    wf.connect(unet, shift, "model")
    clip = wf.add("CLIPLoader", (40, 330), (360, 110),
                  widgets={"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"})
    vae = wf.add("VAELoader", (40, 490), (360, 60), widgets={"vae_name": "wan_2.1_vae.safetensors"})

    wf.group("Prompt", 440, 20, 440, 560, C_PROMPT)
    pos = wf.add("CLIPTextEncode", (460, 80), (400, 220), title="Positive prompt", color="#232", bgcolor="#353",
                 widgets={"text": "a red fox trotting through fresh snow in a pine forest at sunrise, soft golden "
                                  "light, the camera tracks alongside, cinematic, detailed fur"})
    neg = wf.add("CLIPTextEncode", (460, 340), (400, 200), title="Negative prompt", color="#322", bgcolor="#533",
                 widgets={"text": NEGATIVE_WAN})
    wf.connect(clip, pos, "clip")
    wf.connect(clip, neg, "clip")

    wf.group("Sparge Attention", 900, 20, 400, 1100, C_SPARGE)
    sp = wf.add("SpargeAttention", (920, 80), (360, 400), color=SPARGE_COLOR, bgcolor=SPARGE_BG,
                widgets={"preset": "Balanced"})
    wf.connect(shift, sp, "model")
    wf.note("## Sparge Attention on Wan 2.1 1.3B (832x480, 81 frames)\n"
            "Each attention call sees 21x30x52 = 32,760 video tokens; Wan 2.1 1.3B has 30 blocks.\n\n"
            + SLIDERS_MD + "\n" + READOUT_MD, (920, 600), (360, 500))

    wf.group("Sample and save", 1320, 20, 400, 1100, C_SAMPLE)
    lat = wf.add("EmptyHunyuanLatentVideo", (1340, 80), (360, 130),
                 widgets={"width": 832, "height": 480, "length": 81, "batch_size": 1})
    ks = wf.add("KSampler", (1340, 250), (360, 270),
                widgets={"seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
                         "denoise": 1.0})
    wf.connect(sp, ks, "model")
    wf.connect(pos, ks, "positive")
    wf.connect(neg, ks, "negative")
    wf.connect(lat, ks, "latent_image")
    dec = wf.add("VAEDecode", (1340, 560), (360, 50))
    wf.connect(ks, dec, "samples")
    wf.connect(vae, dec, "vae")
    vid = wf.add("CreateVideo", (1340, 650), (360, 80), widgets={"fps": 16.0})
    wf.connect(dec, vid, "images")
    save = wf.add("SaveVideo", (1340, 770), (360, 330), widgets={"filename_prefix": "video/sparge_wan21_t2v"})
    wf.connect(vid, save, "video")

    add_map(wf, sp, ks, x=1740, y=20)
    return wf


def add_map(wf, sparge: Node, sampler: Node, x: int, y: int, label: str = "Sparsity map",
            note: str | None = None) -> Node:
    wf.group(label, x, y, 640, 1100, C_MAP)
    m = wf.add("SpargeSparsityMap", (x + 20, y + 60), (300, 130))
    wf.connect(sparge, m, "model")
    wf.connect(sampler, m, "samples")
    p1 = wf.add("PreviewImage", (x + 20, y + 240), (600, 420), title="Block mask (kept = amber)")
    p2 = wf.add("PreviewImage", (x + 20, y + 700), (600, 380), title="Sparsity per block and step")
    wf.connect(m.out(0), p1, "images")
    wf.connect(m.out(1), p2, "images")
    wf.note(note or ("**Sparge Sparsity Map** redraws without sampling again: change **step** (-1 = last) or "
                     "**head** (-1 = mean over heads) and queue. The block it shows is **map_layer** on the "
                     "Sparge Attention node."), (x + 340, y + 60), (280, 150), markdown=True)
    return m


def wan22_t2v(oi) -> Workflow:
    wf = Workflow(oi)
    wf.group("Models", 20, 20, 400, 760, C_MODELS)
    high = wf.add("UNETLoader", (40, 80), (360, 90), title="Load high-noise model",
                  widgets={"unet_name": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"})
    low = wf.add("UNETLoader", (40, 210), (360, 90), title="Load low-noise model",
                 widgets={"unet_name": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"})
    sh_hi = wf.add("ModelSamplingSD3", (40, 340), (360, 60), widgets={"shift": 8.0})
    sh_lo = wf.add("ModelSamplingSD3", (40, 440), (360, 60), widgets={"shift": 8.0})
    wf.connect(high, sh_hi, "model")
    wf.connect(low, sh_lo, "model")
    clip = wf.add("CLIPLoader", (40, 540), (360, 110),
                  widgets={"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"})
    vae = wf.add("VAELoader", (40, 690), (360, 60), widgets={"vae_name": "wan_2.1_vae.safetensors"})

    wf.group("Prompt", 440, 20, 440, 560, C_PROMPT)
    pos = wf.add("CLIPTextEncode", (460, 80), (400, 220), title="Positive prompt", color="#232", bgcolor="#353",
                 widgets={"text": "a paper boat drifting down a rain-filled street gutter, reflections of neon "
                                  "signs on the water, slow dolly shot at street level, shallow depth of field"})
    neg = wf.add("CLIPTextEncode", (460, 340), (400, 200), title="Negative prompt", color="#322", bgcolor="#533",
                 widgets={"text": NEGATIVE_WAN})
    wf.connect(clip, pos, "clip")
    wf.connect(clip, neg, "clip")

    wf.group("Sparge Attention (one per model)", 900, 20, 400, 1500, C_SPARGE)
    sp_hi = wf.add("SpargeAttention", (920, 80), (360, 400), title="Sparge Attention (high noise)",
                   color=SPARGE_COLOR, bgcolor=SPARGE_BG, widgets={"preset": "Quality"})
    sp_lo = wf.add("SpargeAttention", (920, 600), (360, 400), title="Sparge Attention (low noise)",
                   color=SPARGE_COLOR, bgcolor=SPARGE_BG, widgets={"preset": "Fast"})
    wf.connect(sh_hi, sp_hi, "model")
    wf.connect(sh_lo, sp_lo, "model")
    wf.note("## Sparge Attention on Wan 2.2 14B (two models)\n"
            "Wan 2.2 hands the first half of the steps to a high-noise model and the rest to a low-noise "
            "model, so each model gets its own Sparge node and its own readout. The high-noise steps lay "
            "out motion and composition: this workflow keeps them on **Quality** and lets the low-noise "
            "steps, which refine detail, run **Fast**. Each node counts steps within its own sampler "
            "(start/end_percent are fractions of that sampler's steps). 832x480x81 = 32,760 tokens per "
            "call; each 14B model has 40 blocks.\n\n" + SLIDERS_MD + "\n" + READOUT_MD, (920, 1120), (360, 380))

    wf.group("Sample and save", 1320, 20, 400, 1500, C_SAMPLE)
    lat = wf.add("EmptyHunyuanLatentVideo", (1340, 80), (360, 130),
                 widgets={"width": 832, "height": 480, "length": 81, "batch_size": 1})
    ks_hi = wf.add("KSamplerAdvanced", (1340, 250), (360, 340), title="KSampler (high noise, steps 0-10)",
                   widgets={"add_noise": "enable", "noise_seed": 42, "steps": 20, "cfg": 3.5, "sampler_name": "euler",
                            "scheduler": "simple", "start_at_step": 0, "end_at_step": 10,
                            "return_with_leftover_noise": "enable"})
    ks_lo = wf.add("KSamplerAdvanced", (1340, 630), (360, 340), title="KSampler (low noise, steps 10-20)",
                   control="fixed",
                   widgets={"add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 3.5, "sampler_name": "euler",
                            "scheduler": "simple", "start_at_step": 10, "end_at_step": 10000,
                            "return_with_leftover_noise": "disable"})
    wf.connect(sp_hi, ks_hi, "model")
    wf.connect(sp_lo, ks_lo, "model")
    for ks in (ks_hi, ks_lo):
        wf.connect(pos, ks, "positive")
        wf.connect(neg, ks, "negative")
    wf.connect(lat, ks_hi, "latent_image")
    wf.connect(ks_hi, ks_lo, "latent_image")
    dec = wf.add("VAEDecode", (1340, 1010), (360, 50))
    wf.connect(ks_lo, dec, "samples")
    wf.connect(vae, dec, "vae")
    vid = wf.add("CreateVideo", (1340, 1100), (360, 80), widgets={"fps": 16.0})
    wf.connect(dec, vid, "images")
    save = wf.add("SaveVideo", (1340, 1220), (360, 280), widgets={"filename_prefix": "video/sparge_wan22_t2v"})
    wf.connect(vid, save, "video")

    add_map(wf, sp_hi, ks_hi, x=1740, y=20, label="Sparsity map: high-noise model")
    add_map(wf, sp_lo, ks_lo, x=2400, y=20, label="Sparsity map: low-noise model")
    return wf


def hunyuan_t2v(oi) -> Workflow:
    wf = Workflow(oi)
    wf.group("Models", 20, 20, 400, 560, C_MODELS)
    unet = wf.add("UNETLoader", (40, 80), (360, 90),
                  widgets={"unet_name": "hunyuan_video_t2v_720p_bf16.safetensors", "weight_dtype": "default"})
    shift = wf.add("ModelSamplingSD3", (40, 210), (360, 60), widgets={"shift": 7.0})
    wf.connect(unet, shift, "model")
    clip = wf.add("DualCLIPLoader", (40, 310), (360, 130),
                  widgets={"clip_name1": "clip_l.safetensors", "clip_name2": "llava_llama3_fp8_scaled.safetensors",
                           "type": "hunyuan_video"})
    vae = wf.add("VAELoader", (40, 480), (360, 60), widgets={"vae_name": "hunyuan_video_vae_bf16.safetensors"})

    wf.group("Prompt", 440, 20, 440, 560, C_PROMPT)
    pos = wf.add("CLIPTextEncode", (460, 80), (400, 220), title="Prompt", color="#232", bgcolor="#353",
                 widgets={"text": "a hummingbird hovering at a bright orange flower in a summer garden, wings "
                                  "a blur, macro shot, shallow depth of field, soft morning light"})
    wf.connect(clip, pos, "clip")
    guide = wf.add("FluxGuidance", (460, 340), (400, 60), widgets={"guidance": 6.0})
    wf.connect(pos, guide, "conditioning")
    zero = wf.add("ConditioningZeroOut", (460, 440), (400, 50), title="Negative (unused at cfg 1)")
    wf.connect(pos, zero, "conditioning")

    wf.group("Sparge Attention", 900, 20, 400, 1100, C_SPARGE)
    sp = wf.add("SpargeAttention", (920, 80), (360, 400), color=SPARGE_COLOR, bgcolor=SPARGE_BG,
                widgets={"preset": "Balanced"})
    wf.connect(shift, sp, "model")
    wf.note("## Sparge Attention on HunyuanVideo (848x480, 73 frames)\n"
            "HunyuanVideo attends over video and text tokens together (19x30x53 = 30,210 video tokens plus "
            "the prompt); the text tokens stay in place and the video tokens are reordered. Its 20 double "
            "and 40 single blocks count as blocks 0-19 and 20-59 in **dense_blocks** and **map_layer**. "
            "With real text encoders the prompt padding is masked; the node handles that mask.\n\n"
            + SLIDERS_MD + "\n" + READOUT_MD, (920, 600), (360, 500))

    wf.group("Sample and save", 1320, 20, 400, 1100, C_SAMPLE)
    lat = wf.add("EmptyHunyuanLatentVideo", (1340, 80), (360, 130),
                 widgets={"width": 848, "height": 480, "length": 73, "batch_size": 1})
    ks = wf.add("KSampler", (1340, 250), (360, 270),
                widgets={"seed": 42, "steps": 30, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0})
    wf.connect(sp, ks, "model")
    wf.connect(guide, ks, "positive")
    wf.connect(zero, ks, "negative")
    wf.connect(lat, ks, "latent_image")
    dec = wf.add("VAEDecodeTiled", (1340, 560), (360, 150),
                 widgets={"tile_size": 256, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8})
    wf.connect(ks, dec, "samples")
    wf.connect(vae, dec, "vae")
    vid = wf.add("CreateVideo", (1340, 750), (360, 80), widgets={"fps": 24.0})
    wf.connect(dec, vid, "images")
    save = wf.add("SaveVideo", (1340, 870), (360, 230), widgets={"filename_prefix": "video/sparge_hunyuan_t2v"})
    wf.connect(vid, save, "video")
    add_map(wf, sp, ks, x=1740, y=20)
    return wf


def wan21_i2v(oi) -> Workflow:
    wf = Workflow(oi)
    wf.group("Models", 20, 20, 400, 660, C_MODELS)
    unet = wf.add("UNETLoader", (40, 80), (360, 90),
                  widgets={"unet_name": "wan2.1_i2v_480p_14B_fp16.safetensors", "weight_dtype": "default"})
    shift = wf.add("ModelSamplingSD3", (40, 210), (360, 60), widgets={"shift": 8.0})
    wf.connect(unet, shift, "model")
    clip = wf.add("CLIPLoader", (40, 310), (360, 110),
                  widgets={"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"})
    vae = wf.add("VAELoader", (40, 460), (360, 60), widgets={"vae_name": "wan_2.1_vae.safetensors"})
    cv = wf.add("CLIPVisionLoader", (40, 560), (360, 60), widgets={"clip_name": "clip_vision_h.safetensors"})

    wf.group("Start image and prompt", 440, 20, 440, 1020, C_PROMPT)
    img = wf.add("LoadImage", (460, 80), (400, 360), title="Start image", widgets={"image": "example.png"})
    enc = wf.add("CLIPVisionEncode", (460, 480), (400, 80), widgets={"crop": "none"})
    wf.connect(cv, enc, "clip_vision")
    wf.connect(img, enc, "image")
    pos = wf.add("CLIPTextEncode", (460, 600), (400, 200), title="Positive prompt", color="#232", bgcolor="#353",
                 widgets={"text": "the scene comes to life: gentle wind moves through the picture, natural motion, "
                                  "the camera slowly pushes in"})
    neg = wf.add("CLIPTextEncode", (460, 840), (400, 180), title="Negative prompt", color="#322", bgcolor="#533",
                 widgets={"text": NEGATIVE_WAN})
    wf.connect(clip, pos, "clip")
    wf.connect(clip, neg, "clip")

    wf.group("Sparge Attention", 900, 20, 400, 1100, C_SPARGE)
    sp = wf.add("SpargeAttention", (920, 80), (360, 400), color=SPARGE_COLOR, bgcolor=SPARGE_BG,
                widgets={"preset": "Balanced", "start_percent": 0.1})
    wf.connect(shift, sp, "model")
    wf.note("## Sparge Attention on Wan 2.1 image-to-video 14B (832x480, 81 frames)\n"
            "The start image fixes the layout, so the video tokens (21x30x52 = 32,760 per call) attend mostly "
            "to their neighbours; the image and text conditioning go through cross-attention, which always "
            "runs normal attention. **start_percent 0.1** keeps the first 10% of the steps dense, where the "
            "motion is decided. Wan 2.1 14B has 40 blocks.\n\n" + SLIDERS_MD + "\n" + READOUT_MD,
            (920, 600), (360, 500))

    wf.group("Sample and save", 1320, 20, 400, 1100, C_SAMPLE)
    i2v = wf.add("WanImageToVideo", (1340, 80), (360, 200),
                 widgets={"width": 832, "height": 480, "length": 81, "batch_size": 1})
    wf.connect(pos, i2v, "positive")
    wf.connect(neg, i2v, "negative")
    wf.connect(vae, i2v, "vae")
    wf.connect(enc, i2v, "clip_vision_output")
    wf.connect(img, i2v, "start_image")
    ks = wf.add("KSampler", (1340, 320), (360, 270),
                widgets={"seed": 42, "steps": 20, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
                         "denoise": 1.0})
    wf.connect(sp, ks, "model")
    wf.connect(i2v.out(0), ks, "positive")
    wf.connect(i2v.out(1), ks, "negative")
    wf.connect(i2v.out(2), ks, "latent_image")
    dec = wf.add("VAEDecode", (1340, 630), (360, 50))
    wf.connect(ks, dec, "samples")
    wf.connect(vae, dec, "vae")
    vid = wf.add("CreateVideo", (1340, 720), (360, 80), widgets={"fps": 16.0})
    wf.connect(dec, vid, "images")
    save = wf.add("SaveVideo", (1340, 840), (360, 260), widgets={"filename_prefix": "video/sparge_wan21_i2v"})
    wf.connect(vid, save, "video")
    add_map(wf, sp, ks, x=1740, y=20)
    return wf


TINY_DEMO = "tiny_wan_demo.json"
WORKFLOWS = {
    "wan21_t2v_1.3B_480p.json": ("9b6d8f3e-1c2a-4d6e-8f10-5a7b3c9d2e01", wan21_t2v),
    "wan22_t2v_14B_high_low.json": ("9b6d8f3e-1c2a-4d6e-8f10-5a7b3c9d2e02", wan22_t2v),
    "hunyuan_video_t2v_720p.json": ("9b6d8f3e-1c2a-4d6e-8f10-5a7b3c9d2e03", hunyuan_t2v),
    "wan21_i2v_480p_14B.json": ("9b6d8f3e-1c2a-4d6e-8f10-5a7b3c9d2e04", wan21_i2v),
}


def build_all(object_info: dict, tiny_unet: str, presets: dict) -> dict:
    Workflow.presets = presets
    out = {name: wf(object_info).to_json(wid) for name, (wid, wf) in WORKFLOWS.items()}
    out[TINY_DEMO] = wan21_t2v(object_info, tiny_unet=tiny_unet, tiny=True).to_json(
        "9b6d8f3e-1c2a-4d6e-8f10-5a7b3c9d2e00")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report files that would change")
    a = ap.parse_args(argv)
    from devkit.comfy_harness import ComfyServer

    with ComfyServer(install_tiny_models=True) as srv:
        files = build_all(srv.object_info(), srv.tiny_models["wan21"].name, srv.get_json("/sparge/presets"))
    changed = []
    for name, wf in files.items():
        text = json.dumps(wf, indent=2, ensure_ascii=False) + "\n"
        path = (DEV_OUT if name == TINY_DEMO else OUT) / name
        if not path.exists() or path.read_text() != text:
            changed.append(name)
            if not a.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    print(("would change: " if a.check else "wrote: ") + (", ".join(changed) or "nothing"))
    return 1 if (a.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
