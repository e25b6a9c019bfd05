"""Model upscalers: the ESRGAN family that A1111's hires fix and Extras tab and ComfyUI's
``UpscaleModelLoader`` run, from the ``.safetensors`` files people keep in
``models/ESRGAN`` / ``models/RealESRGAN`` / ``models/upscale_models``.

Three architectures, recognised from the file's tensor names and shapes alone:

- ESRGAN's RRDBNet in the original layout (``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ...:
  ESRGAN_4x, 4x-UltraSharp, Remacri, Siax and most community models), any number of
  blocks and ×1, ×2, ×4 or ×8;
- the same network in BasicSR's layout (``conv_first``, ``body.N.rdb1.conv1``, ``conv_up1``:
  RealESRGAN_x4plus, x4plus_anime_6B, x2plus), whose ×2 and ×1 models pixel-unshuffle their
  input first;
- Real-ESRGAN's SRVGGNetCompact (``body.0`` ... with PReLU: realesr-general-x4v3,
  realesr-animevideov3), a plain conv stack whose output is pixel-shuffled and added to the
  nearest-upsampled input.

Pixels go in as RGB in [0, 1] (the order the models were trained in; ComfyUI's and A1111's
current order) and come out clamped to [0, 1]. A large image runs in tiles of ``tile``
input pixels, each with ``tile_pad`` pixels of context on every side that is cut from its
output: every output pixel is computed with at least that much of its surroundings, and
exactly as the whole image would give it where the network's reach is within the pad.

A1111's semantics are kept where they matter to a picture: ``Upscaler.upscale`` runs the
model until the image is as large as asked (at most 3 passes) and resizes the result with
Lanczos to the size asked, rounded down to a multiple of 8; the hires fix
(``Upscaler.resize``) resizes to its exact target. Pickles (``.pth``) are refused, as
everywhere in sdrt: convert them to ``.safetensors`` first.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SdrtError
from .weights import SafetensorsFiles, load_parameters, refuse_pickle

# A1111 lists the Real-ESRGAN models it downloads under these names; a file of that stem
# answers to both.
A1111_NAMES = {"RealESRGAN_x4plus": "R-ESRGAN 4x+",
               "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
               "RealESRGAN_x2plus": "R-ESRGAN 2x+",
               "realesr-general-x4v3": "R-ESRGAN General 4xV3",
               "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
               "realesr-animevideov3": "R-ESRGAN AnimeVideo"}
MAX_PASSES = 3  # A1111's: a ×2 model reaches at most ×8
# Training checkpoints keep the weights under one of these prefixes.
_PREFIXES = ("params_ema.", "params.", "module.")


@dataclass(frozen=True)
class UpscalerConfig:
    arch: str               # "esrgan" (original layout), "real-esrgan" (BasicSR) or "compact"
    channels: int           # image channels in and out (3: RGB)
    features: int           # width of the network (nf)
    blocks: int             # RRDB blocks, or the compact net's 3x3 convs between first and last
    growth: int = 0         # RRDB's growth channels (gc)
    upsamples: int = 0      # RRDBNet's nearest ×2 upsamples, each followed by a conv
    unshuffle: int = 1      # pixel-unshuffle factor of the input (BasicSR's ×2: 2, ×1: 4)
    scale: int = 4

    @property
    def description(self):
        return {"esrgan": "ESRGAN", "real-esrgan": "Real-ESRGAN",
                "compact": "Real-ESRGAN compact"}[self.arch] + f" x{self.scale}"


# -- the networks ---------------------------------------------------------------------------

def _conv(cin, cout):
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each reading the block's input and every earlier conv's output;
    LeakyReLU(0.2) after the first four, the fifth scaled by 0.2 onto the input."""

    def __init__(self, nf, gc):
        super().__init__()
        for j in range(1, 5):
            setattr(self, f"conv{j}", _conv(nf + (j - 1) * gc, gc))
        self.conv5 = _conv(nf + 4 * gc, nf)

    def forward(self, x):
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks in a row, scaled by 0.2 onto the input."""

    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, with BasicSR's parameter names: a conv, the RRDB trunk and a conv
    added to the trunk's input, then ``upsamples`` × (nearest ×2, conv, LeakyReLU), a conv
    with LeakyReLU and the output conv."""

    def __init__(self, cfg: UpscalerConfig):
        super().__init__()
        nf, u = cfg.features, cfg.unshuffle
        self.unshuffle = u
        self.conv_first = _conv(cfg.channels * u * u, nf)
        self.body = nn.Sequential(*(RRDB(nf, cfg.growth) for _ in range(cfg.blocks)))
        self.conv_body = _conv(nf, nf)
        self.ups = cfg.upsamples
        for k in range(1, cfg.upsamples + 1):
            setattr(self, f"conv_up{k}", _conv(nf, nf))
        self.conv_hr = _conv(nf, nf)
        self.conv_last = _conv(nf, cfg.channels)

    def forward(self, x):  # (B, C, H, W), H and W multiples of the unshuffle factor
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(1, self.ups + 1):
            up = getattr(self, f"conv_up{k}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class CompactNet(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact: conv + PReLU, ``blocks`` × (conv + PReLU), a conv to
    channels × scale², pixel-shuffled and added to the nearest-upsampled input. ``body``
    indices are the file's."""

    def __init__(self, cfg: UpscalerConfig):
        super().__init__()
        nf, s = cfg.features, cfg.scale
        layers = [_conv(cfg.channels, nf), nn.PReLU(nf)]
        for _ in range(cfg.blocks):
            layers += [_conv(nf, nf), nn.PReLU(nf)]
        layers.append(_conv(nf, cfg.channels * s * s))
        self.body = nn.Sequential(*layers)
        self.scale = s

    def forward(self, x):
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# -- recognising a file ---------------------------------------------------------------------

def _strip(key):
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _count(keys, pattern, start=0):
    """How many of ``pattern.format(start)``, ``pattern.format(start + 1)`` ... are keys."""
    n = start
    while pattern.format(n) in keys:
        n += 1
    return n - start


def _config(keys, shape_of, where) -> UpscalerConfig:
    """The config of an upscaler file from its (prefix-stripped) keys and ``shape_of(key)``."""
    def square_scale(channels_out, channels):
        s = math.isqrt(max(channels_out // channels, 1))
        if s * s * channels != channels_out:
            raise SdrtError(f"{where}: the last conv's {channels_out} outputs are not "
                            f"{channels} channels times a square scale")
        return s

    if "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys:
        blocks = _count(keys, "model.1.sub.{}.RDB1.conv1.0.weight")
        tops = sorted(int(k.split(".")[1]) for k in keys
                      if k.startswith("model.") and k.endswith(".weight") and k.count(".") == 2)
        ups = len(tops) - 3  # besides model.0, the hr conv and the last conv
        if ups < 0 or tops != [0] + [3 * k for k in range(1, ups + 1)] + \
                [3 * ups + 2, 3 * ups + 4]:
            raise SdrtError(f"{where}: an ESRGAN whose layers sdrt does not know "
                            f"(model.{', model.'.join(map(str, tops))})")
        nf, channels = shape_of("model.0.weight")[:2]
        gc = shape_of("model.1.sub.0.RDB1.conv1.0.weight")[0]
        return UpscalerConfig("esrgan", channels, nf, blocks, gc, ups, 1, 2 ** ups)
    if "conv_first.weight" in keys and "body.0.rdb1.conv1.weight" in keys:
        nf, cin = shape_of("conv_first.weight")[:2]
        channels = shape_of("conv_last.weight")[0] if "conv_last.weight" in keys else 3
        ups = _count(keys, "conv_up{}.weight", start=1)
        u = square_scale(cin, channels)
        if 2 ** ups % u:
            raise SdrtError(f"{where}: a Real-ESRGAN that would scale by 2^{ups}/{u}")
        return UpscalerConfig("real-esrgan", channels, nf,
                              _count(keys, "body.{}.rdb1.conv1.weight"),
                              shape_of("body.0.rdb1.conv1.weight")[0], ups, u, 2 ** ups // u)
    if "body.0.weight" in keys and len(shape_of("body.0.weight")) == 4:
        convs = sorted(int(k.split(".")[1]) for k in keys
                       if k.startswith("body.") and k.endswith(".weight") and len(shape_of(k)) == 4)
        if convs != list(range(0, 2 * len(convs), 2)) or len(convs) < 2:
            raise SdrtError(f"{where}: a compact Real-ESRGAN whose layers sdrt does not know "
                            f"(convs at body.{', body.'.join(map(str, convs))})")
        if "body.1.weight" not in keys:
            raise SdrtError(f"{where}: a compact Real-ESRGAN without PReLU weights (its "
                            f"activation is not known from the file)")
        nf, channels = shape_of("body.0.weight")[:2]
        last = shape_of(f"body.{convs[-1]}.weight")
        return UpscalerConfig("compact", channels, nf, len(convs) - 2, 0, 0, 1,
                              square_scale(last[0], channels))
    raise SdrtError(f"{where}: not an upscaler sdrt knows (ESRGAN, Real-ESRGAN or compact "
                    f"Real-ESRGAN); its tensors start {', '.join(sorted(keys)[:3])}")


def _file_key(cfg: UpscalerConfig):
    """Module parameter name → the file's (prefix-stripped) key."""
    if cfg.arch != "esrgan":
        return lambda name: name
    n = cfg.upsamples
    top = {"conv_first": "model.0", "conv_body": f"model.1.sub.{cfg.blocks}",
           "conv_hr": f"model.{3 * n + 2}", "conv_last": f"model.{3 * n + 4}",
           **{f"conv_up{k}": f"model.{3 * k}" for k in range(1, n + 1)}}

    def rename(name):
        parts = name.split(".")
        if parts[0] == "body":  # body.I.rdbK.convJ.P -> model.1.sub.I.RDBK.convJ.0.P
            return (f"model.1.sub.{parts[1]}.RDB{parts[2][3:]}.{parts[3]}.0.{parts[4]}")
        return f"{top[parts[0]]}.{parts[1]}"
    return rename


def _open(path):
    from safetensors import SafetensorError, safe_open
    path = os.fspath(path)
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise SdrtError(f"upscaler {path}: no such file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {_strip(k): k for k in f.keys()}, \
                {_strip(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SdrtError(f"{path}: not a readable safetensors file ({e})") from None


def file_config(path) -> UpscalerConfig:
    """The config of upscaler file ``path``, read from its header alone."""
    _, shapes = _open(path)
    return _config(set(shapes), shapes.__getitem__, os.fspath(path))


def upscaler_files(folder):
    """{name: path} of the ``.safetensors`` files under ``folder`` (searched recursively in
    sorted order, None: none), each by its stem and, for Real-ESRGAN's released files, also by
    the name A1111 lists it under; the first file of a name is kept."""
    found = {}
    if folder is None:
        return found
    for root, dirs, names in sorted(os.walk(folder)):
        dirs.sort()
        for n in sorted(names):
            stem, ext = os.path.splitext(n)
            if ext.lower() == ".safetensors":
                found.setdefault(stem, os.path.join(root, n))
                if stem in A1111_NAMES:
                    found.setdefault(A1111_NAMES[stem], os.path.join(root, n))
    return found


# -- running one ----------------------------------------------------------------------------

class Upscaler:
    """A loaded upscale model and how it runs over PIL images."""

    def __init__(self, net: nn.Module, config: UpscalerConfig, name, tile=512, tile_pad=32):
        for field, v in (("tile", tile), ("tile_pad", tile_pad)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (field == "tile"):
                raise SdrtError(f"upscaler {field} must be a{' positive' * (field == 'tile')} "
                                f"integer, got {v!r}")
        self.net, self.config, self.name = net, config, name
        self.tile, self.tile_pad = tile, tile_pad

    @property
    def scale(self):
        return self.config.scale

    def _forward(self, x):
        """One network pass over ``x`` (B, C, h, w), its sides padded (replicated) to the
        unshuffle factor and the output cut back to h·s × w·s."""
        u, s = self.config.unshuffle, self.config.scale
        h, w = x.shape[-2:]
        ph, pw = -h % u, -w % u
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.net(x)[..., :h * s, :w * s]

    @torch.inference_mode()
    def run(self, x):
        """One pass of the model over images ``x`` (B, C, H, W) in [0, 1], tiled: returns
        (B, C, H·s, W·s) in [0, 1], float32."""
        p = next(self.net.parameters())
        x = x.to(p.device, p.dtype)
        if p.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        B, C, H, W = x.shape
        s, t, pad = self.scale, self.tile, self.tile_pad
        if H <= t and W <= t:
            return self._forward(x).float().clamp_(0, 1)
        out = torch.empty(B, C, H * s, W * s, device=p.device, dtype=torch.float32)
        for y0 in range(0, H, t):
            for x0 in range(0, W, t):
                y1, x1 = min(y0 + t, H), min(x0 + t, W)
                ya, xa = max(y0 - pad, 0), max(x0 - pad, 0)
                tile = self._forward(x[..., ya:min(y1 + pad, H), xa:min(x1 + pad, W)])
                out[..., y0 * s:y1 * s, x0 * s:x1 * s] = \
                    tile[..., (y0 - ya) * s:(y1 - ya) * s, (x0 - xa) * s:(x1 - xa) * s]
        return out.clamp_(0, 1)

    def _image_pass(self, image):
        import numpy as np
        from PIL import Image

        from .images import pil_to_float
        x = torch.from_numpy(pil_to_float(image)).permute(2, 0, 1)[None]  # (1, 3, H, W)
        y = self.run(x)[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.rint(y * 255).astype(np.uint8))

    def _passes(self, image, width, height, at_least_one):
        """The model run over ``image`` until it covers ``width`` × ``height`` (A1111's loop:
        at most ``MAX_PASSES``, stopping early if a pass does not change the size)."""
        for i in range(MAX_PASSES):
            if image.width >= width and image.height >= height and (i or not at_least_one):
                break
            size = image.size
            image = self._image_pass(image)
            if image.size == size:
                break
        return image

    def upscale(self, images, scale):
        """A1111's ``Upscaler.upscale``: each PIL image to its size × ``scale`` rounded down to
        a multiple of 8, by as many passes as reach it (one at least where ``scale`` is 1: a
        ×1 model is a filter) and a Lanczos resize to the exact size."""
        from PIL import Image
        out = []
        for im in images:
            w, h = int(im.width * scale // 8 * 8), int(im.height * scale // 8 * 8)
            im = self._passes(im.convert("RGB"), w, h, at_least_one=scale == 1)
            out.append(im if im.size == (w, h) else im.resize((w, h), Image.LANCZOS))
        return out

    def resize(self, images, width, height):
        """A1111's resize with an upscaler (the hires fix's): the model while the image is
        smaller than ``width`` × ``height``, then Lanczos to exactly that size."""
        from PIL import Image
        out = []
        for im in images:
            scale = max(width / im.width, height / im.height)
            if scale > 1:
                im = self.upscale([im], scale)[0]
            out.append(im if im.size == (width, height)
                       else im.resize((width, height), Image.LANCZOS))
        return out


def load_upscaler(path, device="cpu", dtype=torch.float32, name=None, tile=512,
                  tile_pad=32) -> Upscaler:
    """An upscale model from one ``.safetensors`` file; ``name`` (default: the file's stem)
    is what requests and PNG info call it. Every tensor of the file must be one of the
    network's, or the file is refused by name."""
    path = os.fspath(path)
    keys, shapes = _open(path)
    cfg = _config(set(shapes), shapes.__getitem__, path)
    if cfg.scale < 1:
        raise SdrtError(f"{path}: the model shrinks images (scale {cfg.scale})")
    with torch.device("meta"):
        net = RRDBNet(cfg) if cfg.arch != "compact" else CompactNet(cfg)
    rename = _file_key(cfg)
    wanted = {rename(n) for n, _ in net.named_parameters()}
    extra = sorted(set(keys) - wanted)
    if extra:
        raise SdrtError(f"{path}: weights a {cfg.description} does not have: "
                        f"{', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}")
    with SafetensorsFiles([path]) as f:
        source = {k: f.source[keys[k]] for k in keys}
        net = load_parameters(net, source, device, dtype, path, rename)
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    return Upscaler(net, cfg, name, tile, tile_pad)
