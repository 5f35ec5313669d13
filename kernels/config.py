"""Tile shapes per GPU architecture. The mask predictor uses the same block sizes."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query block (BLKQ)
    block_n: int  # key block (BLKK)
    num_warps: int
    num_stages: int
    pv_fp8: bool  # fp8 e4m3 P.V (needs fp8 tensor cores), else fp16


def has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# Block sizes shared by every device, so that masks, profiles and calibration made on one
# machine (or on the CPU reference) mean the same thing on another.
BLOCK_M, BLOCK_N = 64, 128


def default_config(device: torch.device) -> KernelConfig:
    if device.type != "cuda":  # TRITON_INTERPRET on the CPU: the shapes the GPU would use
        return KernelConfig(BLOCK_M, BLOCK_N, 4, 1, pv_fp8=True)
    # H100, 2026-11-26 (bench/NOTES.md): 64x128 with 4 warps and 3 stages beat 128x64 and
    # 128x128 with 8 warps by 12-30% at every density. Other GPUs: same tiles until measured.
    return KernelConfig(BLOCK_M, BLOCK_N, 4, 3, pv_fp8=has_fp8(device))
