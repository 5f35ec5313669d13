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


def has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# Block sizes shared by every device, so that masks, profiles and calibration made on one
# machine (or on the CPU reference) mean the same thing on another.
BLOCK_M, BLOCK_N = 64, 128


@lru_cache(maxsize=None)  # asked on every attention call; a device's answer never changes
def default_config(device: torch.device) -> KernelConfig:
    if device.type != "cuda":  # TRITON_INTERPRET on the CPU: the shapes and loads Hopper uses
        return KernelConfig(BLOCK_M, BLOCK_N, 4, 1, pv_fp8=True, tma=True)
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9:
        # H100, 2026-11-26 (bench/NOTES.md v11-v13): TMA loads, and a 168-register cap so three
        # programs (12 warps) share an SM instead of two: 0.89x -> 0.71x cuDNN at density 1.0.
        # 64x128 with 4 warps stays best; 128-row tiles lose to their lower occupancy.
        return KernelConfig(BLOCK_M, BLOCK_N, 4, 3, pv_fp8=True, tma=True, maxnreg=168)
    # other GPUs: the same tiles and plain loads, until measured there
    return KernelConfig(BLOCK_M, BLOCK_N, 4, 3, pv_fp8=has_fp8(device))
