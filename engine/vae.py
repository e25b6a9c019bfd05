"""AutoencoderKL (the SD VAE): encoder to a diagonal Gaussian over latents, decoder back."""
from dataclasses import dataclass, fields

import torch
from torch import nn

from .configs import MAX_LAYERS, MAX_POSITIONS, ConfigCheck
from .errors import SdrtError
from .layers import (Downsample2D, GroupNorm, Ops, ResnetBlock2D, SpatialSelfAttention,
                     Upsample2D, norm_silu_conv)

_EPS = 1e-6  # diffusers' VAE uses 1e-6 in every norm


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float = None
    # Per-channel statistics the latents are standardised with before scaling_factor
    # (Playground v2.5's VAE): (z - mean) * scaling_factor / std.
    latents_mean: tuple = None
    latents_std: tuple = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d):
        """The config of a ``config.json`` dict, every value checked before anything is built
        (``SdrtError`` naming the key)."""
        check = ConfigCheck("vae")
        names = {f.name for f in fields(cls)}
        for key, value in check.dict(d).items():
            if key in names or key.startswith("_"):
                continue
            # A key sdrt does not know: refused, not dropped, so no model decodes differently
            # from how it was trained.
            raise SdrtError(f"vae config: unsupported setting {key}={value!r} (sdrt runs "
                            f"AutoencoderKL without it)")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.act_fn != "silu":
            raise SdrtError(f"vae config: unsupported act_fn {cfg.act_fn}")
        check.names("down_block_types", cfg.down_block_types, {"DownEncoderBlock2D"})
        n = len(cfg.down_block_types)
        check.names("up_block_types", cfg.up_block_types, {"UpDecoderBlock2D"})
        if len(cfg.up_block_types) != n:
            check.fail("up_block_types", f"a list of {n} (as many as down_block_types)",
                       cfg.up_block_types)
        channels = check.integers("block_out_channels", cfg.block_out_channels, n)
        for key in ("in_channels", "out_channels", "latent_channels"):
            check.integer(key, getattr(cfg, key))
        check.integer("sample_size", cfg.sample_size, hi=MAX_POSITIONS)
        check.integer("layers_per_block", cfg.layers_per_block, hi=MAX_LAYERS)
        groups = check.integer("norm_num_groups", cfg.norm_num_groups)
        check.divides("norm_num_groups", groups, "block_out_channels", channels)
        check.number("scaling_factor", cfg.scaling_factor, positive=True)
        if cfg.shift_factor is not None:
            check.number("shift_factor", cfg.shift_factor)
        if (cfg.latents_mean is None) != (cfg.latents_std is None):
            given = "latents_mean" if cfg.latents_std is None else "latents_std"
            check.fail(given, "given with " + ({"latents_mean": "latents_std",
                                                 "latents_std": "latents_mean"}[given]),
                       getattr(cfg, given))
        if cfg.latents_mean is not None:
            if cfg.shift_factor is not None:
                check.fail("shift_factor", "null with latents_mean", cfg.shift_factor)
            for key in ("latents_mean", "latents_std"):
                value = getattr(cfg, key)
                if not isinstance(value, (list, tuple)) or len(value) != cfg.latent_channels:
                    check.fail(key, f"a list of {cfg.latent_channels} numbers (one per latent "
                                    f"channel)", value)
                for v in value:
                    check.number(key, v, positive=key == "latents_std")
            cfg.latents_mean = tuple(float(v) for v in cfg.latents_mean)
            cfg.latents_std = tuple(float(v) for v in cfg.latents_std)
        for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv",
                    "mid_block_add_attention"):
            check.flag(key, getattr(cfg, key))
        return cfg

    @property
    def scale_factor(self):
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEMidBlock(nn.Module):
    def __init__(self, channels, groups, attention, ops):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, _EPS, ops)
                                     for _ in range(2))
        self.attentions = (nn.ModuleList([SpatialSelfAttention(channels, groups, _EPS)])
                           if attention else None)

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEBlock(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: ResNet blocks, then an optional resampler."""

    def __init__(self, resnet_in, out, groups, resample, ops):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c, out, None, groups, _EPS, ops)
                                     for c in resnet_in)
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops: Ops):
        super().__init__()
        ch, g, n = list(cfg.block_out_channels), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.ops = ops
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAEBlock([ch[max(i - 1, 0)]] + [ch[i]] * (cfg.layers_per_block - 1), ch[i], g,
                     "down" if i < n - 1 else None, ops) for i in range(n))
        self.mid_block = VAEMidBlock(ch[-1], g, cfg.mid_block_add_attention, ops)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return norm_silu_conv(self.ops, self.conv_norm_out, self.conv_out, x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops: Ops):
        super().__init__()
        rch, g, n = list(cfg.block_out_channels)[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.ops = ops
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rch[0], g, cfg.mid_block_add_attention, ops)
        self.up_blocks = nn.ModuleList(
            VAEBlock([rch[max(i - 1, 0)]] + [rch[i]] * cfg.layers_per_block, rch[i], g,
                     "up" if i < n - 1 else None, ops) for i in range(n))
        self.conv_norm_out = GroupNorm(g, rch[-1], _EPS)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return norm_silu_conv(self.ops, self.conv_norm_out, self.conv_out, x)


class AutoencoderKL(nn.Module):
    """``ops``: the kernel paths its modules run (``layers.Ops``; default: a new one)."""

    def __init__(self, cfg: VAEConfig, ops: Ops = None):
        super().__init__()
        self.config = cfg
        self.ops = ops or Ops()
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, self.ops)
        self.decoder = Decoder(cfg, self.ops)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if cfg.use_post_quant_conv else None
        # diffusers' enable_tiling: pictures past the config's sample_size (latents past it over
        # the scale factor) go through the networks in overlapping tiles (``tiled``)
        self.tiling = False
        side = cfg.sample_size[0] if isinstance(cfg.sample_size, (list, tuple)) else \
            cfg.sample_size
        self.tile_sample, self.tile_latent = side, int(side / cfg.scale_factor)

    def encode(self, image):
        """Image (B, 3, H, W) in [-1, 1] → (mean, std) of the latent Gaussian, unscaled."""
        if self.tiling and max(image.shape[2:]) > self.tile_sample:
            moments = tiled(image, self._moments, self.tile_sample, self.tile_latent)
        else:
            moments = self._moments(image)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def _moments(self, image):
        moments = self.encoder(image)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def decode(self, z):
        """Unscaled latents (B, 4, h, w) → image (B, 3, H, W), nominally in [-1, 1]."""
        if self.tiling and max(z.shape[2:]) > self.tile_latent:
            return tiled(z, self._decode, self.tile_latent, self.tile_sample)
        return self._decode(z)

    def _decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


OVERLAP = 0.25  # of a tile, as diffusers' tile_overlap_factor


def tiled(x, network, tile_in, tile_out):
    """``network`` (tiles of ``tile_in`` → ``tile_out`` pixels) over ``x`` (B, C, H, W) as
    diffusers' AutoencoderKL runs it tiled: tiles of ``tile_in`` starting every 3/4 of one
    (the last ones cut by the border), each tile's first quarter (of ``tile_out``) blended
    linearly into the tile above it and then into the one on its left (in place, so a tile's
    blended rows and columns are what its neighbours below and right blend with), then the
    first ``tile_out`` · 3/4 of each kept."""
    stride = int(tile_in * (1 - OVERLAP))
    blend, keep = int(tile_out * OVERLAP), tile_out - int(tile_out * OVERLAP)
    rows = [[network(x[:, :, i:i + tile_in, j:j + tile_in])
             for j in range(0, x.shape[3], stride)] for i in range(0, x.shape[2], stride)]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, 2)
            if j > 0:
                _blend(row[j - 1], tile, blend, 3)
    return torch.cat([torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3)
                      for row in rows], dim=2)


def _blend(a, b, extent, dim):
    """b's first ``extent`` rows (``dim`` 2) or columns (3) from a's last ones to its own,
    linearly (weight i / extent on b's), in place."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w = (torch.arange(extent, device=b.device, dtype=torch.float32) / extent).view(shape)
    mixed = a.narrow(dim, a.shape[dim] - extent, extent).float() * (1 - w) + \
        b.narrow(dim, 0, extent).float() * w
    b.narrow(dim, 0, extent).copy_(mixed)
