"""Tiny upscale-model files in the layouts people download, and the published networks written
out as plain functions over those files' tensors: the reference sdrt's modules are tested
against (``engine/upscaler.py`` shares no code with this file).

- ``esrgan``: ESRGAN's original layout (``model.0``, ``model.1.sub.N.RDBk.convj.0``, ...,
  ``model.{3n+2}``, ``model.{3n+4}``), as 4x-UltraSharp and ESRGAN_4x ship;
- ``real-esrgan``: BasicSR's RRDBNet (``conv_first``, ``body.N.rdbk.convj``, ``conv_up1/2``,
  ``conv_hr``, ``conv_last``), ×4 or, with a pixel-unshuffled input, ×2 and ×1;
- ``compact``: SRVGGNetCompact (``body.0`` conv, ``body.1`` PReLU, ..., the last conv).
"""
import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def _conv(g, cin, cout):
    # Kaiming-like scale, so a deep stack neither vanishes nor explodes; non-zero biases.
    w = torch.randn(cout, cin, 3, 3, generator=g) * (0.5 / (cin * 9) ** 0.5)
    return w, torch.randn(cout, generator=g) * 0.05


def esrgan_tensors(layout="esrgan", nf=8, gc=4, blocks=2, upsamples=2, unshuffle=1, seed=0):
    """{key: tensor} of a random RRDBNet in ``layout`` ("esrgan" or "real-esrgan")."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(key, cin, cout):
        sd[key + ".weight"], sd[key + ".bias"] = _conv(g, cin, cout)
    old = layout == "esrgan"
    put("model.0" if old else "conv_first", 3 * unshuffle ** 2, nf)
    for i in range(blocks):
        for k in (1, 2, 3):
            for j in range(1, 6):
                key = (f"model.1.sub.{i}.RDB{k}.conv{j}.0" if old
                       else f"body.{i}.rdb{k}.conv{j}")
                put(key, nf + (j - 1) * gc, gc if j < 5 else nf)
    put(f"model.1.sub.{blocks}" if old else "conv_body", nf, nf)
    for k in range(1, upsamples + 1):
        put(f"model.{3 * k}" if old else f"conv_up{k}", nf, nf)
    put(f"model.{3 * upsamples + 2}" if old else "conv_hr", nf, nf)
    last = f"model.{3 * upsamples + 4}" if old else "conv_last"
    put(last, nf, 3)
    sd[last + ".bias"] += 0.5  # pictures around mid-grey, not clamped to black
    return sd


def compact_tensors(nf=8, convs=3, scale=4, seed=0):
    """{key: tensor} of a random SRVGGNetCompact: ``convs`` 3x3 convs between its first and
    its last, PReLU after each but the last."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    shapes = [(3, nf)] + [(nf, nf)] * convs + [(nf, 3 * scale * scale)]
    for n, (cin, cout) in enumerate(shapes):
        sd[f"body.{2 * n}.weight"], sd[f"body.{2 * n}.bias"] = _conv(g, cin, cout)
        if n < len(shapes) - 1:
            sd[f"body.{2 * n + 1}.weight"] = 0.25 + 0.1 * torch.randn(nf, generator=g)
    return sd


def write(path, tensors, prefix=""):
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _lrelu(x):
    return F.leaky_relu(x, 0.2)


def reference(tensors, x, layout):
    """The published forward of the network whose tensors are ``tensors``, on ``x`` (B, 3,
    H, W) in [0, 1] (for an unshuffling Real-ESRGAN, H and W multiples of its factor)."""
    def conv(key, t):
        return F.conv2d(t, tensors[key + ".weight"], tensors[key + ".bias"], padding=1)
    if layout == "compact":
        n = max(int(k.split(".")[1]) for k in tensors)
        out = x
        for i in range(0, n + 1, 2):
            out = conv(f"body.{i}", out)
            if f"body.{i + 1}.weight" in tensors:
                out = F.prelu(out, tensors[f"body.{i + 1}.weight"])
        s = int((out.shape[1] // 3) ** 0.5)
        return F.pixel_shuffle(out, s) + F.interpolate(x, scale_factor=s, mode="nearest")
    old = layout == "esrgan"
    first = "model.0" if old else "conv_first"
    u = int((tensors[first + ".weight"].shape[1] // 3) ** 0.5)
    if u > 1:
        x = F.pixel_unshuffle(x, u)
    fea = conv(first, x)
    trunk = fea
    i = 0
    while (f"model.1.sub.{i}.RDB1.conv1.0.weight" if old else f"body.{i}.rdb1.conv1.weight") \
            in tensors:
        block_in = trunk
        for k in (1, 2, 3):
            feats = [trunk]
            for j in range(1, 6):
                key = f"model.1.sub.{i}.RDB{k}.conv{j}.0" if old else f"body.{i}.rdb{k}.conv{j}"
                y = conv(key, torch.cat(feats, 1))
                feats.append(_lrelu(y) if j < 5 else y)
            trunk = feats[-1] * 0.2 + feats[0]
        trunk = trunk * 0.2 + block_in
        i += 1
    fea = fea + conv(f"model.1.sub.{i}" if old else "conv_body", trunk)
    k = 1
    while (f"model.{3 * k}.weight" if old else f"conv_up{k}.weight") in tensors:
        fea = _lrelu(conv(f"model.{3 * k}" if old else f"conv_up{k}",
                          F.interpolate(fea, scale_factor=2, mode="nearest")))
        k += 1
    n = k - 1
    fea = _lrelu(conv(f"model.{3 * n + 2}" if old else "conv_hr", fea))
    return conv(f"model.{3 * n + 4}" if old else "conv_last", fea)
