"""A tiny model with the real SD 1.x architecture, small widths and deterministic weights.

``sdrt generate`` runs it when no ``--model`` is given, so a new user sees the whole pipeline
work in seconds on a CPU; ``sdrt make-tiny DIR`` writes it as a diffusers-format folder.
"""
import json
import math
import os

import torch
from safetensors.torch import save_file

from .configs import SD15
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


def _init_(module, seed):
    """Deterministic weights: N(0, 1/fan_in) matrices, unit norm scales, zero biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                fan_in = p[0].numel() if "embedding" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return module.eval()


def tiny_components():
    from .tokenizer import ClipTokenizer
    modules = {c: _init_(build(c, TINY[c], device="cpu"), seed)
               for seed, c in enumerate(("text_encoder", "unet", "vae"))}
    return Components(modules["text_encoder"], modules["unet"], modules["vae"],
                      ClipTokenizer.bundled(pad_token=TINY["pad_token"]), TINY["scheduler"],
                      "built-in tiny model")


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)


def write_tiny(folder):
    """Write the tiny model as a diffusers folder (model_index.json, unet/, vae/, ...)."""
    from .tokenizer import write_clip_tokenizer
    c = tiny_components()
    classes = {"unet": ("diffusers", "UNet2DConditionModel"),
               "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel"),
               "tokenizer": ("transformers", "CLIPTokenizer"),
               "scheduler": ("diffusers", TINY["scheduler"]["_class_name"])}
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "model_index.json"),
                {"_class_name": "StableDiffusionPipeline", **{k: list(v) for k, v in classes.items()}})
    for name, stem in WEIGHT_STEMS.items():
        sub = os.path.join(folder, name)
        os.makedirs(sub, exist_ok=True)
        module = getattr(c, name)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  os.path.join(sub, f"{stem}.safetensors"), metadata={"format": "pt"})
        # transformers names a model class its own way; diffusers by _class_name.
        naming = ({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
                  if name == "text_encoder" else {"_class_name": classes[name][1]})
        _write_json(os.path.join(sub, "config.json"), {**TINY[name], **naming})
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), TINY["scheduler"])
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), pad_token=TINY["pad_token"])
