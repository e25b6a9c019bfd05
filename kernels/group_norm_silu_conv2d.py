"""conv2d(silu(group_norm(x))) + add, the front half of every SD ResNet block.

``group_norm_silu_conv2d_reference`` is the plain-PyTorch version: the reference, the CPU path
and what ONNX export traces. The Triton path is two kernels:

1. ``_group_stats_kernel`` + ``_group_stats_finalize_kernel``: per-(sample, group) mean and
   rstd in float32 (Welford-style merges of exact per-tile statistics, never E[x²]−E[x]²),
   folded with γ and β into a per-(sample, channel) ``scale`` and ``shift`` so that
   ``group_norm(x) = x·scale + shift``. When x is not channels_last it also writes x once as
   channels_last (see the layouts below).
2. ``_gn_silu_conv2d_kernel``: an implicit-GEMM convolution. M = N·Ho·Wo output pixels,
   N_gemm = Cout, K = KH·KW·Cin ordered tap-major, one tap and BLOCK_K input channels per
   step of one flat loop, which Triton's software pipeliner multi-buffers (``num_stages``)
   with cp.async for both tiles, keeping a wgmma in flight on sm_90. Its prologue normalises
   each loaded x tile and applies SiLU in float32 before the dot; its epilogue adds the conv
   bias and ``add`` and stores in x's dtype, channels_last by default.

Layouts: the kernel reads both operands channel-contiguous, so each K block is 16-byte
vectors (8 fp16/bf16 channels) for cp.async:
- x as dense channels_last (N, H, W, Cin storage): a [BLOCK_M pixels, BLOCK_K channels] tile
  is BLOCK_M rows of BLOCK_K·e contiguous bytes (64 channels: 128 B, one cache line).
  Contiguous NCHW x has its pixels, not its channels, adjacent; gathering channels from it
  costs one 2-byte load per element. The statistics pass, which reads all of x anyway, writes
  it once as channels_last instead: N·Cin·H·W·e bytes more written and read (320 channels at
  64², batch 2: 5.2 MB each way, ~3 µs at H100 bandwidth) against the conv's
  KH·KW·cdiv(Cout, BLOCK_N) reads of every input element. (In the engine, with its weights
  channels_last, cuDNN's ``conv_in`` already returns channels_last: no call needs the copy.)
- conv weights as channels_last (Cout, KH, KW, Cin storage; the parameter keeps its logical
  (Cout, Cin, KH, KW) shape, so state_dict names, shapes and ONNX export are unchanged, and
  cuDNN runs channels_last weights natively): a [BLOCK_K, BLOCK_N] tile is BLOCK_N runs of
  BLOCK_K·e contiguous bytes. In OIHW a K block steps over Cin with stride KH·KW = 9
  elements: one scalar 2-byte load per element, every wgmma waited to completion. On the
  sm_90 cubin (128×128×64 blocks, 8 warps): OIHW 238-243 registers, 32 ``LDG.E.U16`` in the
  loop, ``wgmma.wait_group 0``; channels_last 181 registers, none, three cp.async stages and
  ``wait_group 1`` (``test_sm90_code_of_engine_convs`` checks every engine specialisation).
  ``engine.layers.use_conv_chooser`` converts the engine's weights once at load; any other
  layout is copied per call by the launcher (Cout·Cin·KH·KW·e bytes read and written; it
  warns once).

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

Compiled variants: the kernel is specialised on what changes its code (kernel size, stride,
padding, bias, kind of ``add``, block sizes, and Triton's 16-divisibility of channel counts
and strides, which decides the vector width), not on the spatial sizes (``do_not_specialize``:
M, H, W, Ho, Wo), so the UNet's four resolutions share one binary per channel configuration.
"""
import dataclasses
import math
import warnings

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


PADDING_MODES = ("zeros", "circular")


def padded_conv2d(h, conv_weight, conv_bias, stride, padding, padding_mode):
    """``F.conv2d`` with ``nn.Conv2d``'s ``padding_mode``: "circular" wraps the picture around
    (each border reads the opposite one, A1111's "Tiling"), "zeros" pads with zeros."""
    if padding_mode == "circular" and padding:
        h = F.pad(h, (padding,) * 4, mode="circular")
        padding = 0
    return F.conv2d(h, conv_weight, conv_bias, stride=stride, padding=padding)


def group_norm_silu_conv2d_reference(x, norm_weight, norm_bias, num_groups, conv_weight,
                                     conv_bias=None, *, eps=1e-5, stride=1, padding=1, add=None,
                                     padding_mode="zeros"):
    h = group_norm_reference(x, num_groups, norm_weight, norm_bias, eps, activation="silu")
    y = padded_conv2d(h, conv_weight, conv_bias, stride, padding, padding_mode)
    return y if add is None else y + add


# ----------------------------------------------------------------------------------------------
# Block sizes: the one place the fused kernel's configs come from. First guesses after Triton's
# matmul tutorial, NOT yet tuned (``tuned_on`` None): tune them on the GPU with
# ``benchmarks/bench_conv.py --sweep``, which times ``SWEEP_CONFIGS``, and record the GPU in
# ``tuned_on``. Rows are tried in order; the first whose ``max_cout`` covers Cout wins (None: any).
@dataclasses.dataclass(frozen=True)
class ConvConfig:
    block_m: int            # output pixels per tile
    block_n: int            # output channels per tile
    block_k: int            # input channels per K step (one tap at a time)
    num_warps: int
    num_stages: int         # software-pipeline depth of the loop over Cin blocks
    group_m: int = 8        # M tiles sharing one band of weights, for L2 reuse
    stats_block_p: int = 64     # pixels per statistics tile
    stats_block_c: int = 64     # channels per statistics tile
    stats_max_splits: int = 64  # programs a (sample, channel block) is split over, at most
    tuned_on: str | None = None  # the GPU these values were measured best on; None: a guess


_CONV_TABLE = (
    # max_cout, config
    (64, ConvConfig(block_m=128, block_n=64, block_k=32, num_warps=4, num_stages=3)),
    (None, ConvConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
)

# (block_m, block_n, block_k, num_warps, num_stages) the benchmark's ``--sweep`` tries per shape
SWEEP_CONFIGS = ((64, 64, 32, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                 (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                 (128, 256, 64, 8, 3), (256, 128, 64, 8, 3))


def conv_config(cin: int, cout: int, hw_out: int) -> ConvConfig:
    """The ``_CONV_TABLE`` row for ``cout``, its N and K blocks shrunk to fit small channel counts
    (``tl.dot`` needs every block dimension ≥ 16), and its M block shrunk to a power of two
    ≥ 64 that divides Ho·Wo where the table's does not (the UNet's 8×8 level: 64): then every
    tile lies in one sample and loads its normalisation as one row, not a per-pixel gather
    (which also costs the pipeline ~4× the shared memory)."""
    cfg = next(c for max_cout, c in _CONV_TABLE if max_cout is None or cout <= max_cout)
    return _fit(cfg, cin, cout, hw_out)


def sweep_configs(cin: int, cout: int, hw_out: int) -> list:
    """``SWEEP_CONFIGS`` as ``ConvConfig`` rows, fitted to the shape as ``conv_config`` fits the
    table's, without repeats."""
    base = conv_config(cin, cout, hw_out)
    fitted = [_fit(dataclasses.replace(base, block_m=bm, block_n=bn, block_k=bk, num_warps=nw,
                                       num_stages=ns), cin, cout, hw_out)
              for bm, bn, bk, nw, ns in SWEEP_CONFIGS]
    return list(dict.fromkeys(fitted))


def _fit(cfg, cin, cout, hw_out):
    block_m = cfg.block_m
    if hw_out % block_m and (hw_out & -hw_out) >= 64:
        block_m = hw_out & -hw_out  # the largest power of two dividing hw_out, < block_m
    return dataclasses.replace(
        cfg, block_m=block_m, block_n=min(cfg.block_n, max(16, triton.next_power_of_2(cout))),
        block_k=min(cfg.block_k, max(16, triton.next_power_of_2(cin))))


# ----------------------------------------------------------------------------------------------
# Statistics (and, for input that is not channels_last, the channels_last copy the conv reads).
if triton is not None:
    @triton.jit
    def _group_stats_kernel(x_ptr, xc_ptr, pmean_ptr, pm2_ptr, C, HW, CHUNK,
                            sxn, sxc, sxp,
                            WRITE_COPY: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-channel mean and M2 = Σ(x − mean)² of one chunk of pixels of one sample.

        Grid (N, splits, cdiv(C, BLOCK_C)). x's pixels are read at one stride ``sxp`` (1 in
        NCHW, C in channels_last; the launcher guarantees it), so a tile is vector loads along
        pixels or along channels. Reads x once (N·C·H·W·e bytes in all); writes 2·N·splits·C
        floats, and with WRITE_COPY x again as channels_last (N·C·H·W·e bytes) into xc. Each
        [BLOCK_P, BLOCK_C] tile's own mean and M2 are exact (two passes over registers) and are
        merged into the running ones with Chan's formula.
        """
        n = tl.program_id(0)
        split = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, HW)
        base = x_ptr + n.to(tl.int64) * sxn + c[None, :] * sxc
        copy_base = xc_ptr + n.to(tl.int64) * HW * C + c[None, :]

        count = 0.0
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_mask = p < end
            mask = p_mask[:, None] & c_mask[None, :]
            raw = tl.load(base + p[:, None] * sxp, mask=mask, other=0.0)
            if WRITE_COPY:
                tl.store(copy_base + p[:, None] * C, raw, mask=mask)
            xs = raw.to(tl.float32)
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
    # A tiny kernel (N·G programs): one binary per power of two of channels a group
    @triton.jit(do_not_specialize=["C", "HW", "CHUNK", "SPLITS", "G", "CPG"])
    def _group_stats_finalize_kernel(pmean_ptr, pm2_ptr, gamma_ptr, beta_ptr,
                                     mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
                                     C, HW, CHUNK, SPLITS, G, eps, CPG,
                                     BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
                                     BLOCK_C: tl.constexpr,
                                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
        """Merges the chunks' per-channel statistics into one (sample, group)'s mean and rstd, and
        writes ``scale = rstd·γ`` and ``shift = β − mean·rstd·γ`` for the group's channels.

        Grid (N·G,); BLOCK_S ≥ SPLITS, BLOCK_C ≥ CPG. The statistics of the group's CPG channels
        are merged BLOCK_CG channels at a time (SPLITS × BLOCK_CG tiles), so the registers a
        thread needs do not grow with the channel count; scale and shift are one BLOCK_C
        vector. Within a block of channels, over its SPLITS chunks (chunk i has n_i =
        min(CHUNK, HW − i·CHUNK) pixels): mean_b = Σ n_i·mean_i / n_b and M2_b = Σ M2_i +
        n_i·(mean_i − mean_b)²; the blocks are merged with Chan's formula, as the statistics
        kernel merges its tiles.
        """
        ng = tl.program_id(0)
        n = ng // G
        g = ng % G
        s = tl.arange(0, BLOCK_S)
        j = tl.arange(0, BLOCK_CG)
        s_ok = s < SPLITS
        rows = (n * SPLITS + s)[:, None] * C + g * CPG
        pixels = tl.minimum(CHUNK, HW - s * CHUNK).to(tl.float32)[:, None]

        count = 0.0
        mean = 0.0
        m2 = 0.0
        for c0 in range(0, CPG, BLOCK_CG):
            mask = s_ok[:, None] & (c0 + j < CPG)[None, :]
            offs = rows + (c0 + j)[None, :]
            pmean = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
            pm2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
            cnt = tl.where(mask, pixels, 0.0)
            b_count = tl.sum(tl.sum(cnt, axis=1), axis=0)
            b_mean = tl.sum(tl.sum(cnt * pmean, axis=1), axis=0) / b_count
            d = pmean - b_mean
            b_m2 = tl.sum(tl.sum(pm2 + cnt * d * d, axis=1), axis=0)
            new_count = count + b_count
            delta = b_mean - mean
            mean += delta * (b_count / new_count)
            m2 += b_m2 + delta * delta * (count * b_count / new_count)
            count = new_count
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)

        c = g * CPG + tl.arange(0, BLOCK_C)
        c_mask = tl.arange(0, BLOCK_C) < CPG
        scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
        if HAS_GAMMA:
            scale *= tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_BETA:
            shift += tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(scale_ptr + n * C + c, scale, mask=c_mask)
        tl.store(shift_ptr + n * C + c, shift, mask=c_mask)


# Channels the finalize kernel merges at a time. One tile of 64 chunks × all the group's
# channels took 255 registers a thread at 80 channels a group (SD's 2560-channel convs; sm_90,
# Triton 3.9) and would spill beyond; at most 32 at a time take at most 128 at any count.
FINALIZE_BLOCK_CG = 32


def _pixel_stride(x):
    """The one stride between consecutive pixels (h, w) of a channel, or None: NCHW and
    channels_last both have one (1 and C)."""
    _, _, h, w = x.shape
    if h == 1 or x.stride(2) == w * x.stride(3):
        return x.stride(3)
    return None


def _stats_splits(hw, cfg):
    """(splits, chunk): the pixels of a sample in ``splits`` chunks of ``chunk`` pixels (a
    multiple of the statistics tile), at most ``cfg.stats_max_splits``, none empty."""
    tiles = triton.cdiv(hw, cfg.stats_block_p)
    splits = min(tiles, cfg.stats_max_splits)
    chunk = triton.cdiv(tiles, splits) * cfg.stats_block_p
    return triton.cdiv(hw, chunk), chunk


def _stats_launch(x, copy, pmean, pm2, cfg):
    """``_group_stats_kernel``'s grid and keyword arguments for x, whose pixels have one stride,
    ``copy`` (None or channels_last) and the N×splits×C partial statistics ``pmean``, ``pm2``."""
    n, c, h, w = x.shape
    _, chunk = _stats_splits(h * w, cfg)
    block_c = min(cfg.stats_block_c, triton.next_power_of_2(c))
    grid = (n, pmean.shape[1], triton.cdiv(c, block_c))
    return grid, dict(x_ptr=x, xc_ptr=copy if copy is not None else x, pmean_ptr=pmean,
                      pm2_ptr=pm2, C=c, HW=h * w, CHUNK=chunk, sxn=x.stride(0), sxc=x.stride(1),
                      sxp=_pixel_stride(x), WRITE_COPY=copy is not None,
                      BLOCK_P=cfg.stats_block_p, BLOCK_C=block_c)


def _stats_workspace(n, c, num_groups, splits, device):
    """The statistics pass's float32 buffers carved from one allocation, not six: pmean, pm2
    (N×splits×C), mean, rstd (N×G), scale, shift (N×C). Each starts on a 16-byte boundary, so
    every call sees equally aligned pointers (Triton specialises on alignment)."""
    shapes = [(n, splits, c)] * 2 + [(n, num_groups)] * 2 + [(n, c)] * 2
    sizes = [math.prod(shape) for shape in shapes]
    padded = [-(-size // 4) * 4 for size in sizes]  # 4 floats = 16 bytes
    ws = torch.empty(sum(padded), device=device, dtype=torch.float32)
    parts = ws.split(padded)
    return [part[:size].view(shape) for part, size, shape in zip(parts, sizes, shapes)]


def _group_stats(x, num_groups, weight, bias, eps, cfg, copy=None):
    """(mean, rstd) as N×G and (scale, shift) as N×C float32 tensors for x (N×C×H×W); fills
    ``copy`` (None or an N×C×H×W channels_last tensor) with x on the way."""
    n, c, h, w = x.shape
    if _pixel_stride(x) is None:  # an arbitrary view: one copy so that pixels have one stride
        x = x.contiguous()
    splits, chunk = _stats_splits(h * w, cfg)
    pmean, pm2, mean, rstd, scale, shift = _stats_workspace(n, c, num_groups, splits, x.device)
    grid, kwargs = _stats_launch(x, copy, pmean, pm2, cfg)
    _group_stats_kernel[grid](**kwargs)

    cpg = c // num_groups
    _group_stats_finalize_kernel[(n * num_groups,)](
        pmean, pm2, weight if weight is not None else scale, bias if bias is not None else shift,
        mean, rstd, scale, shift, c, h * w, chunk, splits, num_groups, eps, cpg,
        # BLOCK_S from the config, not from this shape's splits: one binary for all image sizes
        BLOCK_S=triton.next_power_of_2(cfg.stats_max_splits),
        BLOCK_CG=min(FINALIZE_BLOCK_CG, triton.next_power_of_2(cpg)),
        BLOCK_C=triton.next_power_of_2(cpg), HAS_GAMMA=weight is not None,
        HAS_BETA=bias is not None,
        num_stages=1)  # its loop is a few steps: no software pipeline, no copies of it
    return mean, rstd, scale, shift


# ----------------------------------------------------------------------------------------------
# The convolution.
ADD_NONE, ADD_CHANNEL, ADD_FULL = 0, 1, 2


if triton is not None:
    # Spatial sizes change no code: not specialised on (one binary for all resolutions).
    @triton.jit(do_not_specialize=["M", "H", "W", "HO", "WO"])
    def _gn_silu_conv2d_kernel(
            x_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, add_ptr, out_ptr,
            M, CIN, H, W, COUT, HO, WO,
            san, sac, sah, saw,
            son, soc, soh, sow,
            KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
            CIRCULAR: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_KIND: tl.constexpr, TILE_IN_ONE_SAMPLE: tl.constexpr,
            DOT_IN_FP32: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """out[m, co] = Σ_{kh,kw,ci} silu(x[n, ci, hi, wi]·scale[n, ci] + shift[n, ci])
        · w[co, ci, kh, kw] (+ bias[co]) (+ add), with (n, ho, wo) = m and
        (hi, wi) = (ho, wo)·STRIDE − PAD + (kh, kw): outside the picture a zero, or with
        CIRCULAR the pixel PAD ≤ H, W rows or columns in from the opposite border.

        x is dense channels_last (element (n, ci, hi, wi) at ((n·H + hi)·W + wi)·CIN + ci) and w
        dense channels_last ((co, ci, kh, kw) at ((co·KH + kh)·KW + kw)·CIN + ci): both tiles
        are runs of contiguous channels, 16-byte vectors when CIN is a multiple of 8.
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
        x_rows = x_ptr + n.to(tl.int64) * H * W * CIN    # [BLOCK_M] pointers to each sample
        w_cols = w_ptr + co * (KH * KW * CIN)            # [BLOCK_N] pointers to each filter
        if TILE_IN_ONE_SAMPLE:
            n0 = (pid_m * BLOCK_M) // hw_out
            stat_rows = n0 * CIN                     # scalar: one sample per tile
        else:
            stat_rows = n[:, None] * CIN             # [BLOCK_M, 1]

        # -- main loop: K = KH·KW·CIN, one tap and BLOCK_K input channels per step. One flat loop,
        # software-pipelined over all taps (cp.async for both tiles, NUM_STAGES deep, a wgmma in
        # flight). Measured on the sm_90 cubin against a static loop over taps around a loop
        # over Cin blocks: that drains the pipeline at every tap, takes 252 registers instead of
        # 181 (128×128×64 blocks) and compiles ~10× longer (9 pipelined loops, 3.5× the SASS).
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        c_blocks = tl.cdiv(CIN, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            tap = it // c_blocks
            ci = (it - tap * c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            ci_mask = ci < CIN
            hi = ho * STRIDE - PAD + tap // KW
            wi = wo * STRIDE - PAD + tap % KW
            if CIRCULAR:  # every tap reads a pixel, one wrap away at most (PAD ≤ H, W)
                hi = tl.where(hi < 0, hi + H, tl.where(hi >= H, hi - H, hi))
                wi = tl.where(wi < 0, wi + W, tl.where(wi >= W, wi - W, wi))
                inside = m_mask
            else:
                inside = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a_mask = inside[:, None] & ci_mask[None, :]
            a = tl.load((x_rows + (hi * W + wi) * CIN)[:, None] + ci[None, :], mask=a_mask,
                        other=0.0)
            b = tl.load((w_cols + tap * CIN)[None, :] + ci[:, None],
                        mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
            # prologue: GroupNorm as one FMA with the (sample, channel) scale and shift, then
            # SiLU, in float32. Zero padding comes AFTER it (padded taps contribute 0, as in
            # conv2d of the normalised tensor), as do the masked channels.
            if TILE_IN_ONE_SAMPLE:
                sc = tl.load(scale_ptr + stat_rows + ci, mask=ci_mask, other=0.0)[None, :]
                sh = tl.load(shift_ptr + stat_rows + ci, mask=ci_mask, other=0.0)[None, :]
            else:
                stat_mask = m_mask[:, None] & ci_mask[None, :]
                sc = tl.load(scale_ptr + stat_rows + ci[None, :], mask=stat_mask, other=0.0)
                sh = tl.load(shift_ptr + stat_rows + ci[None, :], mask=stat_mask, other=0.0)
            h = a.to(tl.float32) * sc + sh
            h = h / (1.0 + tl.exp2(h * -1.4426950408889634))  # silu(h) = h / (1 + 2^(−h·log2 e))
            # the normalised tile is rounded to the weights' dtype, as the unfused path stores it
            h = tl.where(a_mask, h, 0.0).to(b.dtype)
            if DOT_IN_FP32:  # the same products (exact in fp32) and fp32 sums, no bf16 MMA
                acc = tl.dot(h.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, b, acc)

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


def _check(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias, stride, padding, add,
           padding_mode="zeros"):
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
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{where}: padding_mode must be one of {', '.join(PADDING_MODES)}, "
                         f"got {padding_mode!r}")
    if padding_mode == "circular" and padding > min(h, w):
        raise ValueError(f"{where}: circular padding {padding} wraps past the other border "
                         f"of {h}×{w}")
    if add is not None:
        try:
            shape = torch.broadcast_shapes(tuple(add.shape), (n, cout, ho, wo))
        except RuntimeError:
            shape = None
        if shape != (n, cout, ho, wo) or add.device != x.device:
            raise ValueError(f"{where}: add of shape {tuple(add.shape)} on {add.device} does "
                             f"not broadcast to the output {(n, cout, ho, wo)} on {x.device}")
    return n, cout, ho, wo


def _channels_last_weight(conv_weight):
    """conv_weight as the kernel reads it: dense channels_last (Cin contiguous)."""
    if conv_weight.is_contiguous(memory_format=torch.channels_last):
        return conv_weight
    # Python shows a warning once per call site: a per-call copy worth fixing at load time
    warnings.warn("group_norm_silu_conv2d: conv_weight is not channels_last, so every call "
                  "copies it (Cout·Cin·KH·KW·e bytes read and written); convert it once with "
                  "weight.data = weight.data.contiguous(memory_format=torch.channels_last), as "
                  "sdrt.engine.layers.use_conv_chooser does", stacklevel=4)
    return conv_weight.contiguous(memory_format=torch.channels_last)


def _conv_launch(x, scale, shift, weight, conv_bias, add, out, stride, padding, cfg,
                 padding_mode="zeros"):
    """``_gn_silu_conv2d_kernel``'s grid and keyword arguments (constexprs, num_warps and
    num_stages included) for dense channels_last x and weight."""
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    _, _, ho, wo = out.shape
    if add is None:
        add_kind, add_t, add_strides = ADD_NONE, out, (0, 0, 0, 0)
    else:
        add_t = add.expand(n, cout, ho, wo)  # broadcast dimensions get stride 0
        add_strides = add_t.stride()
        add_kind = ADD_CHANNEL if add_strides[2] == add_strides[3] == 0 else ADD_FULL
    m = n * ho * wo
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(cout, cfg.block_n),)
    return grid, dict(
        x_ptr=x, scale_ptr=scale, shift_ptr=shift, w_ptr=weight,
        bias_ptr=conv_bias if conv_bias is not None else out, add_ptr=add_t, out_ptr=out,
        M=m, CIN=cin, H=h, W=w, COUT=cout, HO=ho, WO=wo,
        san=add_strides[0], sac=add_strides[1], sah=add_strides[2], saw=add_strides[3],
        son=out.stride(0), soc=out.stride(1), soh=out.stride(2), sow=out.stride(3),
        KH=kh, KW=kw, STRIDE=stride, PAD=padding,
        CIRCULAR=padding_mode == "circular" and padding > 0, HAS_BIAS=conv_bias is not None, ADD_KIND=add_kind,
        TILE_IN_ONE_SAMPLE=(ho * wo) % cfg.block_m == 0,
        DOT_IN_FP32=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _group_norm_silu_conv2d_triton(x, norm_weight, norm_bias, num_groups, conv_weight,
                                   conv_bias=None, *, eps=1e-5, stride=1, padding=1, add=None,
                                   padding_mode="zeros", out=None, config=None):
    """The Triton path: statistics kernels, then the fused implicit-GEMM convolution.

    x may have any strides: channels_last is read in place, anything else is copied to
    channels_last by the statistics pass. conv_weight should be channels_last (see
    ``_channels_last_weight``). ``out`` (optional) receives the result: N×Cout×Ho×Wo in x's
    dtype, any strides; by default it is allocated channels_last. ``config`` overrides
    ``conv_config``'s choice of blocks.
    """
    if triton is None:
        raise ValueError("group_norm_silu_conv2d: the Triton backend was asked for but triton "
                         "is not installed")
    n, cout, ho, wo = _check(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias,
                             stride, padding, add, padding_mode)
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"group_norm_silu_conv2d: the Triton path takes float16 or bfloat16, "
                         f"got {x.dtype}")
    cin, h, w = x.shape[1:]
    if h * w * cin >= 2 ** 31 or conv_weight.numel() >= 2 ** 31:
        raise ValueError(f"group_norm_silu_conv2d: one sample ({cin}×{h}×{w}) or the weights "
                         f"({tuple(conv_weight.shape)}) exceed the kernel's 32-bit offsets")
    if out is None:
        out = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
    elif tuple(out.shape) != (n, cout, ho, wo) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"group_norm_silu_conv2d: out must be {(n, cout, ho, wo)} {x.dtype} on "
                         f"{x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    cfg = config or conv_config(cin, cout, ho * wo)
    weight = _channels_last_weight(conv_weight)

    copy = None
    if not x.is_contiguous(memory_format=torch.channels_last):
        copy = torch.empty_like(x, memory_format=torch.channels_last)
    _, _, scale, shift = _group_stats(x, num_groups, norm_weight, norm_bias, eps, cfg, copy)
    grid, kwargs = _conv_launch(x if copy is None else copy, scale, shift, weight, conv_bias, add,
                                out, stride, padding, cfg, padding_mode)
    _gn_silu_conv2d_kernel[grid](**kwargs)
    return out


def group_norm_silu_conv2d(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias=None,
                           *, eps=1e-5, stride=1, padding=1, add=None, padding_mode="zeros"):
    """``conv2d(silu(group_norm(x)), conv_weight, conv_bias, stride, padding) + add``.

    ``add`` broadcasts to the output: a time embedding N×C×1×1 or a residual N×C×H×W.
    ``padding_mode`` is ``nn.Conv2d``'s: "zeros", or "circular" (the borders wrap around).
    The Triton path (``use_triton(x)``) runs float16 and bfloat16; float32 runs the reference.
    """
    _check(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias, stride, padding, add,
           padding_mode)
    kwargs = dict(eps=eps, stride=stride, padding=padding, add=add, padding_mode=padding_mode)
    if use_triton(x) and x.dtype in TRITON_DTYPES:
        return _group_norm_silu_conv2d_triton(x, norm_weight, norm_bias, num_groups, conv_weight,
                                              conv_bias, **kwargs)
    return group_norm_silu_conv2d_reference(x, norm_weight, norm_bias, num_groups, conv_weight,
                                            conv_bias, **kwargs)
