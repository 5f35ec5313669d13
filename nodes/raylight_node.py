"""The node "Sparge Attention (Raylight)": Raylight's RAY_ACTORS in and out, the Sparge node's
settings (no profile input); each Ray worker patches its own model (nodes/raylight.py, which
imports without ComfyUI so the workers can load it before ComfyUI's API is needed)."""
from __future__ import annotations

from comfy_api.latest import io

from .config import SpargeConfig
from .raylight import PACK_DIR, PACK_NAME, WIDGETS, worker_patch
from .schema import node_schema
from .sparge_node import SpargeAttention

RAY_ACTORS = io.Custom("RAY_ACTORS")


class SpargeAttentionRaylight(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [RAY_ACTORS.Input("ray_actors", tooltip="From Raylight's Load Diffusion Model (Ray).")]
        inputs += [i for i in SpargeAttention.define_schema().inputs if i.id not in ("model", "profile")]
        return node_schema(
            "SpargeAttentionRaylight", "Sparge Attention (Raylight)",
            description=("Sparge Attention on every GPU of a Raylight USP sampler (Ulysses; ring attention "
                         "stays dense for now). The readout, in the ComfyUI console, sums all GPUs."),
            inputs=inputs, outputs=[RAY_ACTORS.Output()], hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, preset=None, mode=None, dense_blocks=None, start_percent=None, end_percent=None,
                        error_check=None):
        return SpargeAttention.validate_inputs(preset=preset, mode=mode, dense_blocks=dense_blocks,
                                               start_percent=start_percent, end_percent=end_percent,
                                               error_check=error_check)

    @classmethod
    def execute(cls, ray_actors, map_layer=-1, error_check="off", **kw) -> io.NodeOutput:
        import ray  # present whenever RAY_ACTORS exist

        widgets = {k: v for k, v in kw.items() if k in WIDGETS}
        SpargeConfig.from_widgets(**widgets)  # fail here, not on the workers
        widgets["error_check"] = error_check
        node_id = getattr(cls.hidden, "unique_id", None) if cls.hidden is not None else None
        fn = worker_patch(PACK_DIR, PACK_NAME, widgets, node_id, int(map_layer))
        ray.get([actor.model_function_runner.remote(fn) for actor in ray_actors["workers"]])
        return io.NodeOutput(ray_actors)
