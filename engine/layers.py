"""Building blocks shared by the UNet and the VAE, with diffusers' parameter names.

Every GroupNorm, attention, LayerNorm and GEGLU goes through ``sdrt.kernels``, so the
Triton backend swaps in underneath without touching this file.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdrt import kernels

from .errors import SdrtError


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` parameters, computed by ``kernels.group_norm`` (optionally + SiLU)."""

    def forward(self, x, activation=None):
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
    """Sinusoidal embedding of timesteps ``t`` (B,) → (B, dim), in float32 (DDPM / diffusers)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Ops:
    """The kernel paths of one model, chosen explicitly: a model builds one ``Ops`` (or is given
    one) and hands it to each module that runs a fused op, so the path is decided in one place
    instead of by rewriting module attributes.

    ``gn_silu_conv(x, weight, bias, groups, conv_weight, conv_bias, eps=, add=, padding=,
    padding_mode=)`` computes ``conv2d(silu(group_norm(x))) + add``, padded as the conv
    module's ``padding_mode`` says (``set_seamless``). The default is
    ``kernels.group_norm_silu_conv2d`` (the fused Triton kernel where it runs, plain PyTorch on
    the CPU); on a GPU the pipeline sets a per-shape chooser between it and group_norm + cuDNN
    (``use_conv_chooser``).
    """

    def __init__(self, gn_silu_conv=None):
        self.gn_silu_conv = gn_silu_conv or kernels.group_norm_silu_conv2d


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv3×3 (+ time embedding) → GroupNorm → SiLU → conv3×3, + shortcut.

    Both halves run as ``ops.gn_silu_conv``: the time embedding and the residual are added in
    the convolution's epilogue.
    """

    def __init__(self, in_channels, out_channels, temb_channels, groups, eps, ops: Ops = None):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.ops = ops or Ops()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def forward(self, x, temb=None):
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.ops.gn_silu_conv(x, self.norm1.weight, self.norm1.bias, self.groups,
                                  self.conv1.weight, self.conv1.bias, eps=self.eps, add=t,
                                  padding_mode=self.conv1.padding_mode)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return self.ops.gn_silu_conv(h, self.norm2.weight, self.norm2.bias, self.groups,
                                     self.conv2.weight, self.conv2.bias, eps=self.eps,
                                     add=shortcut, padding_mode=self.conv2.padding_mode)


def use_conv_chooser(model, chooser):
    """Run every GroupNorm+SiLU+conv of ``model`` through ``chooser`` (a ``ConvPathChooser``):
    set on the one ``Ops`` the model gave its modules (a model without one, such as a text
    encoder, has no such conv). Off the CPU (a GPU, or the meta device that stands in for one
    in a launch walk), also give the conv weights the layout the fused kernel reads
    (``channels_last_conv_weights``), once, here at load."""
    if getattr(model, "ops", None) is not None:
        model.ops.gn_silu_conv = chooser
    if any(p.device.type != "cpu" for p in model.parameters()):
        channels_last_conv_weights(model)


def channels_last_conv_weights(model):
    """Give every ``nn.Conv2d`` weight of ``model`` channels_last storage, in place.

    The parameter keeps its logical (Cout, Cin, KH, KW) shape, name and values (state_dict and
    ONNX export are unchanged); only the storage becomes (Cout, KH, KW, Cin), where one tap's
    input channels are contiguous: the fused GroupNorm+SiLU conv then loads weight tiles as
    16-byte vectors (OIHW would be 2-byte loads 9 elements apart, or a copy per call), and
    cuDNN runs channels_last weights natively, with a channels_last output, so the activations
    after ``conv_in`` are channels_last too. Not done on the CPU, where the layout changes the
    order of the convolution's sums and the fused kernel does not run.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)


def norm_silu_conv(ops, norm, conv, x):
    """``conv(silu(norm(x)))`` through ``ops.gn_silu_conv``: the output head of the UNet and
    of the VAE's encoder and decoder."""
    return ops.gn_silu_conv(x, norm.weight, norm.bias, norm.num_groups, conv.weight,
                            conv.bias, eps=norm.eps, padding=conv.padding[0],
                            padding_mode=conv.padding_mode)


def set_seamless(model, on):
    """A1111's "Tiling": every ``nn.Conv2d`` of ``model`` pads circularly (``on``), reading
    past a border from the opposite one, so that the picture the model makes tiles without
    seams; or with zeros again. The fused GroupNorm+SiLU convolutions follow their conv
    modules' ``padding_mode``. (Unpadded ones, 1×1 and the VAE encoder's explicitly padded
    downsamplers, are left as they are: they read no border.)"""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and any(m.padding):
            m.padding_mode = "circular" if on else "zeros"


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. ``padding=0`` is the VAE's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2× upsampling (to ``size`` when given, for odd latent sizes), then a 3×3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


@dataclass(frozen=True)
class ImagePrompt:
    """A cross-attention context with IP-Adapter image tokens: what a UNet whose attention
    layers carry adapters (``ip_adapter.attach``) passes down in place of the text states."""
    states: torch.Tensor  # (B, T, D) text states
    tokens: tuple         # per adapter: (B, n, D) image tokens
    scales: torch.Tensor  # (B, layers, adapters): each adapter's scale in each layer, per row
    # Regional adapters: per adapter (B, images, Σ h·w), each image's weight at the queries
    # of every level's (h, w) grid, in ``grids``' order (0 images: not regional); or ().
    regions: tuple = ()
    grids: tuple = ()

    def region(self, adapter, queries):
        """Adapter ``adapter``'s (B, images, queries) weights at a layer of ``queries``
        queries, or None when it is not regional."""
        if not self.regions or self.regions[adapter].shape[1] == 0:
            return None
        return self.regions[adapter][..., grid_slice(self.grids, queries)]


def level_grids(height, width, levels):
    """The (h, w) grid of each of a UNet's ``levels`` levels for a (height, width) sample:
    each down level halves it, rounding up (a 3x3 convolution of stride 2, padding 1)."""
    grids = [(height, width)]
    for _ in range(levels - 1):
        h, w = grids[-1]
        grids.append(((h + 1) // 2, (w + 1) // 2))
    return tuple(grids)


def grid_weights(masks, grids, mode):
    """Masks (N, 1, H, W) brought to every grid of ``grids`` by ``mode`` ("bilinear" or
    "bicubic"; align_corners off, no antialiasing, straight from the mask), flattened and
    joined: (N, Σ h·w). A region mask's weights at every level of the UNet."""
    return torch.cat([F.interpolate(masks, size=g, mode=mode).flatten(1) for g in grids], dim=1)


def grid_slice(grids, size):
    """The slice of ``grid_weights``' last axis that holds the grid of ``size`` positions
    (h·w)."""
    start = 0
    for h, w in grids:
        if h * w == size:
            return slice(start, start + size)
        start += h * w
    raise SdrtError(f"no level of the UNet has {size} positions (grids {grids})")


class Attention(nn.Module):
    """Multi-head attention with diffusers' names: to_q, to_k, to_v, to_out.0.

    Self-attention when ``context`` is None, cross-attention over ``context`` otherwise. An
    ``ImagePrompt`` context adds, per IP-Adapter in ``image_kv`` (its ``to_k_ip``/``to_v_ip``
    for this layer), ``scale · attention(q, image keys, image values)`` to the attention over
    the text, before ``to_out`` (diffusers' ``IPAdapterAttnProcessor``), ``scale`` this
    layer's (``image_layer``: its row of the scales).
    """

    def __init__(self, dim, heads, head_dim, context_dim=None, bias=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.image_kv = None  # IP-Adapters' keys and values of this layer (ip_adapter.attach)
        self.image_layer = None  # and the layer's index among the UNet's cross-attentions
        # perturbed-attention guidance: (B,) bool, the rows whose self-attention gives the
        # values as they are (an identity attention map), or None (set for one UNet call)
        self.identity_rows = None

    def _heads(self, t):  # (B, T, H·D) → (B, H, T, D)
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, context=None):  # x: (B, S, dim), context: (B, T, context_dim)
        image = None
        if isinstance(context, ImagePrompt):
            image, context = context, context.states
        context = x if context is None else context
        b, s, _ = x.shape
        scale = self.head_dim ** -0.5
        q = self._heads(self.to_q(x))  # (B, H, S, D)
        v = self._heads(self.to_v(context))
        o = kernels.attention(q, self._heads(self.to_k(context)), v, scale=scale)  # (B, H, S, D)
        if self.identity_rows is not None:  # (PAG's perturbed rows: the values as they are)
            o = torch.where(self.identity_rows[:, None, None, None], v, o)
        if image is not None and self.image_kv is not None:
            for i, (kv, tokens) in enumerate(zip(self.image_kv, image.tokens)):
                k_ip, v_ip = self._heads(kv.to_k_ip(tokens)), self._heads(kv.to_v_ip(tokens))
                scales = image.scales[:, self.image_layer, i, None, None, None].to(o.dtype)
                weights = image.region(i, s)  # (B, images, S) or None
                if weights is None:
                    o = o + scales * kernels.attention(q, k_ip, v_ip, scale=scale)
                    continue
                # Regional: each image's tokens attended alone, weighed at each query.
                n = weights.shape[1]
                for j, (k_j, v_j) in enumerate(zip(k_ip.chunk(n, dim=2), v_ip.chunk(n, dim=2))):
                    o_j = kernels.attention(q, k_j.contiguous(), v_j.contiguous(), scale=scale)
                    o = o + scales * weights[:, j, None, :, None].to(o.dtype) * o_j
        return self.to_out[0](o.transpose(1, 2).reshape(b, s, -1))


class SpatialSelfAttention(Attention):
    """The VAE's single-head attention over pixels, with its own GroupNorm and residual."""

    def __init__(self, channels, groups, eps):
        super().__init__(channels, 1, channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps)

    def forward(self, x):  # x: (B, C, H, W)
        b, c, h, w = x.shape
        y = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        y = super().forward(y)
        return x + y.transpose(1, 2).reshape(b, c, h, w)
