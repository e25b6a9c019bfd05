"""conv2d(silu(group_norm(x))) + add, the front half of every SD ResNet block.

``group_norm_silu_conv2d_reference`` is the plain-PyTorch version: the reference, the CPU path
and what ONNX export traces. The Triton path is two kernels:

1. ``_group_stats_kernel`` + ``_group_stats_finalize_kernel``: per-(sample, group) mean and
   rstd in float32 (Welford-style merges of exact per-tile statistics, never E[x²]−E[x]²),
   folded with γ and β into a per-(sample, channel) ``scale`` and ``shift`` so that
   ``group_norm(x) = x·scale + shift``.
2. ``_gn_silu_conv2d_kernel``: an implicit-GEMM convolution over x read in place (any strides,
   channels_last being the fast one). M = N·Ho·Wo output pixels, N_gemm = Cout,
   K = KH·KW·Cin ordered tap-major so that one K block is one tap (kh, kw) and a run of
   input channels: a [BLOCK_M pixels, BLOCK_K channels] tile is a strided gather of
   channel-contiguous rows. Its prologue normalises each loaded tile and applies SiLU in
   float32 before the dot; its epilogue adds the conv bias and ``add`` and stores in x's
   dtype, channels_last.

What the fusion saves, per call, against GroupNorm+SiLU kernel → cuDNN conv → ``+ add``
(e = element size, 2 bytes in fp16/bf16). Both read x twice (statistics, then the pass that
uses them) and write the output once; the fused path also
- never writes nor reads back the normalised tensor h: 2·N·Cin·H·W·e bytes
  (the 128-channel 512×512 VAE decoder convs: 2 · 33.5 M · 2 B = 134 MB each, ~30 µs at
  H100 bandwidth);
- adds ``add`` before its single store, where the unfused path writes the conv output, reads
  it back and writes the sum: 2·N·Cout·Ho·Wo·e bytes fewer for a residual, one launch fewer.
What it costs: the prologue (an FMA, exp2, add, divide and select, ~6 CUDA-core ops) runs on
every loaded element of A, i.e. KH·KW·cdiv(Cout, BLOCK_N) times per input element, against
2·BLOCK_N tensor-core flops each; a wide BLOCK_N amortises it. Where cuDNN's convolution is
faster anyway, ``conv_autotune.ConvPathChooser`` picks the unfused path per shape.
"""
import dataclasses

import torch
import torch.nn.functional as F
try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path still works without triton
    triton = None

from ._backend import use_triton
from .group_norm import group_norm_reference

TRITON_DTYPES = (torch.float16, torch.bfloat16)


def group_norm_silu_conv2d_reference(x, norm_weight, norm_bias, num_groups, conv_weight,
                                     conv_bias=None, *, eps=1e-5, stride=1, padding=1, add=None):
    h = group_norm_reference(x, num_groups, norm_weight, norm_bias, eps, activation="silu")
    y = F.conv2d(h, conv_weight, conv_bias, stride=stride, padding=padding)
    return y if add is None else y + add


# ----------------------------------------------------------------------------------------------
# Block sizes. First guesses after Triton's matmul tutorial, NOT yet tuned: tune them on the
# GPU with benchmarks/bench_conv.py. Rows are tried in order; the first whose ``max_cout``
# covers Cout wins (None: any).
@dataclasses.dataclass(frozen=True)
class ConvConfig:
    block_m: int            # output pixels per tile
    block_n: int            # output channels per tile
    block_k: int            # input channels per K step (one tap at a time)
    num_warps: int
    num_stages: int
    group_m: int = 8        # M tiles sharing one band of weights, for L2 reuse
    stats_block_p: int = 64     # pixels per statistics tile
    stats_block_c: int = 64     # channels per statistics tile
    stats_max_splits: int = 64  # programs a (sample, channel block) is split over, at most


_CONV_TABLE = (
    # max_cout, config
    (64, ConvConfig(block_m=128, block_n=64, block_k=32, num_warps=4, num_stages=3)),
    (None, ConvConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
)


def conv_config(cin: int, cout: int, hw_out: int) -> ConvConfig:
    """The ``_CONV_TABLE`` row for ``cout``, its N and K blocks shrunk to fit small channel counts
    (``tl.dot`` needs every block dimension ≥ 16), and its M block shrunk to a power of two
    ≥ 64 that divides Ho·Wo where the table's does not (the UNet's 8×8 level: 64): then every
    tile lies in one sample and loads its normalisation as one row, not a per-pixel gather
    (which also costs the pipeline ~4× the shared memory)."""
    cfg = next(c for max_cout, c in _CONV_TABLE if max_cout is None or cout <= max_cout)
    block_m = cfg.block_m
    if hw_out % block_m and (hw_out & -hw_out) >= 64:
        block_m = hw_out & -hw_out  # the largest power of two dividing hw_out, < block_m
    return dataclasses.replace(
        cfg, block_m=block_m, block_n=min(cfg.block_n, max(16, triton.next_power_of_2(cout))),
        block_k=min(cfg.block_k, max(16, triton.next_power_of_2(cin))))


# ----------------------------------------------------------------------------------------------
# Statistics.
if triton is not None:
    @triton.jit
    def _group_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, C, H, W, CHUNK,
                            sxn, sxc, sxh, sxw,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-channel mean and M2 = Σ(x − mean)² of one chunk of pixels of one sample.

        Grid (N, splits, cdiv(C, BLOCK_C)). Reads x once (N·C·H·W·e bytes in all); writes
        2 · N·splits·C floats. Each [BLOCK_P, BLOCK_C] tile's own mean and M2 are exact (two
        passes over registers) and are merged into the running ones with Chan's formula.
        """
        n = tl.program_id(0)
        split = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        hw = H * W
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, hw)
        base = x_ptr + n.to(tl.int64) * sxn + c[None, :] * sxc

        count = 0.0
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_mask = p < end
            mask = p_mask[:, None] & c_mask[None, :]
            xs = tl.load(base + (p // W)[:, None] * sxh + (p % W)[:, None] * sxw, mask=mask,
                         other=0.0).to(tl.float32)
            t_count = tl.minimum(end - p0, BLOCK_P).to(tl.float32)  # ≥ 1: p0 < end
            t_mean = tl.sum(xs, axis=0) / t_count
            d = tl.where(mask, xs - t_mean[None, :], 0.0)
            t_m2 = tl.sum(d * d, axis=0)
            new_count = count + t_count
            delta = t_mean - mean
            mean += delta * (t_count / new_count)
            m2 += t_m2 + delta * delta * (count * t_count / new_count)
            count = new_count
        out = (n * tl.num_programs(1) + split) * C + c
        tl.store(pmean_ptr + out, mean, mask=c_mask)
        tl.store(pm2_ptr + out, m2, mask=c_mask)


if triton is not None:
    @triton.jit
    def _group_stats_finalize_kernel(pmean_ptr, pm2_ptr, gamma_ptr, beta_ptr,
                                     mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
                                     C, HW, CHUNK, SPLITS, G, eps, CPG,
                                     BLOCK_S: tl.constexpr,
                                     BLOCK_CG: tl.constexpr,
                                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
        """Merges the chunks' per-channel statistics into one (sample, group)'s mean and rstd, and
        writes ``scale = rstd·γ`` and ``shift = β − mean·rstd·γ`` for the group's channels.

        Grid (N·G,). Over the group's CPG channels and SPLITS chunks (chunk i has
        n_i = min(CHUNK, HW − i·CHUNK) pixels): mean = Σ_i n_i·mean_i / n and
        M2 = Σ_i M2_i + n_i·(mean_i − mean)².
        """
        ng = tl.program_id(0)
        n = ng // G
        g = ng % G
        s = tl.arange(0, BLOCK_S)
        j = tl.arange(0, BLOCK_CG)
        c = g * CPG + j
        mask = (s < SPLITS)[:, None] & (j < CPG)[None, :]
        offs = (n * SPLITS + s)[:, None] * C + c[None, :]
        pmean = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        pm2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        cnt = tl.where(mask, tl.minimum(CHUNK, HW - s * CHUNK).to(tl.float32)[:, None], 0.0)
        total = (HW * CPG) * 1.0
        mean = tl.sum(tl.sum(cnt * pmean, axis=1), axis=0) / total
        d = pmean - mean
        m2 = tl.sum(tl.sum(pm2 + cnt * d * d, axis=1), axis=0)
        rstd = 1.0 / tl.sqrt(m2 / total + eps)
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)

        c_mask = j < CPG
        scale = tl.full([BLOCK_CG], 1.0, tl.float32) * rstd
        if HAS_GAMMA:
            scale *= tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_BETA:
            shift += tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(scale_ptr + n * C + c, scale, mask=c_mask)
        tl.store(shift_ptr + n * C + c, shift, mask=c_mask)


def _group_stats(x, num_groups, weight, bias, eps, cfg):
    """(mean, rstd) as N×G and (scale, shift) as N×C float32 tensors for x (N×C×H×W)."""
    n, c, h, w = x.shape
    hw = h * w
    tiles = triton.cdiv(hw, cfg.stats_block_p)
    splits = min(tiles, cfg.stats_max_splits)
    chunk = triton.cdiv(tiles, splits) * cfg.stats_block_p
    splits = triton.cdiv(hw, chunk)  # no empty chunk
    f32 = dict(device=x.device, dtype=torch.float32)
    pmean = torch.empty(n, splits, c, **f32)
    pm2 = torch.empty(n, splits, c, **f32)
    block_c = min(cfg.stats_block_c, triton.next_power_of_2(c))
    _group_stats_kernel[(n, splits, triton.cdiv(c, block_c))](
        x, pmean, pm2, c, h, w, chunk, *x.stride(),
        BLOCK_P=cfg.stats_block_p, BLOCK_C=block_c)

    mean = torch.empty(n, num_groups, **f32)
    rstd = torch.empty(n, num_groups, **f32)
    scale = torch.empty(n, c, **f32)
    shift = torch.empty(n, c, **f32)
    cpg = c // num_groups
    _group_stats_finalize_kernel[(n * num_groups,)](
        pmean, pm2, weight if weight is not None else scale, bias if bias is not None else shift,
        mean, rstd, scale, shift, c, hw, chunk, splits, num_groups, eps, cpg,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_CG=triton.next_power_of_2(cpg),
        HAS_GAMMA=weight is not None, HAS_BETA=bias is not None)
    return mean, rstd, scale, shift


# ----------------------------------------------------------------------------------------------
# The convolution.
ADD_NONE, ADD_CHANNEL, ADD_FULL = 0, 1, 2


if triton is not None:
    @triton.jit
    def _gn_silu_conv2d_kernel(
            x_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, add_ptr, out_ptr,
            M, CIN, H, W, COUT, HO, WO,
            sxn, sxc, sxh, sxw,
            swo, swi, swh, sww,
            san, sac, sah, saw,
            son, soc, soh, sow,
            KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
            HAS_BIAS: tl.constexpr, ADD_KIND: tl.constexpr, TILE_IN_ONE_SAMPLE: tl.constexpr,
            DOT_IN_FP32: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """out[m, co] = Σ_{kh,kw,ci} silu(x[n, ci, hi, wi]·scale[n, ci] + shift[n, ci])
        · w[co, ci, kh, kw] (+ bias[co]) (+ add), with (n, ho, wo) = m and
        (hi, wi) = (ho, wo)·STRIDE − PAD + (kh, kw).

        Grid (cdiv(M, BLOCK_M) · cdiv(COUT, BLOCK_N),), M tiles grouped by GROUP_M so that the
        programs running together share weight tiles in L2. TILE_IN_ONE_SAMPLE: Ho·Wo is a multiple
        of BLOCK_M, so a tile's pixels all belong to one sample and scale/shift load as one row
        instead of a [BLOCK_M, BLOCK_K] gather. DOT_IN_FP32: only for bfloat16 under Triton's CPU
        interpreter, whose ``tl.dot`` multiplies bfloat16 bit patterns (triton-lang/triton#11584).
        """
        # -- which tile
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(COUT, BLOCK_N)
        width = GROUP_M * num_pid_n
        first_m = (pid // width) * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_size
        pid_n = (pid % width) // group_size

        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < M
        hw_out = HO * WO
        n = m // hw_out
        ho = (m % hw_out) // WO
        wo = m % WO
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        co_mask = co < COUT
        x_rows = x_ptr + n.to(tl.int64) * sxn       # [BLOCK_M] pointers
        if TILE_IN_ONE_SAMPLE:
            n0 = (pid_m * BLOCK_M) // hw_out
            stat_rows = n0 * CIN                     # scalar: one sample per tile
        else:
            stat_rows = n[:, None] * CIN             # [BLOCK_M, 1]

        # -- main loop: K = KH·KW·CIN, one tap and BLOCK_K input channels per step
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        c_blocks = tl.cdiv(CIN, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            tap = it // c_blocks
            kh = tap // KW
            kw = tap % KW
            ci = (it % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            ci_mask = ci < CIN
            hi = ho * STRIDE - PAD + kh
            wi = wo * STRIDE - PAD + kw
            inside = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a_mask = inside[:, None] & ci_mask[None, :]
            a = tl.load(x_rows[:, None] + hi[:, None] * sxh + wi[:, None] * sxw + ci[None, :] * sxc,
                        mask=a_mask, other=0.0).to(tl.float32)
            # prologue: GroupNorm as one FMA with the (sample, channel) scale and shift, then SiLU,
            # in float32. Zero padding comes AFTER it (padded taps contribute 0, as in conv2d of
            # the normalised tensor), as do the masked channels.
            if TILE_IN_ONE_SAMPLE:
                sc = tl.load(scale_ptr + stat_rows + ci, mask=ci_mask, other=0.0)[None, :]
                sh = tl.load(shift_ptr + stat_rows + ci, mask=ci_mask, other=0.0)[None, :]
            else:
                stat_mask = m_mask[:, None] & ci_mask[None, :]
                sc = tl.load(scale_ptr + stat_rows + ci[None, :], mask=stat_mask, other=0.0)
                sh = tl.load(shift_ptr + stat_rows + ci[None, :], mask=stat_mask, other=0.0)
            a = a * sc + sh
            a = a / (1.0 + tl.exp2(a * -1.4426950408889634))  # silu(a) = a / (1 + 2^(−a·log2 e))
            a = tl.where(a_mask, a, 0.0)

            b = tl.load(w_ptr + co[None, :] * swo + ci[:, None] * swi + kh * swh + kw * sww,
                        mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
            # the normalised tile is rounded to the weights' dtype, as the unfused path stores it
            a = a.to(b.dtype)
            if DOT_IN_FP32:  # the same products (exact in fp32) and fp32 sums, without bf16 MMA
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)

        # -- epilogue: bias, add, one store in the output dtype
        if HAS_BIAS:
            acc += tl.load(bias_ptr + co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
        mask = m_mask[:, None] & co_mask[None, :]
        n64 = n.to(tl.int64)[:, None]
        if ADD_KIND == 1:    # N×C×1×1: the time embedding
            acc += tl.load(add_ptr + n64 * san + co[None, :] * sac, mask=mask,
                           other=0.0).to(tl.float32)
        elif ADD_KIND == 2:  # N×C×Ho×Wo: the residual
            acc += tl.load(add_ptr + n64 * san + co[None, :] * sac + ho[:, None] * sah
                           + wo[:, None] * saw, mask=mask, other=0.0).to(tl.float32)
        out = out_ptr + n64 * son + co[None, :] * soc + ho[:, None] * soh + wo[:, None] * sow
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _output_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def _check_contiguous(where, name, p):
    # the kernels index γ, β and the conv bias as c, not c·stride: a strided view would read the
    # wrong elements
    if p is not None and p.numel() > 1 and p.stride(0) != 1:
        raise ValueError(f"{where}: {name} must be contiguous, got stride {p.stride(0)}")


def _check(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias, stride, padding, add):
    where = "group_norm_silu_conv2d"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be an N×C×H×W tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{where}: x must be floating point, got {x.dtype}")
    n, c, h, w = x.shape
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"{where}: {c} channels do not split into {num_groups} groups")
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if p is not None and (tuple(p.shape) != (c,) or p.device != x.device):
            raise ValueError(f"{where}: {name} must have shape ({c},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")
        _check_contiguous(where, name, p)
    if (not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 4
            or conv_weight.shape[1] != c):
        raise ValueError(f"{where}: conv_weight must be Cout×{c}×KH×KW for x of shape "
                         f"{tuple(x.shape)}, got {tuple(getattr(conv_weight, 'shape', ()))}")
    if conv_weight.dtype != x.dtype or conv_weight.device != x.device:
        raise ValueError(f"{where}: conv_weight must be {x.dtype} on {x.device}, "
                         f"got {conv_weight.dtype} on {conv_weight.device}")
    cout, _, kh, kw = conv_weight.shape
    if conv_bias is not None and (tuple(conv_bias.shape) != (cout,)
                                  or conv_bias.device != x.device):
        raise ValueError(f"{where}: conv_bias must have shape ({cout},) on {x.device}, "
                         f"got {tuple(conv_bias.shape)} on {conv_bias.device}")
    _check_contiguous(where, "conv_bias", conv_bias)
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{where}: {name} must be an int ≥ {low}, got {v!r}")
    ho, wo = _output_size(h, kh, stride, padding), _output_size(w, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"{where}: a {kh}×{kw} kernel with padding {padding} does not fit "
                         f"in {h}×{w}")
    if add is not None:
        try:
            shape = torch.broadcast_shapes(tuple(add.shape), (n, cout, ho, wo))
        except RuntimeError:
            shape = None
        if shape != (n, cout, ho, wo) or add.device != x.device:
            raise ValueError(f"{where}: add of shape {tuple(add.shape)} on {add.device} does "
                             f"not broadcast to the output {(n, cout, ho, wo)} on {x.device}")
    return n, cout, ho, wo


def _group_norm_silu_conv2d_triton(x, norm_weight, norm_bias, num_groups, conv_weight,
                                   conv_bias=None, *, eps=1e-5, stride=1, padding=1, add=None,
                                   out=None, config=None):
    """The Triton path: statistics kernels, then the fused implicit-GEMM convolution.

    x may be contiguous or channels_last (read through its strides, no copy); conv_weight is
    read through its strides too, fastest in channels_last (Cin contiguous along K). ``out``
    (optional) receives the result: N×Cout×Ho×Wo in x's dtype, any strides; by default it is
    allocated channels_last. ``config`` overrides ``conv_config``'s choice of blocks.
    """
    if triton is None:
        raise ValueError("group_norm_silu_conv2d: the Triton backend was asked for but triton "
                         "is not installed")
    n, cout, ho, wo = _check(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias,
                             stride, padding, add)
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"group_norm_silu_conv2d: the Triton path takes float16 or bfloat16, "
                         f"got {x.dtype}")
    cin, h, w = x.shape[1:]
    _, _, kh, kw = conv_weight.shape
    if out is None:
        out = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
    elif tuple(out.shape) != (n, cout, ho, wo) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"group_norm_silu_conv2d: out must be {(n, cout, ho, wo)} {x.dtype} on "
                         f"{x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    cfg = config or conv_config(cin, cout, ho * wo)

    _, _, scale, shift = _group_stats(x, num_groups, norm_weight, norm_bias, eps, cfg)

    if add is None:
        add_kind, add_t, add_strides = ADD_NONE, out, (0, 0, 0, 0)
    else:
        add_t = add.expand(n, cout, ho, wo)  # broadcast dimensions get stride 0
        add_strides = add_t.stride()
        add_kind = ADD_CHANNEL if add_strides[2] == add_strides[3] == 0 else ADD_FULL
    m = n * ho * wo
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(cout, cfg.block_n),)
    _gn_silu_conv2d_kernel[grid](
        x, scale, shift, conv_weight, conv_bias if conv_bias is not None else out, add_t, out,
        m, cin, h, w, cout, ho, wo,
        *x.stride(), *conv_weight.stride(), *add_strides, *out.stride(),
        KH=kh, KW=kw, STRIDE=stride, PAD=padding,
        HAS_BIAS=conv_bias is not None, ADD_KIND=add_kind,
        TILE_IN_ONE_SAMPLE=(ho * wo) % cfg.block_m == 0,
        DOT_IN_FP32=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def group_norm_silu_conv2d(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias=None,
                           *, eps=1e-5, stride=1, padding=1, add=None):
    """``conv2d(silu(group_norm(x)), conv_weight, conv_bias, stride, padding) + add``.

    ``add`` broadcasts to the output: a time embedding N×C×1×1 or a residual N×C×H×W.
    The Triton path (``use_triton(x)``) runs float16 and bfloat16; float32 runs the reference.
    """
    _check(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias, stride, padding, add)
    if use_triton(x) and x.dtype in TRITON_DTYPES:
        return _group_norm_silu_conv2d_triton(x, norm_weight, norm_bias, num_groups, conv_weight,
                                              conv_bias, eps=eps, stride=stride, padding=padding,
                                              add=add)
    return group_norm_silu_conv2d_reference(x, norm_weight, norm_bias, num_groups, conv_weight,
                                            conv_bias, eps=eps, stride=stride, padding=padding,
                                            add=add)
