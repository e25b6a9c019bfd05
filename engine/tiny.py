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

from . import families
from .configs import SD15, SD21, SDXL, SDXL_REFINER
from .families import TEXT_ENCODERS
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
# SDXL's features at the tiny size: two text encoders (the second with a projection), a first
# level without attention, 1 and 2 transformer layers, the "text_time" added embedding of the
# pooled text and six time ids, Euler; the refiner: the second encoder only, five time ids.
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_hidden_layers": 2}
TINY_SDXL = {
    **SDXL,
    "unet": {**SDXL["unet"], "block_out_channels": [32, 64], "attention_head_dim": [2, 4],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2], "cross_attention_dim": 64,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
             "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 16},
    "vae": {**SDXL["vae"], "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
            "sample_size": 128},
    "text_encoder": {**SDXL["text_encoder"], **_TINY_TEXT, "projection_dim": 32},
    "text_encoder_2": {**SDXL["text_encoder_2"], **_TINY_TEXT, "projection_dim": 32},
}
TINY_SDXL_REFINER = {
    **SDXL_REFINER,
    "unet": {**TINY_SDXL["unet"], "cross_attention_dim": 32,
             "projection_class_embeddings_input_dim": 32 + 5 * 8},
    "vae": TINY_SDXL["vae"],
    "text_encoder_2": TINY_SDXL["text_encoder_2"],
}
TINY_CONFIGS = {"sd1": TINY, "sd2": TINY_SD2, "sdxl": TINY_SDXL, "sdxl-refiner": TINY_SDXL_REFINER}

# Which seed initialises which network (text encoder 0, UNet 1, VAE 2, second text encoder 3).
_SEEDS = {"text_encoder": 0, "unet": 1, "vae": 2, "text_encoder_2": 3}
_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "tokenizer_2": ("transformers", "CLIPTokenizer")}
_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
              "sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}


def config_family(config: dict) -> families.Family:
    """The family of a config dict (``configs.MODELS``' layout), as a folder of it reads."""
    return families.recognise(config["unet"], {c: config[c] for c in TEXT_ENCODERS if c in config},
                              config.get("model_index"), "config")


def _pad_token(config, family, tokenizer):
    default = dict(zip(family.tokenizers, family.pad_tokens))[tokenizer]
    return config.get("pad_token_2" if tokenizer == "tokenizer_2" else "pad_token", default)


def tiny_config(family: str = "sd1") -> dict:
    """The tiny config of a family (``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sdxl-refiner"``), a
    fresh copy."""
    return json.loads(json.dumps(TINY_CONFIGS[family]))


def _init_(module, seed):
    """Deterministic weights: N(0, 1/fan_in) matrices, norm scales 1 + N(0, 0.1²), biases
    N(0, 0.1²). Biases and shifts are non-zero on purpose: an exporter or a kernel that drops
    one (the dynamo ONNX exporter drops a conv bias that is all zeros) then changes the output.
    Drawn on the module's device (a full-size model on the GPU, not element by element on the
    CPU)."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g, device=device)
        with torch.no_grad():
            if p.dim() == 1:
                scale = "norm" in name and name.endswith("weight")
                p.copy_((1.0 if scale else 0.0) + 0.1 * noise)
            else:
                fan_in = p[0].numel() if "embedding" not in name else 1
                p.copy_(noise / math.sqrt(fan_in))
    return module.eval()


def random_components(config: dict, device="cpu", description="random-weight model") -> Components:
    """The networks of ``config``'s family with ``_init_``'s weights, its tokenizers and
    scheduler."""
    from .tokenizer import ClipTokenizer
    family = config_family(config)
    modules = {c: _init_(build(c, config[c], device=device), _SEEDS[c])
               for c in ("text_encoder", "unet", "vae", "text_encoder_2")
               if c in ("unet", "vae") or c in family.text_encoders}
    tokenizers = {t: ClipTokenizer.bundled(pad_token=_pad_token(config, family, t))
                  for t in family.tokenizers}
    return Components(modules.get("text_encoder"), modules["unet"], modules["vae"],
                      tokenizers.get("tokenizer"), config["scheduler"], description,
                      modules.get("text_encoder_2"), tokenizers.get("tokenizer_2"), family,
                      config.get("model_index", {}))


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
    family = config_family(config)
    present = {"unet", "vae", *family.text_encoders, *family.tokenizers}
    # A component the pipeline runs without is listed as [null, null], as diffusers does.
    classes = {k: v if k in present else (None, None) for k, v in _CLASSES.items()}
    classes["scheduler"] = ("diffusers", config["scheduler"]["_class_name"])
    os.makedirs(folder, exist_ok=True)
    options = {k: v for k, v in config.get("model_index", {}).items() if not k.startswith("_")}
    _write_json(os.path.join(folder, "model_index.json"),
                {"_class_name": _PIPELINES[family.name], **options,
                 **{k: list(v) for k, v in classes.items()}})
    for name, stem in WEIGHT_STEMS.items():
        module = getattr(c, name, None)
        if module is None:  # a network this family does not have (SD 1.x: text_encoder_2)
            continue
        sub = os.path.join(folder, name)
        os.makedirs(sub, exist_ok=True)
        tensors = {k: (v if dtype is None or not v.is_floating_point() else v.to(dtype))
                   .contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, os.path.join(sub, f"{stem}.safetensors"), metadata={"format": "pt"})
        # transformers names a model class its own way; diffusers by _class_name.
        naming = ({"architectures": [classes[name][1]], "model_type": "clip_text_model"}
                  if name in TEXT_ENCODERS else {"_class_name": classes[name][1]})
        _write_json(os.path.join(sub, "config.json"), {**config[name], **naming})
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), config["scheduler"])
    for tokenizer in family.tokenizers:
        write_clip_tokenizer(os.path.join(folder, tokenizer),
                             pad_token=_pad_token(config, family, tokenizer))


def write_tiny(folder):
    """Write the built-in tiny model as a diffusers folder (model_index.json, unet/, vae/, ...)."""
    write_model(folder, TINY, tiny_components())


def controlnet_config(unet_config: dict, vae_scale_factor: int, widths=None) -> dict:
    """The diffusers config of a ControlNet for a UNet of ``unet_config``: its down path and
    mid block, and a hint encoder that downsamples by ``vae_scale_factor`` (``widths``,
    default ControlNet's own (16, 32, 96, 256) cut or grown to that factor)."""
    from .controlnet import unet_part
    n = vae_scale_factor.bit_length()  # log2(factor) + 1 widths
    widths = list(widths or [16, 32, 96, 256][:n] + [256] * max(0, n - 4))
    return {**unet_part(unet_config), "_class_name": "ControlNetModel",
            "conditioning_embedding_out_channels": widths}


def write_controlnet(folder, config: dict, seed=0, dtype=None, device="cpu"):
    """A ControlNet of ``config`` (``controlnet_config``) with ``_init_``'s random weights
    (its zero convolutions too, so its residuals are not zero), as a diffusers folder."""
    from .controlnet import ControlNetConfig, ControlNetModel
    with torch.device(device):
        net = _init_(ControlNetModel(ControlNetConfig.from_dict(config)), seed)
    return _write_module(folder, net, config, dtype)


def adapter_config(unet_config: dict, vae_scale_factor: int, in_channels=3) -> dict:
    """The diffusers config of a full T2I-Adapter for a UNet of ``unet_config`` (one feature
    per UNet level, of its widths) over a VAE of ``vae_scale_factor``."""
    return {"_class_name": "T2IAdapter", "in_channels": in_channels,
            "channels": list(unet_config["block_out_channels"]), "num_res_blocks": 1,
            "downscale_factor": vae_scale_factor, "adapter_type": "full_adapter"}


def write_adapter(folder, config: dict, seed=0, dtype=None, device="cpu"):
    """A T2I-Adapter of ``config`` (``adapter_config``) with ``_init_``'s random weights, as
    a diffusers folder."""
    from .adapter import AdapterConfig, T2IAdapter
    with torch.device(device):
        adapter = _init_(T2IAdapter(AdapterConfig.from_dict(config)), seed)
    return _write_module(folder, adapter, config, dtype)


def _write_module(folder, module, config, dtype):
    os.makedirs(folder, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous().cpu()
               for k, v in module.state_dict().items()}
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    _write_json(os.path.join(folder, "config.json"), config)
    return folder
