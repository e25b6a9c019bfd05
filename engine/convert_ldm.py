"""Key mapping from an original LDM/CompVis single-file checkpoint to sdrt's (diffusers') names.

An SD 1.x/2.x ``.safetensors`` from the original repositories keeps all three models in one
file under three prefixes:

    model.diffusion_model.*     the UNet      → "unet"
    first_stage_model.*         the VAE       → "vae"
    cond_stage_model.*          text encoder  → "text_encoder"
        SD 1.x: .transformer.text_model.*  (or .transformer.* from older transformers)
        SD 2.x: .model.*  OpenCLIP layout, fused q/k/v in ``attn.in_proj_*``

Everything else (``model_ema.*``, ``alphas_cumprod``, ``betas``, ...) is not a weight of the
three models and is ignored.

The mapping works on key NAMES only: ``ldm_to_diffusers`` returns, per component, a
``{diffusers_key: Recipe}`` plan, and the loader reads one stored tensor at a time through
``recipe.load(get_tensor)``, so no second full copy of the checkpoint is ever built.

The block layout (levels, ``layers_per_block``, which levels have attention) comes from the
diffusers config dicts, so tiny test models and non-standard sizes convert too:

    UNet  input_blocks.0.0                    conv_in
          input_blocks.k.0 / .k.1             down_blocks.i.resnets.j / .attentions.j
          input_blocks.k.0.op                 down_blocks.i.downsamplers.0.conv
                                              (k = 1 + i*(n+1) + j, n = layers_per_block)
          middle_block.0 / .1 / .2            mid_block.resnets.0 / .attentions.0 / .resnets.1
          output_blocks.k.0 / .k.1            up_blocks.i.resnets.j / .attentions.j
          output_blocks.k.{1|2}.conv          up_blocks.i.upsamplers.0.conv
                                              (k = i*(n+1) + j; the upsampler follows the
                                               attention, so it is .2 on attention levels)
    VAE   encoder.down.i.block.j              encoder.down_blocks.i.resnets.j
          decoder.up.b.block.j                decoder.up_blocks.(levels-1-b).resnets.j
                                              (LDM numbers decoder levels by resolution,
                                               highest first; diffusers by execution order)
          {en,de}coder.mid.block_1/attn_1/block_2   mid_block.resnets.0/attentions.0/resnets.1
"""
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import configs
from .errors import SdrtError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: open_clip's text tower


@dataclass(frozen=True)
class Recipe:
    """How one diffusers tensor is made from one stored LDM tensor."""

    ldm_key: str
    rows: slice | None = None  # q, k or v: a third of OpenCLIP's fused (3D, D) in_proj
    squeeze_1x1: bool = False  # VAE attention: 1×1 conv weight (C, C, 1, 1) → Linear (C, C)

    def load(self, get_tensor: Callable[[str], torch.Tensor]) -> torch.Tensor:
        t = get_tensor(self.ldm_key)
        if self.rows is not None:
            # clone: a view would keep the whole fused (3D, D) tensor alive for each third.
            t = t[self.rows].clone()
        if self.squeeze_1x1:
            t = t.flatten(1)
        return t


Plan = dict[str, dict[str, Recipe]]


def detect_family(keys: Iterable[str]) -> str:
    """``"sd1"`` or ``"sd2"`` from the text encoder's key layout; SdrtError for anything else."""
    keys = list(keys)
    if not keys:
        raise SdrtError("the checkpoint holds no tensors")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SdrtError("this is an SDXL checkpoint (conditioner.embedders.*); only SD 1.x/2.x "
                        "single-file checkpoints are supported")
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"),
                         ("cond_stage_model.", "text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            raise SdrtError(f"not an SD 1.x/2.x LDM checkpoint: no {what} keys ({prefix}*); "
                            "a diffusers-layout model is loaded from its folder")
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "sd1"
    raise SdrtError("not an SD 1.x/2.x LDM checkpoint: the text encoder is neither CLIP "
                    f"({CLIP_PREFIX}*) nor OpenCLIP ({OPENCLIP_PREFIX}*)")


def family_configs(family: str, prediction_type: str | None = None) -> dict:
    """The model configs for a single-file checkpoint of ``family`` (a deep copy).

    ``"sd1"`` is SD 1.5. ``"sd2"`` defaults to SD 2.1 768-v (v-prediction); the file does not
    say which objective it was trained with, so a 512-base (epsilon) checkpoint needs
    ``prediction_type="epsilon"``, which selects the SD 2.1-base configs.
    """
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise SdrtError(f"unknown prediction type {prediction_type!r}: "
                        "expected 'epsilon' or 'v_prediction'")
    if family == "sd1":
        cfg = configs.model_config("sd15")
    elif family == "sd2":
        cfg = configs.model_config("sd21-base" if prediction_type == "epsilon" else "sd21")
    else:
        raise SdrtError(f"unknown model family {family!r}: expected 'sd1' or 'sd2'")
    if prediction_type is not None:
        cfg["scheduler"]["prediction_type"] = prediction_type
    return cfg


def ldm_to_diffusers(keys: Iterable[str], family: str, unet_config: dict, vae_config: dict,
                     text_config: dict) -> Plan:
    """``{"unet" | "vae" | "text_encoder": {diffusers_key: Recipe}}`` for the LDM ``keys``."""
    keys = list(keys)
    if family == "sd1":
        text = _clip_plan(keys)
    elif family == "sd2":
        text = _openclip_plan(keys, text_config)
    else:
        raise SdrtError(f"unknown model family {family!r}: expected 'sd1' or 'sd2'")
    return {"unet": _unet_plan(keys, unet_config), "vae": _vae_plan(keys, vae_config),
            "text_encoder": text}


# A module table maps an LDM module path to (diffusers module path, renames); the renames
# rewrite the start of the parameter path below the module.
_SAME = ()
_UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."),
                ("emb_layers.1.", "time_emb_proj."), ("out_layers.0.", "norm2."),
                ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_UNET_DOWNSAMPLE = (("op.", "conv."),)
_VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0."))
_VAE_CONV_TO_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _unet_modules(cfg: dict) -> dict[str, tuple[str, tuple]]:
    n = cfg["layers_per_block"]
    modules = {
        "time_embed.0": ("time_embedding.linear_1", _SAME),
        "time_embed.2": ("time_embedding.linear_2", _SAME),
        "input_blocks.0.0": ("conv_in", _SAME),
        "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", _SAME),
        "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
        "out.0": ("conv_norm_out", _SAME),
        "out.2": ("conv_out", _SAME),
    }
    k = 1
    down = cfg["down_block_types"]
    for i, block_type in enumerate(down):
        for j in range(n):
            modules[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", _UNET_RESNET)
            if "CrossAttn" in block_type:
                modules[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", _SAME)
            k += 1
        if i < len(down) - 1:
            modules[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.downsamplers.0", _UNET_DOWNSAMPLE)
            k += 1
    k = 0
    up = cfg["up_block_types"]
    for i, block_type in enumerate(up):
        attention = "CrossAttn" in block_type
        for j in range(n + 1):
            modules[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", _UNET_RESNET)
            if attention:
                modules[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", _SAME)
            k += 1
        if i < len(up) - 1:
            modules[f"output_blocks.{k - 1}.{2 if attention else 1}"] = (
                f"up_blocks.{i}.upsamplers.0", _SAME)
    return modules


def _vae_modules(cfg: dict) -> dict[str, tuple[str, tuple]]:
    levels, n = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    modules = {"quant_conv": ("quant_conv", _SAME), "post_quant_conv": ("post_quant_conv", _SAME)}
    for side in ("encoder", "decoder"):
        modules[f"{side}.conv_in"] = (f"{side}.conv_in", _SAME)
        modules[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", _VAE_RESNET)
        modules[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", _VAE_ATTENTION)
        modules[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", _VAE_RESNET)
        modules[f"{side}.norm_out"] = (f"{side}.conv_norm_out", _SAME)
        modules[f"{side}.conv_out"] = (f"{side}.conv_out", _SAME)
    for i in range(levels):
        for j in range(n):
            modules[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}",
                                                      _VAE_RESNET)
        if i < levels - 1:
            modules[f"encoder.down.{i}.downsample"] = (f"encoder.down_blocks.{i}.downsamplers.0",
                                                       _SAME)
        b = levels - 1 - i
        for j in range(n + 1):
            modules[f"decoder.up.{b}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}",
                                                    _VAE_RESNET)
        if i < levels - 1:
            modules[f"decoder.up.{b}.upsample"] = (f"decoder.up_blocks.{i}.upsamplers.0", _SAME)
    return modules


def _rename(name: str, modules: dict, component: str) -> str:
    """The diffusers name of LDM parameter ``name`` (prefix stripped): longest module match."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:depth])
        if module in modules:
            target, renames = modules[module]
            rest = ".".join(parts[depth:]) + "."
            for old, new in renames:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            return f"{target}.{rest[:-1]}"
    raise SdrtError(f"{component} key {name!r} has no place in the {component} config "
                    "(block layout or layers_per_block do not match the checkpoint)")


def _unet_plan(keys: list[str], cfg: dict) -> dict[str, Recipe]:
    modules = _unet_modules(cfg)
    return {_rename(k[len(UNET_PREFIX):], modules, "UNet"): Recipe(k)
            for k in keys if k.startswith(UNET_PREFIX)}


def _vae_plan(keys: list[str], cfg: dict) -> dict[str, Recipe]:
    modules = _vae_modules(cfg)
    plan = {}
    for k in keys:
        if k.startswith(VAE_PREFIX):
            name = _rename(k[len(VAE_PREFIX):], modules, "VAE")
            plan[name] = Recipe(k, squeeze_1x1=name.endswith(_VAE_CONV_TO_LINEAR))
    return plan


# Some SD 1.x files hold the whole CLIP model; SD conditions on the text tower's hidden states.
_CLIP_UNUSED = ("text_model.embeddings.position_ids",  # a buffer (arange), not a weight
                "vision_model.", "visual_projection.", "text_projection.", "logit_scale")
# Older files store transformers' CLIPTextTransformer bare, without the text_model wrapper.
_CLIP_BARE = ("embeddings.", "encoder.", "final_layer_norm.")


def _clip_plan(keys: list[str]) -> dict[str, Recipe]:
    """SD 1.x: transformers' own names below the prefix."""
    plan = {}
    for k in keys:
        if not k.startswith(CLIP_PREFIX):
            continue
        name = k[len(CLIP_PREFIX):]
        if name.startswith(_CLIP_BARE):
            name = "text_model." + name
        if name.startswith(_CLIP_UNUSED):
            continue
        if not name.startswith("text_model."):
            raise SdrtError(f"text encoder key {k!r} is not part of a CLIP text model")
        plan[name] = Recipe(k)
    return plan


_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# CLIP's image-text contrastive head: SD conditions on the hidden states, not on it.
_OPENCLIP_UNUSED = ("text_projection", "logit_scale")
_OPENCLIP_LAYER = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _openclip_plan(keys: list[str], cfg: dict) -> dict[str, Recipe]:
    """SD 2.x: OpenCLIP names. SD 2 conditions on the penultimate layer, so the diffusers
    config has one layer fewer than the file (23 of 24): resblocks past it are unused."""
    d = cfg["hidden_size"]
    qkv = {"q_proj": slice(0, d), "k_proj": slice(d, 2 * d), "v_proj": slice(2 * d, 3 * d)}
    plan = {}
    for k in keys:
        if not k.startswith(OPENCLIP_PREFIX):
            continue
        name = k[len(OPENCLIP_PREFIX):]
        block = _RESBLOCK.fullmatch(name)
        if name in _OPENCLIP_TOP:
            plan[_OPENCLIP_TOP[name]] = Recipe(k)
        elif name in _OPENCLIP_UNUSED or (block and int(block[1]) >= cfg["num_hidden_layers"]):
            continue
        elif block and block[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = block[2].rsplit("_", 1)[1]  # weight | bias
            for proj, rows in qkv.items():
                plan[f"text_model.encoder.layers.{block[1]}.self_attn.{proj}.{kind}"] = Recipe(
                    k, rows=rows)
        elif block and block[2] in _OPENCLIP_LAYER:
            plan[f"text_model.encoder.layers.{block[1]}.{_OPENCLIP_LAYER[block[2]]}"] = Recipe(k)
        else:
            raise SdrtError(f"text encoder key {k!r} is not part of an OpenCLIP text tower")
    return plan
