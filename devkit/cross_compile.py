"""Compile the pack's Triton kernels for a GPU target on a machine without that GPU (or any GPU):
Triton's own ptxas does the work, a stand-in driver answers what JITFunction.run asks before it
compiles, and the launch stops right after the compile. Used by tests/test_gpu_targets.py (shared
memory per GPU family), bench/ptx_compare.py (did a source change alter a kernel's code) and
bench/sass_mix.py (which execution units a kernel's code leans on).

Import Triton with TRITON_INTERPRET unset (an interpreted @triton.jit cannot compile), in a
process of its own: `use_target` replaces Triton's active driver for the rest of the process."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


class Compiled(Exception):
    """Stops a launcher right after compiling: there is no GPU to run on."""


def use_target(cc: int):
    """Make Triton compile for compute capability `cc` (e.g. 90) from here on; returns the target."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    target = GPUTarget("cuda", cc, 32)

    class CompileOnlyDriver:  # what JITFunction.run asks of the driver before it compiles
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    return target


def compile_through(jit_fn, launch):
    """Run a launcher that launches jit_fn once; return the kernel Triton compiled for it."""
    import triton

    jit_fn.device_caches.clear()
    jit_fn.device_caches[0]  # builds the binder, which sets jit_fn.compile

    def capture(src, target=None, options=None, _env_vars=None):
        raise Compiled(triton.compile(src, target=target, options=options, _env_vars=_env_vars))

    jit_fn.compile = capture
    try:
        launch()
    except Compiled as done:
        return done.args[0]
    raise RuntimeError("the launcher did not launch its kernel")


def cuobjdump(cubin: bytes, flag: str) -> str:
    """Triton's own cuobjdump run on a cubin (flag: -sass, -res-usage). Its -sass lists every
    instruction; Triton's kernel.asm["sass"] does not: its parser (triton/tools/disasm.py) stops at
    the first offset of five hex digits, after 4,096 instructions."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def cubin_resources(cubin: bytes) -> dict:
    """Registers, spill bytes and static shared memory as ptxas recorded them in the cubin
    (cuobjdump -res-usage: a kernel compiled without a driver has no n_regs attribute)."""
    txt = cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups()))) if m else {"raw": txt}


# the shapes the compiles use: head dim 128, the largest the pack runs (most shared memory), and
# Wan 2.1 720p, 81 frames (591 key blocks)
B, H, HKV, D, N = 1, 4, 2, 128, 75600


def fill_module():
    """The module that holds the fill pass's FILL_PAD and VAR_GROUPS in the revision being compiled:
    kernels.fill_pass since v44's split, kernels.attn_fwd before (VAR_GROUPS absent before v43)."""
    try:
        from kernels import fill_pass
    except ImportError:
        from kernels import attn_fwd as fill_pass
    return fill_pass


def attention_launch(cfg, fill: bool, causal: bool, pv_skip: bool, perm: bool = True):
    """A launch of the attention kernel (kernels.attn_fwd) in one variant, on zero inputs of the
    shapes above, with the KernelConfig `cfg`."""
    import triton

    from kernels import attn_fwd

    nq, nk = triton.cdiv(N, cfg.block_m), triton.cdiv(N, cfg.block_n)
    pad_to = fill_module().FILL_PAD
    nkc = triton.cdiv(nk, pad_to) * pad_to
    v_dtype = torch.float8_e4m3fn if cfg.pv_fp8 else torch.float16

    def x(*shape, dtype=torch.bfloat16):
        return torch.zeros(*shape, dtype=dtype)

    f, kw = None, {}
    if fill:
        # the keys' variances (the estimate's second-order term) and its bound: revisions before
        # them took four tensors; v42 kept a variance per channel, v43 per channel group
        order2 = "fill_clamp" in attn_fwd.sparse_attn_fwd.__code__.co_varnames
        groups = getattr(fill_module(), "VAR_GROUPS", None)
        kvar = (x(B, HKV, nkc, groups.value if groups is not None else D, dtype=torch.float16),) if order2 else ()
        kw = {"fill_clamp": 2.0} if order2 else {}
        f = (x(B, HKV, nkc, D, dtype=torch.int8), x(B, HKV, nkc, dtype=torch.float32), *kvar,
             x(B, HKV, D, nkc, dtype=v_dtype), x(B, H, nq, nkc, dtype=torch.float32))
    return lambda: attn_fwd.sparse_attn_fwd(
        x(B, H, nq * cfg.block_m, D, dtype=torch.int8), x(B, HKV, nk * cfg.block_n, D, dtype=torch.int8),
        x(B, HKV, D, nk * cfg.block_n, dtype=v_dtype), x(B, H, nq, dtype=torch.float32),
        x(B, HKV, nk, dtype=torch.float32), x(B, HKV, D, dtype=torch.float32), x(B, H, nq, dtype=torch.int32),
        x(B, H, nq, nk, dtype=torch.int32), x(H, dtype=torch.float32), N, N, D, torch.bfloat16, causal, pv_skip,
        cfg, out_perm=torch.arange(N, dtype=torch.int32) if perm else None, fill=f, **kw)


def pack_kernel_jobs(cc: int) -> list:
    """Every Triton kernel of the pack in the variants that matter for code size and shared
    memory, as (jit function, variant name, launch) with the config and helper launch shapes
    capability `cc` would run (kernels.config). The pack's `kernels` must be importable (its root on
    sys.path); call after use_target(cc)."""
    import triton

    from kernels import attn_fwd, block_index, block_scores, config, kv_stats, quantize, select

    # V's quantizer has a module of its own since the review of v43 (before: in quantize)
    try:
        from kernels import quantize_v
    except ImportError:
        quantize_v = quantize

    cfg = config.config_for_capability(cc // 10, cc % 10)
    # the helper kernels' launch shapes on that GPU (revisions before them took none)
    helpers = config.helper_launches_for(cc // 10) if hasattr(config, "helper_launches_for") else None

    def helper_kw(name):
        return {"launch": helpers[name]} if helpers else {}

    nq, nk = triton.cdiv(N, cfg.block_m), triton.cdiv(N, cfg.block_n)
    small = 1000  # token count for the kernels whose compiled code does not depend on it

    def x(*shape, dtype=torch.bfloat16):
        return torch.zeros(*shape, dtype=dtype)

    def select_launch(mode, fill, nkb):
        scores = x(B, H, 2, nkb, dtype=torch.float32)
        pad_to = fill_module().FILL_PAD
        pad = triton.cdiv(nkb, pad_to) * pad_to
        return lambda: select.select_blocks_fused(
            scores, x(B, H, 2, dtype=torch.bool), None, x(H, dtype=torch.float32), mode, True, fill,
            2 * cfg.block_m, nkb * cfg.block_n, cfg.block_m, cfg.block_n,
            fill_mean=scores if fill else None, fill_blocks=pad if fill else 0)

    perm = torch.arange(small, dtype=torch.int32)
    kmean = x(B, HKV, D, dtype=torch.float32)
    # K's sampled mean, as prepare_sparse asks for it (revisions before it took all of K)
    k_sample_kw = ({"k_sample": (32, 8), "perm": perm} if "k_sample" in kv_stats.kv_stats.__code__.co_varnames
                   else {})
    # V's max from the same sample and quant_v's overflow check (revisions before them read all of V)
    v_sampled = "v_headroom" in kv_stats.kv_stats.__code__.co_varnames
    if v_sampled:
        k_sample_kw.update(v_format_max=448.0, v_headroom=4.0)
    v_check_kw = {"rescale_above": 448.0} if v_sampled else {}
    finish_headroom = (4.0,) if v_sampled else ()
    fix_kernel = getattr(quantize_v, "_quant_v_fix_kernel", None)
    # the lse kernel's means from the mean keys (revisions before summed them in the loop)
    lse_kw = {}
    if "kbar" in block_scores.block_lse_scores.__code__.co_varnames:
        lse_kw = dict(kbar=(x(B, HKV, 640, D, dtype=torch.int8), x(B, HKV, 640, dtype=torch.float32)))

    # K's quantizer as production runs it since v55 (the guarded lse scores at stride 2, 4 since v56, read its
    # self-similarity and top keys); revisions before it ran it without either
    k_guard_kw = (dict(want_sim=True, want_top=True, sim_kind="energy")
                  if "sim_kind" in quantize.quant_pool.__code__.co_varnames else {})

    def v_fix_launch():
        """quant_v's second kernel launched directly (the launcher would run the first one here),
        on the overflow path's variant: fp8 or fp16 as the target runs it, with means, permuted."""
        nb = triton.cdiv(small, cfg.block_n)
        vt = x(B, HKV, D, nb * cfg.block_n, dtype=torch.float8_e4m3fn if cfg.pv_fp8 else torch.float16)
        vbar = x(B, HKV, D, 128, dtype=vt.dtype)
        f32 = dict(dtype=torch.float32)
        fix_kernel[(B * HKV, 8)](
            x(B, HKV, small, D), kmean, perm, x(B, HKV, D, **f32), vt, vbar, x(B * HKV, nb, D, **f32),
            x(B * HKV, nb, **f32), small * D * HKV, small * D, D, D * HKV, D, vt.stride(0), vt.stride(1), vt.stride(2),
            vbar.stride(0), vbar.stride(1), vbar.stride(2), small, HKV, 448.0, BLOCK=cfg.block_n, HEAD_DIM=D,
            D_TRUE=D, PV_FP8=cfg.pv_fp8, EMULATE_FP8=False, HAS_PERM=True, WANT_MEAN=True, RBLOCK=16, V_SLOT=-1,
            **({"num_warps": helpers["quant_v"].num_warps} if helpers else {}),
            # the rows per step (revisions before it quantized a whole block at once)
            **({"ROWS": min(helpers["quant_v"].block or cfg.block_n, cfg.block_n)} if "ROWS" in fix_kernel.arg_names
               else {}))
    # fill, causal and pv_skip (off: pvthreshd inf) each on and off, every pair of them together,
    # in four compiles instead of eight; fill + causal without pv_skip needs the most shared memory
    jobs = [(attn_fwd._sparse_attn_fwd, f"fill={fill} causal={causal} pv_skip={pv_skip}",
             attention_launch(cfg, fill, causal, pv_skip))
            for fill, causal, pv_skip in [(False, False, False), (False, True, True), (True, False, True),
                                          (True, True, False)]]
    jobs += [
        (quantize._quant_pool_kernel, "q", lambda: quantize.quant_pool(
            x(B, H, small, D), cfg.block_m, D, perm=perm, **helper_kw("quant_pool64"))),
        (quantize._quant_pool_kernel, "k, int8 means", lambda: quantize.quant_pool(
            x(B, HKV, small, D), cfg.block_n, D, mean=kmean, want_pool=False, perm=perm, pool_i8_blocks=128,
            **k_guard_kw, **helper_kw("quant_pool128"))),
        (quantize_v._quant_v_kernel, "v, means", lambda: quantize_v.quant_v(
            x(B, HKV, small, D), kmean + 1, cfg.block_n, D, cfg.pv_fp8, perm=perm, mean_blocks=128,
            **helper_kw("quant_v"), **v_check_kw)),
        (fix_kernel, "v overflow check", v_fix_launch),
        (kv_stats._kv_stats_kernel, "", lambda: kv_stats.kv_stats(x(B, HKV, small, D), x(B, HKV, small, D),
                                                                   **helper_kw("kv_stats"), **k_sample_kw)),
        # the second kernel of kv_stats, launched directly (the launcher would run the first one here;
        # older revisions, compared by bench/sass_mix.py, do not have it)
        (getattr(kv_stats, "_kv_finish_kernel", None), "v scale", lambda: kv_stats._kv_finish_kernel[(B * HKV,)](
            x(B * HKV, 4, D, dtype=torch.float32), x(B * HKV, 4, D, dtype=torch.float32),
            x(B, HKV, D, dtype=torch.float32), x(B, HKV, D, dtype=torch.float32), float(small), 4, *finish_headroom,
            448.0,
            HEAD_DIM=D, D_K=D, D_V=D, SCALE=True, num_warps=1)),
        (block_scores._block_lse_kernel, "with means", lambda: block_scores.block_lse_scores(
            x(B, H, nq, D, dtype=torch.float32), x(B, HKV, nk * cfg.block_n, D, dtype=torch.int8),
            x(B, HKV, nk, dtype=torch.float32), 0.088, N, cfg.block_n, want_mean=True, **helper_kw("block_lse"),
            **lse_kw)),
        # every 4th key (production's stride since v56; 2 in v55) with the guard's branch (blocks
        # of low self-similarity read in full); revisions before v32 lack it
        (block_scores._block_lse_kernel if "key_sim" in block_scores.block_lse_scores.__code__.co_varnames else None,
         "stride 4, guard", lambda: block_scores.block_lse_scores(
            x(B, H, nq, D, dtype=torch.float32), x(B, HKV, nk * cfg.block_n, D, dtype=torch.int8),
            x(B, HKV, nk, dtype=torch.float32), 0.088, N, cfg.block_n, want_mean=True, **helper_kw("block_lse"),
            key_stride=4, key_top=x(B, HKV, nk, dtype=torch.int32), key_sim=x(B, HKV, nk, dtype=torch.float32),
            exact_below=0.2, **lse_kw)),
        # the sorting modes' shared memory grows with the padded key-block count (1024: 4 warps, 2048: 8)
        (select._select_kernel, "cdf causal fill, 1500 blocks", select_launch("cdf", True, 1500)),
        (select._select_kernel, "topk, 591 blocks", select_launch("topk", False, nk)),
        (select._select_kernel, "share, 591 blocks", select_launch("share", False, nk)),
        (block_index._block_index_kernel, "1500 blocks", lambda: block_index.block_map_to_index(
            x(B, H, 2, 1500, dtype=torch.bool))),
    ]
    try:  # the error target's measurement (older revisions, compared by bench/sass_mix.py, lack it)
        from kernels import sampled_error as se
    except ImportError:
        se = None
    if se is not None:
        def measure(d):
            return lambda: se.sampled_error_sums(x(B, H, small, d), x(B, HKV, small, d), x(B, HKV, small, d),
                                                 x(B, H, small, d), torch.zeros(256, dtype=torch.int64))

        jobs += [
            (se._rows_partial_kernel, "exact rows, D=128", measure(128)),
            (se._rows_partial_kernel, "exact rows, D=256", measure(256)),
            # the second kernel launched directly (the launcher would run the first one here), as a
            # graphed measurement runs it: its tensors and seed from the address table (in a measured
            # sparse call's graph, its sums after three thresholds' slots; older revisions lack the slot)
            (se._rows_error_kernel, "error sums, table", lambda: se._rows_error_kernel[(4, B * H)](
                x(8 * B * H * 256 * (D + 1), dtype=torch.float32), x(B, H, small, D), x(1, dtype=torch.float32),
                x(2, H, dtype=torch.float64), torch.zeros(16, dtype=torch.int64), 0, small * D, D, D * H, H, small,
                256, 8, BLOCK_R=64, HEAD_DIM=D, D=D, ROUND_BF16=False, HAS_ROWS=False, TABLE=True, num_warps=4,
                **({"SUMS_AT": se.SUMS_SLOT + 3} if hasattr(se, "SUMS_SLOT") else {}))),
        ]
    return [job for job in jobs if job[0] is not None]


def child_rows(script: str, src_root: str, cc: int, cache_name: str) -> list:
    """Run `script --child src_root --cc cc` in a process of its own (TRITON_INTERPRET unset, a Triton
    cache folder of its own in the temp dir, reused between runs) and return its JSON lines."""
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tempfile.gettempdir(), cache_name))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, script, "--child", src_root, "--cc", str(cc)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@contextmanager
def revision_checkout(repo, rev: str):
    """A detached git worktree of `rev` in a temp folder, removed afterwards: yields (path, short hash)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rev")
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", path, rev], check=True)
        try:
            short = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
            yield path, short
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", path], check=False)


def revision_compare(script: str, child, cache_name: str):
    """The command line of a bench that compiles this checkout and another revision for one target
    (bench/ptx_compare.py, bench/sass_mix.py): --before REV (default HEAD), --cc (default 90).
    The bench runs itself once per source tree with --child SRC: there this points Triton at the
    target, puts SRC first on sys.path (its `kernels`), calls child(cc), which prints JSON lines,
    and returns None. Otherwise returns (cc, the revision's short hash, its rows, this checkout's)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="HEAD", help="the revision to compare this checkout with")
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, args.child)
        use_target(args.cc)
        child(args.cc)
        return None
    root = Path(script).resolve().parents[1]
    with revision_checkout(root, args.before) as (old, rev):
        before = child_rows(script, old, args.cc, cache_name)
    after = child_rows(script, str(root), args.cc, cache_name)
    return args.cc, rev, before, after
