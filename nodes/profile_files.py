"""Calibrated profile files in ComfyUI: the models/sparge_profiles folder, reading and checking a
profile (LoadedProfile), and fitting it to a model and the Sparge Attention node's settings. The
"Load Sparge Profile" node is nodes/profile_node.py; the readout of its use nodes/profile_use.py.

The profile reaches the Sparge Attention node through an OPTIONAL socket input `profile`
(type SPARGE_PROFILE), not a widget, so saved workflows (their widgets_values) are unchanged.
With a profile, every block the profile calibrated uses its per-head params
(`SpargeProfile.params_for_layer`: (H,) float32 tensors, dense heads with threshold 1.0 and
simthreshd1 1.0, i.e. all blocks kept); a block whose heads are ALL dense runs ComfyUI's own
attention (readout reason "profile dense layer"); blocks the profile did not calibrate use the
node's preset. A profile made at another resolution still applies; the readout carries
`SpargeProfile.note_for` about it.

Files are read by sparge_core/profile_format.py and checked by profiles.py (header as JSON, tensors by the
safetensors parser, every field checked, nothing unpickled or executed). A bad file is reported
by the loader's validation (HTTP 400 with the message, before anything runs); a profile for a
model with another head or block count fails the Sparge Attention node with the message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Optional

from ..sparge_core.profile_format import parse_header
from ..sparge_core.profiles import SpargeProfile
from .config import ERROR_CHECK_MODES, SpargeConfig
from .model_info import model_shape

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
    with open(path, "rb") as f:
        data = f.read()
    _, meta = parse_header(data, path)
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


def apply_profile(config: SpargeConfig, model_patcher, loaded, error_check="off") -> SpargeConfig:
    """The Sparge Attention node's settings with its optional profile and error check. Raises
    ValueError when the profile cannot belong to the model (shown as the node's execution error);
    smaller differences go to the readout as the config's profile_notes."""
    if error_check is None:
        error_check = "off"
    if error_check not in ERROR_CHECK_MODES:
        raise ValueError(f"error_check must be one of {list(ERROR_CHECK_MODES)}, got {error_check!r}")
    notes = []
    if loaded is not None:
        if not isinstance(loaded, LoadedProfile):
            raise ValueError(f"the 'profile' input must come from the Load Sparge Profile node, got {type(loaded).__name__}")
        notes = check_fits(loaded, model_patcher)
    return dataclasses.replace(config, profile=loaded, profile_notes=tuple(notes), error_check=str(error_check))
