"""Host time of two builds of the pack in one process, call by call (issue 14): the H200 host's own
cost per operation moved by up to 4x between processes (SDPA 39 vs 174 us in back-to-back runs of
bench/host_overhead.py), so a before/after comparison of host time has to share the process.

Loads this checkout as `sparge_attention` and another tree (e.g. `git archive <rev>` unpacked) as
`sparge_before`, then alternates their calls: the public API and the node's override inside a
sampling run (Balanced, as bench/host_overhead.py drives it), each call timed alone after a sync.

    python bench/host_ab.py --before ../.carry/before [--tokens 7800] [--rounds 6]
"""
import argparse
import datetime
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common import card_name, comfy_sdpa, save
from devkit.sampling_run import sampling_run
from host_overhead import GRIDS, B, D, H, median


def load_tree(root: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return name


def build(pkg: str):
    """(API call, override step) of one build; each returns its calls' wall times in us."""
    api = importlib.import_module(f"{pkg}.sparge_core")
    presets = importlib.import_module(f"{pkg}.sparge_core.presets")
    config = importlib.import_module(f"{pkg}.nodes.config")
    override = importlib.import_module(f"{pkg}.nodes.override")
    return api, presets, config, override


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the other tree's root (its __init__.py)")
    ap.add_argument("--tokens", type=int, default=7800)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    n, grid = args.tokens, GRIDS[args.tokens]
    load_tree(Path(args.before).resolve(), "sparge_before")
    builds = {"after": build("sparge_attention"), "before": build("sparge_before")}
    g = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(B, n, H * D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    qh, kh, vh = (t.view(B, n, H, D).transpose(1, 2) for t in x)
    times = {k: {"api": [], "override": []} for k in builds}
    overrides = {}
    for name, (api, presets, config, override) in builds.items():
        p = presets.PRESETS["Balanced"].params()
        overrides[name] = (api, p, override.SpargeOverride(config.SpargeConfig.from_widgets(preset="Balanced",
                                                                                            min_tokens=1024),
                                                             node_id=f"ab-{name}"))

    def run(name, record, steps=3, blocks=30):
        api, p, ov = overrides[name]

        def forward(x_, t, c_concat, c_crossattn, control, to):
            for _ in range(blocks):
                us = timed(lambda: ov(comfy_sdpa, *x, heads=H, transformer_options=to))
                if record:
                    times[name]["override"].append(us)
        sampling_run(ov, forward, SimpleNamespace(patch_size=(1, 2, 2)),
                     torch.zeros(B, 16, grid[0], grid[1] * 2, grid[2] * 2, device="cuda"), steps)
        for _ in range(30):
            us = timed(lambda: api.sparge_attention(qh, kh, vh, p))
            if record:
                times[name]["api"].append(us)

    for name in builds:  # compile and warm both
        run(name, False, steps=4)
    for _ in range(args.rounds):
        for name in builds:
            run(name, True)
    res = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "tokens": n,
           "preset": "Balanced", "median_us": {}}
    print(f"host time per call (median wall us, calls alternating by build in one process), {res['card']}, "
          f"{n} tokens, Balanced; the override's calls include its measured ones (every 4th step per block)")
    for name, t in times.items():
        med = {k: median(v) for k, v in t.items()}
        res["median_us"][name] = med
        print(f"  {name:<7} override {med['override']:8.1f}   API {med['api']:8.1f}   ({len(t['override'])} / "
              f"{len(t['api'])} calls)")
    print("saved", save(res, f"{res['date']}-{card_name()}-host_ab"))


if __name__ == "__main__":
    main()
