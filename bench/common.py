"""Shared bits of the GPU benchmarks: loading the pack, timing, random masks. Importing it puts the
repository root on sys.path, so bench scripts import devkit (metrics, realistic inputs) after it."""
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from devkit.pack import load_pack  # noqa: E402

load_pack()

SHAPES = {  # name: (B, H, N, D, grid, n_text)
    "wan480": (1, 12, 32760, 128, (21, 30, 52), 0),
    "hunyuan544": (1, 24, 67320, 128, (33, 34, 60), 0),
    "wan720": (1, 40, 75600, 128, (21, 45, 80), 0),
    "wan480_17f": (2, 12, 7800, 128, (5, 30, 52), 0),  # 17 frames, batch 2: the e2e's short clip (host time goal)
}


def realistic_text_tokens(shape_name: str) -> int:
    """Text tokens the realistic benchmarks append to the video tokens: HunyuanVideo's joint
    attention with 256 text tokens (issue 6); Wan's self-attention has none."""
    return 256 if shape_name.startswith("hunyuan") else 0


def bench_ms(fn, warmup=25, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def paired_ratio(fn, ref, budget_ms=2000.0, min_pairs=5, max_pairs=60):
    """Time fn against ref in alternating pairs (ref, fn, ref, fn, ...) with CUDA events and
    return (median of the per-pair ratios fn/ref, median fn ms, median ref ms).

    One cuDNN figure taken at the start of a long run drifts from the later ones (clocks follow
    power and temperature: identical masks measured minutes apart differed by up to 10% at the
    HunyuanVideo shape); a ratio taken pair by pair cancels that drift. The host queues ahead as
    in a model, so Python launch time is hidden whenever the GPU is busy."""
    fn(), ref()  # warm-up (compilation, caches)
    torch.cuda.synchronize()
    e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    e[0].record(), ref(), e[1].record(), fn(), e[2].record()
    torch.cuda.synchronize()
    est = e[0].elapsed_time(e[2])
    n = int(min(max_pairs, max(min_pairs, budget_ms // max(est, 1e-3))))
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n)]
    for a, b, c in ev:
        a.record()
        ref()
        b.record()
        fn()
        c.record()
    torch.cuda.synchronize()
    t_ref = torch.tensor([a.elapsed_time(b) for a, b, _ in ev])
    t_fn = torch.tensor([b.elapsed_time(c) for _, b, c in ev])
    return (t_fn / t_ref).median().item(), t_fn.median().item(), t_ref.median().item()


def bench_graph_ms(fn, rep=100):
    """GPU time of fn replayed from a CUDA graph: leaves out the Python launch cost, which a real
    model hides by queueing ahead while earlier kernels run (measured ~1.3 ms of host time per
    call on the device machine, ~10 Triton launches)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def sdpa_cudnn(q, k, v, is_causal=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def comfy_sdpa(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
    """ComfyUI's attention function as the node's override receives it ((B, N, H*D) in and out, by
    SDPA): the `func` a bench hands to SpargeOverride for its dense calls."""
    b, n, hd = q.shape
    q, k, v = (t.view(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def random_block_mask(B, H, nq, nk, density, device, seed=0):
    """Each query block keeps round(density * nk) random key blocks (at least one)."""
    g = torch.Generator(device=device).manual_seed(seed)
    keep = max(1, round(density * nk))
    scores = torch.rand(B, H, nq, nk, generator=g, device=device)
    idx = scores.topk(keep, dim=-1).indices
    return torch.zeros(B, H, nq, nk, dtype=torch.bool, device=device).scatter_(-1, idx, True)


def card_name():
    return torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def save(result: dict, stem: str):
    out = os.environ.get("OUT") or str(ROOT / "bench" / "results")
    os.makedirs(out, exist_ok=True)
    path = Path(out) / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def text_tail(text: str, n=6) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_smoke_children(script: str, names, timeout_s: float) -> dict:
    """`python script --smoke <name>` for every name, all at once, each in a child process of its
    own (a kernel with a wrong barrier phase hangs its child, not the run). Each child prints one
    JSON line last; returns name -> that dict, or {"variant", "ok": False, "error"} where the child
    failed, printed nothing or ran past timeout_s."""
    import subprocess

    procs = {n: subprocess.Popen([sys.executable, script, "--smoke", n], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in names}
    out = {}
    for n, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()  # our own child, by its handle
            p.communicate()
            out[n] = {"variant": n, "ok": False, "error": f"smoke test did not finish in {timeout_s} s (hang?)"}
            continue
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        out[n] = (json.loads(lines[-1]) if p.returncode == 0 and lines
                  else {"variant": n, "ok": False, "error": text_tail(stderr or stdout, 12)})
    return out
