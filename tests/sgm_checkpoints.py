"""Test-side writers of original-layout single files, from diffusers/transformers modules.

SDXL files (Stability's generative-models, "SGM") store the UNet and the VAE exactly as the
SD 1.x/2.x LDM files do, so one set of inverse mappings serves both; only the text encoders'
prefixes differ:

    LDM  (SD 1/2)   cond_stage_model.transformer.*          CLIP, transformers' names
                    cond_stage_model.model.*                OpenCLIP, fused q/k/v
    SGM  (SDXL)     conditioner.embedders.0.transformer.*   CLIP ViT-L        (base)
                    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG (base)
                    conditioner.embedders.0.model.*         OpenCLIP ViT-bigG (refiner)

The inverses are written from the published layouts, independently of the engine's tables
(engine/convert_ldm.py), and tests/test_convert_ldm.py checks them against diffusers' own
single-file converters. ``write_sgm`` writes a whole SDXL base or refiner file, with the
extra keys real files carry, for end-to-end tests:

    write_sgm(path, "sdxl", unet, vae, text_encoder, text_encoder_2)
    write_sgm(path, "sdxl-refiner", unet, vae, None, text_encoder_2)

Only torch and safetensors are imported: the modules come from the caller.
"""
import re

import torch
from safetensors.torch import save_file

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
SGM_CLIP, SGM_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
SGM_REFINER_OPENCLIP = "conditioner.embedders.0.model."

# ---------------------------------------------------------------------------------------------
# UNet and VAE: diffusers names → LDM/SGM names, one regex per block kind.

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             # SDXL's "text_time" added embedding: sgm's label_emb = Sequential(Sequential(
             # Linear, SiLU, Linear)), so its Linears are label_emb.0.0 and label_emb.0.2.
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key_to_ldm(key, cfg):
    """One diffusers UNet key → its LDM/SGM key. Below an attention module (transformer
    blocks, proj_in/out, norm) the names are the same in both layouts."""
    n = cfg["layers_per_block"]
    module, param = key.rsplit(".", 1)
    if module in _UNET_TOP:
        return f"{UNET}{_UNET_TOP[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
        ldm = f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.0.{_UNET_RESNET[m[3]]}"
    elif m := re.fullmatch(r"down_blocks\.(\d)\.attentions\.(\d)\.(.+)", module):
        ldm = f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv", module):
        ldm = f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", module):
        ldm = f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        ldm = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
        ldm = f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.0.{_UNET_RESNET[m[3]]}"
    elif m := re.fullmatch(r"up_blocks\.(\d)\.attentions\.(\d)\.(.+)", module):
        ldm = f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv", module):
        # The upsampler comes after the attention on cross-attention levels.
        index = 2 if "CrossAttn" in cfg["up_block_types"][int(m[1])] else 1
        ldm = f"output_blocks.{int(m[1]) * (n + 1) + n}.{index}.conv"
    else:
        raise AssertionError(f"test inverse: unexpected UNet key {key}")
    return f"{UNET}{ldm}.{param}"


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def vae_to_ldm(sd, cfg):
    levels = len(cfg["block_out_channels"])
    out = {}
    for key, t in sd.items():
        module, param = key.rsplit(".", 1)
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.conv", module):
            ldm = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.conv", module):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv"
        elif m := re.fullmatch(r"(\w+)\.mid_block\.resnets\.(\d)\.(\w+)", module):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)", module):
            ldm = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}"
            if param == "weight" and m[2] != "group_norm":
                t = t[:, :, None, None]  # LDM's and SGM's attention projections are 1×1 convs
        else:
            ldm = module.replace("conv_norm_out", "norm_out")
        out[f"{VAE}{ldm.replace('conv_shortcut', 'nin_shortcut')}.{param}"] = t
    return out


# ---------------------------------------------------------------------------------------------
# Text encoders.

def text_state_dict(model):
    """A transformers CLIP text model's tensors under sdrt's (and diffusers' converters')
    names: ``text_model.*``, and ``text_projection.weight`` for CLIPTextModelWithProjection.
    transformers 5 dropped the ``text_model.`` wrapper from CLIPTextModel's own names only."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": t
            for k, t in model.state_dict().items()}


def clip_to_ldm(sd, wrapper=True, prefix=CLIP):
    """CLIP: transformers' layout under the prefix; real files also carry position_ids."""
    out = {f"{prefix}{k if wrapper else k.removeprefix('text_model.')}": t for k, t in sd.items()}
    n = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    wrap = "text_model." if wrapper else ""
    out[f"{prefix}{wrap}embeddings.position_ids"] = torch.arange(n)[None]
    return out


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj"}


def openclip_to_ldm(sd, num_layers, prefix=OPENCLIP):
    """OpenCLIP layout: q/k/v fused along rows into in_proj; the projection (when the model
    has one) stored (D, P), as open_clip applies it: ``pooled @ text_projection``."""
    p = f"{prefix}transformer.resblocks."
    out = {f"{prefix}token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           f"{prefix}positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           f"{prefix}ln_final.weight": sd["text_model.final_layer_norm.weight"],
           f"{prefix}ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[f"{prefix}text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(num_layers):
        layer = f"text_model.encoder.layers.{i}."
        for param in ("weight", "bias"):
            out[f"{p}{i}.attn.in_proj_{param}"] = torch.cat(
                [sd[f"{layer}self_attn.{x}_proj.{param}"] for x in "qkv"])
            for ours, theirs in _OPENCLIP_LAYER.items():
                out[f"{p}{i}.{theirs}.{param}"] = sd[f"{layer}{ours}.{param}"]
    return out


# ---------------------------------------------------------------------------------------------
# Whole SGM files.

def sgm_extras(device="cpu"):
    """Keys real SGM files hold beside the networks' weights (the loader must ignore them)."""
    return {"alphas_cumprod": torch.linspace(0.9991, 0.0047, 1000, device=device),
            "model_ema.decay": torch.tensor(0.9999, device=device),
            "model_ema.num_updates": torch.tensor(10, device=device)}


def sgm_state_dict(family, unet, vae, text_encoder, text_encoder_2):
    """The SGM single-file dict of an SDXL base (``family="sdxl"``) or refiner
    (``"sdxl-refiner"``, ``text_encoder=None``) made of diffusers/transformers modules:
    a UNet2DConditionModel, an AutoencoderKL, a CLIPTextModel and a
    CLIPTextModelWithProjection. Tensors are shared with the modules, not copied."""
    if family not in ("sdxl", "sdxl-refiner"):
        raise ValueError(f"family must be 'sdxl' or 'sdxl-refiner', got {family!r}")
    if (text_encoder is None) != (family == "sdxl-refiner"):
        raise ValueError("the SDXL base has two text encoders, the refiner only text_encoder_2")
    unet_cfg, vae_cfg = dict(unet.config), dict(vae.config)
    out = {unet_key_to_ldm(k, unet_cfg): t for k, t in unet.state_dict().items()}
    out.update(vae_to_ldm(vae.state_dict(), vae_cfg))
    bigg_prefix = SGM_OPENCLIP if family == "sdxl" else SGM_REFINER_OPENCLIP
    if text_encoder is not None:
        out.update(clip_to_ldm(text_state_dict(text_encoder), prefix=SGM_CLIP))
    out.update(openclip_to_ldm(text_state_dict(text_encoder_2),
                               text_encoder_2.config.num_hidden_layers, prefix=bigg_prefix))
    # open_clip's contrastive temperature: part of the saved model, unused by SDXL.
    device = next(iter(out.values())).device
    out[f"{bigg_prefix}logit_scale"] = torch.tensor(4.6052, device=device)
    out.update(sgm_extras(device))
    return out


def write_sgm(path, family, unet, vae, text_encoder, text_encoder_2):
    """Write ``sgm_state_dict(...)`` to ``path`` as a .safetensors file (dtypes kept)."""
    sd = sgm_state_dict(family, unet, vae, text_encoder, text_encoder_2)
    save_file({k: t.detach().contiguous().clone() for k, t in sd.items()}, str(path))
