"""T2I-Adapters (diffusers' ``T2IAdapter``): a small network that turns a control image into
one feature map per UNet level, added to the UNet's down path where diffusers adds its
``down_intrablock_additional_residuals`` (``unet.UNetBlock.down``). Unlike a ControlNet it
does not see the latents or the timestep: its features are computed once per request and
scaled per UNet call.

Three architectures, by ``adapter_type``: "full_adapter" (SD 1.x/2.x: the image
pixel-unshuffled by 8, then one block per level, each but the first halving the size),
"full_adapter_xl" (SDXL: unshuffled by 16, one halving, the last feature for the mid block)
and "light_adapter" (the colour adapter). Loaded from a diffusers folder, a ``.safetensors``
with a ``config.json`` beside it, or one ``.safetensors`` in diffusers' names or the original
T2I-Adapter repository's (``body.N.block1``, ``conv_in``: A1111's and ComfyUI's files), the
architecture read from the weights.
"""
import dataclasses
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ConfigCheck
from .errors import SdrtError
from .weights import (SafetensorsFiles, component_weights, load_parameters, read_json,
                      refuse_pickle)

TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass(frozen=True)
class AdapterConfig:
    """A diffusers T2IAdapter ``config.json``."""
    in_channels: int = 3
    channels: tuple = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    @classmethod
    def from_dict(cls, d):
        check = ConfigCheck("t2i-adapter")
        d = check.dict(d)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        cfg = cls(**{**known, "channels": tuple(check.integers(
            "channels", known.get("channels", cls.channels)))})
        check.integer("in_channels", cfg.in_channels)
        check.integer("num_res_blocks", cfg.num_res_blocks, hi=64)
        check.integer("downscale_factor", cfg.downscale_factor, hi=64)
        if cfg.adapter_type not in TYPES:
            check.fail("adapter_type", f"one of {', '.join(TYPES)}", cfg.adapter_type)
        return cfg

    @property
    def total_downscale_factor(self):
        """The image's size over the smallest feature's."""
        n = len(self.channels)
        return self.downscale_factor * {"full_adapter": 2 ** (n - 1), "full_adapter_xl": 2,
                                        "light_adapter": 2 ** n}[self.adapter_type]


class _Resnet(nn.Module):
    """x + block2(relu(block1(x))); ``light``: both convs 3×3, else block2 1×1."""

    def __init__(self, c, light):
        super().__init__()
        self.block1 = nn.Conv2d(c, c, 3, padding=1)
        self.block2 = nn.Conv2d(c, c, 3, padding=1) if light else nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.block2(F.relu(self.block1(x)))


class _Block(nn.Module):
    """An optional 2× average pool (its size rounded up), a 1×1 conv where the width changes
    (always, to a quarter of it, in a light block), the ResNets, and a light block's 1×1
    conv back out."""

    def __init__(self, c_in, c_out, n, down, light):
        super().__init__()
        self.down = down
        inner = c_out // 4 if light else c_out
        if light or c_in != c_out:
            self.in_conv = nn.Conv2d(c_in, inner, 1)
        self.resnets = nn.Sequential(*(_Resnet(inner, light) for _ in range(n)))
        if light:
            self.out_conv = nn.Conv2d(inner, c_out, 1)

    def forward(self, x):
        if self.down:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        if hasattr(self, "in_conv"):
            x = self.in_conv(x)
        x = self.resnets(x)
        return self.out_conv(x) if hasattr(self, "out_conv") else x


class _Body(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        ch, n, kind = cfg.channels, cfg.num_res_blocks, cfg.adapter_type
        c_in = cfg.in_channels * cfg.downscale_factor ** 2
        light = kind == "light_adapter"
        if light:  # (in → c0), (c0 → c1, down), ..., (c_last → c_last, down)
            pairs = [(c_in, ch[0], False)] + [(ch[i], ch[i + 1], True)
                                              for i in range(len(ch) - 1)]
            pairs.append((ch[-1], ch[-1], True))
        else:
            self.conv_in = nn.Conv2d(c_in, ch[0], 3, padding=1)
            # full: each level but the first halves the size; XL: only the third does
            pairs = [(ch[max(i - 1, 0)], ch[i], i == 2 if kind == "full_adapter_xl" else i > 0)
                     for i in range(len(ch))]
        self.body = nn.ModuleList(_Block(a, b, n, down, light) for a, b, down in pairs)
        self.unshuffle = cfg.downscale_factor

    def forward(self, x):
        x = F.pixel_unshuffle(x, self.unshuffle)
        if hasattr(self, "conv_in"):
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """Feature maps, one per UNet level, from a control image; parameters under ``adapter.``
    as diffusers names them."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.config = cfg
        self.adapter = _Body(cfg)

    def forward(self, image):
        """image (B, in_channels, H, W) in [0, 1], H and W multiples of the total downscale
        factor → [(B, channels[i], H / f_i, W / f_i)]."""
        return self.adapter(image)

    @property
    def num_features(self):
        return len(self.adapter.body)


def runs_as_adapter(net):
    """Whether a loaded control net is a T2I-Adapter: sdrt's, or one inside an exported
    UNet (a ``controlnet.FusedControlNet`` of kind "adapter")."""
    return isinstance(net, T2IAdapter) or getattr(net, "kind", None) == "adapter"


def adapter_input(cfg: AdapterConfig, image):
    """A (B, 3, H, W) control image as an adapter of ``cfg`` reads it: a one-channel adapter
    gets its grey (ITU-R 601 weights, as PIL's "L" conversion)."""
    if cfg.in_channels == 1:
        weights = image.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (image * weights).sum(dim=1, keepdim=True)
    return image


# A1111's ControlNet extension's soft weights of an adapter's features, first level first
# (control modes "My prompt is more important" and "ControlNet is more important").
SOFT_WEIGHTS = (0.25, 0.62, 0.825, 1.0)


def adapter_scales(adapter: T2IAdapter, scale, mode="balanced"):
    """The factors (2, n) of an adapter's n features at conditioning scale ``scale`` for the
    unconditional (row 0) and the conditional (row 1) half of a CFG batch: all ``scale``
    (diffusers' ``adapter_conditioning_scale``); in control mode "prompt" or "controlnet"
    the extension's soft weights times ``scale``; in mode "controlnet" none for the
    unconditional half."""
    n = adapter.num_features
    if mode != "balanced":
        cond = torch.tensor((SOFT_WEIGHTS + (1.0,) * n)[:n]) * scale
    else:
        cond = torch.full((n,), float(scale))
    return torch.stack([torch.zeros(n) if mode == "controlnet" else cond, cond])


def _diffusers_name(keys, where):
    """A function from the keys of an adapter in the original T2I-Adapter repository's
    names (an optional ``adapter.`` prefix) to diffusers': full (``body.{level·n + j}.block1``
    → ``adapter.body.{level}.resnets.{j}.block1``, ``body.{level·n}.in_conv``, ``conv_in``) or
    light (``body.{level}.body.{j}`` → ``adapter.body.{level}.resnets.{j}``)."""
    prefix = "adapter." if any(k.startswith("adapter.body.") for k in keys) else ""
    names = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    if any(re.match(r"body\.\d+\.(skep|down_opt)\.", k) for k in names):
        raise SdrtError(f"{where}: this T2I-Adapter has skip or strided-conv downsampling "
                        f"layers (sk=False or use_conv=True), which no released adapter has; "
                        f"sdrt loads the released layouts")
    if any(re.match(r"body\.\d+\.body\.\d+\.", k) for k in names):  # light
        return lambda k: "adapter." + re.sub(r"^body\.(\d+)\.body\.", r"body.\1.resnets.",
                                             k[len(prefix):])
    blocks = sorted({int(m.group(1)) for k in names
                     if (m := re.match(r"body\.(\d+)\.block1\.weight$", k))})
    convs = sorted({int(m.group(1)) for k in names
                    if (m := re.match(r"body\.(\d+)\.in_conv\.weight$", k))})
    if not blocks or "conv_in.weight" not in names:
        raise SdrtError(f"{where}: not a T2I-Adapter (no body.N.block1 and conv_in weights)")
    n = convs[0] if convs else len(blocks)
    if len(blocks) % n:
        raise SdrtError(f"{where}: {len(blocks)} adapter blocks do not divide into levels of "
                        f"{n}")

    def rename(key):
        m = re.match(r"body\.(\d+)\.(.*)$", key[len(prefix):])
        if m is None:
            return "adapter." + key[len(prefix):]
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith("in_conv."):
            return f"adapter.body.{i // n}.{rest}"
        return f"adapter.body.{i // n}.resnets.{i % n}.{rest}"
    return rename


def _diffusers_config(keys, shape_of):
    """A diffusers-named adapter's config from its weights: the type, widths and blocks per
    level, the input channels and unshuffle factor (from conv_in's, or the first block's,
    input width: channels × factor², 3 channels where that is a square)."""
    light = "adapter.body.0.out_conv.weight" in keys
    levels = sorted({int(k.split(".")[2]) for k in keys if k.startswith("adapter.body.")})
    n = len({k.split(".")[4] for k in keys if k.startswith("adapter.body.0.resnets.")})
    if light:
        channels = [shape_of(f"adapter.body.{i}.out_conv.weight")[0] for i in levels[:-1]]
        width = shape_of("adapter.body.0.in_conv.weight")[1]
    else:
        channels = [shape_of(f"adapter.body.{i}.resnets.0.block1.weight")[0] for i in levels]
        width = shape_of("adapter.conv_in.weight")[1]
    in_channels = 3 if width % 3 == 0 and math.isqrt(width // 3) ** 2 == width // 3 else 1
    factor = math.isqrt(width // in_channels)
    kind = "light_adapter" if light else "full_adapter_xl" if factor == 16 else "full_adapter"
    return {"adapter_type": kind, "channels": channels, "num_res_blocks": n,
            "in_channels": in_channels, "downscale_factor": factor}


def is_adapter_file(keys):
    """Whether a ``.safetensors`` file's keys are a T2I-Adapter's."""
    return any(k.startswith(("adapter.body.", "adapter.conv_in.")) for k in keys) or (
        any(re.match(r"body\.\d+\.(body\.\d+\.)?block1\.weight$", k) for k in keys))


def is_adapter(path):
    """Whether ``path`` (a folder or a ``.safetensors`` file, with or without a
    ``config.json`` beside it) holds a T2I-Adapter rather than a ControlNet."""
    path = os.fspath(path)
    config = os.path.join(path, "config.json") if os.path.isdir(path) else \
        os.path.join(os.path.dirname(path), "config.json")
    if os.path.isfile(config):
        cfg = read_json(config, "config")
        return isinstance(cfg, dict) and (cfg.get("_class_name") == "T2IAdapter"
                                          or "adapter_type" in cfg)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return is_adapter_file(list(f.keys()))
        except (SafetensorError, OSError, ValueError):  # the ControlNet loader says why
            return False
    return False


def load_adapter(path, device, dtype, files=None, config=None, fits=None) -> T2IAdapter:
    """A T2I-Adapter from a diffusers folder, or a ``.safetensors`` file (``files`` its
    path, ``config`` the dict of a ``config.json`` beside it, if any). Without a config the
    weights say all but where a full adapter downsamples (it has no weights): an SD one
    unless it unshuffles by 16 (SDXL's), or, where ``fits(config)`` says only the other
    layout fits the model, that one."""
    path = os.fspath(path)
    if files is None:
        if os.path.isdir(path):
            config = read_json(os.path.join(path, "config.json"), "t2i-adapter config")
            files = component_weights(path, "diffusion_pytorch_model")
        else:
            refuse_pickle(path)
            files = [path]
            beside = os.path.join(os.path.dirname(path), "config.json")
            if os.path.isfile(beside):
                config = read_json(beside, "t2i-adapter config")
    with SafetensorsFiles(files) as f:
        source = f.source
        if not any(k.startswith("adapter.") and ".resnets." in k for k in source):
            rename = _diffusers_name(list(source), path)
            source = {rename(k): source[k] for k in source}
        guessed = config is None
        if guessed:
            config = _diffusers_config(set(source), lambda k: source[k]().shape)
        try:
            cfg = AdapterConfig.from_dict(config)
        except SdrtError as e:
            raise SdrtError(f"{path}: {e}") from None
        if guessed and fits is not None and cfg.adapter_type != "light_adapter" and \
                not fits(cfg):
            other = dataclasses.replace(cfg, adapter_type="full_adapter_xl" if
                                        cfg.adapter_type == "full_adapter" else "full_adapter")
            cfg = other if fits(other) else cfg
        with torch.device("meta"):
            adapter = T2IAdapter(cfg)
        return load_parameters(adapter, source, device, dtype, path).eval()


def _feature_points(cfg: AdapterConfig, vae_scale_factor):
    """Each feature's (width, size divisor relative to the latents)."""
    widths = list(cfg.channels)
    if cfg.adapter_type == "light_adapter":
        widths.append(widths[-1])
    d = cfg.downscale_factor / vae_scale_factor
    points = []
    for i, w in enumerate(widths):
        down = i == 2 if cfg.adapter_type == "full_adapter_xl" else i > 0
        d *= 2 if down else 1
        points.append((w, d))
    return points


def _unet_points(unet_cfg):
    """Where the UNet adds features: per down block (width, size divisor) — after its last
    layer in a block with attention, after its downsampler in one without — then the mid
    block's output."""
    widths, points, d = list(unet_cfg.block_out_channels), [], 1
    for i, kind in enumerate(unet_cfg.down_block_types):
        down = i < len(widths) - 1
        points.append((widths[i], d if kind.startswith("CrossAttn") or not down else 2 * d))
        d *= 2 if down else 1
    return points, (widths[-1], d)


def fits(cfg: AdapterConfig, unet_cfg, vae_scale_factor):
    """Whether the adapter's features fit the UNet (``check_fits``)."""
    return _feature_points(cfg, vae_scale_factor) == _wanted_points(cfg, unet_cfg)


def _wanted_points(cfg, unet_cfg):
    blocks, mid = _unet_points(unet_cfg)
    return blocks + [mid] if len(cfg.channels) + (cfg.adapter_type == "light_adapter") > \
        len(blocks) else blocks


def check_fits(cfg: AdapterConfig, unet_cfg, vae_scale_factor, where):
    """The adapter's features fit the UNet: one per down block, as wide as it and at its
    size where diffusers adds it, and at most one more, for the mid block's output."""
    features = _feature_points(cfg, vae_scale_factor)
    want = _wanted_points(cfg, unet_cfg)
    if features != want:
        show = lambda ps: ", ".join(f"{w}@1/{d:g}" for w, d in ps)
        raise SdrtError(f"{where}: this T2I-Adapter ({cfg.adapter_type}) is for another model: "
                        f"its features (width@size) are {show(features)}, this UNet takes "
                        f"{show(want)} (an adapter for SD 1.x, SD 2.x and SDXL fits only its "
                        f"own family)")
