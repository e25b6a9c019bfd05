"""Attention without a mask: softmax(q·kᵀ·scale)·v.

q is B×H×S×D, k and v are B×H×T×D (the layout of ``F.scaled_dot_product_attention``), each
with any strides as long as the last is 1: SD's q, k and v are often views of one fused
projection, and the kernel reads them in place.

The Triton kernel is FlashAttention-2's forward pass: a program owns BLOCK_M queries of one
(batch, head), keeps its q tile, running max m, running sum l and fp32 accumulator in
registers, and streams K and V by blocks of BLOCK_N keys, rescaling by exp2(m_old − m_new)
when the max moves (online softmax). Scores are scaled by scale·log2(e) once so every
exponential is an exp2. Bytes: q read and o written once; K and V read once per query block
(S / BLOCK_M times, mostly from L2); the S×T score matrix never leaves the chip. Loads are
16 bytes wide when every stride is a multiple of 8 elements: SD's q, k, v are B×S×H·D
projections viewed B×H×S×D (strides S·H·D, D, H·D), and the launcher passes them in units of
8 so that Triton knows a head's offset h·D is aligned even at D = 40 (``_stride_unit``).

Two specialisations, chosen by ``tl.constexpr`` switches:
- cross-attention (T ≤ ``CROSS_MAX_T`` keys, SD's 77 text tokens): the whole of K and V is one
  block, so the softmax is exact in one pass (no running max, no rescaling);
- the key loop runs over whole blocks with no key mask; only a ragged last block is masked.

Head dims that are not powers of two are split into two power-of-two pieces of columns
(``pieces``): SD 1.5's 40 = 32 + 16 (8 columns of padding), 80 = 64 + 16 and 160 = 128 + 32
(none). The scores are the sum of one MMA per piece, and each piece has its own accumulator
and store. The cross path's keys split the same way: 77 = 64 + 16, so the softmax and both
MMAs run over 80 key columns, not 128. Padded to one power of two instead (head dims 64, 128,
256; 128 keys: as ``SPLIT_HEAD_DIM = False`` and ``SPLIT_KEYS = False`` still do), only 62.5%
of the tensor-core work at those head dims, and 60% of the key columns, was useful.
Compiled for sm_90 at SD 1.5's launches (``benchmarks/results/sm90_report.md``, Triton 3.9),
the splits also take fewer registers a thread (padded in brackets): self-attention at head
dim 40 214 (224), 80 140 (168), 160 155 (198); cross-attention 74 (123), 100 (178), 167
(187), and 76 (125) at SD 2.x's 64. Loads stay 16 bytes wide but for 2 scalar ones in the
16 × 16 corner tile of the cross path (padding is masked in memory, never read). Whether the
splits are faster on a GPU is for ``bench_kernels`` to measure: it times the padded forms
too (``padded_d_ms``, ``padded_keys_ms``).

Every wgmma is waited to completion (``wgmma: sync`` in the compile report): each block's
scores feed its softmax at once, and P·V's accumulator is rescaled before the next. Issuing
the next block's q·kᵀ before this block's softmax (FlashAttention-3's overlap within a warp
group) was tried: Triton 3.9 still waited on it at once, and at head dim 64 with 4 warps the
second score tile took 255 registers and spilled, so the loop stays as it is.

On the Triton path fp16 and bf16 run the kernel; float32 inputs, and head dims over 256 (the
VAE's single 512-wide head), run ``attention_reference`` (``F.scaled_dot_product_attention``)
instead.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._backend import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_HEAD_DIM = 256
# Up to this many keys, K and V are loaded whole as one block (cross-attention: T = 77).
CROSS_MAX_T = 128

# Starting points for Hopper (H100/H200), fp16/bf16; not yet tuned on a GPU.
# (path, BLOCK_D) → (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_N = None: all T keys as
# ``pieces(T)`` (cross path). Register budget: the fp32 accumulator is BLOCK_M × BLOCK_D, so at
# BLOCK_D = 256 (head dim 160) BLOCK_M drops to 64 and 8 warps share it. Compiled for sm_90
# without a GPU at SD 1.5's launches (benchmarks/sm90_report.py, Triton 3.9), split: wgmma
# throughout, 74-226 registers a thread, no stack, 16-byte loads (2 scalar ones at most), a
# cp.async pipeline on the self path, at most 100 KB of shared memory (head dim 160, self
# path). The table is keyed by the head dim padded to a power of two, split or not; the
# cross path's BLOCK_N comes from the keys (``pieces``).
_BLOCKS = {
    ("self", 16): (128, 64, 4, 3),
    ("self", 32): (128, 64, 4, 3),
    ("self", 64): (128, 64, 4, 3),    # head dim 40 (SD 1.5 level 1), 64 (SD 2.x)
    ("self", 128): (128, 64, 8, 3),   # head dim 80 (SD 1.5 level 2)
    ("self", 256): (64, 64, 8, 2),    # head dim 160 (SD 1.5 levels 3-4)
    ("cross", 16): (128, None, 8, 1),  # 8 warps: the 128×128 fp32 scores spill with 4
    ("cross", 32): (128, None, 8, 1),
    ("cross", 64): (128, None, 8, 1),
    ("cross", 128): (128, None, 8, 1),
    ("cross", 256): (64, None, 8, 1),
}

# Split head dims, and the cross path's keys, that are not a power of two into two pieces
# (``pieces``) instead of padding them to the next one. False restores the padded kernel
# (``bench_kernels`` times both).
SPLIT_HEAD_DIM = True
SPLIT_KEYS = True

# What ``bench_kernels --sweep`` tries per attention shape besides the table's row, as
# (BLOCK_M, BLOCK_N, num_warps, num_stages); the cross path takes its BLOCK_N from the keys.
SWEEP_BLOCKS = {
    "self": ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
             (64, 128, 4, 2), (128, 32, 4, 3)),
    "cross": ((128, None, 8, 1), (128, None, 4, 1), (64, None, 4, 1), (64, None, 8, 1)),
}

_LOG2E = 1.4426950408889634


def attention_reference(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


if triton is not None:
    @triton.jit
    def _row_masks(n_ok, d_ok, d2_ok, MASK_KEYS: tl.constexpr):
        """The load masks of a block of key (or value) rows, for each piece of the head dim:
        its columns, and its rows too when MASK_KEYS."""
        if MASK_KEYS:
            mask = n_ok[:, None] & d_ok[None, :]
            mask2 = n_ok[:, None] & d2_ok[None, :]
        else:
            mask = d_ok[None, :]
            mask2 = d2_ok[None, :]
        return mask, mask2

    @triton.jit
    def _scores(q, q2, k_ptrs, k2_ptrs, rows, n_ok, d_ok, d2_ok, BLOCK_D2: tl.constexpr,
                MASK_KEYS: tl.constexpr):
        """q·kᵀ for the keys at row offsets ``rows`` (masked by ``n_ok`` when MASK_KEYS): one
        MMA per piece of the head dim, summed."""
        k_mask, k2_mask = _row_masks(n_ok, d_ok, d2_ok, MASK_KEYS)
        k = tl.load(k_ptrs + rows, mask=k_mask, other=0.0)
        s = tl.dot(q, tl.trans(k))
        if BLOCK_D2 > 0:
            k2 = tl.load(k2_ptrs + rows, mask=k2_mask, other=0.0)
            s = tl.dot(q2, tl.trans(k2), s)
        return s

    @triton.jit
    def _weigh(p, acc, acc2, v_ptrs, v2_ptrs, rows, n_ok, d_ok, d2_ok, BLOCK_D2: tl.constexpr,
               MASK_KEYS: tl.constexpr):
        """acc + p·v for the values at row offsets ``rows``, per piece of the head dim."""
        v_mask, v2_mask = _row_masks(n_ok, d_ok, d2_ok, MASK_KEYS)
        v = tl.load(v_ptrs + rows, mask=v_mask, other=0.0)
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc)
        if BLOCK_D2 > 0:
            v2 = tl.load(v2_ptrs + rows, mask=v2_mask, other=0.0)
            acc2 = tl.dot(p, v2, acc2)
        return acc, acc2

    @triton.jit
    def _attend_block(acc, acc2, l_i, m_i, q, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, start, T,
                      stride_kt, stride_vt, qk_scale, offs_n, d_ok, d2_ok,
                      BLOCK_D2: tl.constexpr, MASK_KEYS: tl.constexpr):
        """One step of the online softmax over keys start … start + BLOCK_N."""
        n = start + offs_n
        n_ok = n < T
        s = _scores(q, q2, k_ptrs, k2_ptrs, n.to(tl.int64)[:, None] * stride_kt, n_ok, d_ok,
                    d2_ok, BLOCK_D2, MASK_KEYS) * qk_scale  # BLOCK_M × BLOCK_N, log2 units
        if MASK_KEYS:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block, where m_i = −inf
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc, acc2 = _weigh(p, acc * alpha[:, None], acc2 * alpha[:, None], v_ptrs, v2_ptrs,
                           n.to(tl.int64)[:, None] * stride_vt, n_ok, d_ok, d2_ok, BLOCK_D2,
                           MASK_KEYS)
        return acc, acc2, l_i, m_new

    # H, S and T only index and bound: a variant per divisibility of the sequence lengths
    # would buy nothing.
    @triton.jit(do_not_specialize=["H", "S", "T"])
    def _attention_kernel(Q, K, V, O, qk_scale, H, S, T,
                          stride_qb, stride_qh, stride_qs,
                          stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt,
                          stride_ob, stride_oh, stride_os,
                          HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_D2: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
                          STRIDE_UNIT: tl.constexpr):
        # Strides arrive in units of STRIDE_UNIT elements (see ``_stride_unit``): multiplying
        # by the constant here is what tells Triton they are multiples of it, so that a head
        # at offset h·40 is still known 16-byte aligned and loads stay 16 bytes wide.
        stride_qb, stride_qh, stride_qs = (stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT,
                                           stride_qs * STRIDE_UNIT)
        stride_kb, stride_kh, stride_kt = (stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT,
                                           stride_kt * STRIDE_UNIT)
        stride_vb, stride_vh, stride_vt = (stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT,
                                           stride_vt * STRIDE_UNIT)
        stride_ob, stride_oh, stride_os = (stride_ob * STRIDE_UNIT, stride_oh * STRIDE_UNIT,
                                           stride_os * STRIDE_UNIT)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        # Head-dim columns: [0, BLOCK_D) and, split, [BLOCK_D, BLOCK_D + BLOCK_D2); what lies
        # past HEAD_D is padding in registers only (masked loads, never stored).
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            d2_ok = offs_d2 < HEAD_D
        else:
            offs_d2 = offs_d
            d2_ok = d_ok
        m_ok = offs_m < S

        q_rows = Q + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs
        q = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if BLOCK_D2 > 0:
            q2 = tl.load(q_rows + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :],
                         other=0.0)
        else:
            q2 = q
        k_head = K + b * stride_kb + h * stride_kh
        v_head = V + b * stride_vb + h * stride_vh
        k_ptrs = k_head + offs_d[None, :]
        v_ptrs = v_head + offs_d[None, :]
        k2_ptrs = k_head + offs_d2[None, :]
        v2_ptrs = v_head + offs_d2[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Unsplit, acc2 is never touched and the compiler drops it.
        if BLOCK_D2 > 0:
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
        else:
            acc2 = tl.zeros([BLOCK_M, 16], tl.float32)

        if ONE_KEY_BLOCK:
            # All T keys at once, as one block of BLOCK_N or, split, BLOCK_N + BLOCK_N2 (77 =
            # 64 + 13 of 16): a plain softmax, no running max or rescaling.
            n_ok = offs_n < T
            s = _scores(q, q2, k_ptrs, k2_ptrs, offs_n[:, None] * stride_kt, n_ok, d_ok, d2_ok,
                        BLOCK_D2, MASK_KEYS=True)
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            m_i = tl.max(s, axis=1)
            if BLOCK_N2 > 0:
                offs_n2 = BLOCK_N + tl.arange(0, BLOCK_N2)
                n2_ok = offs_n2 < T
                s2 = _scores(q, q2, k_ptrs, k2_ptrs, offs_n2[:, None] * stride_kt, n2_ok, d_ok,
                             d2_ok, BLOCK_D2, MASK_KEYS=True)
                s2 = tl.where(n2_ok[None, :], s2 * qk_scale, float("-inf"))
                m_i = tl.maximum(m_i, tl.max(s2, axis=1))
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, axis=1)
            acc, acc2 = _weigh(p, acc, acc2, v_ptrs, v2_ptrs, offs_n[:, None] * stride_vt, n_ok,
                               d_ok, d2_ok, BLOCK_D2, MASK_KEYS=True)
            if BLOCK_N2 > 0:
                p2 = tl.exp2(s2 - m_i[:, None])
                l_i += tl.sum(p2, axis=1)
                acc, acc2 = _weigh(p2, acc, acc2, v_ptrs, v2_ptrs, offs_n2[:, None] * stride_vt,
                                   n2_ok, d_ok, d2_ok, BLOCK_D2, MASK_KEYS=True)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            t_full = (T // BLOCK_N) * BLOCK_N
            for start in range(0, t_full, BLOCK_N):
                acc, acc2, l_i, m_i = _attend_block(
                    acc, acc2, l_i, m_i, q, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, start, T,
                    stride_kt, stride_vt, qk_scale, offs_n, d_ok, d2_ok, BLOCK_D2,
                    MASK_KEYS=False)
            if t_full < T:
                acc, acc2, l_i, m_i = _attend_block(
                    acc, acc2, l_i, m_i, q, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, t_full, T,
                    stride_kt, stride_vt, qk_scale, offs_n, d_ok, d2_ok, BLOCK_D2,
                    MASK_KEYS=True)

        o_rows = O + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os
        tl.store(o_rows + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        if BLOCK_D2 > 0:
            tl.store(o_rows + offs_d2[None, :], (acc2 / l_i[:, None]).to(O.dtype.element_ty),
                     mask=m_ok[:, None] & d2_ok[None, :])


class Blocks(NamedTuple):
    """One launch's tiling: BLOCK_M queries; BLOCK_N keys a step or, on the cross path, all of
    them as one block of BLOCK_N or two, BLOCK_N + BLOCK_N2; the head dim as one BLOCK_D-wide
    piece or two, BLOCK_D + BLOCK_D2; ``one_key_block``: the cross path."""
    block_m: int
    block_n: int
    block_n2: int
    block_d: int
    block_d2: int
    warps: int
    stages: int
    one_key_block: bool


def pieces(n, split=True):
    """(first, second): n columns (head dims, or keys on the cross path) padded to one power of
    two (second = 0) or, where that needs fewer, split into two, the first exactly a power of
    two ≤ n: 40 → 32 + 16 (48 columns, not 64), 77 → 64 + 16, 80 → 64 + 16, 160 → 128 + 32;
    64 stays whole, as does 100 (64 + 64 is no better than 128). A piece is at least 16 wide
    (the MMA's K step)."""
    whole = max(16, triton.next_power_of_2(n))
    first = 1 << (n.bit_length() - 1)
    if not split or first == n or first < 16:
        return whole, 0
    second = max(16, triton.next_power_of_2(n - first))
    return (first, second) if first + second < whole else (whole, 0)


def _blocks(head_dim, t):
    """The ``Blocks`` of a problem: the table's row for its path and padded head dim."""
    block_d, block_d2 = pieces(head_dim, SPLIT_HEAD_DIM)
    padded = pieces(head_dim, split=False)[0]
    cross = t <= CROSS_MAX_T
    block_m, block_n, warps, stages = _BLOCKS[("cross" if cross else "self", padded)]
    block_n2 = 0
    if cross:
        block_n, block_n2 = pieces(t, SPLIT_KEYS)
    return Blocks(block_m, block_n, block_n2, block_d, block_d2, warps, stages, cross)


def sweep_blocks(head_dim, t):
    """The table's ``Blocks`` for a problem, then each ``SWEEP_BLOCKS`` row for its path that
    differs from it (same head-dim and key pieces)."""
    table = _blocks(head_dim, t)
    rows = [table]
    for block_m, block_n, warps, stages in SWEEP_BLOCKS["cross" if table.one_key_block
                                                       else "self"]:
        blk = table._replace(block_m=block_m, warps=warps, stages=stages,
                             block_n=table.block_n if block_n is None else block_n)
        if blk not in rows:
            rows.append(blk)
    return rows


def _attention_triton(q, k, v, scale, out=None, blocks=None):
    """The kernel's launch; ``blocks``: a ``Blocks`` to launch with instead of the table's
    (``sweep_blocks``' rows, timed by ``bench_kernels --sweep``)."""
    if triton is None:
        raise ValueError("attention: the Triton backend was asked for but triton is not "
                         "installed")
    for name, t in (("q", q), ("k", k), ("v", v)) + ((("out", out),) if out is not None else ()):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"attention: {name} needs a unit last stride, got strides "
                             f"{t.stride()}")
    b, h, s, d = q.shape
    t = k.shape[2]
    if out is None:
        # Stored B×S×H×D: the layout the output projection reads, so the caller's
        # out.transpose(1, 2).reshape(B, S, H·D) is free.
        out = q.new_empty(b, s, h, d).transpose(1, 2)
    if out.numel() == 0:
        return out
    if t == 0:
        raise ValueError("attention: k and v have no keys")
    blk = _blocks(d, t) if blocks is None else blocks
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    unit = _stride_unit(strides)
    grid = (triton.cdiv(s, blk.block_m), b * h)
    _attention_kernel[grid](
        q, k, v, out, scale * _LOG2E, h, s, t, *(st // unit for st in strides),
        HEAD_D=d, BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, BLOCK_N2=blk.block_n2,
        BLOCK_D=blk.block_d, BLOCK_D2=blk.block_d2, ONE_KEY_BLOCK=blk.one_key_block,
        STRIDE_UNIT=unit, num_warps=blk.warps, num_stages=blk.stages)
    return out


def _stride_unit(strides):
    """8 when every stride is a multiple of 8 elements (16 bytes in fp16/bf16), else 1.

    Triton specialises an integer argument on divisibility by 16 only, so it sees SD 1.5's
    head stride 40 (and 80·k) as unaligned and falls back to 2-byte loads with no cp.async
    pipeline (compiled for sm_90: 192 scalar loads, 255 registers and a stack frame at
    head dim 40). Passing strides in units of 8 restores the fact. One flag for all twelve
    strides keeps it to two variants per block shape.
    """
    return 8 if all(st % 8 == 0 for st in strides) else 1


def _check(q, k, v, out=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k, v must be B×H×S×D, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError("attention: shapes do not agree: q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("attention: q, k, v must share one dtype and device")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


def attention(q, k, v, scale=None, *, out=None):
    """Scaled dot-product attention, B×H×S×D → B×H×S×D (``scale`` defaults to 1/√D).

    On the Triton path the result is stored B×S×H×D (returned as a B×H×S×D view) unless
    ``out`` is given: then it receives the result, in whatever strides it has (last one 1),
    and is returned.
    """
    _check(q, k, v, out)
    if (use_triton(q) and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= MAX_HEAD_DIM):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return _attention_triton(q, k, v, scale, out)
    y = attention_reference(q, k, v, scale)
    return y if out is None else out.copy_(y)
