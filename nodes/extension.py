"""The pack's ComfyUI extension (V3 API): the node list, plus the readout and preset HTTP routes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .calibrate_node import SpargeCalibrate
from .profile_files import register_folder
from .profile_node import LoadSpargeProfile
from .raylight_node import SpargeAttentionRaylight
from .routes import register_routes
from .sparge_node import SpargeAttention
from .sparsity_map import SpargeSparsityMap


class SpargeExtension(ComfyExtension):
    async def on_load(self) -> None:  # newer ComfyUI calls this; 0.3.75 does not
        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_routes()  # 0.3.75: before the server adds its routes to the app
        register_folder()  # models/sparge_profiles
        return [SpargeAttention, SpargeSparsityMap, SpargeCalibrate, LoadSpargeProfile, SpargeAttentionRaylight]
