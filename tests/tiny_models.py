"""Tiny random SD-1-like and SD-2-like models, built with diffusers and saved to disk.

They are the reference side of the comparisons: sdrt loads the very folder diffusers wrote.
``sdrt_config`` describes the same architectures for sdrt's own writer
(``engine.tiny.write_model``), for tests that need a model folder but no diffusers (the GPU
tests: the GPU machine has no diffusers).
"""
import torch

from sdrt.engine.configs import model_config

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                 clip_sample=False, skip_prk_steps=True)


def unet_kwargs(family):
    kw = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
              in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, norm_num_groups=16)
    if family == "sd2":
        # SD 2.x: linear projections, per-level head counts (head dim 8 here), upcast attention.
        kw.update(attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True)
    else:
        kw.update(attention_head_dim=4)
    return kw


VAE = dict(block_out_channels=(16, 32), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           latent_channels=4, norm_num_groups=8, sample_size=16)
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=49408, max_position_embeddings=77)


def _hidden_act(family):
    return "gelu" if family == "sd2" else "quick_gelu"


def _pad_token(family):
    return "!" if family == "sd2" else "<|endoftext|>"


def sdrt_config(family):
    """``build_diffusers_pipeline``'s architecture and scheduler as the config dict sdrt's writer
    takes: the real SD 1.5 / 2.1 config with the tiny sizes over it."""
    cfg = model_config("sd21" if family == "sd2" else "sd15")
    cfg["unet"].update(unet_kwargs(family))
    cfg["vae"].update(VAE)
    cfg["text_encoder"].update(TEXT, hidden_act=_hidden_act(family))
    if family == "sd2":
        cfg["scheduler"] = {"_class_name": "DDIMScheduler", **{k: v for k, v in SCHEDULER.items()
                                                              if k != "skip_prk_steps"},
                            "prediction_type": "v_prediction"}
    else:
        cfg["scheduler"] = {"_class_name": "PNDMScheduler",
                            **{k: v for k, v in SCHEDULER.items() if k != "clip_sample"}}
    cfg["pad_token"] = _pad_token(family)
    return cfg


def build_diffusers_pipeline(family, tokenizer_dir, seed=0, in_channels=4):
    """A StableDiffusionPipeline with random weights and CLIP's real tokenizer files;
    ``in_channels=9`` makes its UNet an inpainting one."""
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdrt.engine.tokenizer import write_clip_tokenizer
    write_clip_tokenizer(tokenizer_dir, pad_token=_pad_token(family))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**unet_kwargs(family), "in_channels": in_channels})
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act=_hidden_act(family)))
    if family == "sd2":
        scheduler = DDIMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "skip_prk_steps"},
                                  prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "clip_sample"})
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(),
                                   tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_diffusers_folder(folder, family, seed=0, in_channels=4):
    """Write a tiny diffusers folder and return the reference pipeline loaded back from it."""
    from diffusers import StableDiffusionPipeline
    pipe = build_diffusers_pipeline(family, f"{folder}-tokenizer", seed, in_channels)
    pipe.save_pretrained(folder, safe_serialization=True)
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
