"""Cross-compile every Triton kernel of the pack for the GPU families users run (no GPU needed)
and check each kernel's shared memory against the family's per-block limit.

The kernels were tuned on Hopper only; on a 3090/4090/5090 a kernel whose pipelined tiles need
more shared memory than the card allows fails at launch ("out of resources"). Triton compiles
for any GPUTarget on the CPU (its own ptxas), so each family is compiled here with the exact
config it would run (kernels.config.config_for_capability) through the pack's own launchers.

The compiling runs in a child process: this process imported Triton with TRITON_INTERPRET=1
(conftest.py), which turns every @triton.jit into an interpreted function, and the child swaps
in a stand-in driver that must not leak into other tests. Run directly
(`python tests/test_gpu_targets.py 89`) it prints one JSON line per compiled kernel."""
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("triton")  # without Triton the pack runs dense: nothing to compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Max shared memory per thread block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin), in
# KB of 1024 bytes, from the CUDA Programming Guide's technical specifications per compute
# capability ("Maximum amount of shared memory per thread block": 8.0: 163 KB, 8.6/8.9: 99 KB,
# 9.0: 227 KB, 12.0: 99 KB; docs.nvidia.com/cuda/cuda-programming-guide/05-appendices/
# compute-capabilities.html). Triton compares metadata.shared with the same attribute at launch.
ARCHS = {  # capability: (family, opt-in KB)
    80: ("A100 (sm80)", 163),
    86: ("RTX 30xx (sm86)", 99),
    89: ("RTX 40xx / L40 (sm89)", 99),
    90: ("H100 / H200 (sm90)", 227),
    120: ("RTX 50xx (sm120)", 99),
}
# Triton's cache in a fixed temp folder: a re-run on one machine reuses the compiled kernels
# (seconds instead of a minute); CI machines start without it, so there every kernel compiles.
CACHE_DIR = os.path.join(tempfile.gettempdir(), "sparge-gpu-targets-triton-cache")


def _run_child(cc: int) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = CACHE_DIR
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(cc)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def compiled():
    """{capability: (exit code, stdout, stderr)}: one child per architecture, run side by side."""
    with ThreadPoolExecutor(max_workers=min(len(ARCHS), os.cpu_count() or 1)) as pool:
        return dict(zip(ARCHS, pool.map(_run_child, ARCHS)))


@pytest.mark.parametrize("cc", sorted(ARCHS), ids=[f"sm{c}" for c in sorted(ARCHS)])
def test_kernels_fit_shared_memory(compiled, cc):
    code, out, err = compiled[cc]
    assert code == 0, f"cross-compile child for sm{cc} exited {code}:\n{err[-4000:]}"
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    unsupported = [r for r in rows if "unsupported" in r]
    if unsupported:
        pytest.skip(f"this Triton cannot compile for sm{cc} here: {unsupported[0]['unsupported']}")
    family, limit_kb = ARCHS[cc]
    failed = [r for r in rows if "error" in r]
    assert not failed, "\n".join(f"{r['kernel']} [{r['variant']}]: {r['error']}" for r in failed)
    assert len(rows) == 13 and all(r["arch"] == cc for r in rows)  # every job below, for this target
    too_big = [r for r in rows if r["shared"] > limit_kb * 1024]
    assert not too_big, f"{family} allows {limit_kb} KB per block: " + ", ".join(
        f"{r['kernel']} [{r['variant']}] needs {r['shared'] / 1024:.1f} KB" for r in too_big)


# ---------------------------------------------------------------- the child process ----------

def _child(cc: int) -> None:
    sys.path.insert(0, ROOT)
    import torch
    import triton
    import triton.language as tl

    from devkit.cross_compile import compile_through, use_target

    use_target(cc)

    @triton.jit
    def _probe(X, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs) + 1.0)

    try:
        compile_through(_probe, lambda: _probe[(1,)](torch.zeros(16), BLOCK=16))
    except Exception as exc:  # no ptxas for this target, an older Triton, ...
        print(json.dumps({"unsupported": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True)
        return

    from kernels import attn_fwd, block_index, block_scores, kv_stats, quantize, select
    from kernels.config import config_for_capability

    cfg = config_for_capability(cc // 10, cc % 10)
    B, H, Hkv, D, hd = 1, 4, 2, 128, 128  # head dim 128: the largest the pack runs (most shared memory)
    n = 75600  # Wan 2.1 720p, 81 frames: 591 key blocks
    nq, nk = triton.cdiv(n, cfg.block_m), triton.cdiv(n, cfg.block_n)
    nkc = triton.cdiv(nk, attn_fwd.FILL_PAD) * attn_fwd.FILL_PAD
    v_dtype = torch.float8_e4m3fn if cfg.pv_fp8 else torch.float16
    small = 1000  # token count for the kernels whose compiled code does not depend on it

    def x(*shape, dtype=torch.bfloat16):
        return torch.zeros(*shape, dtype=dtype)

    def attn(fill, causal, pv_skip):
        q = x(B, H, nq * cfg.block_m, hd, dtype=torch.int8)
        k = x(B, Hkv, nk * cfg.block_n, hd, dtype=torch.int8)
        f = None
        if fill:
            f = (x(B, Hkv, nkc, hd, dtype=torch.int8), x(B, Hkv, nkc, dtype=torch.float32),
                 x(B, Hkv, hd, nkc, dtype=v_dtype), x(B, H, nq, nkc, dtype=torch.float32))
        return lambda: attn_fwd.sparse_attn_fwd(
            q, k, x(B, Hkv, hd, nk * cfg.block_n, dtype=v_dtype), x(B, H, nq, dtype=torch.float32),
            x(B, Hkv, nk, dtype=torch.float32), x(B, Hkv, hd, dtype=torch.float32), x(B, H, nq, dtype=torch.int32),
            x(B, H, nq, nk, dtype=torch.int32), x(H, dtype=torch.float32), n, n, D, torch.bfloat16, causal, pv_skip,
            cfg, out_perm=torch.arange(n, dtype=torch.int32), fill=f)

    def select_launch(mode, fill, nkb):
        scores = x(B, H, 2, nkb, dtype=torch.float32)
        pad = triton.cdiv(nkb, attn_fwd.FILL_PAD) * attn_fwd.FILL_PAD
        return lambda: select.select_blocks_fused(
            scores, x(B, H, 2, dtype=torch.bool), None, x(H, dtype=torch.float32), mode, True, fill,
            2 * cfg.block_m, nkb * cfg.block_n, cfg.block_m, cfg.block_n,
            fill_mean=scores if fill else None, fill_blocks=pad if fill else 0)

    perm = torch.arange(small, dtype=torch.int32)
    kmean = x(B, Hkv, D, dtype=torch.float32)
    # fill, causal and pv_skip (off: pvthreshd inf) each on and off, every pair of them together,
    # in four compiles instead of eight; fill + causal without pv_skip needs the most shared memory
    jobs = [(attn_fwd._sparse_attn_fwd, f"fill={fill} causal={causal} pv_skip={pv_skip}", attn(fill, causal, pv_skip))
            for fill, causal, pv_skip in [(False, False, False), (False, True, True), (True, False, True),
                                          (True, True, False)]]
    jobs += [
        (quantize._quant_pool_kernel, "q", lambda: quantize.quant_pool(
            x(B, H, small, D), cfg.block_m, hd, perm=perm)),
        (quantize._quant_pool_kernel, "k, int8 means", lambda: quantize.quant_pool(
            x(B, Hkv, small, D), cfg.block_n, hd, mean=kmean, want_pool=False, perm=perm, pool_i8_blocks=128)),
        (quantize._quant_v_kernel, "v, means", lambda: quantize.quant_v(
            x(B, Hkv, small, D), kmean + 1, cfg.block_n, hd, cfg.pv_fp8, perm=perm, mean_blocks=128)),
        (kv_stats._kv_stats_kernel, "", lambda: kv_stats.kv_stats(x(B, Hkv, small, D), x(B, Hkv, small, D))),
        (block_scores._block_lse_kernel, "with means", lambda: block_scores.block_lse_scores(
            x(B, H, nq, D, dtype=torch.float32), x(B, Hkv, nk * cfg.block_n, hd, dtype=torch.int8),
            x(B, Hkv, nk, dtype=torch.float32), 0.088, n, cfg.block_n, want_mean=True)),
        # the sorting modes' shared memory grows with the padded key-block count (1024: 4 warps, 2048: 8)
        (select._select_kernel, "cdf causal fill, 1500 blocks", select_launch("cdf", True, 1500)),
        (select._select_kernel, "topk, 591 blocks", select_launch("topk", False, nk)),
        (select._select_kernel, "share, 591 blocks", select_launch("share", False, nk)),
        (block_index._block_index_kernel, "1500 blocks", lambda: block_index.block_map_to_index(
            x(B, H, 2, 1500, dtype=torch.bool))),
    ]
    for jit_fn, variant, launch in jobs:
        row = {"kernel": jit_fn.fn.__name__, "variant": variant}
        t0 = time.perf_counter()
        try:
            kernel = compile_through(jit_fn, launch)
            row.update(shared=kernel.metadata.shared, arch=kernel.metadata.target.arch, num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                       tma=cfg.tma, pv_fp8=cfg.pv_fp8)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret
    _child(int(sys.argv[1]))
