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

Head dims that are not powers of two (SD 1.5's 40, 80, 160) are padded inside the kernel to
BLOCK_D (64, 128, 256) with masked loads; memory is never padded. The padding costs tensor-
core work (62.5% of it is useful at each of 40, 80 and 160): splitting D into power-of-two
pieces (32 + 16, 64 + 16, 128 + 32) is the next step once there is a GPU to measure on.

On the Triton path fp16 and bf16 run the kernel; float32 inputs, and head dims over 256 (the
VAE's single 512-wide head), run ``attention_reference`` (``F.scaled_dot_product_attention``)
instead.
"""
import math

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
# (path, BLOCK_D) → (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_N = None: the next power
# of two ≥ T (cross path). Register budget: the fp32 accumulator is BLOCK_M × BLOCK_D, so at
# BLOCK_D = 256 (head dim 160) BLOCK_M drops to 64 and 8 warps share it. Compiled for sm_90
# without a GPU at SD 1.5's launches (benchmarks/sm90_report.py, Triton 3.9): wgmma
# throughout, 123-224 registers a thread, no stack, 16-byte loads only, a cp.async pipeline
# on the self path, at most 160 KB of shared memory (head dim 160, self path).
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

_LOG2E = 1.4426950408889634


def attention_reference(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


if triton is not None:
    @triton.jit
    def _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start, T, stride_kt, stride_vt,
                      qk_scale, offs_n, d_ok, MASK_KEYS: tl.constexpr):
        """One step of the online softmax over keys start … start + BLOCK_N."""
        n = start + offs_n
        if MASK_KEYS:
            kv_mask = (n < T)[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_ptrs + n.to(tl.int64)[:, None] * stride_kt, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # BLOCK_M × BLOCK_N, log2 units
        if MASK_KEYS:
            s = tl.where((n < T)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block, where m_i = −inf
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs + n.to(tl.int64)[:, None] * stride_vt, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, l_i, m_new

    # H, S and T only index and bound: a variant per divisibility of the sequence lengths
    # would buy nothing.
    @triton.jit(do_not_specialize=["H", "S", "T"])
    def _attention_kernel(Q, K, V, O, qk_scale, H, S, T,
                          stride_qb, stride_qh, stride_qs,
                          stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt,
                          stride_ob, stride_oh, stride_os,
                          HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
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
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D  # head dim padded to BLOCK_D in registers only
        m_ok = offs_m < S

        q_ptrs = (Q + b * stride_qb + h * stride_qh
                  + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :])
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_d[None, :]
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_d[None, :]

        if ONE_KEY_BLOCK:
            # All T keys in one block: plain softmax, no running max or rescaling.
            n_ok = offs_n < T
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs + offs_n[:, None] * stride_kt, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None])
            l_i = tl.sum(p, axis=1)
            v = tl.load(v_ptrs + offs_n[:, None] * stride_vt, mask=kv_mask, other=0.0)
            acc = tl.dot(p.to(v.dtype), v)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            t_full = (T // BLOCK_N) * BLOCK_N
            for start in range(0, t_full, BLOCK_N):
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start, T,
                                              stride_kt, stride_vt, qk_scale, offs_n, d_ok,
                                              MASK_KEYS=False)
            if t_full < T:
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, t_full, T,
                                              stride_kt, stride_vt, qk_scale, offs_n, d_ok,
                                              MASK_KEYS=True)

        o = acc / l_i[:, None]
        o_ptrs = (O + b * stride_ob + h * stride_oh
                  + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :])
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _blocks(head_dim, t):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages, one_key_block) for a problem."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    cross = t <= CROSS_MAX_T
    block_m, block_n, warps, stages = _BLOCKS[("cross" if cross else "self", block_d)]
    if cross:
        block_n = max(16, triton.next_power_of_2(t))
    return block_m, block_n, block_d, warps, stages, cross


def _attention_triton(q, k, v, scale, out=None):
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
    block_m, block_n, block_d, warps, stages, cross = _blocks(d, t)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    unit = _stride_unit(strides)
    grid = (triton.cdiv(s, block_m), b * h)
    _attention_kernel[grid](
        q, k, v, out, scale * _LOG2E, h, s, t, *(st // unit for st in strides),
        HEAD_D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ONE_KEY_BLOCK=cross,
        STRIDE_UNIT=unit, num_warps=warps, num_stages=stages)
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
