"""Calibrated profiles in ComfyUI: the models/sparge_profiles folder, the "Load Sparge Profile"
node (SPARGE_PROFILE output), and what the Sparge Attention node does with a loaded profile.

The profile reaches the Sparge Attention node through an OPTIONAL socket input `profile`
(type SPARGE_PROFILE), not a widget, so saved workflows (their widgets_values) are unchanged.
With a profile, every block the profile calibrated uses its per-head params
(`SpargeProfile.params_for_layer`: (H,) float32 tensors, dense heads with threshold 1.0 and
simthreshd1 1.0, i.e. all blocks kept); a block whose heads are ALL dense runs ComfyUI's own
attention (readout reason "profile dense layer"); blocks the profile did not calibrate use the
node's preset. A profile made at another resolution still applies; the readout carries
`SpargeProfile.note_for` about it.

Files are read by sparge_core/profiles.py (safetensors header parsed as JSON, tensors by the
safetensors parser, every field checked, nothing unpickled or executed). A bad file is reported
by the loader's validation (HTTP 400 with the message, before anything runs); a profile for a
model with another head or block count fails the Sparge Attention node with the message.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional

from ..sparge_core.profiles import SpargeProfile

log = logging.getLogger("sparge_attention")

FOLDER = "sparge_profiles"
EXT = ".safetensors"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


# ----------------------------------------------------------------------------- the folder
def register_folder() -> None:
    """models/sparge_profiles (under ComfyUI's models dir, also with --base-directory), added the
    way ComfyUI 0.3.75 adds model folders; an extra_model_paths.yaml entry `sparge_profiles: ...`
    made before keeps its place, ours becomes the default (first) path."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    if isinstance(exts, set):
        exts.add(EXT)
    else:  # a list or tuple from elsewhere
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {EXT})


def default_dir() -> str:
    import folder_paths

    register_folder()
    return folder_paths.get_folder_paths(FOLDER)[0]


def list_profiles() -> list:
    import folder_paths

    register_folder()
    try:
        return folder_paths.get_filename_list(FOLDER)
    except Exception:  # pragma: no cover - an unreadable folder
        return []


def profile_name_error(name) -> Optional[str]:
    """Why `name` cannot be a profile file name (None: fine). Names stay inside the folder."""
    if not isinstance(name, str):
        return "profile_name must be text"
    stem = name[:-len(EXT)] if name.endswith(EXT) else name
    if not stem.strip():
        return "profile_name is empty: give the profile a name, e.g. 'wan21_t2v_480p'"
    if not _NAME_OK.match(stem) or ".." in stem:
        return (f"profile_name {name!r} may only use letters, digits, '.', '_', '-' and spaces (at most 128, "
                "no folders): the file goes to models/sparge_profiles/<name>.safetensors")
    return None


def profile_path(name: str) -> str:
    err = profile_name_error(name)
    if err:
        raise ValueError(err)
    stem = name[:-len(EXT)] if name.endswith(EXT) else name
    return os.path.join(default_dir(), stem + EXT)


def resolve(name: str) -> str:
    """Full path of a file listed in the profile combo (ValueError when it is not there)."""
    import folder_paths

    register_folder()
    if not isinstance(name, str) or not name or name == "none":
        raise ValueError("no Sparge profile chosen: calibrate one with the Sparge Calibrate node first "
                         "(profiles are read from models/sparge_profiles)")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(f"Sparge profile '{name}' is not in models/sparge_profiles (have: {list_profiles()})")
    return path


# ----------------------------------------------------------------------------- a loaded profile
class LoadedProfile:
    """A SpargeProfile plus where it came from, in the shape SpargeConfig.profile needs.
    Per-layer params and flags are precomputed into lists (cheap in the attention call, and
    plain Python values under torch.compile)."""

    def __init__(self, profile: SpargeProfile, name: str, path: Optional[str] = None, extra_meta=None):
        self.profile = profile
        self.name = name
        self.path = path
        self.extra_meta = dict(extra_meta or {})
        cal = [bool(x) for x in profile.calibrated.tolist()]
        dense = profile.dense.tolist()
        self.calibrated = cal
        self._all_dense = [cal[i] and all(dense[i]) for i in range(profile.layers)]
        self._params = [profile.params_for_layer(i) if cal[i] else None for i in range(profile.layers)]
        self._notes: dict = {}

    def __repr__(self):
        return f"LoadedProfile({self.name!r}, {self.profile.layers} blocks x {self.profile.heads} heads)"

    # SpargeConfig.profile protocol
    def params_for_layer(self, layer: int, fallback):
        if 0 <= layer < len(self._params):
            p = self._params[layer]
            if p is not None:
                return p
        return fallback

    def all_dense(self, layer: int) -> bool:
        return 0 <= layer < len(self._all_dense) and self._all_dense[layer]

    def note_for(self, n_tokens: int, grid) -> Optional[str]:
        key = (int(n_tokens), tuple(grid) if grid else None)
        if key not in self._notes:
            self._notes[key] = self.profile.note_for(*key)
        return self._notes[key]

    def describe_layers(self) -> dict:
        """Per calibrated block: the per-head params the kernel gets (JSON)."""
        prof = self.profile
        out = {}
        for i, p in enumerate(self._params):
            if p is None:
                continue
            thr = p.threshold
            out[str(i)] = {
                "mode": prof.mode,
                "threshold": [round(float(x), 6) for x in thr.tolist()],
                "simthreshd1": [round(float(x), 6) for x in p.simthreshd1.tolist()],
                "dense_heads": [int(h) for h in prof.dense_heads(i).nonzero().flatten().tolist()],
                "all_dense": self._all_dense[i],
            }
        return out


def load(name: str) -> LoadedProfile:
    """Read and check a profile from models/sparge_profiles (ValueError with the reason)."""
    path = resolve(name)
    prof = SpargeProfile.load(path)
    extra = _check_extra_metadata(path, prof)
    return LoadedProfile(prof, name, path, extra)


def _check_extra_metadata(path, prof: SpargeProfile) -> dict:
    """The Sparge Calibrate node also writes the per-block figures as JSON metadata (for people
    and tools reading the header); when present they must agree with the tensors."""
    from ..sparge_core.profiles import _parse_header

    with open(path, "rb") as f:
        data = f.read()
    _, meta = _parse_header(data, path)
    extra = {}
    for key, tensor in (("layer_sparsity", prof.sparsity), ("layer_rel_l1", prof.rel_l1)):
        raw = meta.get(key)
        if raw is None:
            continue
        try:
            vals = json.loads(raw)
        except ValueError:
            raise ValueError(f"Sparge profile {path}: metadata {key!r} is not valid JSON")
        if not isinstance(vals, list) or len(vals) != prof.layers or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise ValueError(f"Sparge profile {path}: metadata {key!r} must list one number per block "
                             f"({prof.layers})")
        if any(abs(float(a) - float(b)) > 1e-3 for a, b in zip(vals, tensor.tolist())):
            raise ValueError(f"Sparge profile {path}: metadata {key!r} does not match the tensors "
                             "(edited or corrupt file)")
        extra[key] = vals
    for key in ("every_n_steps", "created_by"):
        if key in meta:
            extra[key] = meta[key]
    return extra


def model_shape(model_patcher) -> dict:
    """{family, blocks, heads} of a ModelPatcher's diffusion model (None where unknown)."""
    from .override import _count_layers

    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    cfg = getattr(base, "model_config", None)
    family = type(cfg).__name__ if cfg is not None else (type(base).__name__ if base is not None else None)
    heads = getattr(dm, "num_heads", None)
    return {"family": family, "blocks": _count_layers(dm), "heads": int(heads) if isinstance(heads, int) else None}


def check_fits(loaded: LoadedProfile, model_patcher) -> list:
    """Raise ValueError when the profile cannot belong to this model (head or block count);
    returns notes for smaller differences (model family)."""
    prof = loaded.profile
    shape = model_shape(model_patcher)
    what = f"Sparge profile '{loaded.name}' ({prof.model_family}, {prof.layers} blocks x {prof.heads} heads)"
    fix = " Calibrate this model with the Sparge Calibrate node, or pick the profile made for it."
    if shape["heads"] is not None and shape["heads"] != prof.heads:
        raise ValueError(f"{what} does not fit this model: it has {shape['heads']} attention heads per block, "
                         f"the profile {prof.heads}.{fix}")
    if shape["blocks"] is not None and shape["blocks"] != prof.layers:
        raise ValueError(f"{what} does not fit this model: it has {shape['blocks']} transformer blocks, "
                         f"the profile {prof.layers}.{fix}")
    notes = []
    if shape["family"] and prof.model_family not in ("unknown", shape["family"]):
        notes.append(f"profile '{loaded.name}' was calibrated on a {prof.model_family} model, this one is "
                     f"{shape['family']} (same block and head count, so it is used)")
    return notes


# ----------------------------------------------------------------------------- run bookkeeping
def note_profile_use(ov, layer: int, n_tokens: int, grid) -> None:
    """A sparse call of `layer` runs with a profile: note a resolution / token-order difference
    for the readout (SpargeProfile.note_for). Called outside torch.compile only."""
    run = ov.run
    loaded = ov.config.profile
    if run is None or loaded is None or loaded.params_for_layer(layer, None) is None:
        return
    note = loaded.note_for(n_tokens, grid)
    if note:
        notes = run.__dict__.setdefault("profile_notes", [])
        if note not in notes:
            notes.append(note)


def _blocks_with_sparse_calls(run) -> set:
    """Transformer blocks that ran sparse calls in this run (from the override's per-step stats)."""
    used = set()
    for st in (getattr(run, "steps", None) or {}).values():
        for part in getattr(st, "layer_parts", ()) or ():
            used.update(b for b in part[0] if b is not None)
    return used


def profile_readout(ov, run) -> Optional[dict]:
    loaded = getattr(ov.config, "profile", None)
    if loaded is None:
        return None
    prof = loaded.profile
    notes = list(getattr(run, "profile_notes", None) or []) + list(getattr(ov, "profile_notes", None) or [])
    used = sorted(b for b in _blocks_with_sparse_calls(run) if loaded.params_for_layer(b, None) is not None)
    return {
        "name": loaded.name,
        "model_family": prof.model_family,
        "layers": prof.layers,
        "heads": prof.heads,
        "mode": prof.mode,
        "fill_skipped": prof.fill_skipped,
        "target_l1": prof.target_l1,
        "n_tokens": prof.n_tokens,
        "grid": list(prof.grid) if prof.grid else None,
        "calibrated_layers": [i for i, c in enumerate(loaded.calibrated) if c],
        "layers_used": used,  # blocks whose sparse calls ran with the profile's params
        "params": loaded.describe_layers(),  # per block: the per-head thresholds the kernel got
        "notes": notes,
    }


# ----------------------------------------------------------------------------- the node
def _node_classes():
    from comfy_api.latest import io

    SpargeProfileType = io.Custom("SPARGE_PROFILE")

    class LoadSpargeProfile(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="LoadSpargeProfile",
                display_name="Load Sparge Profile",
                category="model_patches/attention",
                description=(
                    "Loads a calibrated Sparge profile (per-block, per-head thresholds measured on your model by "
                    "the Sparge Calibrate node) from models/sparge_profiles. Connect it to the 'profile' input of "
                    "the Sparge Attention node. Profiles are safetensors files: they hold numbers only, and "
                    "they are checked before use (nothing in them is executed)."),
                inputs=[
                    io.Combo.Input("profile_name", options=list_profiles(), tooltip=(
                        "A .safetensors profile in models/sparge_profiles, written by the Sparge Calibrate node "
                        "or shared by someone with the same model (refresh the page after adding files).")),
                ],
                outputs=[SpargeProfileType.Output(display_name="profile", tooltip=(
                    "The profile; plug it into the Sparge Attention node's 'profile' input."))],
            )

        @classmethod
        def validate_inputs(cls, profile_name=None):
            # 0.3.75 does not check V3 combo values: the file is looked up and fully read here,
            # so a bad file is a validation error (HTTP 400, shown on the node) before anything runs.
            if profile_name is None:
                return True
            try:
                load(profile_name)
            except ValueError as e:
                return str(e)
            except Exception as e:  # never let a file take the server down
                return f"Sparge profile '{profile_name}' could not be read: {type(e).__name__}: {e}"
            return True

        @classmethod
        def fingerprint_inputs(cls, profile_name=None):
            # a re-calibrated file with the same name is read again
            try:
                st = os.stat(resolve(profile_name))
                return f"{profile_name}:{st.st_mtime_ns}:{st.st_size}"
            except Exception:
                return f"{profile_name}:missing"

        @classmethod
        def execute(cls, profile_name) -> io.NodeOutput:
            loaded = load(profile_name)
            log.info("Sparge profile %s: %s", profile_name, loaded.profile.summary())
            return io.NodeOutput(loaded)

    return SpargeProfileType, LoadSpargeProfile


_CLASSES = {}


def node_classes():
    if not _CLASSES:
        _CLASSES["type"], _CLASSES["node"] = _node_classes()
    return _CLASSES["type"], _CLASSES["node"]


def apply_profile(config, model_patcher, loaded, error_check="off"):
    """The Sparge Attention node's settings with its optional profile and error check:
    (new SpargeConfig, notes for the readout). Raises ValueError when the profile cannot belong
    to the model (shown as the node's execution error)."""
    import dataclasses

    from .config import ERROR_CHECK_MODES

    if error_check is None:
        error_check = "off"
    if error_check not in ERROR_CHECK_MODES:
        raise ValueError(f"error_check must be one of {list(ERROR_CHECK_MODES)}, got {error_check!r}")
    notes = []
    if loaded is not None:
        if not isinstance(loaded, LoadedProfile):
            raise ValueError(f"the 'profile' input must come from the Load Sparge Profile node, got {type(loaded).__name__}")
        notes = check_fits(loaded, model_patcher)
    return dataclasses.replace(config, profile=loaded, error_check=str(error_check)), notes


__all__ = ["LoadedProfile", "load", "check_fits", "apply_profile", "register_folder", "profile_path", "profile_name_error",
           "list_profiles", "note_profile_use", "profile_readout", "node_classes", "model_shape", "FOLDER"]
