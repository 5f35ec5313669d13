"""The hardware counters of the call's kernels, for Nsight Compute (ncu): what each kernel's warps wait
on, how busy each pipe is (tensor cores, MUFU, FMA, ALU), DRAM throughput. Every earlier step placed
time by timing variants and reading SASS; this asks the GPU itself where the attention tile's ~1,130
cycles go, against ~585 of issue and ~512 of tensor-core work (NOTES, after v65).

Warms every kernel up (compiles, autotunes nothing), then runs under cudaProfilerStart/Stop exactly:
the attention kernel at density 1.0 and 0.25 (random masks, as bench/kernel_variants.py), the whole
Balanced call on the realistic inputs (quantizers, scoring, selection, kernel with the fill pass), and
SDPA-cuDNN, once each at Wan 480p. `bash scripts/ncu_kernels.sh` does all of it on the device (~70 s
on an H100): run under ncu with `--profile-from-start off`, export the pages, summarise them (the
summary needs no GPU):

    ncu --clock-control none --profile-from-start off --set full -o $OUT/rep python3 ncu_kernels.py
    ncu -i $OUT/rep.ncu-rep --page raw --csv > $OUT/raw.csv
    ncu -i $OUT/rep.ncu-rep --page source --csv --print-source sass --kernel-name regex:sparse_attn \
        --launch-count 1 > $OUT/sass_attn.csv
    python bench/ncu_kernels.py --summarize DIR --card H100 --tag v68   # DIR holds the two CSVs

The summary (JSON + table) keeps per kernel the pipes' utilisation, L2 and DRAM throughput, occupancy
and the warps' stall reasons per issued instruction, and for the attention kernel at density 1.0 the
SASS instructions where its warps' samples gather (with their main stall reasons).
"""
import argparse
import csv
import datetime
import math
from pathlib import Path

import torch

from common import SHAPES, random_block_mask, save, sdpa_cudnn

METRICS = {  # short name: ncu raw metric
    "us": "gpu__time_duration.sum",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
    "registers": "launch__registers_per_thread",
    "smem_kb": "launch__shared_mem_per_block_dynamic",
    "warps_active_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "tensor_pct": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "mufu_xu_pct": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "alu_pct": "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "fma_pct": "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "l2_pct": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_sectors_from_sm": "lts__t_sectors_srcunit_tex.sum",
    "dram_pct": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_read_mb": "dram__bytes_read.sum",
    "dram_write_mb": "dram__bytes_write.sum",
    "instructions": "smsp__inst_executed.sum",
    "sm_cycles": "sm__cycles_elapsed.avg",
}
UNITS = {  # a short name's suffix -> its unit's factor from each unit the export may use (ncu picks one by size)
    "us": {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3},
    "mb": {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3},
    "kb": {"byte/block": 1e-3, "Kbyte/block": 1.0, "Mbyte/block": 1e3},
}
STALLS = ("barrier", "wait", "long_scoreboard", "short_scoreboard", "not_selected", "selected", "dispatch_stall",
          "mio_throttle", "math_pipe_throttle", "no_instruction", "branch_resolving")
SASS_STALLS = ("stall_barrier", "stall_wait", "stall_long_sb", "stall_short_sb", "stall_not_selected",
               "stall_dispatch", "stall_mio", "stall_math", "stall_no_inst")


def _in_unit(short, value, unit):
    """value, given in the export's unit, in the unit the short name ends with (us, mb, kb); other
    names as exported. An unknown unit raises rather than mislabel the figure."""
    table = UNITS.get(short.rsplit("_", 1)[-1])
    if table is None:
        return value
    if unit not in table:
        raise ValueError(f"{short}: the export's unit {unit!r} is not one of {sorted(table)}")
    return value * table[unit]


def _num(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


NOTE = ("kernels in launch order: the attention kernel at density 1.0 and 0.25 (random masks), the Balanced call's "
        "kernels on the realistic inputs, SDPA-cuDNN; Wan 480p")


def summarize(folder: Path, card: str, tag: str, note: str = NOTE, hot_share=0.01):
    """raw.csv (every kernel) and sass_attn.csv (the first attention kernel) -> JSON and a table."""
    rows = list(csv.reader(open(folder / "raw.csv")))
    hdr, units, data = rows[0], rows[1], rows[2:]
    col = {h: i for i, h in enumerate(hdr)}
    kernels = []
    for d in data:
        k = {"kernel": d[col["Kernel Name"]][:48]}
        for short, m in METRICS.items():
            k[short] = _in_unit(short, _num(d[col[m]]), units[col[m]]) if m in col else float("nan")
        k["stalls_per_issue"] = {s: round(_num(d[col[f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio"]]), 3)
                                 for s in STALLS}
        kernels.append(k)
    res = {"card": card, "date": datetime.date.today().isoformat(), "tool": "ncu, --clock-control none",
           "note": note, "kernels": kernels}
    srows = list(csv.reader(open(folder / "sass_attn.csv")))
    shdr, sdata = srows[1], srows[2:]
    sc = {h: i for i, h in enumerate(shdr)}
    total = sum(_num(r[sc["Warp Stall Sampling (All Samples)"]] or "0") for r in sdata)
    hot = []
    for j, r in enumerate(sdata):
        share = _num(r[sc["Warp Stall Sampling (All Samples)"]] or "0") / total
        if share >= hot_share:
            why = sorted(((_num(r[sc[s]] or "0") / total, s[6:]) for s in SASS_STALLS), reverse=True)[:2]
            hot.append({"index": j, "sass": r[sc["Source"]].strip()[:80], "share": round(share, 4),
                        "main_stalls": {n: round(v, 4) for v, n in why if v > 0}})
    res["attention_d1_sass_hot"] = hot
    res["attention_d1_samples"] = total
    lines = [f"{'kernel':26} {'us':>8} {'reg':>4} {'warps%':>6} {'issue%':>6} {'tensor%':>7} {'mufu%':>6} {'L2%':>5} "
             f"{'DRAM%':>6}  stalls per issued instruction (largest four)"]
    for k in kernels:
        top = sorted(((v, s) for s, v in k["stalls_per_issue"].items() if s != "selected"), reverse=True)[:4]
        lines.append(f"{k['kernel'][:26]:26} {k['us']:8.1f} {k['registers']:4.0f} {k['warps_active_pct']:6.1f} "
                     f"{k['issue_active_pct']:6.1f} {k['tensor_pct']:7.1f} {k['mufu_xu_pct']:6.1f} {k['l2_pct']:5.1f} "
                     f"{k['dram_pct']:6.1f}  " + ", ".join(f"{s} {v:.2f}" for v, s in top))
    lines.append(f"the kernel of sass_attn.csv: SASS lines holding >= {hot_share:.0%} of its warps' samples")
    for h in hot:
        lines.append(f"  {h['share'] * 100:5.1f}%  {h['sass'][:60]:60} " +
                     ", ".join(f"{n} {v * 100:.1f}%" for n, v in h["main_stalls"].items()))
    print("\n".join(lines))
    path = save(res, f"{res['date']}-{card}-ncu-{tag}")
    path.with_suffix(".log").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="wan480")
    ap.add_argument("--densities", default="1.0,0.25")
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--summarize", type=Path, help="a folder with ncu's raw.csv and sass_attn.csv exports")
    ap.add_argument("--card", default="H100")
    ap.add_argument("--tag", default="v68")
    ap.add_argument("--note", default=NOTE, help="what the profiled kernels were (kept in the JSON)")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize, args.card, args.tag, args.note)
    from devkit.realistic_inputs import make_video_qkv
    from gpu_check import kernel_fn, prepare
    from sparge_attention.kernels.config import KernelConfig
    from sparge_attention.sparge_core import SpargeBlockMask, sparge_attention
    from sparge_attention.sparge_core.presets import PRESETS

    B, H, N, D, grid, _ = SHAPES[args.shape]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    cfg = KernelConfig(64, 128, 4, 3, pv_fp8=True, tma=True, maxnreg=168)  # kernels/config.py's sm90 choice
    prep = prepare(q, k, v, 64, 128)
    runs = []
    for dens in map(float, args.densities.split(",")):
        dm = random_block_mask(B, H, math.ceil(N / 64), math.ceil(N / 128), dens, dev, seed=1)
        runs.append((f"kernel d{dens}", kernel_fn(prep, SpargeBlockMask.from_dense(dm, 64, 128, N, N), N, D, cfg)))
    rq, rk, rv, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, batch=B, n_text=0, seed=0, device=dev)
    params = PRESETS[args.preset].params()
    runs.append((f"call {args.preset}", lambda: sparge_attention(rq, rk, rv, params, grid=grid)))
    runs.append(("cudnn", lambda: sdpa_cudnn(q, k, v)))
    for _, fn in runs:  # compile and warm up outside the profiled range
        fn(), fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in runs:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(n for n, _ in runs), "on", torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
