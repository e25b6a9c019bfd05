"""Model upscalers: the ESRGAN family that A1111's hires fix and Extras tab and ComfyUI's
``UpscaleModelLoader`` run, from the ``.safetensors`` files people keep in
``models/ESRGAN`` / ``models/RealESRGAN`` / ``models/upscale_models``.

Four architectures, recognised from the file's tensor names and shapes alone
(``engine/upscaler_config.py``, which needs no torch):

- ESRGAN's RRDBNet in the original layout (``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ...:
  ESRGAN_4x, 4x-UltraSharp, Remacri, Siax and most community models), any number of
  blocks and ×1, ×2, ×4 or ×8;
- the same network in BasicSR's layout (``conv_first``, ``body.N.rdb1.conv1``, ``conv_up1``:
  RealESRGAN_x4plus, x4plus_anime_6B, x2plus), whose ×2 and ×1 models pixel-unshuffle their
  input first;
- Real-ESRGAN's SRVGGNetCompact (``body.0`` ... with PReLU: realesr-general-x4v3,
  realesr-animevideov3), a plain conv stack whose output is pixel-shuffled and added to the
  nearest-upsampled input;
- SPAN (Wan et al. 2024, "Swift Parameter-free Attention Network": ``conv_1.sk``,
  ``block_N.c1_r.conv.0`` ...: 4x-ClearRealityV1, 2xHFA2kSPAN and other community models), six
  blocks of re-parameterised convs with a parameter-free attention, pixel-shuffled.

Pixels go in as RGB in [0, 1] (the order the models were trained in; ComfyUI's and A1111's
current order) and come out clamped to [0, 1]. A large image runs in tiles of ``tile``
input pixels, each with ``tile_pad`` pixels of context on every side that is cut from its
output: every output pixel is computed with at least that much of its surroundings, and
exactly as the whole image would give it where the network's reach is within the pad.

A1111's semantics are kept where they matter to a picture: ``Upscaler.upscale`` runs the
model until the image is as large as asked (at most 3 passes) and resizes the result with
Lanczos to the size asked, rounded down to a multiple of 8; the hires fix
(``Upscaler.resize``) resizes to its exact target; ``Upscaler.one_pass`` is ComfyUI's
ImageUpscaleWithModel (one pass, then its ImageScale: ``comfy_scale``). Pickles (``.pth``)
are refused, as everywhere in sdrt: convert them to ``.safetensors`` first.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SdrtError
from .images import rgb_image
from .upscaler_config import UpscalerConfig, config_of, read_shapes
from .weights import SafetensorsFiles, load_parameters

MAX_PASSES = 3  # A1111's: a ×2 model reaches at most ×8


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


class Conv3XC(nn.Module):
    """SPAN's re-parameterised 3x3 conv. Trained as a 1x1 → 3x3 (unpadded) → 1x1 chain that
    widens by ``gain`` in the middle, plus a 1x1 skip (``sk``); run as the one padded 3x3
    conv they add up to, whose weights ``fuse`` computes (a file's own ``eval_conv`` copy of
    them may be stale, so it is not read)."""

    def __init__(self, cin, cout, gain=2):
        super().__init__()
        self.sk = nn.Conv2d(cin, cout, 1)
        self.conv = nn.Sequential(nn.Conv2d(cin, cin * gain, 1),
                                  nn.Conv2d(cin * gain, cout * gain, 3),
                                  nn.Conv2d(cout * gain, cout, 1))
        self.register_buffer("weight", None)
        self.register_buffer("bias", None)

    @torch.no_grad()
    def fuse(self):
        """The chain and the skip as one 3x3 conv, composed in float32: the 1x1s are matrices
        on each side of the 3x3 kernel; the first bias passes through the 3x3 as its sum."""
        (w1, b1), (w2, b2), (w3, b3) = ((c.weight.float(), c.bias.float()) for c in self.conv)
        w1, w3 = w1[:, :, 0, 0], w3[:, :, 0, 0]  # (mid, in), (out, mid')
        weight = torch.einsum("om,mnyx,ni->oiyx", w3, w2, w1)
        bias = w3 @ (w2.sum((2, 3)) @ b1 + b2) + b3
        weight[:, :, 1, 1] += self.sk.weight.float()[:, :, 0, 0]
        bias += self.sk.bias.float()
        dtype = self.sk.weight.dtype
        self.weight, self.bias = weight.to(dtype), bias.to(dtype)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


class SPAB(nn.Module):
    """SPAN's block: three Conv3XC (SiLU after the first two); the input plus the third's
    output, weighed by sigmoid(third) − 0.5 (the parameter-free attention). Also returns the
    first conv's output, which the network's last block hands on."""

    def __init__(self, nf):
        super().__init__()
        self.c1_r, self.c2_r, self.c3_r = Conv3XC(nf, nf), Conv3XC(nf, nf), Conv3XC(nf, nf)

    def forward(self, x):
        first = self.c1_r(x)
        third = self.c3_r(F.silu(self.c2_r(F.silu(first))))
        return (third + x) * (torch.sigmoid(third) - 0.5), first


class SPANNet(nn.Module):
    """SPAN: a Conv3XC, six SPABs, then the first conv's features, the last block's (through
    another Conv3XC), the first block's and the last block's first conv joined and mixed by a
    1x1 conv; a 3x3 conv to channels × scale², pixel-shuffled. With ``norm`` the input is
    first centred on SPAN's RGB mean and scaled by 255 (its output is not scaled back)."""

    MEAN = (0.4488, 0.4371, 0.4040)

    def __init__(self, cfg: UpscalerConfig):
        super().__init__()
        nf, s = cfg.features, cfg.scale
        self.norm, self.scale = cfg.norm, s
        self.conv_1 = Conv3XC(cfg.channels, nf)
        for k in range(1, cfg.blocks + 1):
            setattr(self, f"block_{k}", SPAB(nf))
        self.blocks = cfg.blocks
        self.conv_cat = nn.Conv2d(4 * nf, nf, 1)
        self.conv_2 = Conv3XC(nf, nf)
        self.upsampler = nn.Sequential(_conv(nf, cfg.channels * s * s))

    def fuse(self):
        for m in self.modules():
            if isinstance(m, Conv3XC):
                m.fuse()
        return self

    def forward(self, x):
        if self.norm:
            x = (x - x.new_tensor(self.MEAN).view(1, 3, 1, 1)) * 255.0
        feat = self.conv_1(x)
        first_block, first = self.block_1(feat)  # (held to the end: the only one so held)
        out = first_block
        for k in range(2, self.blocks + 1):
            out, first = getattr(self, f"block_{k}")(out)
        mixed = self.conv_cat(torch.cat([feat, self.conv_2(out), first_block, first], 1))
        return F.pixel_shuffle(self.upsampler(mixed), self.scale)


def network(cfg: UpscalerConfig) -> nn.Module:
    """The module of ``cfg``'s architecture (its weights to be loaded, then ``ready``)."""
    return {"compact": CompactNet, "span": SPANNet}.get(cfg.arch, RRDBNet)(cfg)


def ready(net: nn.Module) -> nn.Module:
    """A network whose weights are in, as it runs: SPAN's convs fused."""
    return net.fuse() if isinstance(net, SPANNet) else net


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
    """({stripped key: file key}, {stripped key: shape}) of upscaler file ``path``."""
    found = read_shapes(path)
    return ({k: key for k, (key, _) in found.items()},
            {k: shape for k, (_, shape) in found.items()})


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

    def one_pass(self, images, method=None, width=None, height=None, crop="disabled"):
        """ComfyUI's ImageUpscaleWithModel over PIL ``images``: exactly one pass of the model
        (its own scale), then, with ``method``, the ImageScale after it to ``width`` ×
        ``height`` (``comfy_scale``); PIL RGB images, rounded to 8 bits once, at the end."""
        import numpy as np
        from PIL import Image

        from .images import pil_to_float
        out = []
        for im in images:
            y = self.run(torch.from_numpy(pil_to_float(im)).permute(2, 0, 1)[None])
            if method is not None:
                y = comfy_scale(y, method, width, height, crop)
            y = y[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
            out.append(Image.fromarray(np.rint(y * 255).astype(np.uint8)))
        return out

    def _passes(self, image, width, height, at_least_one):
        """The model run over ``image`` until it covers ``width`` × ``height`` (A1111's loop:
        at most ``MAX_PASSES``, stopping early if a pass does not change the size)."""
        for i in range(MAX_PASSES):
            if image.width >= width and image.height >= height and (i or not at_least_one):
                break
            size = image.size
            image = self.one_pass([image])[0]
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
            im = self._passes(rgb_image(im), w, h, at_least_one=scale == 1)
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
    cfg = config_of(set(shapes), shapes.__getitem__, path)
    with torch.device("meta"):
        net = network(cfg)
    rename = _file_key(cfg)
    wanted = {rename(n) for n, _ in net.named_parameters()}
    if cfg.arch == "span":  # what SPAN's files also hold: the fused convs (made again) and
        # the switch that turns the input's normalisation off
        wanted |= {k for k in keys if k.endswith(("eval_conv.weight", "eval_conv.bias"))}
        wanted |= {"no_norm"} & set(keys)
    extra = sorted(set(keys) - wanted)
    if extra:
        raise SdrtError(f"{path}: weights a {cfg.description} does not have: "
                        f"{', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}")
    with SafetensorsFiles([path]) as f:
        source = {k: f.source[keys[k]] for k in keys}
        net = load_parameters(net, source, device, dtype, path, rename)
    net = ready(net)
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    return Upscaler(net, cfg, name, tile, tile_pad)


# -- ComfyUI's ImageScale, after ImageUpscaleWithModel (Upscaler.one_pass) --------------------

def comfy_scale(x, method, width, height, crop="disabled"):
    """ComfyUI's ImageScale (``comfy.utils.common_upscale``) of images ``x`` (B, C, H, W),
    float in [0, 1], to ``width`` × ``height``: with ``crop`` "center" first cut to that aspect
    ratio about the centre (the cut rounded as Python rounds), then "lanczos" as ComfyUI runs
    it (to 8 bits, truncated, then PIL's Lanczos) or torch's ``interpolate`` in the mode named
    ("nearest-exact", "bilinear", "area", "bicubic": no antialiasing, no clamp)."""
    if crop == "center":
        h, w = x.shape[-2:]
        old, new = w / h, width / height
        cut_x = round((w - w * (new / old)) / 2) if old > new else 0
        cut_y = round((h - h * (old / new)) / 2) if old < new else 0
        x = x[..., cut_y:h - cut_y, cut_x:w - cut_x]
    if method != "lanczos":
        return F.interpolate(x, size=(height, width), mode=method)
    import numpy as np
    from PIL import Image
    out = []
    for im in x:
        pixels = np.clip(255.0 * im.permute(1, 2, 0).float().cpu().numpy(), 0, 255)
        out.append(np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize(
            (width, height), Image.LANCZOS)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, torch.float32) / 255
