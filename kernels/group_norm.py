"""GroupNorm over N×C×H×W, optionally fused with SiLU.

A group is C/G channels × H·W positions: 40 960 elements for SD's 320 channels at 64×64, a
million in the VAE at 512², so one program per group would leave most of an H100 idle (64
programs for a batch of 2). The Triton path therefore splits each group along H·W:

1. ``_group_norm_stats_kernel``: grid (N·G, splits). Each program reads its share of the group
   once and writes (mean, M2) of that share: 8 bytes. Within a tile the statistics are
   two-pass on registers; tiles and splits are merged with Chan's pairwise formula, so no
   E[x²] − E[x]² cancellation anywhere.
2. ``_group_norm_apply_kernel``: same grid. Each program merges its group's few partials,
   reads its share again, normalises, applies weight, bias and SiLU, and writes it.

Bytes: 2 reads + 1 write of x (the second read mostly from L2 at UNet sizes, where the whole
tensor fits in it), against 1 + 1 for an ideal single pass and 3 reads + 2 writes for
F.group_norm (statistics, then normalise) followed by F.silu.

Contiguous input (and any other layout whose spatial dims collapse): a tile is BLOCK_C
channels (one group) × BLOCK_S positions, addressed as c·stride_c + s·stride_s.

channels_last input (every norm after a fused conv: the transformer blocks' norms, the unfused
conv path): a group's channels are a short run per pixel (C/G = 4…80 elements, starting at
g·C/G, so unaligned when C/G is not a multiple of 8), and a tile of one group's channels loads
them 2 bytes at a time (compiled for sm_90: 32-34 scalar loads a thread). There the tiles are
whole runs of pixels instead, BLOCK_S pixels × BLOCK_C = 64 consecutive channels (128 bytes a
pixel in fp16, 16-byte loads), reduced per channel and merged per group afterwards:

1. ``_group_norm_cl_stats_kernel``: grid (N, splits, C / BLOCK_C): per-channel (mean, M2) of a
   split's pixels, Chan-merged over tiles: 8 bytes a channel a split;
2. ``_group_norm_cl_finalize_kernel``: grid (N·G): merges a group's splits × C/G channel
   partials into its mean and rstd and writes per-channel mean and rstd·weight (8 bytes a
   channel); one compiled variant whatever C/G;
3. ``_group_norm_cl_apply_kernel``: grid as 1: normalise, weight, bias, SiLU, store.

Bytes are as above (x read twice, written once); the partials are < 1% of x. Both paths keep
x's memory format in the output.

``group_norm_reference`` is the plain-PyTorch version: the reference, the CPU path and what
ONNX export traces. The public ``group_norm`` picks the path (see ``_backend``).
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

ACTIVATIONS = (None, "silu")

# The kernel holds a tile of BLOCK_C (all of a group's channels, padded to a power of two) ×
# BLOCK_S positions. SD uses 32 groups: at most 2560 / 32 = 80 channels a group.
MAX_CHANNELS_PER_GROUP = 256
_TILE_ELEMS = 4096  # elements in one tile (16 KB of fp32 in registers over 4 warps)
# Elements of a group one program handles; sets the number of splits (at most _MAX_SPLITS,
# which bounds the partials each apply program merges: a power of two, the merge's width).
_ELEMS_PER_PROGRAM = 8192  # SD 1.5 level 1 (2×320×64×64): 64 groups × 4 splits
_MAX_SPLITS = 64


def group_norm_reference(x, num_groups, weight, bias, eps=1e-5, activation=None):
    # Statistics in float32 whatever the input dtype; output in x's dtype.
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


if triton is not None:
    # The loop counts and split sizes vary with the shape but not the code: specialising on
    # them (== 1, divisible by 16) would compile extra variants for nothing.
    @triton.jit(do_not_specialize=["s_per_split", "tiles_per_split"])
    def _group_norm_stats_kernel(X, PARTIAL, HW, G, cpg, stride_n, stride_c, stride_s,
                                 s_per_split, tiles_per_split,
                                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        ng = tl.program_id(0)  # n·G + g
        split = tl.program_id(1)
        n = ng // G
        g = ng % G
        cc = tl.arange(0, BLOCK_C)
        c_ok = cc < cpg
        row = X + n.to(tl.int64) * stride_n + (g * cpg + cc).to(tl.int64)[:, None] * stride_c
        s0 = split * s_per_split
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for i in range(tiles_per_split):
            s = s0 + i * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = c_ok[:, None] & (s < HW)[None, :]
            x = tl.load(row + s.to(tl.int64)[None, :] * stride_s, mask=mask,
                        other=0.0).to(tl.float32)
            # This tile's count, mean and M2 (two-pass on registers) ...
            n_t = tl.sum(mask.to(tl.float32), axis=None)
            mean_t = tl.sum(x, axis=None) / tl.maximum(n_t, 1.0)
            d = tl.where(mask, x - mean_t, 0.0)
            m2_t = tl.sum(d * d, axis=None)
            # ... merged into the running ones (Chan et al.).
            total = tl.maximum(count + n_t, 1.0)
            delta = mean_t - mean
            mean = mean + delta * (n_t / total)
            m2 = m2 + m2_t + delta * delta * (count * n_t / total)
            count = count + n_t
        out = PARTIAL + (ng * tl.num_programs(1) + split) * 2
        tl.store(out, mean)
        tl.store(out + 1, m2)

    @triton.jit(do_not_specialize=["s_per_split", "tiles_per_split"])
    def _group_norm_apply_kernel(X, W, B, Y, PARTIAL, HW, G, cpg, eps,
                                 stride_xn, stride_xc, stride_xs,
                                 stride_yn, stride_yc, stride_ys,
                                 s_per_split, tiles_per_split,
                                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
        ng = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        n = ng // G
        g = ng % G

        # Merge the group's partials: split k covered cpg × min(s_per_split, HW − k·s_per_split)
        # elements.
        k = tl.arange(0, BLOCK_SPLITS)
        k_ok = k < n_splits
        part = PARTIAL + (ng * n_splits + k) * 2
        mean_k = tl.load(part, mask=k_ok, other=0.0)
        m2_k = tl.load(part + 1, mask=k_ok, other=0.0)
        n_k = tl.where(k_ok, tl.minimum(s_per_split, HW - k * s_per_split), 0).to(tl.float32)
        n_k = n_k * cpg
        total = tl.sum(n_k, axis=0)
        mean = tl.sum(n_k * mean_k, axis=0) / total
        dm = mean_k - mean
        m2 = tl.sum(tl.where(k_ok, m2_k + n_k * dm * dm, 0.0), axis=0)
        rstd = tl.rsqrt(m2 / total + eps)

        cc = tl.arange(0, BLOCK_C)
        c_ok = cc < cpg
        c = g * cpg + cc
        # y = (x − mean) · scale + shift, with scale = rstd · weight, shift = bias per channel.
        scale = tl.zeros([BLOCK_C], tl.float32) + rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], tl.float32)
        if HAS_BIAS:
            shift = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)
        x_row = X + n.to(tl.int64) * stride_xn + c.to(tl.int64)[:, None] * stride_xc
        y_row = Y + n.to(tl.int64) * stride_yn + c.to(tl.int64)[:, None] * stride_yc
        s0 = split * s_per_split
        for i in range(tiles_per_split):
            s = s0 + i * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = c_ok[:, None] & (s < HW)[None, :]
            s64 = s.to(tl.int64)[None, :]
            x = tl.load(x_row + s64 * stride_xs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * scale[:, None] + shift[:, None]
            if ACTIVATION == "silu":
                # silu(y) = y · sigmoid(y) = y / (1 + 2^(−y·log2 e))
                y = y / (1.0 + tl.exp2(y * -1.4426950408889634))
            tl.store(y_row + s64 * stride_ys, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["tiles_per_split"])
    def _group_norm_cl_stats_kernel(X, PMEAN, PM2, HW, C, stride_n, stride_s,
                                    s_per_split, tiles_per_split,
                                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        split = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        base = X + n.to(tl.int64) * stride_n + c[None, :]
        s0 = split * s_per_split
        count = 0.0  # pixels so far: the same for every channel
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for i in range(tiles_per_split):
            s = s0 + i * BLOCK_S + tl.arange(0, BLOCK_S)
            s_ok = s < HW
            x = tl.load(base + s.to(tl.int64)[:, None] * stride_s,
                        mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            # Per channel: this tile's mean and M2 (two-pass on registers) ...
            n_t = tl.sum(s_ok.to(tl.float32), axis=0)
            mean_t = tl.sum(x, axis=0) / tl.maximum(n_t, 1.0)
            d = tl.where(s_ok[:, None], x - mean_t[None, :], 0.0)
            m2_t = tl.sum(d * d, axis=0)
            # ... merged into the running ones (Chan et al.).
            total = tl.maximum(count + n_t, 1.0)
            delta = mean_t - mean
            mean = mean + delta * (n_t / total)
            m2 = m2 + m2_t + delta * delta * (count * n_t / total)
            count = count + n_t
        out = (n * tl.num_programs(1) + split).to(tl.int64) * C + c
        tl.store(PMEAN + out, mean, mask=c_ok)
        tl.store(PM2 + out, m2, mask=c_ok)

    @triton.jit(do_not_specialize=["cpg", "n_splits", "s_per_split"])
    def _group_norm_cl_finalize_kernel(PMEAN, PM2, W, MEAN, SCALE, HW, C, G, cpg, n_splits,
                                       s_per_split, eps, HAS_WEIGHT: tl.constexpr,
                                       BLOCK: tl.constexpr, BLOCK_J: tl.constexpr):
        ng = tl.program_id(0)
        n = ng // G
        g = ng % G
        # The group's partials are n_splits × cpg values, walked BLOCK at a time as one flat
        # range e = k·cpg + j (split k, channel j): one compiled variant for every group size.
        # Two passes: the group mean first, then Σ M2_k + n_k·(mean_k − mean)² (Chan et al.).
        # Split k covered min(s_per_split, HW − k·s_per_split) pixels of every channel.
        m = n_splits * cpg
        row0 = (n * n_splits).to(tl.int64)
        total = 0.0
        acc = 0.0
        for e0 in range(0, m, BLOCK):
            e = e0 + tl.arange(0, BLOCK)
            ok = e < m
            k = e // cpg
            idx = (row0 + k) * C + g * cpg + e % cpg
            mean_k = tl.load(PMEAN + idx, mask=ok, other=0.0)
            w_k = tl.where(ok, tl.minimum(s_per_split, HW - k * s_per_split), 0).to(tl.float32)
            total += tl.sum(w_k, axis=0)
            acc += tl.sum(w_k * mean_k, axis=0)
        mean = acc / total
        m2 = 0.0
        for e0 in range(0, m, BLOCK):
            e = e0 + tl.arange(0, BLOCK)
            ok = e < m
            k = e // cpg
            idx = (row0 + k) * C + g * cpg + e % cpg
            mean_k = tl.load(PMEAN + idx, mask=ok, other=0.0)
            m2_k = tl.load(PM2 + idx, mask=ok, other=0.0)
            w_k = tl.where(ok, tl.minimum(s_per_split, HW - k * s_per_split), 0).to(tl.float32)
            dm = mean_k - mean
            m2 += tl.sum(tl.where(ok, m2_k + w_k * dm * dm, 0.0), axis=0)
        rstd = tl.rsqrt(m2 / total + eps)
        # The group's channels, BLOCK_J at a time (one a thread: its 2-byte weights start at
        # g·cpg, unaligned, so wider blocks would only mean more scalar loads a thread).
        for j0 in range(0, cpg, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < cpg
            c = g * cpg + j
            scale = tl.zeros([BLOCK_J], tl.float32) + rstd
            if HAS_WEIGHT:
                scale = scale * tl.load(W + c, mask=j_ok, other=0.0).to(tl.float32)
            tl.store(MEAN + n * C + c, tl.zeros([BLOCK_J], tl.float32) + mean, mask=j_ok)
            tl.store(SCALE + n * C + c, scale, mask=j_ok)

    @triton.jit(do_not_specialize=["tiles_per_split"])
    def _group_norm_cl_apply_kernel(X, B, Y, MEAN, SCALE, HW, C, stride_xn, stride_xs,
                                    stride_yn, stride_ys, s_per_split, tiles_per_split,
                                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        split = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        # y = (x − mean) · scale + shift, per channel: scale = rstd · weight, shift = bias.
        mean = tl.load(MEAN + n * C + c, mask=c_ok, other=0.0)
        scale = tl.load(SCALE + n * C + c, mask=c_ok, other=0.0)
        shift = tl.zeros([BLOCK_C], tl.float32)
        if HAS_BIAS:
            shift = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)
        x_base = X + n.to(tl.int64) * stride_xn + c[None, :]
        y_base = Y + n.to(tl.int64) * stride_yn + c[None, :]
        s0 = split * s_per_split
        for i in range(tiles_per_split):
            s = s0 + i * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = (s < HW)[:, None] & c_ok[None, :]
            s64 = s.to(tl.int64)[:, None]
            x = tl.load(x_base + s64 * stride_xs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
            if ACTIVATION == "silu":
                y = y / (1.0 + tl.exp2(y * -1.4426950408889634))
            tl.store(y_base + s64 * stride_ys, y.to(Y.dtype.element_ty), mask=mask)


def _spatial_stride(t):
    """The one stride that walks t's spatial dims (2…) in order, or None if they don't collapse.

    Contiguous N×C×H×W gives 1, channels_last gives C.
    """
    stride, span = None, None
    for size, st in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if stride is None:
            stride, span = st, st * size
        elif st != span:
            return None
        else:
            span = st * size
    return 1 if stride is None else stride


def _group_norm_triton(x, num_groups, weight, bias, eps, activation, out=None):
    if triton is None:
        raise ValueError("group_norm: the Triton backend was asked for but triton is not "
                         "installed")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm: dtype {x.dtype} is not float32, float16 or bfloat16")
    n, c = x.shape[:2]
    cpg = c // num_groups
    if cpg > MAX_CHANNELS_PER_GROUP:
        raise ValueError(f"group_norm: the kernel takes up to {MAX_CHANNELS_PER_GROUP} channels "
                         f"a group, got {c} channels in {num_groups} groups")
    if out is None:
        out = torch.empty_like(x)  # keeps x's memory format (contiguous or channels_last)
    sx, sy = _spatial_stride(x), _spatial_stride(out)
    if sx is None or sy is None:
        bad = "x" if sx is None else "out"
        t = x if sx is None else out
        raise ValueError(f"group_norm: the spatial dims of {bad} (shape {tuple(t.shape)}, "
                         f"strides {t.stride()}) do not collapse into one stride")
    hw = math.prod(x.shape[2:])
    if x.numel() == 0:
        return out
    if c > 1 and hw > 1 and x.stride(1) == 1 and out.stride(1) == 1:
        return _group_norm_cl(x, num_groups, weight, bias, eps, activation, out, sx, sy, hw)

    block_c = triton.next_power_of_2(cpg)
    block_s = max(16, min(triton.next_power_of_2(hw), _TILE_ELEMS // block_c))
    splits = min(_MAX_SPLITS, max(1, triton.cdiv(cpg * hw, _ELEMS_PER_PROGRAM)))
    s_per_split = triton.cdiv(triton.cdiv(hw, splits), block_s) * block_s
    splits = triton.cdiv(hw, s_per_split)  # no split left empty
    tiles = s_per_split // block_s
    partial = torch.empty(n * num_groups, splits, 2, dtype=torch.float32, device=x.device)
    grid = (n * num_groups, splits)
    _group_norm_stats_kernel[grid](
        x, partial, hw, num_groups, cpg, x.stride(0), x.stride(1), sx, s_per_split, tiles,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    _group_norm_apply_kernel[grid](
        x, x if weight is None else weight, x if bias is None else bias, out, partial,
        hw, num_groups, cpg, eps, x.stride(0), x.stride(1), sx, out.stride(0), out.stride(1), sy,
        s_per_split, tiles,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ACTIVATION="silu" if activation == "silu" else "none",
        # one merge width for every shape (splits ≤ _MAX_SPLITS): fewer compiled variants
        BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_SPLITS=_MAX_SPLITS, num_warps=4)
    return out


# channels_last: a tile is _CL_BLOCK_C channels (128 bytes a pixel in fp16) × the rest of
# _TILE_ELEMS in pixels; a split covers about _CL_ELEMS_PER_PROGRAM elements.
_CL_BLOCK_C = 64
_CL_ELEMS_PER_PROGRAM = 8192
_CL_MAX_SPLITS = 256  # SD's largest, the VAE's 128 channels at 512²: 1 × 256 × 2 programs
# The finalize kernel merges a group's splits × C/G partials this many at a time.
_CL_MERGE_BLOCK = 1024


def _group_norm_cl(x, num_groups, weight, bias, eps, activation, out, sx, sy, hw):
    """channels_last x and out: per-channel statistics over tiles of whole pixel runs."""
    n, c = x.shape[:2]
    cpg = c // num_groups
    block_c = min(_CL_BLOCK_C, triton.next_power_of_2(c))
    block_s = max(16, min(triton.next_power_of_2(hw), _TILE_ELEMS // block_c))
    splits = min(_CL_MAX_SPLITS, max(1, triton.cdiv(block_c * hw, _CL_ELEMS_PER_PROGRAM)))
    s_per_split = triton.cdiv(triton.cdiv(hw, splits), block_s) * block_s
    splits = triton.cdiv(hw, s_per_split)  # no split left empty
    tiles = s_per_split // block_s
    f32 = dict(dtype=torch.float32, device=x.device)
    pmean, pm2 = torch.empty(n, splits, c, **f32), torch.empty(n, splits, c, **f32)
    mean, scale = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    grid = (n, splits, triton.cdiv(c, block_c))
    _group_norm_cl_stats_kernel[grid](
        x, pmean, pm2, hw, c, x.stride(0), sx, s_per_split, tiles,
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4)
    _group_norm_cl_finalize_kernel[(n * num_groups,)](
        pmean, pm2, x if weight is None else weight, mean, scale, hw, c, num_groups, cpg,
        splits, s_per_split, eps, HAS_WEIGHT=weight is not None, BLOCK=_CL_MERGE_BLOCK,
        BLOCK_J=128, num_warps=4)
    _group_norm_cl_apply_kernel[grid](
        x, x if bias is None else bias, out, mean, scale, hw, c, x.stride(0), sx,
        out.stride(0), sy, s_per_split, tiles, HAS_BIAS=bias is not None,
        ACTIVATION="silu" if activation == "silu" else "none",
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4)
    return out


def _check(x, num_groups, weight, bias, activation, out=None):
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    if x.dim() < 3:
        raise ValueError(f"group_norm: x must be N×C×H×W, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (tuple(p.shape) != (c,) or p.device != x.device):
            raise ValueError(f"group_norm: {name} must have shape ({c},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")
        if p is not None and c > 1 and p.stride(0) != 1:
            raise ValueError(f"group_norm: {name} must be contiguous")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype
                            or out.device != x.device):
        raise ValueError(f"group_norm: out must be {tuple(x.shape)} {x.dtype} on {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


def group_norm(x, num_groups, weight, bias, eps=1e-5, activation=None, *, out=None):
    """GroupNorm of ``x`` (N×C×H×W, contiguous or channels_last), then ``activation``.

    The result has x's memory format. ``out``, if given, receives it and is returned: a buffer
    allocated once by the caller.
    """
    _check(x, num_groups, weight, bias, activation, out)
    if use_triton(x):
        return _group_norm_triton(x, num_groups, weight, bias, eps, activation, out)
    y = group_norm_reference(x, num_groups, weight, bias, eps, activation)
    return y if out is None else out.copy_(y)
