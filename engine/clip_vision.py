"""CLIP's vision tower (transformers' CLIPVisionModelWithProjection layout): the image encoder
an IP-Adapter reads, OpenCLIP ViT-H/14 for SD 1.5's and ViT-bigG/14 for SDXL's.

It is loaded from a transformers folder (``config.json`` + ``model.safetensors``, the
``image_encoder`` folder of h94/IP-Adapter) or from one ``.safetensors`` file in
transformers' names (ComfyUI's ``models/clip_vision``), whose architecture the weights give.
``clip_pixels`` prepares images as transformers' ``CLIPImageProcessor`` does.
"""
import os
import re
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from .clip import ACTIVATIONS, NO_EFFECT_KEYS, CLIPEncoder
from .configs import MAX_CHANNELS, MAX_LAYERS, ConfigCheck
from .errors import SdrtError
from .layers import LayerNorm
from .weights import (SafetensorsFiles, component_weights, load_parameters, read_json,
                      refuse_pickle)

ARCHITECTURES = ("CLIPVisionModelWithProjection",)
# OpenAI's CLIP mean and standard deviation per RGB channel, as every CLIP image processor
# normalises.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 1024

    @classmethod
    def from_dict(cls, d):
        """The config of a ``config.json`` dict (or its ``vision_config``), every value
        checked (``SdrtError`` naming the key)."""
        check = ConfigCheck("image encoder")
        d = check.dict(check.dict(d).get("vision_config", d))
        names = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key in names or key in NO_EFFECT_KEYS:
                continue
            if key == "model_type" and value in ("clip_vision_model", None):
                continue
            if key == "architectures" and (value is None or (
                    isinstance(value, list) and all(a in ARCHITECTURES for a in value))):
                continue
            raise SdrtError(f"image encoder config: unsupported setting {key} = {value!r:.60} "
                            f"(sdrt runs transformers' {ARCHITECTURES[0]})")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in ACTIVATIONS:
            check.fail("hidden_act", f"one of {', '.join(ACTIVATIONS)}", cfg.hidden_act)
        hidden = check.integer("hidden_size", cfg.hidden_size)
        check.integer("intermediate_size", cfg.intermediate_size, hi=4 * MAX_CHANNELS)
        check.integer("num_hidden_layers", cfg.num_hidden_layers, lo=2, hi=MAX_LAYERS)
        heads = check.integer("num_attention_heads", cfg.num_attention_heads)
        if hidden % heads:
            check.fail("num_attention_heads", f"a divisor of hidden_size {hidden}", heads)
        size = check.integer("image_size", cfg.image_size, hi=4096)
        patch = check.integer("patch_size", cfg.patch_size, hi=size)
        if size % patch:
            check.fail("patch_size", f"a divisor of image_size {size}", patch)
        check.integer("num_channels", cfg.num_channels, hi=4)
        check.number("layer_norm_eps", cfg.layer_norm_eps, positive=True)
        check.integer("projection_dim", cfg.projection_dim)
        return cfg

    @classmethod
    def from_weights(cls, keys, shape_of, where):
        """The config a single file's weights give (``keys``, and ``shape_of(key)``).
        Heads: 16 for OpenCLIP's ViT-L/H/bigG widths (1024, 1280, 1664), else 64 channels
        per head; the activation: OpenAI's quick GELU at ViT-B/L widths, GELU (OpenCLIP's)
        otherwise."""
        def shape(key):
            if key not in keys:
                raise SdrtError(f"{where}: not a CLIP vision model in transformers' names "
                                f"(no {key})")
            return tuple(shape_of(key))
        hidden, channels, patch, _ = shape("vision_model.embeddings.patch_embedding.weight")
        positions = shape("vision_model.embeddings.position_embedding.weight")[0]
        side = round((positions - 1) ** 0.5)
        if side * side != positions - 1:
            raise SdrtError(f"{where}: {positions} position embeddings are not a square grid "
                            f"of patches and a class token")
        layers = 1 + max(int(m.group(1)) for m in
                         (re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k) for k in keys)
                         if m)
        return cls.from_dict(dict(
            hidden_size=hidden, num_channels=channels, patch_size=patch, image_size=side * patch,
            num_hidden_layers=layers,
            intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
            num_attention_heads=16 if hidden in (1024, 1280, 1664) else max(1, hidden // 64),
            hidden_act="quick_gelu" if hidden in (768, 1024) else "gelu",
            projection_dim=shape("visual_projection.weight")[0]))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, d)

    def forward(self, pixels):  # (B, 3, S, S) → (B, 1 + (S/p)², D)
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic)
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPVisionModelWithProjection(nn.Module):
    """Pixels (B, 3, S, S) from ``clip_pixels`` → the projected image embedding (B, P) and the
    penultimate layer's states (B, 1 + patches, D): transformers' ``image_embeds`` and
    ``hidden_states[-2]``, what IP-Adapter and IP-Adapter Plus read."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixels, states_only=False):
        """(image_embeds, penultimate states); with ``states_only`` the last layer is not run
        and the embedding is None."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels.to(self.visual_projection.weight.dtype)))
        layers = vm.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        if states_only:
            return None, x
        last = layers[-1](x)
        return self.visual_projection(vm.post_layernorm(last[:, 0])), x


def clip_pixels(images, size):
    """Images (PIL images, or uint8 (H, W, 3) arrays) → float32 (N, 3, size, size) as
    transformers' ``CLIPImageProcessor(size=size, crop_size=size)`` (PIL backend) prepares
    them: RGB, the shorter side resized to ``size`` (bicubic), the centre cropped, scaled to
    [0, 1] and normalised with CLIP's mean and standard deviation."""
    from PIL import Image
    out = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        scaled = int(size * long / short)
        image = image.resize((size, scaled) if w <= h else (scaled, size), Image.BICUBIC)
        w, h = image.size
        top, left = int((h - size) / 2), int((w - size) / 2)
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
        out.append((pixels - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def encoder_config(path) -> VisionConfig:
    """The config of the image encoder in ``path`` (a folder's ``config.json``, or read from a
    single file's tensor shapes without loading them)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return VisionConfig.from_dict(read_json(os.path.join(path, "config.json"),
                                                "image encoder config"))
    from safetensors import SafetensorError, safe_open
    refuse_pickle(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            return VisionConfig.from_weights(keys, lambda k: f.get_slice(k).get_shape(), path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SdrtError(f"{path}: not a readable safetensors file ({e})") from None


def load_image_encoder(path, device, dtype) -> CLIPVisionModelWithProjection:
    """A CLIP vision model from a transformers folder or one ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SdrtError(f"image encoder {path}: no such file or folder")
    cfg = encoder_config(path)
    files = component_weights(path, "model") if os.path.isdir(path) else [path]
    with SafetensorsFiles(files) as f:
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(cfg)
        return load_parameters(model, f.source, device, dtype, path)
