"""Tiny upscale-model files in the layouts people download, and the published networks written
out as plain functions over those files' tensors: the reference sdrt's modules are tested
against (``engine/upscaler.py`` shares no code with this file).

- ``esrgan``: ESRGAN's original layout (``model.0``, ``model.1.sub.N.RDBk.convj.0``, ...,
  ``model.{3n+2}``, ``model.{3n+4}``), as 4x-UltraSharp and ESRGAN_4x ship;
- ``real-esrgan``: BasicSR's RRDBNet (``conv_first``, ``body.N.rdbk.convj``, ``conv_up1/2``,
  ``conv_hr``, ``conv_last``), ×4 or, with a pixel-unshuffled input, ×2 and ×1;
- ``compact``: SRVGGNetCompact (``body.0`` conv, ``body.1`` PReLU, ..., the last conv);
- ``span``: SPAN (``conv_1``, ``block_1`` ... ``block_6``, ``conv_cat``, ``conv_2``,
  ``upsampler.0``), each re-parameterised conv as trained (``sk``, ``conv.0/1/2``) beside a
  stale ``eval_conv``, as chaiNNer's files hold them.
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


def span_tensors(nf=8, scale=4, norm=True, seed=0):
    """{key: tensor} of a random SPAN; its ``eval_conv`` tensors are noise (a file's copy of
    the fused conv is not to be trusted)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv3xc(key, cin, cout, gain=2):
        for name, (a, b, k) in {"sk": (cin, cout, 1), "conv.0": (cin, cin * gain, 1),
                                "conv.1": (cin * gain, cout * gain, 3),
                                "conv.2": (cout * gain, cout, 1), "eval_conv": (cin, cout, 3)
                                }.items():
            sd[f"{key}.{name}.weight"] = torch.randn(b, a, k, k, generator=g) * (
                0.7 / (a * k * k) ** 0.5)
            sd[f"{key}.{name}.bias"] = torch.randn(b, generator=g) * 0.05
    conv3xc("conv_1", 3, nf)
    for k in range(1, 7):
        for c in ("c1_r", "c2_r", "c3_r"):
            conv3xc(f"block_{k}.{c}", nf, nf)
    sd["conv_cat.weight"] = torch.randn(nf, 4 * nf, 1, 1, generator=g) * (0.7 / (4 * nf) ** 0.5)
    sd["conv_cat.bias"] = torch.randn(nf, generator=g) * 0.05
    conv3xc("conv_2", nf, nf)
    sd["upsampler.0.weight"], sd["upsampler.0.bias"] = _conv(g, nf, 3 * scale * scale)
    sd["upsampler.0.weight"] *= 0.2 if norm else 1.0  # features of a ×255 input are large
    sd["upsampler.0.bias"] += 0.5
    if not norm:
        sd["no_norm"] = torch.zeros(1)
    return sd


def _span_conv(tensors, key, t):
    """A re-parameterised conv, as its trained chain adds up to: the 3x3 kernel and bias of
    the unpadded chain (1x1, 3x3, 1x1) plus the skip, read off its responses (in float64) to
    a zero and to a unit 3x3 patch in each input channel and place, applied with padding 1."""
    w = {name: tensors[f"{key}.{name}"].double() for name in (
        "sk.weight", "sk.bias", *(f"conv.{i}.{p}" for i in range(3) for p in ("weight", "bias")))}

    def chain(p):  # patches (N, C, 3, 3) -> (N, C_out)
        y = p
        for i in range(3):
            y = F.conv2d(y, w[f"conv.{i}.weight"], w[f"conv.{i}.bias"])
        return (y + F.conv2d(p[:, :, 1:2, 1:2], w["sk.weight"], w["sk.bias"]))[:, :, 0, 0]
    c = w["sk.weight"].shape[1]
    bias = chain(torch.zeros(1, c, 3, 3, dtype=torch.float64))[0]
    units = torch.eye(c * 9, dtype=torch.float64).view(c * 9, c, 3, 3)
    kernel = (chain(units) - bias).T.reshape(-1, c, 3, 3)
    return F.conv2d(t, kernel.to(t.dtype), bias.to(t.dtype), padding=1)


def span_reference(tensors, x):
    """The published SPAN forward on ``x`` (B, 3, H, W) in [0, 1]."""
    if "no_norm" not in tensors:
        x = (x - torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)) * 255.0
    feat = _span_conv(tensors, "conv_1", x)
    out, outs, first = feat, [], None
    for k in range(1, 7):
        first = _span_conv(tensors, f"block_{k}.c1_r", out)
        second = _span_conv(tensors, f"block_{k}.c2_r", F.silu(first))
        third = _span_conv(tensors, f"block_{k}.c3_r", F.silu(second))
        out = (third + out) * (torch.sigmoid(third) - 0.5)
        outs.append(out)
    last = _span_conv(tensors, "conv_2", out)
    mixed = F.conv2d(torch.cat([feat, last, outs[0], first], 1), tensors["conv_cat.weight"],
                     tensors["conv_cat.bias"])
    up = F.conv2d(mixed, tensors["upsampler.0.weight"], tensors["upsampler.0.bias"], padding=1)
    return F.pixel_shuffle(up, int((up.shape[1] // 3) ** 0.5))


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
    if layout == "span":
        return span_reference(tensors, x)
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
