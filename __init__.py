"""Sparge Attention for ComfyUI: sparse + quantized attention (SpargeAttn) for video DiTs.

ComfyUI loads this folder as a custom-node package. Nothing ComfyUI-specific is imported at
module import time, so sparge_core and kernels can be used (and tested) without ComfyUI.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import SpargeExtension

    return SpargeExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
