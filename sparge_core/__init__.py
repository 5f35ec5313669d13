"""SpargeAttn in PyTorch: public API, parameters, reference, layouts, Hilbert order, stats.

Never imports ComfyUI. Kernels are imported lazily, only on the Triton path."""
from .api import block_sizes, sparge_attention
from .blockmask import SpargeBlockMask
from .params import SpargeParams
from .stats import SpargeStats

__all__ = ["sparge_attention", "block_sizes", "SpargeParams", "SpargeBlockMask", "SpargeStats"]
