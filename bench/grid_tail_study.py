"""CPU study (issue 14, v61): how much of the attention kernel's time the grid's tail costs, and what
launching each head's query blocks longest list first gives back.

The kernel runs one program per (head, query block); an SM slot that finishes takes the next
program in launch order, so the grid ends when its last slot does. Modelled here on realistic masks
(devkit/realistic_inputs, seed 0, Hilbert order, the reference's stage 1 at each preset): a
program costs 1 tile for its prologue and epilogue, one per kept key block and 1.4 per fill step
of fill_block means (NOTES v58), in Hopper's config's blocks, on 132 SMs x 3 programs (its
168-register cap). Greedy list
scheduling gives the makespan in each launch order, against the ideal (all work / slots).

    python bench/grid_tail_study.py [--shapes wan480,hunyuan544]

Timed on an H100 (NOTES v61), longest first per head did not pay: the model's tail is not where the
GPU loses time. Kept as the record of that prediction.
"""
import argparse
import datetime
import heapq
import math

import torch

from common import SHAPES, realistic_text_tokens, save
from devkit.realistic_inputs import make_video_qkv
from sparge_attention.kernels.config import config_for_capability
from sparge_attention.sparge_core.hilbert import TokenPermutation
from sparge_attention.sparge_core.presets import PRESETS
from sparge_attention.sparge_core.reference_predict import predict_block_mask

SLOTS = 132 * 3
FILL_STEP_TILES = 1.4
HOPPER = config_for_capability(9, 0)


def makespan(costs) -> float:
    slots = [0.0] * SLOTS
    for c in costs:
        heapq.heappush(slots, heapq.heappop(slots) + c)
    return max(slots)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    args = ap.parse_args()
    res = {"date": datetime.date.today().isoformat(), "slots": SLOTS, "fill_step_tiles": FILL_STEP_TILES, "shapes": {}}
    for name in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[name]
        q, k, _, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, n_text=realistic_text_tokens(name), seed=0)
        perm = TokenPermutation.for_grid(grid, q.shape[2])
        q, k = perm.apply(q, 2), perm.apply(k, 2)
        rows = res["shapes"][name] = []
        for preset in ("Balanced", "Fast", "Turbo"):
            p = PRESETS[preset].params()
            # head by head: the reference's scores for every head at once do not fit 24 GB at HunyuanVideo
            mask = torch.cat([predict_block_mask(q[:, h:h + 1].float(), k[:, h:h + 1].float(), p, HOPPER.block_m,
                                                 HOPPER.block_n) for h in range(H)], 1)
            cnt = mask.sum(-1)[0].float()  # (H, NQ)
            cost = 1.0 + cnt + FILL_STEP_TILES * math.ceil(mask.shape[-1] / HOPPER.fill_block)
            ideal = float(cost.sum()) / SLOTS
            row = dict(preset=preset, density=float(cnt.mean()) / mask.shape[-1], max_list=int(cnt.max()),
                       block_order=makespan(cost.flatten().tolist()) / ideal,
                       longest_first_per_head=makespan(cost.sort(-1, descending=True).values.flatten().tolist()) / ideal,
                       longest_first_global=makespan(cost.flatten().sort(descending=True).values.tolist()) / ideal)
            rows.append(row)
            print(f"{name} {preset:<8} density {row['density']:.4f}  makespan / ideal: block order "
                  f"{row['block_order']:.3f}, longest first per head {row['longest_first_per_head']:.3f}, "
                  f"over all heads {row['longest_first_global']:.3f}", flush=True)
    print("saved", save(res, f"{res['date']}-cpu-grid_tail_study"))


if __name__ == "__main__":
    main()
