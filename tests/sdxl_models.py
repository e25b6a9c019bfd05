"""Tiny random SDXL-like models (base, refiner, Turbo), built with diffusers and saved to disk.

They are the reference side of ``test_sdxl.py``: sdrt loads the very folder diffusers wrote. The
architectures are the real ones (``MODELS["sdxl"]``, ``["sdxl-refiner"]``, ``["sdxl-turbo"]``:
two text encoders, the "text_time" added embedding, per-level transformer depths, Euler on
leading timesteps) at toy widths, so that a whole pipeline call takes milliseconds on a CPU.

diffusers and transformers initialise many parameters to zero or one (biases, norms, some
output projections); a zero bias hides a missing bias, so every parameter is redrawn here from
one seeded generator (``randomize``).
"""
import math

import torch

from sdrt.engine.configs import model_config

# The real configs' flags, at toy widths. Text encoder 1 is CLIP ViT-L-like (quick_gelu, pad
# "<|endoftext|>"); text encoder 2 is OpenCLIP bigG-like (gelu, a projection, pad "!"), with a
# different head count so that mixing the two up fails.
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
            pad_token_id=1, hidden_act="quick_gelu")
TEXT_2 = dict(TEXT, intermediate_size=41, num_attention_heads=2, hidden_act="gelu",
              projection_dim=32)
TIME_IDS = 8  # addition_time_embed_dim: each micro-conditioning number → 8 sinusoid features

VAE = dict(block_out_channels=(16, 32), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           latent_channels=4, norm_num_groups=8, sample_size=16, force_upcast=True,
           scaling_factor=0.13025)

_UNET = dict(block_out_channels=(32, 64), in_channels=4, out_channels=4, norm_num_groups=16,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
             attention_head_dim=(2, 4), use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=TIME_IDS)

# Base: six time ids (original size, crop corner, target size), states of both encoders
# concatenated (32 + 32), per-level transformer depths as a list (the mid block takes the last).
BASE_UNET = dict(_UNET, layers_per_block=2, transformer_layers_per_block=[1, 2],
                 cross_attention_dim=TEXT["hidden_size"] + TEXT_2["hidden_size"],
                 projection_class_embeddings_input_dim=TEXT_2["projection_dim"] + 6 * TIME_IDS,
                 sample_size=8)
# Refiner: text encoder 2 only, five time ids (original size, crop corner, aesthetic score),
# one transformer depth for every level given as an int.
REFINER_UNET = dict(_UNET, layers_per_block=1, transformer_layers_per_block=2,
                    cross_attention_dim=TEXT_2["hidden_size"],
                    projection_class_embeddings_input_dim=TEXT_2["projection_dim"] + 5 * TIME_IDS,
                    sample_size=8)
# Turbo: the base architecture whose default size is 64 px (latents 32², VAE factor 2).
TURBO_UNET = dict(BASE_UNET, sample_size=32)

VARIANTS = ("base", "refiner", "turbo")


def randomize(module, generator):
    """Redraw every parameter of ``module`` in place, in ``named_parameters`` order: norm
    weights 1 + 0.1·N(0, 1); biases 0.1·N(0, 1); other tensors N(0, 1)/√fan_in (so a layer
    keeps its input's scale); embedding tables 0.1·N(0, 1)."""
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for _, sub in module.named_modules():
            for name, p in sub.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                if isinstance(sub, norms) and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                elif isinstance(sub, torch.nn.Embedding) or p.ndim < 2:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / math.sqrt(p[0].numel()))


def _scheduler(variant):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    config = model_config("sdxl-turbo" if variant == "turbo" else "sdxl")["scheduler"]
    cls = EulerAncestralDiscreteScheduler if variant == "turbo" else EulerDiscreteScheduler
    assert config["_class_name"] == cls.__name__
    return cls.from_config(config)


def build_diffusers_pipeline(variant, tokenizer_dir, seed=0):
    """A StableDiffusionXLPipeline ("base", "turbo") or StableDiffusionXLImg2ImgPipeline
    ("refiner") with seeded random weights and CLIP's real tokenizer files."""
    from diffusers import (AutoencoderKL, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    from sdrt.engine.tokenizer import write_clip_tokenizer
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**{"base": BASE_UNET, "refiner": REFINER_UNET,
                                   "turbo": TURBO_UNET}[variant])
    vae = AutoencoderKL(**VAE)
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        str(write_clip_tokenizer(f"{tokenizer_dir}-2", pad_token="!")))
    for module in (unet, vae, text_2):
        randomize(module, g)
    if variant == "refiner":
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae.eval(), text_encoder=None, text_encoder_2=text_2.eval(), tokenizer=None,
            tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=_scheduler(variant),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    randomize(text, g)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_clip_tokenizer(tokenizer_dir, pad_token="<|endoftext|>")))
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(),
        scheduler=_scheduler(variant), force_zeros_for_empty_prompt=True, add_watermarker=False)


def save_diffusers_folder(folder, variant, seed=0):
    """Write a tiny SDXL folder of ``variant`` and return the reference pipeline loaded back
    from it (what sdrt reads is then exactly what diffusers runs)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    pipe = build_diffusers_pipeline(variant, f"{folder}-tokenizer", seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    cls = StableDiffusionXLImg2ImgPipeline if variant == "refiner" else StableDiffusionXLPipeline
    return cls.from_pretrained(folder, add_watermarker=False)
