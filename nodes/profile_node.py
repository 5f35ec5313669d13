"""The "Load Sparge Profile" node and the SPARGE_PROFILE socket type it outputs (the profile
reaches the Sparge Attention node's optional `profile` input; files: nodes/profile_files.py)."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from .profile_files import list_profiles, load, resolve
from .schema import node_schema

log = logging.getLogger("sparge_attention")

SpargeProfileType = io.Custom("SPARGE_PROFILE")


class LoadSpargeProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "LoadSpargeProfile", "Load Sparge Profile",
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
