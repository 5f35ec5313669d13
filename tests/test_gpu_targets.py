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


def _rows(compiled, cc: int) -> list:
    """The child's JSON line per compiled kernel for sm{cc} (skips where this Triton cannot target it)."""
    code, out, err = compiled[cc]
    assert code == 0, f"cross-compile child for sm{cc} exited {code}:\n{err[-4000:]}"
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    unsupported = [r for r in rows if "unsupported" in r]
    if unsupported:
        pytest.skip(f"this Triton cannot compile for sm{cc} here: {unsupported[0]['unsupported']}")
    return rows


@pytest.mark.parametrize("cc", sorted(ARCHS), ids=[f"sm{c}" for c in sorted(ARCHS)])
def test_kernels_fit_shared_memory(compiled, cc):
    rows = _rows(compiled, cc)
    family, limit_kb = ARCHS[cc]
    failed = [r for r in rows if "error" in r]
    assert not failed, "\n".join(f"{r['kernel']} [{r['variant']}]: {r['error']}" for r in failed)
    assert len(rows) == 19 and all(r["arch"] == cc for r in rows)  # every job of pack_kernel_jobs, for this target
    too_big = [r for r in rows if r["shared"] > limit_kb * 1024]
    assert not too_big, f"{family} allows {limit_kb} KB per block: " + ", ".join(
        f"{r['kernel']} [{r['variant']}] needs {r['shared'] / 1024:.1f} KB" for r in too_big)


def test_hopper_attention_keeps_three_programs_per_sm(compiled):
    """Hopper's config caps the attention kernel at 168 registers so that three programs share an
    SM (kernels/config.py); their shared memory must fit three too (227 KB per SM), or the cap buys
    nothing. Causal kernels at 3 stages took 106.6 KB (3-deep K/V buffers, NOTES v59) and the fill
    pass's triple-buffered means 128 KB (v58): both ran slower."""
    attn = [r for r in _rows(compiled, 90) if r["kernel"] == "_sparse_attn_fwd"]
    assert len(attn) == 4
    assert all(r["shared"] <= ARCHS[90][1] * 1024 // 3 for r in attn), [(r["variant"], r["shared"]) for r in attn]


# ---------------------------------------------------------------- the child process ----------

def _child(cc: int) -> None:
    sys.path.insert(0, ROOT)
    import torch
    import triton
    import triton.language as tl

    from devkit.cross_compile import compile_through, pack_kernel_jobs, use_target

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

    from kernels.config import config_for_capability

    cfg = config_for_capability(cc // 10, cc % 10)
    for jit_fn, variant, launch in pack_kernel_jobs(cc):
        row = {"kernel": jit_fn.fn.__name__, "variant": variant}
        t0 = time.perf_counter()
        try:
            kernel = compile_through(jit_fn, launch)
            row.update(shared=kernel.metadata.shared, arch=kernel.metadata.target.arch,
                       num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                       tma=cfg.tma, pv_fp8=cfg.pv_fp8)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret
    _child(int(sys.argv[1]))
