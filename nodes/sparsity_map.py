"""The "Sparge Sparsity Map" node: pictures of what a Sparge Attention node skipped in its last
sampling run (the drawing is in nodes/sparsity_render.py and sparsity_views.py, the capture in nodes/capture.py).

How it is wired (one node, no extra patch node):

    Load model -> Sparge Attention (map_layer: which block to photograph) -> KSampler -> ...
                         |  MODEL                                            | LATENT
                         +-------------> Sparge Sparsity Map <---------------+
                                           |  block_mask   |  layer_x_step
                                           v               v
                                      Preview Image    Preview Image

During sampling the Sparge Attention node keeps, for each step, the block mask of ONE transformer
block (its `map_layer` widget; -1 = the middle block) and the sparsity of every block; nothing
is read back from the GPU until the run ends. This node only draws that: the `samples` input just
makes it run after the sampler, so `step` and `head` can be changed and re-queued without
sampling again.
"""
from __future__ import annotations

from comfy_api.latest import io

from .install import find_override
from .schema import node_schema
from .sparsity_render import render_message, to_tensor
from .sparsity_views import block_mask_image, layer_step_image

DESCRIPTION = (
    "Shows which attention blocks the Sparge Attention node computed and which it skipped in the last "
    "sampling run. Connect the MODEL output of the Sparge Attention node and the sampler's LATENT "
    "output (that only makes this node run after sampling). block_mask: the predicted block mask of "
    "the transformer block chosen with map_layer on the Sparge Attention node (-1 = the middle block), "
    "at one step, for one head or the mean over heads: amber = computed, dark = skipped; rows are query "
    "blocks, columns key blocks, in Hilbert order when the node used it. layer_x_step: the share of "
    "blocks skipped by every transformer block at every step (grey = normal attention). Feed both into "
    "Preview Image. Changing step or head redraws without sampling again.")


class SpargeSparsityMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "SpargeSparsityMap", "Sparge Sparsity Map",
            description=DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The MODEL output of the Sparge Attention node whose last run you want to see (the same "
                    "link that goes into the sampler).")),
                io.Latent.Input("samples", tooltip=(
                    "The sampler's output. Only used so that the map is drawn after sampling; for Wan 2.2 "
                    "connect the last sampler.")),
                io.Int.Input("step", default=-1, min=-1, max=100000, step=1, tooltip=(
                    "Which sampling step to show, counted from 0 within the sampler's run; -1 = the last step.")),
                io.Int.Input("head", default=-1, min=-1, max=1023, step=1, tooltip=(
                    "Which attention head to show, from 0; -1 = the mean over all heads (brighter = more heads "
                    "compute that block).")),
            ],
            outputs=[
                io.Image.Output(display_name="block_mask", tooltip=(
                    "Kept (amber) vs skipped (dark) attention blocks of the chosen block, step and head.")),
                io.Image.Output(display_name="layer_x_step", tooltip=(
                    "Sparsity of every transformer block (rows) at every step (columns).")),
            ],
        )

    @classmethod
    def execute(cls, model, samples, step=-1, head=-1) -> io.NodeOutput:
        ov = find_override(model)
        if ov is None:
            msg = render_message("No Sparge Attention on this model", [
                "Connect the MODEL output of a Sparge Attention node (the one that feeds the sampler).",
                "If that node is bypassed, there is nothing to show."])
            return io.NodeOutput(to_tensor(msg), to_tensor(msg))
        data = ov.last_map
        mask_img, _ = block_mask_image(data, int(step), int(head))
        grid_img, _ = layer_step_image(data)
        return io.NodeOutput(to_tensor(mask_img), to_tensor(grid_img))
