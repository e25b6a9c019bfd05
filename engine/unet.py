"""UNet2DConditionModel for SD 1.x / 2.x and SDXL, with diffusers' parameter names."""
from dataclasses import dataclass, fields

import torch
from torch import nn

from sdrt import kernels

from .configs import MAX_LAYERS, MAX_POSITIONS, ConfigCheck
from .errors import SdrtError
from .layers import (Attention, Downsample2D, GroupNorm, ImagePrompt, LayerNorm, Ops,
                     ResnetBlock2D, TimestepEmbedding, Upsample2D, level_grids, norm_silu_conv,
                     timestep_embedding)


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


class Timesteps(nn.Module):
    """diffusers' ``Timesteps``: the sinusoidal features of each number, in float32. No
    parameters; a module so that SDXL's ``add_time_proj`` sits where diffusers has it."""

    def __init__(self, dim, flip_sin_to_cos, freq_shift):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t):  # t: (N,) → (N, dim)
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


def per_block(value, n, name):
    """A config entry that is one value for all blocks or a list with one per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SdrtError(f"unet config: {name} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


def _exactly(*values):
    """A test for one of ``values`` where True is not 1 and 1.0 is 1, as JSON reads them."""
    return lambda v: any(v == x and isinstance(v, bool) == isinstance(x, bool) for x in values)


# diffusers' UNet2DConditionModel settings (its __init__ arguments) that sdrt does not
# implement, each with the values at which it leaves diffusers' computation as sdrt does it
# (its default, or a value diffusers treats the same). Any other value is refused by name:
# a model built without it would load and run, and compute something else.
_FIXED = {
    "act_fn": ("'silu'", _exactly("silu")),
    "class_embed_type": ("null", _exactly(None)),
    "num_class_embeds": ("null", _exactly(None)),          # a class-label nn.Embedding
    "class_embeddings_concat": ("false", _exactly(False)),
    "encoder_hid_dim": ("null", _exactly(None)),           # a projection of the text states
    "encoder_hid_dim_type": ("null", _exactly(None)),
    "dual_cross_attention": ("false", _exactly(False)),
    # Per-level lists of false are the same as false (checked against the level count below).
    "only_cross_attention": ("false", lambda v: v is False or (
        isinstance(v, list) and all(x is False for x in v))),
    "mid_block_only_cross_attention": ("null or false", _exactly(None, False)),
    "resnet_time_scale_shift": ("'default'", _exactly("default")),
    "resnet_skip_time_act": ("false", _exactly(False)),
    "resnet_out_scale_factor": ("1", _exactly(1)),
    "mid_block_scale_factor": ("1", _exactly(1)),         # the mid ResNets' output divisor
    "time_embedding_type": ("'positional'", _exactly("positional")),
    "time_embedding_dim": ("null", _exactly(None)),
    "time_embedding_act_fn": ("null", _exactly(None)),
    "timestep_post_act": ("null", _exactly(None)),
    "conv_in_kernel": ("3", _exactly(3)),
    "conv_out_kernel": ("3", _exactly(3)),
    "attention_type": ("'default'", _exactly("default")),  # GLIGEN's gated attention
    "cross_attention_norm": ("null", _exactly(None)),
}

# Settings that do not change the computation at any value: dropout (inference runs in eval
# mode) and the head count of the "text" added embedding, which is the only one that reads it
# (sdrt refuses addition_embed_type "text"). sample_size, the training resolution, is a field:
# the pipeline's default image size.
_NO_EFFECT = {"dropout", "addition_embed_type_num_heads"}


@dataclass
class UNetConfig:
    """The settings of a diffusers UNet2DConditionModel ``config.json`` that sdrt implements.

    ``from_dict`` accepts a whole ``config.json``: diffusers' settings sdrt does not implement
    are accepted only where they leave the computation unchanged (``_FIXED``, ``_NO_EFFECT``,
    keys starting with "_"); any other key is refused by name."""
    COMPONENT = "unet"  # the name its refusals start with
    MODEL_CLASS = "UNet2DConditionModel"
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    # An int, or one entry per level: an int, or (with reverse_transformer_layers_per_block)
    # a list with one count per ResNet of the level.
    transformer_layers_per_block: int = 1
    # The up path's counts, level by level from the bottom (default: the down path's,
    # reversed); each entry an int or a list with one count per ResNet of the up level.
    reverse_transformer_layers_per_block: list = None
    attention_head_dim: int = 8
    num_attention_heads: int = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_cond_proj_dim: int = None
    # SDXL: "text_time" adds an embedding of the pooled text (B, P) and the sinusoidal
    # features (addition_time_embed_dim each) of K micro-conditioning numbers, P + K·dim wide.
    addition_embed_type: str = None
    addition_time_embed_dim: int = None
    projection_class_embeddings_input_dim: int = None

    @classmethod
    def from_dict(cls, d):
        """The config of a ``config.json`` dict, every value checked before anything is built
        (``SdrtError`` naming the key)."""
        what = cls.COMPONENT
        d = ConfigCheck(what).dict(d)
        names = {f.name for f in fields(cls)}
        for key, value in d.items():
            if not isinstance(key, str):
                raise SdrtError(f"{what} config: key {key!r} is not a string")
            if key.startswith("_") or key in names:
                continue
            if key in _NO_EFFECT:
                if key == "dropout":
                    ConfigCheck(what).number(key, value)
                continue
            if key not in _FIXED:
                raise SdrtError(f"{what} config: unsupported setting {key} (not a "
                                f"{cls.MODEL_CLASS} setting sdrt knows; it may change the "
                                f"computation)")
            allowed, ok = _FIXED[key]
            if not ok(value):
                raise SdrtError(f"{what} config: unsupported setting {key}={value!r} (sdrt "
                                f"implements only {allowed})")
        only = d.get("only_cross_attention", False)
        if isinstance(only, list) and len(only) != len(d.get("down_block_types",
                                                             cls.down_block_types)):
            ConfigCheck(what).fail("only_cross_attention", "false or a list with one entry "
                                     "per down block", only)
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg._check()
        return cfg

    def _check(self):
        check = ConfigCheck(self.COMPONENT)
        if self.addition_embed_type not in (None, "text_time"):
            raise SdrtError(f"{self.COMPONENT} config: unsupported setting addition_embed_type="
                            f"{self.addition_embed_type!r} (sdrt implements only null or "
                            f"'text_time')")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise SdrtError(f"{self.COMPONENT} config: unsupported setting mid_block_type="
                            f"{self.mid_block_type!r} (sdrt implements only "
                            f"'UNetMidBlock2DCrossAttn' or null)")
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
        self._check_transformer_layers(check, n)
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
        for key in ("center_input_sample", "flip_sin_to_cos", "use_linear_projection",
                    "upcast_attention"):
            check.flag(key, getattr(self, key))
        added = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        for key in added:
            if self.addition_embed_type == "text_time":
                check.integer(key, getattr(self, key))
            elif getattr(self, key) is not None:
                raise SdrtError(f"{self.COMPONENT} config: unsupported setting "
                                f"{key}={getattr(self, key)!r} "
                                f"without addition_embed_type 'text_time'")

    def _check_transformer_layers(self, check, n):
        """diffusers' rules: per-ResNet lists only with an explicit up path; a list for a
        level has one entry per ResNet of that level where the level has attention."""
        down = self.transformer_layers_per_block
        reverse = self.reverse_transformer_layers_per_block
        key = "transformer_layers_per_block"

        def level(key, value, count, used):
            if isinstance(value, (list, tuple)):
                check.integers(key, value, hi=MAX_LAYERS)
                if used and len(value) != count:
                    check.fail(key, f"one entry per ResNet of a level ({count}) in its "
                               f"per-ResNet lists", value)
            else:
                check.integer(key, value, hi=MAX_LAYERS)

        if not isinstance(down, (list, tuple)):
            check.integer(key, down, hi=MAX_LAYERS)
        else:
            if len(down) != n:
                check.fail(key, f"an integer or a list of {n} entries", down)
            nested = any(isinstance(v, (list, tuple)) for v in down)
            if nested and reverse is None:
                check.fail(key, "a list of integers unless reverse_transformer_layers_per_block "
                           "is given (diffusers' rule for asymmetric UNets)", down)
            for kind, value in zip(self.down_block_types, down):
                level(key, value, self.layers_per_block, kind.startswith("CrossAttn"))
        if reverse is not None:
            key = "reverse_transformer_layers_per_block"
            if not isinstance(reverse, (list, tuple)) or len(reverse) != n:
                check.fail(key, f"null or a list of {n} entries", reverse)
            for kind, value in zip(self.up_block_types, reverse):
                level(key, value, self.layers_per_block + 1, kind.startswith("CrossAttn"))

    @property
    def heads(self):
        # diffusers' naming quirk: for SD, "attention_head_dim" holds the number of heads.
        n = len(self.down_block_types)
        return per_block(self.num_attention_heads or self.attention_head_dim, n, "heads")

    @property
    def transformer_layers(self):
        """(down, mid, up): the transformer layers after each ResNet, as diffusers builds them.

        ``down[i]`` has one count per ResNet of down level i, ``up[i]`` one per ResNet of up
        level i (from the bottom); ``mid`` is the mid block's count, the last level's (its
        first entry, where that is a per-ResNet list)."""
        n, k = len(self.down_block_types), self.layers_per_block
        down = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        up = (down[::-1] if self.reverse_transformer_layers_per_block is None
              else list(self.reverse_transformer_layers_per_block))
        expand = lambda v, count: list(v) if isinstance(v, (list, tuple)) else [v] * count
        mid = down[-1][0] if isinstance(down[-1], (list, tuple)) else down[-1]
        return [expand(v, k) for v in down], mid, [expand(v, k + 1) for v in up]


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

    def __init__(self, resnet_channels, out_channels, temb, cfg, heads, layers, attn, resample,
                 ops):
        """``layers``: the transformer layers after each ResNet (one count per ResNet)."""
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, out_channels, temb, cfg.norm_num_groups, cfg.norm_eps, ops)
            for c in resnet_channels)
        if attn:
            self.attentions = nn.ModuleList(
                Transformer2DModel(out_channels, heads, cfg.cross_attention_dim, depth,
                                   cfg.norm_num_groups, cfg.use_linear_projection)
                for depth in layers)
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

    def down(self, x, temb, context, feature=None):
        """Returns the output and the skip tensors it hands to the up path. ``feature``, a
        T2I-Adapter's for this level, is added where diffusers adds it: in a block with
        attention after its last layer (before the downsampler), in one without to its
        output (which is also its last skip tensor)."""
        skips = []
        attend = self.attentions is not None
        for i in range(len(self.resnets)):
            x = self._layer(i, x, temb, context)
            if feature is not None and attend and i == len(self.resnets) - 1:
                x = x + feature
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        if feature is not None and not attend:
            x = skips[-1] = x + feature
        return x, skips

    def up(self, x, skips, temb, context, size=None, freeu=None):
        """``freeu``: (``freeu.FreeU``, this level's index from the bottom, the UNet's first
        level's channels), applied to each ResNet's backbone and skip; or None."""
        for i in range(len(self.resnets)):
            skip = skips.pop()
            if freeu is not None:
                x, skip = freeu[0].apply(x, skip, *freeu[1:])
            x = self._layer(i, torch.cat([x, skip], dim=1), temb, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock(nn.Module):
    def __init__(self, channels, temb, cfg, heads, layers, ops):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb, groups, eps, ops)
                                     for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(
            channels, heads, cfg.cross_attention_dim, layers, groups, cfg.use_linear_projection)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNetEncoder(nn.Module):
    """The part of the UNet a ControlNet copies: the time (and SDXL's added) embedding,
    ``conv_in``, the down path and the mid block, with diffusers' names."""

    def __init__(self, cfg: UNetConfig, ops: Ops = None):
        """``ops``: the kernel paths its modules run (``layers.Ops``; default: a new one)."""
        super().__init__()
        self.config = cfg
        self.ops = ops = ops or Ops()
        ch = list(cfg.block_out_channels)
        n = len(ch)
        heads = cfg.heads
        down_layers, mid_layers, _ = cfg.transformer_layers
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = (TimestepEmbedding(ch[0], temb) if cfg.time_cond_proj_dim is None
                               else GuidedTimestepEmbedding(ch[0], temb, cfg.time_cond_proj_dim))
        if cfg.addition_embed_type == "text_time":
            # SDXL: sinusoidal features of each micro-conditioning number (sizes, crop,
            # aesthetic score), concatenated after the pooled text embedding and embedded to
            # the time embedding's width: (B, P + K·addition_time_embed_dim) → (B, 4·C0).
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                           cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim,
                                                   temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            c_in = ch[max(i - 1, 0)]
            resnet_in = [c_in] + [ch[i]] * (cfg.layers_per_block - 1)
            self.down_blocks.append(UNetBlock(
                resnet_in, ch[i], temb, cfg, heads[i], down_layers[i],
                kind.startswith("CrossAttn"), "down" if i < n - 1 else None, ops))

        self.mid_block = (UNetMidBlock(ch[-1], temb, cfg, heads[-1], mid_layers, ops)
                          if cfg.mid_block_type else None)

    def embed(self, sample, timestep, timestep_cond=None, text_embeds=None, time_ids=None):
        """The time embedding (B, 4·C0) of each row, SDXL's added embedding included (see
        ``UNet2DConditionModel.forward`` for the inputs)."""
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
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._added_embedding(sample.shape[0], text_embeds, time_ids, emb.dtype)
        else:
            for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
                if value is not None:
                    raise SdrtError(f"{name} was given, but this UNet has no added text-time "
                                    f"embedding (config addition_embed_type is "
                                    f"{cfg.addition_embed_type!r}, not 'text_time')")
        return emb

    def encode(self, x, emb, context, features=()):
        """``conv_in``'s output ``x`` (B, C0, h, w) through the down path and the mid block:
        the result and the skip tensors, in the order the down path makes them (diffusers'
        ``down_block_res_samples``). ``features``: a T2I-Adapter's, one per down block and
        (SDXL's) one for the mid block's output (diffusers'
        ``down_intrablock_additional_residuals``)."""
        skips = [x]
        features = list(features)
        for block in self.down_blocks:
            x, s = block.down(x, emb, context, features.pop(0) if features else None)
            skips += s
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        if features:
            if features[0].shape != x.shape:
                raise SdrtError(f"a T2I-Adapter feature of shape {tuple(features[0].shape)} is "
                                f"left over for the mid block's output "
                                f"{tuple(x.shape)} (an adapter for another architecture?)")
            x = x + features.pop(0)
        return x, skips

    def _added_embedding(self, batch, text_embeds, time_ids, dtype):
        """SDXL's added embedding (B, 4·C0): ``add_embedding`` of the pooled text (B, P) and
        the sinusoidal features of each time id, flattened per row (B, K·dim). The shapes are
        checked here, on the host, so that a wrong input is one line naming it rather than a
        matmul error deep in the model."""
        cfg = self.config
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            if value is None:
                raise SdrtError(f"this UNet (addition_embed_type 'text_time', SDXL) needs "
                                f"{name}: pass text_embeds (B, P), the pooled text embedding, "
                                f"and time_ids (B, K), the micro-conditioning numbers")
            if value.dim() != 2 or value.shape[0] != batch:
                raise SdrtError(f"{name} must be ({batch}, n) for a sample batch of {batch}, "
                                f"got shape {tuple(value.shape)}")
        width = text_embeds.shape[1] + cfg.addition_time_embed_dim * time_ids.shape[1]
        if width != cfg.projection_class_embeddings_input_dim:
            raise SdrtError(
                f"text_embeds width {text_embeds.shape[1]} + addition_time_embed_dim "
                f"{cfg.addition_time_embed_dim} x {time_ids.shape[1]} time_ids = {width}, but "
                f"the UNet's projection_class_embeddings_input_dim is "
                f"{cfg.projection_class_embeddings_input_dim}")
        time_embeds = self.add_time_proj(time_ids.reshape(-1)).reshape(batch, -1)  # (B, K·dim)
        # Each cast on its own rounds every element as diffusers' cast of the concatenation.
        add = torch.cat([text_embeds.to(dtype), time_embeds.to(dtype)], dim=-1)
        return self.add_embedding(add)


class UNet2DConditionModel(UNetEncoder):
    """Predicts noise (or v) from latents (B, 4, h, w), timesteps and text states (B, T, D);
    SDXL's UNets (``addition_embed_type="text_time"``) also take the pooled text embedding and
    the micro-conditioning numbers (``text_embeds``, ``time_ids``)."""

    def __init__(self, cfg: UNetConfig, ops: Ops = None):
        """``ops``: the kernel paths its modules run (``layers.Ops``; default: a new one)."""
        super().__init__(cfg, ops)
        ch = list(cfg.block_out_channels)
        n = len(ch)
        _, _, up_layers = cfg.transformer_layers
        temb = ch[0] * 4
        rch, rheads = ch[::-1], cfg.heads[::-1]
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
                resnet_in, out, temb, cfg, rheads[i], up_layers[i],
                kind.startswith("CrossAttn"), "up" if i < n - 1 else None, self.ops))
            prev = out

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.image_adapters = 0  # IP-Adapters attached to its attention (ip_adapter.attach)
        self.freeu = None  # freeu.FreeU on the up path, or None

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None,
                text_embeds=None, time_ids=None, down_residuals=None, mid_residual=None,
                adapter_features=(), image_tokens=None, image_scales=None,
                image_regions=None, perturbed=None):
        """sample (B, C, h, w); timestep 0-d or (B,); encoder_hidden_states (B, T, D);
        timestep_cond (B, time_cond_proj_dim), the guidance-scale embedding of a
        guidance-distilled UNet (config ``time_cond_proj_dim``), or None; text_embeds (B, P)
        and time_ids (B, K), required by (and only by) an SDXL UNet
        (``addition_embed_type="text_time"``): the pooled text embedding and the
        micro-conditioning numbers. ``down_residuals`` (one tensor per skip tensor of the
        down path) and ``mid_residual`` are a ControlNet's outputs, added to the skip tensors
        and to the mid block's output (diffusers' ``down_block_additional_residuals`` and
        ``mid_block_additional_residual``); ``adapter_features`` a T2I-Adapter's, added along
        the down path (``encode``). ``image_tokens`` (per attached IP-Adapter, (B, n, D)) and
        ``image_scales`` (B, cross-attention layers, adapters) are the IP-Adapters' image
        prompt; ``image_regions`` (per adapter, (B, images, Σ h·w) over the levels' grids,
        ``ImagePromptRequest.regions``) confines regional adapters to their masks.
        ``perturbed`` (B,) bool: the rows whose mid-block self-attentions give their values
        as they are (perturbed-attention guidance, as diffusers' PAG and ComfyUI's
        PerturbedAttentionGuidance perturb the "mid" layers)."""
        emb = self.embed(sample, timestep, timestep_cond, text_embeds, time_ids)
        context = encoder_hidden_states
        if image_tokens is not None:
            if len(image_tokens) != self.image_adapters or image_scales is None:
                raise SdrtError(f"image_tokens holds {len(image_tokens)} IP-Adapters' tokens "
                                f"(with{'out' if image_scales is None else ''} image_scales) "
                                f"for a UNet with {self.image_adapters} attached")
            grids = level_grids(*sample.shape[2:], len(self.config.block_out_channels))
            context = ImagePrompt(encoder_hidden_states, tuple(image_tokens), image_scales,
                                  tuple(image_regions or ()), grids if image_regions else ())
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        perturbing = [] if perturbed is None or self.mid_block is None else [
            block.attn1 for t in self.mid_block.attentions for block in t.transformer_blocks]
        for attention in perturbing:
            attention.identity_rows = perturbed
        try:
            x, skips = self.encode(self.conv_in(sample), emb, context, adapter_features)
        finally:
            for attention in perturbing:
                attention.identity_rows = None
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise SdrtError(f"down_residuals holds {len(down_residuals)} tensors, but this "
                                f"UNet's down path makes {len(skips)} (a ControlNet for "
                                f"another architecture?)")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            x = x + mid_residual
        first = self.config.block_out_channels[0]
        for i, block in enumerate(self.up_blocks):
            level = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # Upsample to the next skip's size so odd latent sizes line up with the down path.
            size = skips[-1].shape[2:] if skips else None
            x = block.up(x, level, emb, context, size,
                         None if self.freeu is None else (self.freeu, i, first))
        return norm_silu_conv(self.ops, self.conv_norm_out, self.conv_out, x)
