"""SpargeAttn in PyTorch: public API, parameters, reference, layouts, Hilbert order, stats.

Never imports ComfyUI. Kernels (and Triton) are imported lazily: on the Triton path, and once by
`availability.triton_status()` to tell whether that path can run here."""
from .api import block_sizes, sparge_attention
from .blockmask import SpargeBlockMask
from .params import SpargeParams
from .stats import SpargeStats

__all__ = ["sparge_attention", "block_sizes", "SpargeParams", "SpargeBlockMask", "SpargeStats"]
