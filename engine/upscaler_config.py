"""What an upscale-model file holds, from its header alone, and what a folder of them is
called: no torch here, so the CLI and the server check a request naming one before torch
loads (``engine/upscaler.py`` builds and runs the networks).

Four architectures are recognised from the tensor names and shapes: ESRGAN's RRDBNet in its
original layout (``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ...), the same network in
BasicSR's (``conv_first``, ``body.N.rdb1.conv1``, ``conv_up1``), whose ×2 and ×1 models
pixel-unshuffle their input, Real-ESRGAN's SRVGGNetCompact (``body.0`` ... with PReLU) and
SPAN (``conv_1.sk``, ``block_N.c1_r.conv.0``, ..., ``upsampler.0``).
"""
import json
import math
import os
import struct
from dataclasses import dataclass

from .errors import SdrtError, refuse_pickle
from .model_files import by_name

MAX_HEADER_BYTES = 100 * 2 ** 20  # safetensors' own bound on a header

# A1111 lists the Real-ESRGAN models it downloads under these names; a file of that stem
# answers to both.
A1111_NAMES = {"RealESRGAN_x4plus": "R-ESRGAN 4x+",
               "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
               "RealESRGAN_x2plus": "R-ESRGAN 2x+",
               "realesr-general-x4v3": "R-ESRGAN General 4xV3",
               "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
               "realesr-animevideov3": "R-ESRGAN AnimeVideo"}
SPAN_BLOCKS = 6  # SPAN's attention blocks (block_1 ... block_6)
# Training checkpoints keep the weights under one of these prefixes.
_PREFIXES = ("params_ema.", "params.", "module.")


@dataclass(frozen=True)
class UpscalerConfig:
    arch: str               # "esrgan" (original layout), "real-esrgan" (BasicSR), "compact"
    #                         or "span"
    channels: int           # image channels in and out (3: RGB)
    features: int           # width of the network (nf)
    blocks: int             # RRDB blocks, or the compact net's 3x3 convs between first and last
    growth: int = 0         # RRDB's growth channels (gc)
    upsamples: int = 0      # RRDBNet's nearest ×2 upsamples, each followed by a conv
    unshuffle: int = 1      # pixel-unshuffle factor of the input (BasicSR's ×2: 2, ×1: 4)
    scale: int = 4
    norm: bool = True       # SPAN: the input centred on its mean and scaled by 255 first

    @property
    def description(self):
        return {"esrgan": "ESRGAN", "real-esrgan": "Real-ESRGAN",
                "compact": "Real-ESRGAN compact", "span": "SPAN"}[self.arch] + f" x{self.scale}"


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


def config_of(keys, shape_of, where) -> UpscalerConfig:
    """The config of an upscaler file from its (prefix-stripped) keys and ``shape_of(key)``;
    only RGB models (3 channels in and out) are run."""
    cfg = _recognise(keys, shape_of, where)
    if cfg.channels != 3:
        raise SdrtError(f"{where}: a {cfg.description} of {cfg.channels} image channels; sdrt "
                        f"runs RGB upscale models (3 channels)")
    return cfg


def _index(key, prefix):
    """N of a key ``{prefix}.N.weight`` (None for any other key)."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[0] == prefix and parts[2] == "weight" \
        and parts[1].isdigit() else None


def _recognise(keys, shapes, where) -> UpscalerConfig:
    """The architecture and sizes the tensor names and shapes say."""
    def shape_of(key):  # a convolution's (out, in, kh, kw), each at least 1
        shape = shapes(key)
        if len(shape) != 4 or min(shape) < 1:
            raise SdrtError(f"{where}: {key} has shape {shape}, not a convolution's")
        return shape

    def square_scale(channels_out, channels):
        s = math.isqrt(max(channels_out // channels, 1))
        if s * s * channels != channels_out:
            raise SdrtError(f"{where}: the last conv's {channels_out} outputs are not "
                            f"{channels} channels times a square scale")
        return s

    if "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys:
        blocks = _count(keys, "model.1.sub.{}.RDB1.conv1.0.weight")
        tops = sorted(i for i in (_index(k, "model") for k in keys) if i is not None)
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
    if "conv_1.sk.weight" in keys and "block_1.c1_r.sk.weight" in keys:
        blocks = _count(keys, "block_{}.c1_r.sk.weight", start=1)
        if blocks != SPAN_BLOCKS:
            raise SdrtError(f"{where}: a SPAN of {blocks} blocks; sdrt knows SPAN's "
                            f"{SPAN_BLOCKS}")
        nf, channels = shape_of("conv_1.sk.weight")[:2]
        return UpscalerConfig("span", channels, nf, blocks,
                              scale=square_scale(shape_of("upsampler.0.weight")[0], channels),
                              norm="no_norm" not in keys)
    if "body.0.weight" in keys and len(shapes("body.0.weight")) == 4:
        convs = sorted(i for i in (_index(k, "body") for k in keys)
                       if i is not None and len(shapes(f"body.{i}.weight")) == 4)
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
    raise SdrtError(f"{where}: not an upscaler sdrt knows (ESRGAN, Real-ESRGAN, compact "
                    f"Real-ESRGAN or SPAN); its tensors start {', '.join(sorted(keys)[:3])}")


def read_shapes(path):
    """{key without a training prefix: (file key, shape)} of the ``.safetensors`` file
    ``path``, read from its JSON header alone (8 bytes of length, then the header)."""
    path = os.fspath(path)
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise SdrtError(f"upscaler {path}: no such file")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {n} bytes")
            header = json.loads(f.read(n))
        shapes = {_strip(k): (k, tuple(v["shape"])) for k, v in header.items()
                  if k != "__metadata__"}
        if not all(isinstance(d, int) and d >= 0 for _, shape in shapes.values() for d in shape):
            raise ValueError("a tensor shape that is not a list of sizes")
        return shapes
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError) as e:
        raise SdrtError(f"{path}: not a readable safetensors file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def file_config(path) -> UpscalerConfig:
    """The config of upscaler file ``path``, read from its header alone."""
    shapes = {k: shape for k, (_, shape) in read_shapes(path).items()}
    return config_of(set(shapes), shapes.__getitem__, os.fspath(path))


def upscaler_files(folder):
    """{name: path} of the ``.safetensors`` files under ``folder`` (searched recursively in
    sorted order, None: none), each by its stem and, for Real-ESRGAN's released files, also by
    the name A1111 lists it under; the first file of a name is kept."""
    found = {}
    for stem, path in by_name(folder).items():  # (in the walk's order, as named there)
        found.setdefault(stem, path)
        if stem in A1111_NAMES:
            found.setdefault(A1111_NAMES[stem], path)
    return found
