"""ControlNet (diffusers' ``ControlNetModel``): a trained copy of the UNet's down path and mid
block that reads a control image (edges, depth, pose ...) and hands the UNet one residual per
skip tensor and one for the mid block, each through a zero-initialised 1×1 convolution.

    control image (B, 3, H, W) in [0, 1] → controlnet_cond_embedding → (B, C0, h, w)
    latents → conv_in, + that embedding → down path and mid block (the UNet's, own weights)
    each skip tensor → controlnet_down_blocks[i] (1×1 conv) → × scale → UNet skip i
    mid block output → controlnet_mid_block (1×1 conv) → × scale → after the UNet's mid block

Loaded from a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or
from one ``.safetensors`` file, in diffusers' names or in the original ControlNet repository's
(``control_model.input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``: the files
A1111's and ComfyUI's users download); a single file's architecture is the base UNet's, read
from its weights' shapes where they differ (input channels, the hint encoder's widths).
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ConfigCheck
from .errors import SdrtError
from .layers import Ops
from .unet import UNetConfig, UNetEncoder
from .weights import (SafetensorsFiles, component_weights, load_parameters, read_json,
                      refuse_pickle)

_UP_BLOCK = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
# Keys of control models sdrt does not run, by what they are.
_OTHER_CONTROLS = (("lora_controlnet", "a Control-LoRA (Stability's low-rank ControlNet)"),
                   ("lllite", "a ControlNet-LLLite"),
                   ("style_embedding", "a T2I style adapter (CLIP-vision tokens)"),
                   ("adapter.", "a T2I-Adapter"), ("body.0.", "a T2I-Adapter"))
LDM_PREFIX = "control_model."


@dataclass
class ControlNetConfig(UNetConfig):
    """A diffusers ControlNetModel ``config.json``: the UNet settings of its down path and
    mid block, and the control image's encoder."""
    COMPONENT = "controlnet"
    MODEL_CLASS = "ControlNetModel"
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False  # average each residual over the image (shuffle)

    @classmethod
    def from_dict(cls, d):
        d = ConfigCheck(cls.COMPONENT).dict(d)
        if "up_block_types" not in d:
            # A ControlNet has no up path; the UNet checks want one of the same depth.
            down = d.get("down_block_types", cls.down_block_types)
            if isinstance(down, (list, tuple)):
                d = {**d, "up_block_types": [_UP_BLOCK.get(k, k) for k in reversed(down)]}
        return super().from_dict(d)

    def _check(self):
        super()._check()
        check = ConfigCheck(self.COMPONENT)
        check.integer("conditioning_channels", self.conditioning_channels)
        check.integers("conditioning_embedding_out_channels",
                       self.conditioning_embedding_out_channels)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            check.fail("controlnet_conditioning_channel_order", "'rgb' or 'bgr'",
                       self.controlnet_conditioning_channel_order)
        check.flag("global_pool_conditions", self.global_pool_conditions)


class ControlNetConditioningEmbedding(nn.Module):
    """The control image's encoder: a 3×3 conv, then pairs of 3×3 convs (the second of each
    pair strided by 2), SiLU after each, and a last (zero-initialised) conv to the UNet's
    first width: (B, 3, H, W) → (B, C0, H/8, W/8) for the usual three pairs."""

    def __init__(self, out_channels, in_channels, widths):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(UNetEncoder):
    """Residuals for the UNet from the latents, the timestep, the text states and a control
    image."""

    def __init__(self, cfg: ControlNetConfig, ops: Ops = None):
        super().__init__(cfg, ops)
        ch = cfg.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, list(cfg.conditioning_embedding_out_channels))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in skip_widths(cfg))
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, scales,
                text_embeds=None, time_ids=None):
        """sample (B, C, h, w), the UNet's latent input; controlnet_cond (B, 3, H, W), the
        control image in [0, 1] at the latents' size times the VAE's scale factor; ``scales``
        (n + 1,) or per sample (B, n + 1), float32: the factor of each of the n down residuals
        and of the mid one (``residual_scales``). Returns (down residuals, mid residual), in
        ``sample``'s dtype."""
        cfg = self.config
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        emb = self.embed(sample, timestep, None, text_embeds, time_ids)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        x, skips = self.encode(x, emb, encoder_hidden_states)
        if scales.dim() == 2:  # (B, n + 1): one factor per sample
            scales = scales.t()[:, :, None, None, None].to(sample.dtype)  # (n + 1, B, 1, 1, 1)
        down = [conv(s) * scales[i] for i, (conv, s) in
                enumerate(zip(self.controlnet_down_blocks, skips))]
        mid = self.controlnet_mid_block(x) * scales[-1]
        if cfg.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid

    @property
    def num_residuals(self):
        return len(self.controlnet_down_blocks)


def skip_widths(cfg: UNetConfig):
    """The channels of each skip tensor of the down path, in its order (one ControlNet
    residual each): conv_in's, then per level one per ResNet and one for the downsampler."""
    ch = cfg.block_out_channels
    widths = [ch[0]]
    for i, c in enumerate(ch):
        widths += [c] * (cfg.layers_per_block + (i < len(ch) - 1))
    return widths


# The inputs of a UNet that runs its nets itself (FusedControlNet), per kind: the nets'
# images (N, B, 3, H, W) and their scales (N,).
FUSED_INPUTS = {"controlnet": ("controlnet_images", "controlnet_scales"),
                "adapter": ("adapter_images", "adapter_scales")}


@dataclass(frozen=True)
class FusedControlNet:
    """A ControlNet or T2I-Adapter (``kind`` "controlnet" or "adapter") whose network is part
    of the UNet (an ONNX export's ``--controlnet``): the UNet takes each such net's control
    image and one conditioning scale, and runs it on every call. ``index``: its place among
    the ``count`` nets of its kind in that UNet; ``factors``: how many outputs it scales (a
    ControlNet's residuals and its mid one, an adapter's features). It stands where a
    ``ControlNetModel`` does in a request's settings (``residual_scales``, ``Control``)."""
    name: str
    index: int
    count: int
    config: object  # ControlNetConfig, or adapter.AdapterConfig
    kind: str
    factors: int

    @property
    def num_residuals(self):
        return self.factors - 1

    @property
    def num_features(self):
        return self.factors


_SOFT = 0.825  # the extension's factor per skip, from 0.825^12 at the first to 1 at the mid


def residual_scales(net: ControlNetModel, scale, guess_mode, mode="balanced"):
    """The factors (2, n + 1) of a ControlNet's n down residuals and its mid one at
    conditioning scale ``scale``, for the unconditional (row 0) and the conditional (row 1)
    half of a CFG batch: all ``scale``; in guess mode (without a pooled ControlNet)
    diffusers' ramp from 0.1·scale at the first skip to ``scale`` at the mid block, evenly
    spaced in log10; in control mode "prompt" or "controlnet" the extension's soft ramp,
    ``scale``·0.825^(12 - i) at residual i (from the first skip; SDXL's ten stop at
    0.825^3); in mode "controlnet" none for the unconditional half. A batch without CFG
    takes row 1."""
    n = net.num_residuals + 1
    pooled = net.config.global_pool_conditions
    if guess_mode and not pooled:
        cond = torch.logspace(-1, 0, n) * scale
    elif mode != "balanced":
        cond = _SOFT ** (12.0 - torch.arange(n, dtype=torch.float64)).float() * scale
    else:
        cond = torch.full((n,), float(scale))
    return torch.stack([torch.zeros(n) if mode == "controlnet" else cond, cond])


# UNet settings a ControlNet does not have: its up path and output, and what only the UNet
# applies (the input's centring, the guidance embedding) or reads (the default image size).
_UNET_ONLY = ("up_block_types", "out_channels", "reverse_transformer_layers_per_block",
              "time_cond_proj_dim", "center_input_sample", "sample_size", "conv_out_kernel")


def unet_part(unet_config: dict) -> dict:
    """The settings of a UNet's diffusers config dict that a ControlNet for it shares (its
    down path and mid block), without the private ``_`` keys."""
    return {k: v for k, v in unet_config.items()
            if not k.startswith("_") and k not in _UNET_ONLY}


def _hint_widths(shape_of, conv):
    """The hint encoder's widths from its conv weights (``conv(i)``: the key of conv i)."""
    widths, i = [shape_of(conv(0))[0]], 1
    while conv(i + 1) is not None:  # the pairs; the last conv is conv_out
        widths.append(shape_of(conv(i + 1))[0])
        i += 2
    return widths


def single_file_config(keys, shape_of, unet_config: dict, where):
    """The ControlNet config of one ``.safetensors`` file holding no config: the base UNet's
    (``unet_config``, a diffusers dict) for its down path and mid block, with the input
    channels, the hint encoder's and the added embedding's settings read from the weights.
    Returns (config dict, layout, key prefix): layout ``"diffusers"`` or ``"ldm"``, the
    prefix ``control_model.`` (the original repository's .pth files) or empty."""
    keyset = set(keys)
    for marker, what in _OTHER_CONTROLS:
        if any(marker in k for k in keys):
            raise SdrtError(f"{where}: this file is {what}, not a ControlNet or T2I-Adapter "
                            f"sdrt runs")
    if "controlnet_cond_embedding.conv_in.weight" in keyset:
        layout, prefix = "diffusers", ""
        conv_in, label = "conv_in.weight", "add_embedding.linear_1.weight"
        hint = lambda i: {0: "controlnet_cond_embedding.conv_in.weight"}.get(
            i, f"controlnet_cond_embedding.blocks.{i - 1}.weight")
    else:
        prefix = LDM_PREFIX if f"{LDM_PREFIX}input_hint_block.0.weight" in keyset else ""
        if f"{prefix}input_hint_block.0.weight" not in keyset:
            raise SdrtError(f"{where}: not a ControlNet (no controlnet_cond_embedding.* or "
                            f"input_hint_block.* weights)")
        layout, conv_in, label = "ldm", "input_blocks.0.0.weight", "label_emb.0.0.weight"
        hint = lambda i: f"input_hint_block.{2 * i}.weight"
    present = lambda k: k if prefix + k in keyset else None
    shape = lambda k: shape_of(prefix + k)
    widths = _hint_widths(shape, lambda i: present(hint(i)))
    cfg = unet_part(unet_config)
    cfg.update(in_channels=shape(conv_in)[1], conditioning_channels=shape(hint(0))[1],
               conditioning_embedding_out_channels=widths)
    if present(label) is None:
        for k in ("addition_embed_type", "addition_time_embed_dim",
                  "projection_class_embeddings_input_dim"):
            cfg.pop(k, None)
    return cfg, layout, prefix


def load_controlnet(path, device, dtype, unet_config: dict = None, variant=None,
                    ops: Ops = None) -> ControlNetModel:
    """A ControlNet from a diffusers folder, or a ``.safetensors`` file: with a
    ``config.json`` beside it, or else (A1111's and ComfyUI's files) in the architecture of
    ``unet_config``, the base UNet's diffusers config dict."""
    from .convert_ldm import controlnet_plan
    path = os.fspath(path)
    if os.path.isdir(path):
        config = read_json(os.path.join(path, "config.json"), "controlnet config")
        files, layout, prefix = component_weights(path, "diffusion_pytorch_model", variant), \
            "diffusers", ""
    elif os.path.isfile(path):
        refuse_pickle(path)
        if not path.endswith(".safetensors"):
            raise SdrtError(f"{path}: expected a ControlNet folder or .safetensors file")
        files, config = [path], None
        beside = os.path.join(os.path.dirname(path), "config.json")
        if os.path.isfile(beside):
            config, layout, prefix = read_json(beside, "controlnet config"), "diffusers", ""
    else:
        raise SdrtError(f"controlnet path {path} does not exist")
    with SafetensorsFiles(files) as f:
        keys = list(f.source)
        if config is None:
            if unet_config is None:
                raise SdrtError(f"{path}: a ControlNet file without config.json needs the "
                                f"base model's UNet config")
            config, layout, prefix = single_file_config(
                keys, lambda k: f.source[k]().shape, unet_config, path)
        try:
            cfg = ControlNetConfig.from_dict(config)
        except SdrtError as e:
            raise SdrtError(f"{path}: {e}") from None
        with torch.device("meta"):
            net = ControlNetModel(cfg, ops)
        source = f.source
        if layout == "ldm":
            plan = controlnet_plan(keys, prefix, config)
            source = {k: (lambda r=r: r.load(lambda key: f.source[key]()))
                      for k, r in plan.items()}
        return load_parameters(net, source, device, dtype, path)


def check_fits(cfg: ControlNetConfig, unet_cfg: UNetConfig, where):
    """The ControlNet's residuals fit the UNet: the same levels, widths and ResNets per level
    (one residual per skip tensor), the same text width, latents and added embedding."""
    pairs = (("block_out_channels", tuple(cfg.block_out_channels),
              tuple(unet_cfg.block_out_channels)),
             ("layers_per_block", cfg.layers_per_block, unet_cfg.layers_per_block),
             ("cross_attention_dim", cfg.cross_attention_dim, unet_cfg.cross_attention_dim),
             ("in_channels", cfg.in_channels, unet_cfg.out_channels),
             ("addition_embed_type", cfg.addition_embed_type, unet_cfg.addition_embed_type),
             ("projection_class_embeddings_input_dim",
              cfg.projection_class_embeddings_input_dim,
              unet_cfg.projection_class_embeddings_input_dim))
    for key, ours, theirs in pairs:
        if ours != theirs:
            raise SdrtError(f"{where}: this ControlNet is for another model: its {key} is "
                            f"{ours!r}, the UNet's is {theirs!r} (a ControlNet for SD 1.x, "
                            f"SD 2.x and SDXL fits only its own family)")
