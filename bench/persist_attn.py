"""Prototype (issue 14, NOTES v64): a persistent attention kernel, timed against production's.

Production launches one program per (head, query block) and walks that block's kept key blocks in
one pipelined loop: every program pays its start (Q's tile, the first K/V loads' latency) and its
end (the normalised store) outside the loop, ~2% of the kernel at density 0.25 and ~4% at the
presets' densities (NOTES after v63). Triton does not flatten the loop nest (v63), so here the
flattening is by hand: one program per SM slot walks a flat list of (query block, key block) tiles,
so the pipeliner fetches the next row's first K/V tiles while the current row finishes.

Rows go to programs round-robin (program p takes rows p, p + P, ...): the programs running together
then work on neighbouring query blocks of one head, whose K and V share the L2, as production's grid
order does. Each tile's code is the key block with two flags: the row's first tile resets the
online softmax by setting m to -inf (alpha = exp2(-inf) = 0 then zeroes l and acc in the same
FMAs), the row's last stores it. Q's tile is loaded at a row's first tile and carried, or
(Q_EACH) at every tile as a pipelined load. Non-causal, no fill pass, no P.V skip: the issue's
kernel-at-a-mask rows.

Measured (H100, NOTES v64): slower than production at every density. Q's tile costs either shared
memory (loaded at each tile: 90 KB, two programs per SM) or registers (carried: spills), and a tile's
path grows by ~15%; the flat loop removes a third to 40% of a program's fixed part.

    python bench/persist_attn.py [--shapes wan480,hunyuan544] [--densities 1.0,0.5,0.25,0.1]
    TRITON_INTERPRET=1 python bench/persist_attn.py --cpu-check
"""
import argparse
import dataclasses
import datetime
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from common import SHAPES, bench_ms, card_name, paired_ratio, random_block_mask, save, sdpa_cudnn  # loads the pack
from devkit.metrics import rel_l1
from gpu_check import prepare
from sparge_attention.kernels.attn_fwd import _scores, _softmax_pv, sparse_attn_fwd
from sparge_attention.kernels.config import KernelConfig, default_config
from sparge_attention.kernels.fp8 import INTERPRET
from sparge_attention.kernels.numerics import batch_head
from sparge_attention.sparge_core import SpargeBlockMask

FIRST = tl.constexpr(1 << 30)  # a tile code's flags above its key block (< 2^24)
LAST = tl.constexpr(1 << 29)


def build_schedule(counts: torch.Tensor, indices: torch.Tensor, n_programs: int):
    """Flat tile lists: program p's tiles are codes[pstart[p]:pstart[p+1]] with their rows in
    rows[...] (row = (b*H + h)*NQ + query block), the rows p, p + P, ... in order. Device ops only
    (no host sync); every row must keep at least one block."""
    B, H, NQ = counts.shape
    NK = indices.shape[-1]
    R = B * H * NQ
    P = min(n_programs, R)
    dev = counts.device
    r = torch.arange(R, device=dev)
    per = -(-R // P)
    order = torch.argsort((r % P) * per + r // P)  # position -> row
    c = counts.reshape(R).to(torch.int64)[order]
    end = torch.cumsum(c, 0)
    start = end - c
    n_rows = (R - torch.arange(P, device=dev) + P - 1) // P
    rpos = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(n_rows, 0)])
    pstart = torch.cat([start, end[-1:]])[rpos].to(torch.int32)
    j = torch.arange(NK, device=dev)
    valid = j[None, :] < c[:, None]
    dump = R * NK
    pos = torch.where(valid, start[:, None] + j, dump).flatten()
    code = indices.reshape(R, NK)[order].to(torch.int64)
    code = code | torch.where(j == 0, FIRST.value, 0)[None, :] | torch.where(j[None, :] == c[:, None] - 1, LAST.value, 0)
    codes = torch.zeros(dump + 1, dtype=torch.int32, device=dev)
    codes.scatter_(0, pos, code.flatten().to(torch.int32))
    # a row's (batch*head, query block) packed as bh << 16 | query block: no division in the loop
    packed = (order // NQ) << 16 | (order % NQ)
    rows = torch.zeros(dump + 1, dtype=torch.int32, device=dev)
    rows.scatter_(0, pos, packed[:, None].expand(R, NK).flatten().to(torch.int32))
    return codes, rows, pstart


@triton.jit
def _persist_attn_fwd(
    Q, K, VT, QS, KS, VS, O, CODES, ROWS, PSTART,
    sq_b, sq_h, sq_n, sk_n, so_b, so_h, so_n,
    sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h,
    N_Q, N_K, Q_HEAD_ROWS, K_HEAD_ROWS, H: tl.constexpr, KV_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_OUT: tl.constexpr,
    PV_FP8: tl.constexpr, P_LOG2: tl.constexpr, EMULATE_FP8: tl.constexpr, Q_EACH: tl.constexpr, Q_TMA: tl.constexpr,
    PARTIAL_KEYS: tl.constexpr,
):
    p = tl.program_id(0)
    t0 = tl.load(PSTART + p)
    t1 = tl.load(PSTART + p + 1)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.int8)
    for g in range(t0, t1):
        code = tl.load(CODES + g)
        row = tl.load(ROWS + g)
        kb = code & 0xFFFFFF
        first = (code & FIRST) != 0
        last = (code & LAST) != 0
        bh = row >> 16
        pid_m = row & 0xFFFF
        b, h = batch_head(bh, H)  # H and KV_GROUP are constexpr here: shifts and multiplies
        hk = h // KV_GROUP
        if Q_TMA:  # Q as a 2-D descriptor over (B*H*NQ_pad, HEAD_DIM)
            q_row = (bh * Q_HEAD_ROWS + pid_m * BLOCK_M).to(tl.int32)
            if Q_EACH:
                q = Q.load([q_row, 0])
            elif first:
                q = Q.load([q_row, 0])
        else:
            q_src = Q + b * sq_b + h * sq_h + (pid_m * BLOCK_M + offs_m0)[:, None].to(tl.int64) * sq_n + offs_d[None, :]
            if Q_EACH:
                q = tl.load(q_src)
            elif first:
                q = tl.load(q_src)
        k_row = ((b * (H // KV_GROUP) + hk) * K_HEAD_ROWS).to(tl.int32)  # the descriptors' rows (contiguous tensors)
        v_row = ((b * (H // KV_GROUP) + hk) * HEAD_DIM).to(tl.int32)
        qk_scale = tl.load(QS + b * sqs_b + h * sqs_h + pid_m) * tl.load(KS + b * sks_b + hk * sks_h + kb)
        s = _scores(q, K, k_row, kb, sk_n, BLOCK_N, True)
        if PARTIAL_KEYS:  # only the block past N_K's last whole one is masked
            if (kb + 1) * BLOCK_N > N_K:
                s = tl.where((kb * BLOCK_N + offs_n < N_K)[None, :], s, float("-inf"))
        # a row's first tile: m = -inf makes alpha 0, which zeroes l and acc in their own FMAs
        m_i = tl.where(first, float("-inf"), m_i)
        # the P.V-skip count is off here; t0 * 0 passes it as a runtime int, as the helper's branches need
        acc, l_i, m_i, _ = _softmax_pv(acc, l_i, m_i, t0 * 0, s, VT, v_row, qk_scale, kb, offs_m0, offs_n, N_Q, N_K, 0.0,
                                       BLOCK_N, False, False, PV_FP8, False, P_LOG2, EMULATE_FP8, True)
        if last:
            vs = tl.load(VS + b * svs_b + hk * svs_h + offs_d, mask=offs_d < D_OUT, other=0.0)
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            out = acc * vs[None, :] / l_safe[:, None]
            rows_o = pid_m * BLOCK_M + offs_m0
            o_ptr = O + b * so_b + h * so_h + rows_o[:, None].to(tl.int64) * so_n + offs_d[None, :]
            tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(rows_o < N_Q)[:, None] & (offs_d < D_OUT)[None, :])


def persist_attn_fwd(q_i8, k_i8, v_t, q_scale, k_scale, v_scale, schedule, n_q, n_k, d_out, out_dtype,
                     config: KernelConfig, q_each=False, q_tma=False):
    """sparse_attn_fwd's non-causal call without fill, P.V skip or lse, over build_schedule's lists."""
    codes, rows, pstart = schedule
    B, H, nq_pad, hd = q_i8.shape
    Hkv = k_i8.shape[1]
    out = torch.empty(B, n_q, H, d_out, dtype=out_dtype, device=q_i8.device).transpose(1, 2)
    k_arg = TensorDescriptor.from_tensor(k_i8.view(-1, hd), [config.block_n, hd])
    v_arg = TensorDescriptor.from_tensor(v_t.view(-1, v_t.shape[-1]), [hd, config.block_n])
    pv_fp8 = v_t.dtype == torch.float8_e4m3fn
    q_arg = TensorDescriptor.from_tensor(q_i8.view(-1, hd), [config.block_m, hd]) if q_tma else q_i8
    _persist_attn_fwd[(pstart.numel() - 1,)](
        q_arg, k_arg, v_arg, q_scale, k_scale, v_scale, out, codes, rows, pstart,
        q_i8.stride(0), q_i8.stride(1), q_i8.stride(2), k_i8.stride(2), out.stride(0), out.stride(1), out.stride(2),
        q_scale.stride(0), q_scale.stride(1), k_scale.stride(0), k_scale.stride(1), v_scale.stride(0),
        v_scale.stride(1), n_q, n_k, nq_pad, k_i8.shape[2], H, H // Hkv,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=hd, D_OUT=d_out, PV_FP8=pv_fp8,
        P_LOG2=8.0 if pv_fp8 else 0.0, EMULATE_FP8=INTERPRET, Q_EACH=q_each, Q_TMA=q_tma, PARTIAL_KEYS=n_k % config.block_n != 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"maxnreg": config.maxnreg} if config.maxnreg else {}),
    )
    return out


def _random_lists(B, H, N, block_m, block_n, density, dev, seed):
    """common.random_block_mask's mask (kernel_variants' masks) as (counts, ascending index lists)."""
    nq, nk = triton.cdiv(N, block_m), triton.cdiv(N, block_n)
    bm = SpargeBlockMask.from_dense(random_block_mask(B, H, nq, nk, density, dev, seed), block_m, block_n, N, N)
    return bm.kv_num_blocks.clone(), bm.kv_indices


def cpu_check():
    """Under TRITON_INTERPRET: the prototype against production's kernel, same inputs and lists."""
    torch.manual_seed(0)
    cfg = KernelConfig(64, 128, 4, 1, pv_fp8=True, tma=True)
    for (B, H, N, dens, P, q_each, q_tma) in [(1, 2, 300, 0.5, 3, False, False), (2, 2, 200, 1.0, 5, True, True),
                                              (1, 3, 260, 0.34, 64, False, True), (2, 1, 256, 0.5, 2, True, False)]:
        q, k, v = (torch.randn(B, H, N, 128, dtype=torch.bfloat16) for _ in range(3))
        prep = prepare(q, k, v, 64, 128)
        counts, indices = _random_lists(B, H, N, 64, 128, dens, q.device, 1)
        # uneven lists too: every other row keeps one block less (at least one)
        counts[..., ::2] = (counts[..., ::2] - 1).clamp_min(1)
        ref = sparse_attn_fwd(*prep, counts, indices, torch.full((H,), math.inf), N, N, 128, torch.bfloat16,
                              False, False, cfg)[0]
        out = persist_attn_fwd(*prep, build_schedule(counts, indices, P), N, N, 128, torch.bfloat16, cfg, q_each,
                               q_tma)
        err = rel_l1(out, ref)
        print(f"B{B} H{H} N{N} density {dens} programs {P} q_each {q_each} q_tma {q_tma}: rel-L1 vs production {err:.2e}")
        assert err < 1e-3, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    ap.add_argument("--densities", default="1.0,0.25,0.1")
    ap.add_argument("--tag", default="persist-v64")
    args = ap.parse_args()
    if args.cpu_check:
        return cpu_check()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cfg = default_config(dev)
    pcfg = dataclasses.replace(cfg, num_stages=2)  # 2-deep K/V buffers, as production's loop has at 3
    cfg2 = dataclasses.replace(cfg, maxnreg=None)  # production at 198 registers: two programs per SM
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "sms": n_sm, "shapes": {}}
    lines = []
    for shape in args.shapes.split(","):
        B, H, N, D, _, _ = SHAPES[shape]
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        prep = prepare(q, k, v, cfg.block_m, cfg.block_n)
        pvt = torch.full((H,), math.inf, device=dev)

        def dense():
            return sdpa_cudnn(q, k, v)
        rows = res["shapes"][shape] = []
        for dens in map(float, args.densities.split(",")):
            counts, indices = _random_lists(B, H, N, cfg.block_m, cfg.block_n, dens, dev, 1)

            def prod():
                return sparse_attn_fwd(*prep, counts, indices, pvt, N, N, D, torch.bfloat16, False, False, cfg)[0]
            ref = prod()

            def prod2():
                return sparse_attn_fwd(*prep, counts, indices, pvt, N, N, D, torch.bfloat16, False, False, cfg2)[0]
            variants = [("production", prod, None), ("production 2/SM", prod2, None)]
            # Q's tile by TMA: at every tile (pipelined, 90 KB of shared memory: two programs per SM) or
            # at a row's first (carried in registers: spills at the 168 cap), NOTES v64
            for slots, q_each in ((2, True), (3, False)):
                sched = build_schedule(counts, indices, slots * n_sm)
                variants.append((f"persist p{slots}{' q_each' if q_each else ' q_first'}",
                                 (lambda s=sched, qe=q_each: persist_attn_fwd(
                                     *prep, s, N, N, D, torch.bfloat16, pcfg, qe, True)), sched))
            variants.append(("production (again)", prod, None))
            for name, fn, sched in variants:
                try:
                    out = fn()
                    torch.cuda.synchronize()
                except Exception as e:  # a variant that fails to compile is a result too
                    rows.append(dict(density=dens, variant=name, failed=str(e)[:200]))
                    lines.append(f"{shape:<11} {dens:>5.2f} {name:<22} failed: {str(e)[:80]}")
                    continue
                err = rel_l1(out, ref)
                x_pair, t_pair, t_ref = paired_ratio(fn, dense)
                t_sched = bench_ms(lambda: build_schedule(counts, indices, sched[2].numel() - 1)) if sched else 0.0
                rows.append(dict(density=dens, variant=name, x_paired=x_pair, ms_paired=t_pair, cudnn_ms=t_ref,
                                 l1_vs_production=err, schedule_ms=t_sched))
                lines.append(f"{shape:<11} {dens:>5.2f} {name:<22} {t_pair:>8.3f} {x_pair:>7.4f} {err:>9.2e} "
                             f"{t_sched:>8.3f}")
        del q, k, v, prep
        torch.cuda.empty_cache()
    path = save(res, f"{res['date']}-{card_name()}-{args.tag}")
    print(f"\n{res['card']} ({n_sm} SMs)  ({path})")
    print(f"{'shape':<11} {'dens':>5} {'variant':<22} {'ms':>8} {'paired':>7} {'L1 vs prod':>9} {'sched ms':>8}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
