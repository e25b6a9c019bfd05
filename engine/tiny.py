"""A tiny model with the real SD 1.x architecture, small widths and deterministic weights, and
the writer that saves a model of any config as a diffusers folder, without diffusers.

``sdrt generate`` runs the tiny model when no ``--model`` is given, so a new user sees the
whole pipeline work in seconds on a CPU; ``sdrt make-tiny DIR`` writes it as a diffusers-format
folder. ``TINY_SD2`` is the same at the tiny size with SD 2.x's features. ``write_model``
writes a folder for any config dict (``tiny_config("sd2")``; the real
``configs.model_config("sd15")`` with random weights for the benchmarks; the tests' tiny
configs for the GPU tests): sdrt's modules carry diffusers' parameter names, so diffusers,
where it is installed, loads the same folder.
"""
import json
import math
import os

import torch
from safetensors.torch import save_file

from .configs import SD15, SD21
from .loading import WEIGHT_STEMS, Components, build

TINY = {
    "unet": {**SD15["unet"], "block_out_channels": [32, 64, 64], "attention_head_dim": 2,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 64, "layers_per_block": 1, "sample_size": 16},
    "vae": {**SD15["vae"], "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
            "sample_size": 128},
    "text_encoder": {**SD15["text_encoder"], "hidden_size": 64, "intermediate_size": 128,
                     "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 64},
    "scheduler": SD15["scheduler"],
    "pad_token": SD15["pad_token"],
}

# The SD 2.x features at the tiny size: linear projections, a head count per level (head dim 8
# at both levels), upcast attention, a GELU text encoder, v-prediction DDIM, pad token "!".
TINY_SD2 = {
    **TINY,
    "unet": {**TINY["unet"], "attention_head_dim": [4, 8, 8], "use_linear_projection": True,
             "upcast_attention": True},
    "text_encoder": {**TINY["text_encoder"], "hidden_act": "gelu"},
    "scheduler": SD21["scheduler"],
    "pad_token": SD21["pad_token"],
}
TINY_CONFIGS = {"sd1": TINY, "sd2": TINY_SD2}

# Which seed initialises which network (text encoder 0, UNet 1, VAE 2).
_SEEDS = {"text_encoder": 0, "unet": 1, "vae": 2}
_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "tokenizer": ("transformers", "CLIPTokenizer")}


def tiny_config(family: str = "sd1") -> dict:
    """The tiny SD 1.x-like (``"sd1"``) or SD 2.x-like (``"sd2"``) config, a fresh copy."""
    return json.loads(json.dumps(TINY_CONFIGS[family]))


def _init_(module, seed):
    """Deterministic weights: N(0, 1/fan_in) matrices, unit norm scales, zero biases. Drawn on
    the module's device (a full-size model on the GPU, not element by element on the CPU)."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                fan_in = p[0].numel() if "embedding" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g, device=device) / math.sqrt(fan_in))
    return module.eval()


def random_components(config: dict, device="cpu", description="random-weight model") -> Components:
    """The three networks of ``config`` with ``_init_``'s weights, its tokenizer and scheduler."""
    from .tokenizer import ClipTokenizer
    modules = {c: _init_(build(c, config[c], device=device), seed) for c, seed in _SEEDS.items()}
    return Components(modules["text_encoder"], modules["unet"], modules["vae"],
                      ClipTokenizer.bundled(pad_token=config["pad_token"]), config["scheduler"],
                      description)


def tiny_components():
    return random_components(TINY, description="built-in tiny model")


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)


def write_model(folder, config: dict, components: Components = None, dtype=None, device="cpu"):
    """Write a model as a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/): ``components``, or ``random_components(config, device)``, with
    the weights stored in ``dtype`` (default: as they are)."""
    from .tokenizer import write_clip_tokenizer
    c = components if components is not None else random_components(config, device)
    classes = {**_CLASSES, "scheduler": ("diffusers", config["scheduler"]["_class_name"])}
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "model_index.json"),
                {"_class_name": "StableDiffusionPipeline", **{k: list(v) for k, v in classes.items()}})
    for name, stem in WEIGHT_STEMS.items():
        sub = os.path.join(folder, name)
        os.makedirs(sub, exist_ok=True)
        module = getattr(c, name)
        tensors = {k: (v if dtype is None or not v.is_floating_point() else v.to(dtype))
                   .contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, os.path.join(sub, f"{stem}.safetensors"), metadata={"format": "pt"})
        # transformers names a model class its own way; diffusers by _class_name.
        naming = ({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
                  if name == "text_encoder" else {"_class_name": classes[name][1]})
        _write_json(os.path.join(sub, "config.json"), {**config[name], **naming})
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), config["scheduler"])
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), pad_token=config["pad_token"])


def write_tiny(folder):
    """Write the built-in tiny model as a diffusers folder (model_index.json, unet/, vae/, ...)."""
    write_model(folder, TINY, tiny_components())
