"""Tiny random-weight video DiT checkpoints that real ComfyUI 0.3.75 detects.

The state dicts are produced by instantiating ComfyUI's own model classes
(``comfy.ldm.wan.model.WanModel`` and ``comfy.ldm.hunyuan_video.model.HunyuanVideo``)
with the smallest configuration that ``comfy.model_detection`` still maps to the
intended model type, filling every parameter from a seeded generator, and saving
the (un-prefixed, "diffusion_models/" style) state dict as .safetensors.

* Wan 2.1 T2V: dim 256 (head_dim is fixed at 128 -> 2 heads), ffn 256, 2 layers,
  in/out 16 channels, text_dim 4096 (conditioning width 4096) -> WAN21_T2V.
* HunyuanVideo: hidden 256 (2 heads of 128, rope axes 16/56/56), 1 double and
  1 single block, context_in_dim 256 (conditioning width 256), vector_in
  (pooled_output width 768), guidance embedding -> HunyuanVideo.

ComfyUI's import tree has top-level names (``nodes``, ``utils``, ``app``...) that
would shadow this project's packages, so by default the generation runs in a
child process (the venv python) and nothing from ComfyUI is imported into the
caller. Inside a process that already runs ComfyUI, pass ``in_process=True``.

CLI:  python devkit/tiny_models.py {wan21,hunyuan,wan22pair,all} PATH [--seed N]
      python devkit/tiny_models.py detect FILE [FILE...]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFY_ROOT = REPO_ROOT / ".comfyui" / "ComfyUI"

# Bump when the generated weights change, so cached files are regenerated.
FORMAT_VERSION = 1

WAN21_T2V_CONFIG = dict(
    model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=256,
    freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1),
    qk_norm=True, cross_attn_norm=True, eps=1e-6,
)
WAN21_CONTEXT_DIM = 4096

HUNYUAN_VIDEO_CONFIG = dict(
    in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=256, hidden_size=256,
    mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256,
    patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
    use_cond_type_embedding=False, vision_in_dim=None,
)
HUNYUAN_CONTEXT_DIM = 256
HUNYUAN_POOLED_DIM = 768

DEFAULT_SEEDS = {"wan21": 1234, "hunyuan": 4321, "wan22_high": 2201, "wan22_low": 2202}


def venv_python() -> str:
    """The project's venv python if present, else the current interpreter."""
    cand = REPO_ROOT / ".venv" / "bin" / "python"
    return str(cand) if cand.exists() else sys.executable


# --------------------------------------------------------------------------- in-process part

def _import_comfy():
    """Make ComfyUI's ``comfy`` package importable in CPU mode (only for a child/ComfyUI process)."""
    if str(COMFY_ROOT) not in sys.path:
        sys.path.insert(0, str(COMFY_ROOT))
    import comfy.cli_args  # noqa: E402
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401,E402
    import comfy.ops  # noqa: E402
    return comfy


def _fill_deterministic(module, seed: int) -> None:
    """Fill every parameter/buffer with seeded values; keeps activations sane for random weights."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2:
                fan_in = max(1, p[0].numel())
                std = 1.0 / (fan_in ** 0.5)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
            elif leaf in ("scale",) or "norm" in name:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
            else:  # biases and other vectors
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float32))


def _save(state_dict, path: Path, meta: dict) -> Path:
    import safetensors.torch
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique: concurrent generators are safe
    # A single metadata key keeps the header (and so the file bytes) deterministic.
    safetensors.torch.save_file(sd, str(tmp), metadata={"sparge_tiny_model": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return path


def _build_wan21_t2v_inproc(path, seed):
    _import_comfy()
    import torch
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(**WAN21_T2V_CONFIG, device="cpu", dtype=torch.float32,
                     operations=comfy.ops.disable_weight_init)
    _fill_deterministic(model, seed)
    return _save(model.state_dict(), path, {"kind": "wan21_t2v", "seed": seed,
                                            "format_version": FORMAT_VERSION,
                                            "config": WAN21_T2V_CONFIG})


def _build_hunyuan_video_inproc(path, seed):
    _import_comfy()
    import torch
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    model = HunyuanVideo(image_model="hunyuan_video", device="cpu", dtype=torch.float32,
                         operations=comfy.ops.disable_weight_init, **HUNYUAN_VIDEO_CONFIG)
    _fill_deterministic(model, seed)
    return _save(model.state_dict(), path, {"kind": "hunyuan_video", "seed": seed,
                                            "format_version": FORMAT_VERSION,
                                            "config": HUNYUAN_VIDEO_CONFIG})


def _detect_inproc(path) -> dict:
    """What ComfyUI's model_detection makes of the file (same path as UNETLoader)."""
    _import_comfy()
    import comfy.model_detection
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    temp_sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    if len(temp_sd) > 0:
        sd = temp_sd
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    model_config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata)
    n_params = sum(v.numel() for v in sd.values())
    return {
        "model_config": None if model_config is None else type(model_config).__name__,
        "unet_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (unet_config or {}).items()},
        "n_params": int(n_params),
        "bytes": os.path.getsize(path),
    }


# --------------------------------------------------------------------------- public API

def _run_child(kind: str, path, seed=None) -> str:
    cmd = [venv_python(), str(Path(__file__).resolve()), kind, str(path)]
    if seed is not None:
        cmd += ["--seed", str(int(seed))]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"tiny model child failed ({' '.join(cmd)}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res.stdout


def make_tiny_wan21_t2v(path, seed: int = DEFAULT_SEEDS["wan21"], in_process: bool = False) -> Path:
    """Write a random-weight Wan 2.1 T2V (detected as WAN21_T2V) to ``path``. Conditioning width 4096."""
    if in_process:
        return _build_wan21_t2v_inproc(Path(path), seed)
    _run_child("wan21", path, seed)
    return Path(path)


def make_tiny_hunyuan_video(path, seed: int = DEFAULT_SEEDS["hunyuan"], in_process: bool = False) -> Path:
    """Write a random-weight HunyuanVideo (detected as HunyuanVideo) to ``path``.

    Conditioning width 256 and a pooled_output of width 768 are required.
    """
    if in_process:
        return _build_hunyuan_video_inproc(Path(path), seed)
    _run_child("hunyuan", path, seed)
    return Path(path)


def make_tiny_wan22_pair(directory, in_process: bool = False) -> tuple[Path, Path]:
    """Wan 2.2 style high-noise / low-noise pair: two Wan 2.1-architecture T2V files, different seeds."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    high = d / "tiny_wan22_high_noise.safetensors"
    low = d / "tiny_wan22_low_noise.safetensors"
    if in_process:
        _build_wan21_t2v_inproc(high, DEFAULT_SEEDS["wan22_high"])
        _build_wan21_t2v_inproc(low, DEFAULT_SEEDS["wan22_low"])
    else:
        _run_child("wan22pair", d)
    return high, low


def make_tiny_wan_lora(path, rank: int = 4, scale: float = 0.5, seed: int = 77,
                       targets=("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")) -> Path:
    """A seeded LoRA for the tiny Wan models (2.1 and the 2.2 pair share the shapes), in the
    diffusers/PEFT key style that ComfyUI's comfy/lora.py maps onto Wan:
    ``diffusion_model.blocks.{i}.{target}.lora_A.weight`` (rank, dim) and ``.lora_B.weight``
    (dim, rank), no alpha (ComfyUI then applies B @ A at strength 1). The update B @ A has about
    ``scale`` times the spread of the base weights. Needs only torch + safetensors (no ComfyUI)."""
    import safetensors.torch
    import torch

    dim, layers = WAN21_T2V_CONFIG["dim"], WAN21_T2V_CONFIG["num_layers"]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    sd = {}
    for i in range(layers):
        for t in targets:
            key = f"diffusion_model.blocks.{i}.{t}"
            sd[f"{key}.lora_A.weight"] = torch.randn((rank, dim), generator=gen) / dim ** 0.5
            sd[f"{key}.lora_B.weight"] = torch.randn((dim, rank), generator=gen) * (scale / rank ** 0.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path),
                                metadata={"sparge_tiny_lora": json.dumps({"rank": rank, "scale": scale, "seed": seed})})
    return path


def detect(path, in_process: bool = False) -> dict:
    """Return {"model_config": class name or None, "unet_config": {...}, "n_params", "bytes"}."""
    return detect_many([path], in_process=in_process)[str(path)]


def detect_many(paths, in_process: bool = False) -> dict:
    """detect() for several files in one child process: {str(path): result}."""
    paths = [str(p) for p in paths]
    if in_process:
        return {p: _detect_inproc(p) for p in paths}
    cmd = [venv_python(), str(Path(__file__).resolve()), "detect", *paths]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"detection child failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# File names used inside a ComfyUI models/diffusion_models/ folder.
WAN21_FILENAME = "sparge_tiny_wan21_t2v.safetensors"
HUNYUAN_FILENAME = "sparge_tiny_hunyuan_video.safetensors"
WAN22_HIGH_FILENAME = "tiny_wan22_high_noise.safetensors"
WAN22_LOW_FILENAME = "tiny_wan22_low_noise.safetensors"


def cache_dir() -> Path:
    d = Path(os.environ.get("SPARGE_TINY_MODEL_CACHE", REPO_ROOT / ".comfyui" / "tiny_models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_tiny_models() -> dict[str, Path]:
    """Generate (once, deterministic) and return {"wan21", "hunyuan", "wan22_high", "wan22_low"} paths.

    Generation happens in one child process; later calls reuse the files.
    """
    d = cache_dir() / f"v{FORMAT_VERSION}"
    paths = {
        "wan21": d / WAN21_FILENAME,
        "hunyuan": d / HUNYUAN_FILENAME,
        "wan22_high": d / WAN22_HIGH_FILENAME,
        "wan22_low": d / WAN22_LOW_FILENAME,
    }
    if not all(p.exists() for p in paths.values()):
        _run_child("all", d)
    return paths


def install_into(models_dir, names=("wan21", "hunyuan", "wan22_high", "wan22_low")) -> dict[str, Path]:
    """Hard-link (or copy) cached tiny models into ``models_dir`` (e.g. BASE/models/diffusion_models)."""
    src = cached_tiny_models()
    dst_dir = Path(models_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        dst = dst_dir / src[n].name
        if not dst.exists():
            try:
                os.link(src[n], dst)
            except OSError:
                shutil.copyfile(src[n], dst)
        out[n] = dst
    return out


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["wan21", "hunyuan", "wan22pair", "all", "detect"])
    ap.add_argument("path", nargs="+", help="output file/dir (detect: one or more model files)")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    if a.kind == "detect":
        print(json.dumps({p: _detect_inproc(p) for p in a.path}))
        return 0
    if len(a.path) != 1:
        ap.error("exactly one path expected")
    a.path = a.path[0]
    if a.kind == "wan21":
        p = _build_wan21_t2v_inproc(Path(a.path), DEFAULT_SEEDS["wan21"] if a.seed is None else a.seed)
        print(p)
    elif a.kind == "hunyuan":
        p = _build_hunyuan_video_inproc(Path(a.path), DEFAULT_SEEDS["hunyuan"] if a.seed is None else a.seed)
        print(p)
    elif a.kind == "wan22pair":
        print(make_tiny_wan22_pair(a.path, in_process=True))
    elif a.kind == "all":
        d = Path(a.path)
        _build_wan21_t2v_inproc(d / WAN21_FILENAME, DEFAULT_SEEDS["wan21"])
        _build_hunyuan_video_inproc(d / HUNYUAN_FILENAME, DEFAULT_SEEDS["hunyuan"])
        make_tiny_wan22_pair(d, in_process=True)
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
