"""Energy and clocks of the attention kernel against SDPA-cuDNN, on a GPU held at its power limit.

kernel_variants.py found the kernel's ratio to cuDNN depends on how it is timed (H100, 2026-12-06:
0.68-0.76 alone from row to row, 0.751 in alternating pairs) while the GPU sat at its 700 W limit.
This bench measures why: each of cuDNN and the kernel at a given block mask runs back to back for a
few seconds alone, then the two alternate, and for each phase it reads from NVML (the driver's own
library, through ctypes: no package needed) the energy counter before and after, and the SM clock
every few ms. Per call: time, energy, mean power and mean SM clock, and the kernel's ratios to
cuDNN: time and energy alone, clock cycles alone (time times clock), time alternating. At a power
limit time follows energy: a kernel that needs less energy per call than cuDNN runs at higher clocks
alone, and alternating, both run at about one clock, so their time ratio is their cycle ratio
(H100, 2026-12-06, Wan 480p, density 1.0: time alone 0.713, energy 0.705, cycles 0.759, time
alternating 0.755).

    python bench/power_draw.py [--shape wan480] [--densities 1.0,0.25] [--seconds 3]
"""
import argparse
import ctypes
import datetime
import threading
import time

import torch
import triton

from common import SHAPES, card_name, random_block_mask, save, sdpa_cudnn
from gpu_check import kernel_fn, prepare
from sparge_attention.kernels.config import default_config
from sparge_attention.sparge_core import SpargeBlockMask

NVML_CLOCK_SM = 1


class Nvml:
    """The few NVML calls this bench needs, for the GPU torch runs on (its index as NVML sees it)."""

    def __init__(self, index: int):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit failed")
        self.dev = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.dev)) != 0:
            raise RuntimeError("no NVML handle for this GPU")

    def energy_mj(self) -> int:
        e = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.dev, ctypes.byref(e)) != 0:
            raise RuntimeError("no energy counter on this GPU")
        return e.value

    def sm_mhz(self) -> int:
        c = ctypes.c_uint()
        self.lib.nvmlDeviceGetClockInfo(self.dev, NVML_CLOCK_SM, ctypes.byref(c))
        return c.value


def phase(nvml: Nvml, fns, seconds: float) -> dict:
    """Run fns in turn, back to back, for about `seconds`: per fn its median time per call (CUDA
    events), and over the phase the energy per round of fns, the mean power and the mean SM clock."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    # one round timed to size the phase
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    rounds = max(5, int(seconds / max(time.perf_counter() - t0, 1e-4)))
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(len(fns) + 1)] for _ in range(rounds)]
    clocks, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            clocks.append(nvml.sm_mhz())
            time.sleep(0.005)
    th = threading.Thread(target=sample)
    e0, w0 = nvml.energy_mj(), time.perf_counter()
    th.start()
    for r in ev:
        r[0].record()
        for i, f in enumerate(fns):
            f()
            r[i + 1].record()
    torch.cuda.synchronize()
    e1, w1 = nvml.energy_mj(), time.perf_counter()
    stop.set()
    th.join()
    per = [sorted(r[i].elapsed_time(r[i + 1]) for r in ev)[rounds // 2] for i in range(len(fns))]
    joules = (e1 - e0) / 1000.0
    return dict(rounds=rounds, ms=per, wall_s=w1 - w0, joules_per_round=joules / rounds, watts=joules / (w1 - w0),
                sm_mhz=sum(clocks) / max(len(clocks), 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="wan480")
    ap.add_argument("--densities", default="1.0,0.25")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    nvml = Nvml(torch.cuda.current_device())
    B, H, N, D, _, _ = SHAPES[args.shape]
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    cfg = default_config(dev)
    prep = prepare(q, k, v, cfg.block_m, cfg.block_n)
    cudnn = lambda: sdpa_cudnn(q, k, v)  # noqa: E731
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "shape": args.shape, "seconds": args.seconds, "rows": []}
    print(f"{res['card']}, {args.shape}: per call, each phase ~{args.seconds:g} s back to back")
    print(f"{'density':>7} {'phase':<22} {'ms':>8} {'J/call':>8} {'W':>6} {'SM MHz':>7}")
    for dens in map(float, args.densities.split(",")):
        nq, nk = triton.cdiv(N, cfg.block_m), triton.cdiv(N, cfg.block_n)
        mask = SpargeBlockMask.from_dense(random_block_mask(B, H, nq, nk, dens, dev, seed=1), cfg.block_m,
                                          cfg.block_n, N, N)
        kern = kernel_fn(prep, mask, N, D, cfg)
        c = phase(nvml, [cudnn], args.seconds)
        s = phase(nvml, [kern], args.seconds)
        p = phase(nvml, [cudnn, kern], args.seconds)
        row = dict(density=dens, cudnn_alone=c, kernel_alone=s, alternating=p,
                   time_ratio_alone=s["ms"][0] / c["ms"][0],
                   energy_ratio_alone=s["joules_per_round"] / c["joules_per_round"],
                   time_ratio_alternating=p["ms"][1] / p["ms"][0],
                   # the clock cycles a call takes, kernel over cuDNN: the time ratio at equal clocks
                   cycle_ratio_alone=s["ms"][0] * s["sm_mhz"] / (c["ms"][0] * c["sm_mhz"]))
        res["rows"].append(row)
        for name, ph, ms in (("cuDNN alone", c, c["ms"][0]), ("kernel alone", s, s["ms"][0])):
            print(f"{dens:>7.2f} {name:<22} {ms:>8.3f} {ph['joules_per_round']:>8.3f} {ph['watts']:>6.0f} "
                  f"{ph['sm_mhz']:>7.0f}")
        print(f"{dens:>7.2f} {'alternating (pair)':<22} {p['ms'][0]:>4.2f}+{p['ms'][1]:<4.2f} "
              f"{p['joules_per_round']:>8.3f} {p['watts']:>6.0f} {p['sm_mhz']:>7.0f}")
        print(f"{dens:>7.2f} kernel / cuDNN: time alone {row['time_ratio_alone']:.3f}, energy alone "
              f"{row['energy_ratio_alone']:.3f}, cycles alone {row['cycle_ratio_alone']:.3f}, time alternating "
              f"{row['time_ratio_alternating']:.3f}")
    print("saved", save(res, f"{res['date']}-{card_name()}-power_draw"))


if __name__ == "__main__":
    main()
