"""UNet2DConditionModel for SD 1.x / 2.x, with diffusers' parameter names."""
from dataclasses import dataclass, fields

import torch
from torch import nn

from sdrt import kernels

from .configs import MAX_LAYERS, MAX_POSITIONS, ConfigCheck
from .errors import SdrtError
from .layers import (Attention, Downsample2D, GroupNorm, LayerNorm, ResnetBlock2D,
                     TimestepEmbedding, Upsample2D, norm_silu_conv, timestep_embedding)


class GuidedTimestepEmbedding(TimestepEmbedding):
    """diffusers' ``TimestepEmbedding(cond_proj_dim=...)``: a guidance-distilled (LCM) UNet adds
    a projection of its guidance-scale embedding to the sinusoidal timestep features before
    ``linear_1``."""

    def __init__(self, in_dim, dim, cond_dim):
        super().__init__(in_dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)

    def forward(self, x, condition=None):  # x: (B, in_dim), condition: (B, cond_dim)
        if condition is not None:
            x = x + self.cond_proj(condition)
        return super().forward(x)


def per_block(value, n, name):
    """A config entry that is one value for all blocks or a list with one per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SdrtError(f"unet config: {name} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


@dataclass
class UNetConfig:
    """The fields of a diffusers UNet2DConditionModel ``config.json`` that SD 1.x/2.x use."""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int = 1
    attention_head_dim: int = 8
    num_attention_heads: int = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    class_embed_type: str = None
    addition_embed_type: str = None
    time_embedding_type: str = "positional"
    time_cond_proj_dim: int = None
    dual_cross_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, d):
        """The config of a ``config.json`` dict, every value checked before anything is built
        (``SdrtError`` naming the key)."""
        d = ConfigCheck("unet").dict(d)
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg._check()
        return cfg

    def _check(self):
        unsupported = {
            "class_embed_type": self.class_embed_type is not None,
            "addition_embed_type": self.addition_embed_type is not None,
            "dual_cross_attention": bool(self.dual_cross_attention),
            "only_cross_attention": bool(self.only_cross_attention),
            "resnet_time_scale_shift": self.resnet_time_scale_shift != "default",
            "time_embedding_type": self.time_embedding_type != "positional",
            "act_fn": self.act_fn != "silu",
            "conv_in_kernel": self.conv_in_kernel != 3 or self.conv_out_kernel != 3,
            "mid_block_type": self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise SdrtError(f"unet config: unsupported setting {bad[0]} (sdrt runs SD 1.x/2.x UNets)")
        check = ConfigCheck("unet")
        check.names("down_block_types", self.down_block_types,
                    {"CrossAttnDownBlock2D", "DownBlock2D"})
        n = len(self.down_block_types)
        check.names("up_block_types", self.up_block_types, {"CrossAttnUpBlock2D", "UpBlock2D"})
        if len(self.up_block_types) != n:
            check.fail("up_block_types", f"a list of {n} (as many as down_block_types)",
                       self.up_block_types)
        channels = check.integers("block_out_channels", self.block_out_channels, n)
        for key in ("in_channels", "out_channels", "cross_attention_dim"):
            check.integer(key, getattr(self, key))
        check.integer("sample_size", self.sample_size, hi=MAX_POSITIONS)
        check.integer("layers_per_block", self.layers_per_block, hi=MAX_LAYERS)
        if self.time_cond_proj_dim is not None:
            check.integer("time_cond_proj_dim", self.time_cond_proj_dim)
        check.integers("transformer_layers_per_block", self.transformer_layers_per_block, n,
                       hi=MAX_LAYERS, scalar=True)
        check.integer("downsample_padding", self.downsample_padding, lo=0, hi=1)
        groups = check.integer("norm_num_groups", self.norm_num_groups)
        check.divides("norm_num_groups", groups, "block_out_channels", channels)
        key = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        heads = check.integers(key, getattr(self, key), n, scalar=True)
        for c, h in zip(channels, per_block(heads, n, key)):
            if c % h:
                check.fail(key, f"a divisor of each block_out_channels entry (the number of "
                           f"heads; {c} channels do not split into {h})", getattr(self, key))
        check.number("norm_eps", self.norm_eps, positive=True)
        check.number("freq_shift", self.freq_shift)
        check.number("mid_block_scale_factor", self.mid_block_scale_factor)
        for key in ("center_input_sample", "flip_sin_to_cos", "use_linear_projection",
                    "upcast_attention"):
            check.flag(key, getattr(self, key))

    @property
    def heads(self):
        # diffusers' naming quirk: for SD, "attention_head_dim" holds the number of heads.
        n = len(self.down_block_types)
        return per_block(self.num_attention_heads or self.attention_head_dim, n, "heads")


class BasicTransformerBlock(nn.Module):
    """LayerNorm → self-attention, LayerNorm → cross-attention, LayerNorm → GEGLU feed-forward."""

    def __init__(self, dim, heads, head_dim, context_dim):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):  # x: (B, S, dim), context: (B, 77, context_dim)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class GEGLUProj(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        return kernels.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # diffusers' layout: net.0 = GEGLU projection, net.1 = dropout, net.2 = output linear.
        self.net = nn.ModuleList([GEGLUProj(dim, dim * mult), nn.Identity(),
                                  nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class Transformer2DModel(nn.Module):
    """GroupNorm, projection in, transformer blocks over pixels, projection out, + residual."""

    def __init__(self, channels, heads, context_dim, layers, groups, linear_projection):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, 1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else \
            (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim)
            for _ in range(layers))
        self.proj_out = proj()

    def forward(self, x, context):  # x: (B, C, H, W)
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear_projection:
            y = self.proj_in(y)
        # (B, HW, C); free when x is channels_last, a copy when it is NCHW (layer_norm and the
        # attention kernel read rows with a contiguous last dimension).
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
        if self.linear_projection:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear_projection:
            y = self.proj_out(y)
        return x + y


class UNetBlock(nn.Module):
    """One level of the UNet: ResNet blocks, optional transformers, optional resampler.

    Covers diffusers' CrossAttnDownBlock2D / DownBlock2D / CrossAttnUpBlock2D / UpBlock2D,
    which differ only in those three choices and in the skip connections of the up path.
    """

    def __init__(self, resnet_channels, out_channels, temb, cfg, heads, layers, attn, resample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, out_channels, temb, cfg.norm_num_groups, cfg.norm_eps)
            for c in resnet_channels)
        if attn:
            self.attentions = nn.ModuleList(
                Transformer2DModel(out_channels, heads, cfg.cross_attention_dim, layers,
                                   cfg.norm_num_groups, cfg.use_linear_projection)
                for _ in resnet_channels)
        else:
            self.attentions = None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels,
                                                            cfg.downsample_padding)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def _layer(self, i, x, temb, context):
        x = self.resnets[i](x, temb)
        return x if self.attentions is None else self.attentions[i](x, context)

    def down(self, x, temb, context):
        """Returns the output and the skip tensors it hands to the up path."""
        skips = []
        for i in range(len(self.resnets)):
            x = self._layer(i, x, temb, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def up(self, x, skips, temb, context, size=None):
        for i in range(len(self.resnets)):
            x = self._layer(i, torch.cat([x, skips.pop()], dim=1), temb, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock(nn.Module):
    def __init__(self, channels, temb, cfg, heads, layers):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb, groups, eps)
                                     for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(
            channels, heads, cfg.cross_attention_dim, layers, groups, cfg.use_linear_projection)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DConditionModel(nn.Module):
    """Predicts noise (or v) from latents (B, 4, h, w), timesteps and text states (B, 77, D)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = list(cfg.block_out_channels)
        n = len(ch)
        heads = cfg.heads
        layers = per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = (TimestepEmbedding(ch[0], temb) if cfg.time_cond_proj_dim is None
                               else GuidedTimestepEmbedding(ch[0], temb, cfg.time_cond_proj_dim))

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            c_in = ch[max(i - 1, 0)]
            resnet_in = [c_in] + [ch[i]] * (cfg.layers_per_block - 1)
            self.down_blocks.append(UNetBlock(
                resnet_in, ch[i], temb, cfg, heads[i], layers[i], kind.startswith("CrossAttn"),
                "down" if i < n - 1 else None))

        self.mid_block = (UNetMidBlock(ch[-1], temb, cfg, heads[-1], layers[-1])
                          if cfg.mid_block_type else None)

        rch, rheads, rlayers = ch[::-1], heads[::-1], layers[::-1]
        self.up_blocks = nn.ModuleList()
        prev = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            out, skip_in = rch[i], rch[min(i + 1, n - 1)]
            k = cfg.layers_per_block + 1
            # Skip channels: the down path's outputs in reverse; the last one of each level
            # comes from the level below (or conv_in).
            resnet_in = [(prev if j == 0 else out) + (skip_in if j == k - 1 else out)
                         for j in range(k)]
            self.up_blocks.append(UNetBlock(
                resnet_in, out, temb, cfg, rheads[i], rlayers[i], kind.startswith("CrossAttn"),
                "up" if i < n - 1 else None))
            prev = out

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gn_silu_conv = kernels.group_norm_silu_conv2d

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        """sample (B, C, h, w); timestep 0-d or (B,); encoder_hidden_states (B, T, D);
        timestep_cond (B, time_cond_proj_dim), the guidance-scale embedding of a
        guidance-distilled UNet (config ``time_cond_proj_dim``), or None."""
        cfg = self.config
        t = timestep.reshape(-1).expand(sample.shape[0])
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                 cfg.freq_shift).to(sample.dtype)
        if timestep_cond is None:
            emb = self.time_embedding(emb)  # (B, 4·C0)
        else:
            if cfg.time_cond_proj_dim is None:
                raise SdrtError("timestep_cond was given, but this UNet has no "
                                "time_cond_proj_dim (it is not guidance-distilled)")
            emb = self.time_embedding(emb, timestep_cond)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = block.down(x, emb, encoder_hidden_states)
            skips += s
        if self.mid_block is not None:
            x = self.mid_block(x, emb, encoder_hidden_states)
        for block in self.up_blocks:
            level = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # Upsample to the next skip's size so odd latent sizes line up with the down path.
            size = skips[-1].shape[2:] if skips else None
            x = block.up(x, level, emb, encoder_hidden_states, size)
        return norm_silu_conv(self, self.conv_norm_out, self.conv_out, x)
