"""Tile shapes per GPU architecture. The mask predictor uses the same block sizes."""
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query block (BLKQ)
    block_n: int  # key block (BLKK)
    num_warps: int
    num_stages: int
    pv_fp8: bool  # fp8 e4m3 P.V (needs fp8 tensor cores), else fp16
    tma: bool = False  # K/V tiles by bulk tensor copies (TMA descriptors; Hopper)
    maxnreg: int | None = None  # register cap per thread (sets how many programs share an SM)
    # key-block means per step of the fill_skipped pass (kernels/fill_pass.py; a divisor of FILL_PAD)
    fill_block: int = 64
    fill_stages: int = 0  # steps of that pass whose loads are in flight at once; 0: num_stages
    causal_stages: int = 0  # num_stages of causal launches without the P.V skip; 0: num_stages

    def stages_for(self, is_causal: bool, pv_skip: bool) -> int:
        """num_stages of the attention kernel's launch in this variant."""
        return self.causal_stages if is_causal and not pv_skip and self.causal_stages else self.num_stages


@dataclass(frozen=True)
class Launch:
    """Launch shape of a helper kernel (quantizers, stage-1 scoring, statistics): the kernel's
    results do not depend on it, only its speed. `num_stages`: for a kernel's loop, how many
    steps' loads are in flight at once (1: none ahead); `block`: rows per tile where the kernel
    has a free one (0: its default); `programs`: how many programs to split the work into, where
    the kernel splits a sequence into chunks; `maxnreg`: a register cap per thread (how many
    programs share an SM), None for the compiler's choice; `tile`: the scoring kernel's most key
    blocks per program (the width of its register tile of results)."""
    num_warps: int = 4
    num_stages: int = 3
    block: int = 0
    programs: int = 1024
    maxnreg: int | None = None
    tile: int = 32
    tma: bool = False  # the scoring kernel's keys by bulk tensor copies (TMA descriptors; Hopper)

    def warps_and_cap(self) -> dict:
        """Triton's launch options for the warps and, where set, the register cap."""
        return {"num_warps": self.num_warps, **({"maxnreg": self.maxnreg} if self.maxnreg else {})}


# Block sizes shared by every device, so that masks, profiles and calibration made on one
# machine (or on the CPU reference) mean the same thing on another.
BLOCK_M, BLOCK_N = 64, 128


@lru_cache(maxsize=None)  # asked on every attention call; a device's answer never changes
def default_config(device: torch.device) -> KernelConfig:
    if device.type != "cuda":  # TRITON_INTERPRET on the CPU: the shapes and loads Hopper uses
        return KernelConfig(BLOCK_M, BLOCK_N, 4, 1, pv_fp8=True, tma=True, fill_block=128, fill_stages=1)
    return config_for_capability(*torch.cuda.get_device_capability(device))


def config_for_capability(major: int, minor: int) -> KernelConfig:
    """The config a CUDA GPU of compute capability major.minor runs; pure, so that
    tests/test_gpu_targets.py can cross-compile each architecture with exactly its config."""
    if major == 9:
        # H100, 2026-11-26 (bench/NOTES.md v11-v13): TMA loads, and a 168-register cap so three
        # programs (12 warps) share an SM instead of two: 0.89x -> 0.71x cuDNN at density 1.0.
        # 64x128 with 4 warps stays best; 128-row tiles lose to their lower occupancy.
        # The fill pass 128 means a step, its loads (TMA) not multi-buffered: the kernel's 73.8 KB
        # of shared memory as at 64, so three programs still share an SM (NOTES v58).
        # Causal kernels without the P.V skip at 2 stages: at 3, Triton gives their loop 3-deep K/V
        # buffers (106.6 KB: two programs per SM), at 2 the non-causal loop's 2-deep (73.8 KB)
        # (NOTES v59)
        return KernelConfig(BLOCK_M, BLOCK_N, 4, 3, pv_fp8=True, tma=True, maxnreg=168, fill_block=128,
                            fill_stages=1, causal_stages=2)
    # other GPUs: the same tiles and plain loads, until measured there; fp8 tensor cores from sm89.
    # sm86/sm87 (RTX 30xx, Orin) allow 99 KB of shared memory per block: with fp16 P.V, causal
    # masking and no P.V skip, 3 stages need 120 KB (tests/test_gpu_targets.py), 2 stages 72 KB.
    stages = 2 if (major, minor) in ((8, 6), (8, 7)) else 3
    return KernelConfig(BLOCK_M, BLOCK_N, 4, stages, pv_fp8=(major, minor) >= (8, 9))


# Launch shapes of the helper kernels: 4 warps, one token block per quantizer program, 64-row
# tiles for the scoring kernel, 32-row steps for kv_stats over ~1,024 programs, no loads ahead;
# the selection's rows as few warps as their length allows.
# The scoring kernel's result tile is 16 key blocks wide off Hopper: at 32 it compiles to 251-253
# registers for sm80-sm89 and spills 15 for sm120 (devkit/cross_compile; none at 16, not timed there).
_HELPERS = {
    "quant_pool64": Launch(),
    "quant_pool128": Launch(),
    # V's cast in one pass over the block. Steps of 32 rows (v34, when the division made the whole
    # tile spill) ran 1.8x slower on an H100 (146 vs 80 us at Wan 480p, NOTES v36 / v37): every
    # step's row sums and transposed store go through shared memory behind a barrier. With V times
    # the reciprocal the one pass compiles without spills for sm80 / 86 (fp16 V: 255 registers),
    # sm89 (244) and sm120 (249) (devkit/cross_compile, Triton 3.6); 64 rows at 2 warps, Hopper's
    # choice, spills 40-120 B there. Not timed on those GPUs.
    "quant_v": Launch(),
    "kv_stats": Launch(num_stages=1, block=32),
    "block_lse": Launch(block=64, tile=16),
    # one warp per row up to 512 key blocks, two up to 1,024 (H200, bench/predict_tune.py, NOTES
    # v24: 12.2 -> 6.7 us at Wan 480p's 256 blocks, 102 -> 86 us at HunyuanVideo 544p's 1,024 with
    # the fill padding; cross-warp reductions went through shared memory behind barriers)
    "select": Launch(num_warps=1),
}
# Hopper (H200, 2026-12-03, bench/predict_tune.py; NOTES v22): the scoring kernel with a
# 168-register cap (three programs per SM instead of two) and 32 key blocks per program: 133.6 ->
# 126.9 us at Wan 480p, 1215 -> 1029 us at HunyuanVideo 544p; kv_stats with two steps' loads in
# flight: 77.1 -> 65.5 us / 234 -> 199 us. The quantizers measured best as they were (warps 1-8;
# several blocks per program with loads ahead: 56 -> 76 us for Q at Wan).
# quant_v in 64-row steps with 2 warps (H200, 2026-12-05, predict_tune; NOTES v35): 173 -> 87 us at
# Wan 480p, 681 -> 326 us at HunyuanVideo 544p against 32 rows with 4 warps (the one pass: 90 / 358).
# The scoring kernel's keys by TMA (NOTES v39), as the attention kernel's: 106.1 -> 96.6 us at Wan 480p,
# 849.1 -> 786.7 at HunyuanVideo 544p (H100, 2026-12-06).
# kv_stats over 256 programs with the sampled runs' loads ahead (NOTES v57, H100): one wave of
# programs instead of ~1.6 (96 registers: 5 per SM) and a finish over 4x fewer partials; with its
# finish 23.4 -> 10.5-11.4 us at Wan 480p, 55.4 -> 42.5 at HunyuanVideo 544p, 17.1 -> 8.9 at 17 frames.
# The scoring kernel in programs of 2 warps (NOTES v60, H200, 2026-12-06): reading every 4th key (v56)
# each step is a small product and its exp2 chain; 2 warps (mma.sync, twice the scores a thread,
# six programs per SM at 168 registers) took it 53.9 -> 50.1 us at Wan 480p and 421 -> 393 us at
# HunyuanVideo 544p, the same outputs bit for bit (50 launch shapes swept); on an H100 52.9 -> 49.7
# and 409 -> 385 us.
_HOPPER = {"block_lse": Launch(num_warps=2, block=64, programs=256, maxnreg=168, tma=True),
           "kv_stats": Launch(num_stages=3, block=32, programs=256), "quant_v": Launch(num_warps=2, block=64)}


def helper_launches_for(major: int | None) -> dict[str, Launch]:
    """Launch shapes of the helper kernels on a GPU of compute capability `major` (None: the CPU
    interpreter); pure, so that tests/test_gpu_targets.py compiles what each GPU runs."""
    return {**_HELPERS, **(_HOPPER if major == 9 else {})}


@lru_cache(maxsize=None)
def helper_launch(kernel: str, device: torch.device) -> Launch:
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None
    return helper_launches_for(major)[kernel]
