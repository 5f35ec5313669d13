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


def default_config(device: torch.device) -> KernelConfig:
    if device.type != "cuda":  # TRITON_INTERPRET on the CPU: the shapes the GPU would use
        return KernelConfig(128, 64, 4, 1, pv_fp8=True)
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9:  # Hopper: measured on H100, see bench/NOTES.md
        return KernelConfig(128, 64, 8, 3, pv_fp8=True)
    return KernelConfig(128, 64, 4, 2, pv_fp8=has_fp8(device))
