"""Key mapping from an original single-file checkpoint to sdrt's (diffusers') names.

Original checkpoints (the ``.safetensors`` files A1111 and ComfyUI users download) keep all
of a model's networks in one file, under one prefix per network. SD 1.x/2.x files come from
the original LDM/CompVis repositories, SDXL files from Stability's generative-models ("SGM");
both store the UNet and the VAE the same way:

    model.diffusion_model.*     the UNet      → "unet"
    first_stage_model.*         the VAE       → "vae"

and the text encoders under a prefix per family (``LAYOUTS``):

    sd1           cond_stage_model.transformer.*          CLIP ViT-L, transformers' names
                                                           (with or without text_model.)
                                                           → "text_encoder"
    sd2           cond_stage_model.model.*                OpenCLIP ViT-H, fused q/k/v in
                                                           attn.in_proj_* → "text_encoder"
    sdxl          conditioner.embedders.0.transformer.*   CLIP ViT-L → "text_encoder"
                  conditioner.embedders.1.model.*         OpenCLIP ViT-bigG → "text_encoder_2"
    sdxl-refiner  conditioner.embedders.0.model.*         OpenCLIP ViT-bigG → "text_encoder_2"

Everything else (``model_ema.*``, ``alphas_cumprod``, ``betas``, ...) is not a weight of the
models and is ignored.

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
          label_emb.0.0 / .0.2                add_embedding.linear_1 / .linear_2 (SDXL's
                                              "text_time" embedding)
    VAE   encoder.down.i.block.j              encoder.down_blocks.i.resnets.j
          decoder.up.b.block.j                decoder.up_blocks.(levels-1-b).resnets.j
                                              (LDM numbers decoder levels by resolution,
                                               highest first; diffusers by execution order)
          {en,de}coder.mid.block_1/attn_1/block_2   mid_block.resnets.0/attentions.0/resnets.1

Below an attention module both layouts use diffusers' own names (``transformer_blocks.t.*``,
``proj_in``, ``norm``), so SDXL's levels without attention, its several transformer layers
per level and its Linear ``proj_in``/``proj_out`` (stored 2-D, as the diffusers model holds
them) need nothing beyond the table above.
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
SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L
SGM_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG
SGM_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP ViT-bigG only
# Where text encoders live: a text encoder's prefix is one of these plus one more name.
_TEXT_ROOTS = (("cond_stage_model.", 2), ("conditioner.embedders.", 4))


@dataclass(frozen=True)
class Recipe:
    """How one diffusers tensor is made from one stored LDM tensor."""

    ldm_key: str
    rows: slice | None = None  # q, k or v: a third of OpenCLIP's fused (3D, D) in_proj
    squeeze_1x1: bool = False  # VAE attention: 1×1 conv weight (C, C, 1, 1) → Linear (C, C)
    # OpenCLIP's text_projection is a (D, P) matrix applied as x @ W; a Linear weight is (P, D).
    transpose: bool = False

    def load(self, get_tensor: Callable[[str], torch.Tensor]) -> torch.Tensor:
        t = get_tensor(self.ldm_key)
        if self.rows is not None:
            # clone: a view would keep the whole fused (3D, D) tensor alive for each third.
            t = t[self.rows].clone()
        if self.squeeze_1x1:
            t = t.flatten(1)
        if self.transpose:
            t = t.T.contiguous()
        return t


Plan = dict[str, dict[str, Recipe]]


@dataclass(frozen=True)
class TextTower:
    """One text encoder in a single file: its component, key prefix and key layout."""

    component: str  # "text_encoder" | "text_encoder_2"
    prefix: str
    kind: str  # "clip" (transformers' names) | "openclip" (open_clip's names, fused q/k/v)
    # SD 2 conditions on the penultimate layer: its config stops one layer before the file's
    # last, which is not loaded. Elsewhere a layer past the config's depth is an error.
    skips_last_layers: bool = False


@dataclass(frozen=True)
class Layout:
    """One family's single files: what they are called, their text encoders, their configs."""

    name: str  # in messages
    text: tuple[TextTower, ...]
    config: str  # the configs.MODELS entry a file of this family gets
    # Files do not say their training objective; an "epsilon" file of this family gets
    # these configs instead (SD 2.1-base, 512², rather than SD 2.1 768-v).
    epsilon_config: str | None = None


LAYOUTS = {
    "sd1": Layout("SD 1.x", (TextTower("text_encoder", CLIP_PREFIX, "clip"),), "sd15"),
    "sd2": Layout("SD 2.x", (TextTower("text_encoder", OPENCLIP_PREFIX, "openclip",
                                       skips_last_layers=True),), "sd21", "sd21-base"),
    "sdxl": Layout("SDXL", (TextTower("text_encoder", SGM_CLIP_PREFIX, "clip"),
                            TextTower("text_encoder_2", SGM_OPENCLIP_PREFIX, "openclip")),
                   "sdxl"),
    "sdxl-refiner": Layout("SDXL refiner",
                           (TextTower("text_encoder_2", SGM_REFINER_PREFIX, "openclip"),),
                           "sdxl-refiner"),
}

# Single files of models sdrt does not run, told apart by a block name of their denoiser
# (stored under model.diffusion_model. or bare).
_OTHER_MODELS = (("joint_blocks.", "Stable Diffusion 3"), ("double_blocks.", "Flux"))


def _layout(family: str) -> Layout:
    if family not in LAYOUTS:
        raise SdrtError(f"unknown model family {family!r}: expected one of "
                        f"{', '.join(LAYOUTS)}")
    return LAYOUTS[family]


def _found(keys: list[str], limit: int = 6) -> str:
    """The file's top-level key prefixes, for messages: ``"model.*, first_stage_model.*"``."""
    tops = sorted({k.split(".", 1)[0] for k in keys})
    more = f" and {len(tops) - limit} more" if len(tops) > limit else ""
    return ", ".join(f"{t}.*" for t in tops[:limit]) + more


def _text_roots(keys: list[str]) -> set[str]:
    """The text-encoder prefixes present: ``{"conditioner.embedders.0.transformer.", ...}``."""
    roots = set()
    for k in keys:
        parts = k.split(".")
        for root, depth in _TEXT_ROOTS:
            if k.startswith(root) and len(parts) > depth:
                roots.add(".".join(parts[:depth]) + ".")
    return roots


def detect_family(keys: Iterable[str]) -> str:
    """The family of a single file (a key of ``LAYOUTS``) from its text encoders' prefixes;
    SdrtError, saying what the file holds, for anything else."""
    keys = list(keys)
    if not keys:
        raise SdrtError("the checkpoint holds no tensors")
    for marker, model in _OTHER_MODELS:
        if any(k.removeprefix(UNET_PREFIX).startswith(marker) for k in keys):
            raise SdrtError(f"this is a {model} checkpoint ({marker}* keys); single files of "
                            f"SD 1.x, SD 2.x, SDXL and the SDXL refiner are supported")
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        if not any(k.startswith(prefix) for k in keys):
            raise SdrtError(f"not an SD 1.x/2.x/SDXL single-file checkpoint: no {what} keys "
                            f"({prefix}*; found {_found(keys)}); a diffusers-layout model is "
                            "loaded from its folder")
    roots = _text_roots(keys)
    for family, layout in LAYOUTS.items():
        if roots == {tower.prefix for tower in layout.text}:
            return family
    expected = "; ".join(f"{layout.name}: " + " + ".join(f"{t.prefix}*" for t in layout.text)
                         for layout in LAYOUTS.values())
    found = " + ".join(f"{r}*" for r in sorted(roots)) or \
        "none (no cond_stage_model.* or conditioner.embedders.* keys)"
    raise SdrtError(f"unknown text encoders in the checkpoint: {found}; expected {expected}")


def family_configs(family: str, prediction_type: str | None = None) -> dict:
    """The model configs for a single-file checkpoint of ``family`` (a deep copy).

    ``"sd1"`` is SD 1.5, ``"sdxl"`` SDXL 1.0 base, ``"sdxl-refiner"`` the SDXL 1.0 refiner.
    ``"sd2"`` defaults to SD 2.1 768-v (v-prediction); the file does not say which objective
    it was trained with, so a 512-base (epsilon) checkpoint needs ``prediction_type="epsilon"``,
    which selects the SD 2.1-base configs. Any family takes a ``prediction_type`` for
    fine-tunes trained with the other objective.
    """
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise SdrtError(f"unknown prediction type {prediction_type!r}: "
                        "expected 'epsilon' or 'v_prediction'")
    layout = _layout(family)
    name = layout.config
    if prediction_type == "epsilon" and layout.epsilon_config is not None:
        name = layout.epsilon_config
    cfg = configs.model_config(name)
    if prediction_type is not None:
        cfg["scheduler"]["prediction_type"] = prediction_type
    return cfg


def ldm_to_diffusers(keys: Iterable[str], family: str, model_configs: dict) -> Plan:
    """``{component: {diffusers_key: Recipe}}`` for the single file's ``keys``: "unet", "vae"
    and the family's text encoders ("text_encoder" and/or "text_encoder_2").

    ``model_configs`` maps each of those components to its diffusers config dict (other
    entries, such as "scheduler", are not used): ``family_configs(family)`` will do.
    """
    layout = _layout(family)
    keys = list(keys)

    def config(component):
        if not isinstance(model_configs.get(component), dict):
            raise SdrtError(f"a {layout.name} checkpoint needs a {component} config")
        return model_configs[component]

    plan = {"unet": _unet_plan(keys, config("unet")), "vae": vae_plan(keys, config("vae"))}
    for tower in layout.text:
        plan[tower.component] = _TEXT_PLANS[tower.kind](keys, tower, config(tower.component))
    return plan


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
    if cfg.get("addition_embed_type") == "text_time":
        # SDXL's embedding of the pooled text and the micro-conditioning numbers.
        modules["label_emb.0.0"] = ("add_embedding.linear_1", _SAME)
        modules["label_emb.0.2"] = ("add_embedding.linear_2", _SAME)
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


def controlnet_plan(keys: list[str], prefix: str, cfg: dict) -> dict[str, Recipe]:
    """A ControlNet file of the original ControlNet repository (``prefix`` is
    ``control_model.`` or empty): its down path and mid block named as the UNet's, and

        input_hint_block.0 / .2k / .{2m}    controlnet_cond_embedding.conv_in / .blocks.(k-1)
                                            / .conv_out (the odd indices are SiLUs)
        zero_convs.i.0                      controlnet_down_blocks.i
        middle_block_out.0                  controlnet_mid_block
    """
    modules = _unet_modules({**cfg, "up_block_types": []})
    hints = sorted(int(k[len(prefix):].split(".")[1]) for k in keys
                   if k.startswith(prefix + "input_hint_block.") and k.endswith(".weight"))
    for n, i in enumerate(hints):
        modules[f"input_hint_block.{i}"] = (
            "controlnet_cond_embedding." + ("conv_in" if n == 0 else "conv_out"
                                            if n == len(hints) - 1 else f"blocks.{n - 1}"),
            _SAME)
    modules["middle_block_out.0"] = ("controlnet_mid_block", _SAME)
    plan = {}
    for k in keys:
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name.startswith("zero_convs."):
            i, rest = name[len("zero_convs."):].split(".0.", 1)
            plan[f"controlnet_down_blocks.{i}.{rest}"] = Recipe(k)
        else:
            plan[_rename(name, modules, "ControlNet")] = Recipe(k)
    return plan


def vae_plan(keys: list[str], cfg: dict) -> dict[str, Recipe]:
    """``{diffusers_key: Recipe}`` of the VAE keys (``first_stage_model.*``) among ``keys``."""
    modules = _vae_modules(cfg)
    plan = {}
    for k in keys:
        if k.startswith(VAE_PREFIX):
            name = _rename(k[len(VAE_PREFIX):], modules, "VAE")
            plan[name] = Recipe(k, squeeze_1x1=name.endswith(_VAE_CONV_TO_LINEAR))
    return plan


# Some files hold the whole CLIP model; SD conditions on the text tower's hidden states.
_CLIP_UNUSED = ("text_model.embeddings.position_ids",  # a buffer (arange), not a weight
                "vision_model.", "visual_projection.", "text_projection.", "logit_scale")
# Older files store transformers' CLIPTextTransformer bare, without the text_model wrapper.
_CLIP_BARE = ("embeddings.", "encoder.", "final_layer_norm.")


def _clip_plan(keys: list[str], tower: TextTower, cfg: dict) -> dict[str, Recipe]:
    """CLIP ViT-L (SD 1.x, SDXL's first encoder): transformers' own names below the prefix."""
    plan = {}
    for k in keys:
        if not k.startswith(tower.prefix):
            continue
        name = k[len(tower.prefix):]
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
# CLIP's image-text contrastive head. SD 2 conditions on the hidden states only; SDXL's
# second encoder also uses the projection (its pooled, projected text embedding).
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


def _openclip_plan(keys: list[str], tower: TextTower, cfg: dict) -> dict[str, Recipe]:
    """OpenCLIP ViT-H (SD 2.x) or ViT-bigG (SDXL): open_clip's names.

    SD 2 conditions on the penultimate layer, so its diffusers config has one layer fewer
    than the file (23 of 24) and the resblocks past it are not loaded; SDXL's bigG uses all
    32. A model with a projection (CLIPTextModelWithProjection) gets ``text_projection``."""
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    qkv = {"q_proj": slice(0, d), "k_proj": slice(d, 2 * d), "v_proj": slice(2 * d, 3 * d)}
    projection = "CLIPTextModelWithProjection" in (cfg.get("architectures") or ())
    plan = {}
    for k in keys:
        if not k.startswith(tower.prefix):
            continue
        name = k[len(tower.prefix):]
        block = _RESBLOCK.fullmatch(name)
        if name in _OPENCLIP_TOP:
            plan[_OPENCLIP_TOP[name]] = Recipe(k)
        elif name == "text_projection" and projection:
            plan["text_projection.weight"] = Recipe(k, transpose=True)
        elif name in _OPENCLIP_UNUSED:
            continue
        elif block and int(block[1]) >= layers:
            if tower.skips_last_layers:
                continue
            raise SdrtError(f"{tower.component} key {k!r} has no place in the "
                            f"{tower.component} config ({layers} layers)")
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


_TEXT_PLANS = {"clip": _clip_plan, "openclip": _openclip_plan}
