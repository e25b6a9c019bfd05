"""ComfyUI's inpainting workflows (VAEEncodeForInpaint, SetLatentNoiseMask,
InpaintModelConditioning, ImagePadForOutpaint, the mask nodes, ImageCompositeMasked) read into
sdrt's inpainting: the nodes' settings, the mask as ComfyUI reads and grows it (checked against
the rules written out here), the refusals, and ``sdrt generate --workflow`` end to end against
the same inpainting asked for by options and by the library (the result decoded as it is, not
pasted over the picture as A1111 pastes it)."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import comfy
from sdrt.engine.errors import SdrtError
from test_cli import _run, tiny_dir  # noqa: F401  (tiny_dir: the fixture)
from test_comfy import DEFAULT, _pixels, _small


def vae_encode_for_inpaint(graph=DEFAULT, grow=6, mask=("10", 1)):
    """ComfyUI's inpainting example: a LoadImage whose alpha is the mask, VAEEncodeForInpaint,
    the KSampler at denoise 1."""
    g = copy.deepcopy(graph)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    g["11"] = {"class_type": "VAEEncodeForInpaint",
               "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": list(mask),
                          "grow_mask_by": grow}}
    g["3"]["inputs"]["latent_image"] = ["11", 0]
    del g["5"]
    return g


def set_latent_noise_mask(graph=DEFAULT, denoise=0.6):
    """A VAEEncode's latents under SetLatentNoiseMask, the mask a LoadImageMask's red channel
    of another file."""
    g = copy.deepcopy(graph)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    g["12"] = {"class_type": "LoadImageMask",
               "inputs": {"image": "mask.png", "channel": "red", "upload": "image"}}
    g["13"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0],
                                                             "mask": ["12", 0]}}
    g["3"]["inputs"].update(latent_image=["13", 0], denoise=denoise)
    del g["5"]
    return g


def inpaint_conditioning(graph=DEFAULT, denoise=0.8, **inputs):
    """InpaintModelConditioning between the prompts and the KSampler: its three outputs the
    sampler's positive, negative and latent."""
    g = copy.deepcopy(graph)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    g["11"] = {"class_type": "InpaintModelConditioning",
               "inputs": {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2],
                          "pixels": ["10", 0], "mask": ["10", 1], "noise_mask": True,
                          **inputs}}
    g["3"]["inputs"].update(positive=["11", 0], negative=["11", 1], latent_image=["11", 2],
                            denoise=denoise)
    del g["5"]
    return g


def with_controlnet(g, before_inpaint):
    """A ControlNetApplyAdvanced between the prompts and the InpaintModelConditioning
    (``before_inpaint``) or between it and the sampler."""
    g = copy.deepcopy(g)
    g["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.pth"}}
    g["21"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    g["22"] = {"class_type": "ControlNetApplyAdvanced",
               "inputs": {"control_net": ["20", 0], "image": ["21", 0], "strength": 0.5,
                          "start_percent": 0.0, "end_percent": 1.0}}
    if before_inpaint:
        g["22"]["inputs"].update(positive=["6", 0], negative=["7", 0])
        g["11"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    else:
        g["22"]["inputs"].update(positive=["11", 0], negative=["11", 1])
        g["3"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    return g


def with_composite(g, **inputs):
    """An ImageCompositeMasked between the VAEDecode and the save node: the result laid over
    the LoadImage's picture through its MASK."""
    g = copy.deepcopy(g)
    g["30"] = {"class_type": "ImageCompositeMasked",
               "inputs": {"destination": ["10", 0], "source": ["8", 0], "x": 0, "y": 0,
                          "resize_source": False, "mask": ["10", 1], **inputs}}
    g["9"]["inputs"]["images"] = ["30", 0]
    return g


def with_mask_nodes(g):
    """InvertMask, then GrowMask by 3 (square corners), then GrowMask by -1, between the
    LoadImage's MASK and the inpainting node."""
    g = copy.deepcopy(g)
    g["40"] = {"class_type": "InvertMask", "inputs": {"mask": ["10", 1]}}
    g["41"] = {"class_type": "GrowMask", "inputs": {"mask": ["40", 0], "expand": 3,
                                                   "tapered_corners": False}}
    g["42"] = {"class_type": "GrowMask", "inputs": {"mask": ["41", 0], "expand": -1}}
    g["11"]["inputs"]["mask"] = ["42", 0]
    return g


def test_inpainting_nodes_read_as_sdrts_inpainting():
    flow = comfy.read(vae_encode_for_inpaint())
    assert (flow.init_image, flow.mask, flow.grow_mask, flow.strength) == \
        ("photo.png", ("photo.png", "alpha"), 6, 1.0)
    assert flow.width is None and flow.prompt == "beautiful scenery nature glass bottle"
    assert comfy.read(vae_encode_for_inpaint(grow=0)).grow_mask == 0
    flow = comfy.read(set_latent_noise_mask())
    assert (flow.init_image, flow.mask, flow.grow_mask, flow.strength) == \
        ("photo.png", ("mask.png", "red"), None, 0.6)
    flow = comfy.read(inpaint_conditioning())
    assert (flow.init_image, flow.mask, flow.grow_mask, flow.strength) == \
        ("photo.png", ("photo.png", "alpha"), None, 0.8)
    assert (flow.prompt, flow.negative) == ("beautiful scenery nature glass bottle",
                                            "text, watermark")
    for before in (True, False):  # a ControlNet on either side of it
        flow = comfy.read(with_controlnet(inpaint_conditioning(), before))
        assert [c.strength for c in flow.controlnets] == [0.5] and flow.mask is not None
        assert flow.prompt == "beautiful scenery nature glass bottle"
    g = vae_encode_for_inpaint()  # the mask's default input: grow_mask_by 6
    del g["11"]["inputs"]["grow_mask_by"]
    assert comfy.read(g).grow_mask == 6
    assert not comfy.read(vae_encode_for_inpaint()).composite
    assert comfy.read(with_composite(vae_encode_for_inpaint())).composite
    assert comfy.read(with_composite(inpaint_conditioning())).composite
    flow = comfy.read(with_mask_nodes(vae_encode_for_inpaint()))
    assert flow.mask == ("photo.png", "alpha") and flow.mask_ops == (
        ("invert",), ("grow", 3, False), ("grow", -1, True))
    g = with_mask_nodes(vae_encode_for_inpaint())  # (the composite through the same nodes)
    g = with_composite(g, mask=["42", 0])
    assert comfy.read(g).composite


def _edit(graph, edit):
    g = copy.deepcopy(graph)
    edit(g)
    return g


REFUSED = {
    "greyed pixels under a lower denoise": (
        _edit(vae_encode_for_inpaint(), lambda g: g["3"]["inputs"].update(denoise=0.5)),
        "workflow node 3 (KSampler): denoise 0.5 on workflow node 11 (VAEEncodeForInpaint)"),
    "grow_mask_by out of range": (
        vae_encode_for_inpaint(grow=65),
        "workflow node 11 (VAEEncodeForInpaint): grow_mask_by must be an integer from 0 to 64"),
    "a mask from another node": (
        _edit(vae_encode_for_inpaint(), lambda g: g.update({"30": {
            "class_type": "FeatherMask", "inputs": {"mask": ["10", 1], "left": 4}}}) or
            g["11"]["inputs"].update(mask=["30", 0])),
        "workflow node 30 (FeatherMask) is not supported as VAEEncodeForInpaint's mask: sdrt "
        "takes LoadImageMask or LoadImage's MASK there"),
    "GrowMask past its bound": (
        _edit(with_mask_nodes(vae_encode_for_inpaint()), lambda g: g["41"]["inputs"].update(
            expand=-257)),
        "workflow node 41 (GrowMask): expand must be an integer from -256 to 256 and "
        "tapered_corners true or false, got -257 and False"),
    "LoadImage's IMAGE as the mask": (
        vae_encode_for_inpaint(mask=("10", 0)),
        "workflow node 11 (VAEEncodeForInpaint): mask links to output 0 of node 10 "
        "(LoadImage), whose outputs are 0 IMAGE, 1 MASK; mask takes its MASK"),
    "LoadImageMask's channel": (
        _edit(set_latent_noise_mask(), lambda g: g["12"]["inputs"].update(channel="cyan")),
        "workflow node 12 (LoadImageMask): channel must be one of alpha, red, green, blue"),
    "SetLatentNoiseMask on an empty latent": (
        _edit(set_latent_noise_mask(), lambda g: g.update({"5": DEFAULT["5"]}) or
            g["13"]["inputs"].update(samples=["5", 0])),
        "workflow node 5 (EmptyLatentImage) is not supported as SetLatentNoiseMask's samples"),
    "noise_mask off": (
        inpaint_conditioning(noise_mask=False),
        "workflow node 11 (InpaintModelConditioning): noise_mask False: sdrt keeps the latents "
        "outside the mask"),
    "its latent without its prompts": (
        _edit(inpaint_conditioning(), lambda g: g["3"]["inputs"].update(
            positive=["6", 0], negative=["7", 0])),
        "workflow node 3 (KSampler) samples node 11's (InpaintModelConditioning) latent, so "
        "its prompts must come through that node's positive and negative outputs"),
    "its outputs swapped": (
        _edit(inpaint_conditioning(), lambda g: g["3"]["inputs"].update(
            positive=["11", 1], negative=["11", 0])),
        "workflow node 3 (KSampler) must take node 11's (InpaintModelConditioning) positive "
        "and negative outputs as its positive and negative"),
    "its positive as the latent": (
        _edit(inpaint_conditioning(), lambda g: g["3"]["inputs"].update(
            latent_image=["11", 0])),
        "workflow node 3 (KSampler): latent_image links to output 0 of node 11 "
        "(InpaintModelConditioning), whose outputs are 0 CONDITIONING, 1 CONDITIONING, 2 "
        "LATENT; latent_image takes its LATENT"),
    "a hires fix of an inpainting": (
        _edit(vae_encode_for_inpaint(), lambda g: g.update({
            "30": {"class_type": "LatentUpscaleBy",
                   "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                              "scale_by": 1.5}},
            "31": {"class_type": "KSampler",
                   "inputs": {**g["3"]["inputs"], "latent_image": ["30", 0], "denoise": 0.5}}})
            or g["8"]["inputs"].update(samples=["31", 0])),
        "sdrt's hires fix redraws text to image; node 3 samples an image"),
    "a composite of an image to image": (
        _edit(with_composite(vae_encode_for_inpaint()), lambda g: g["11"].update(
            class_type="VAEEncode")),
        "workflow node 30 (ImageCompositeMasked): sdrt lays a result over its picture only "
        "when inpainting"),
    "a composite of a text to image": (
        _edit(with_composite(DEFAULT), lambda g: g.update({"10": {
            "class_type": "LoadImage", "inputs": {"image": "p.png"}}})),
        "workflow node 30 (ImageCompositeMasked): sdrt lays a result over its picture only "
        "when inpainting"),
    "a composite over another picture": (
        _edit(with_composite(vae_encode_for_inpaint()), lambda g: g.update({"31": {
            "class_type": "LoadImage", "inputs": {"image": "other.png"}}}) or
            g["30"]["inputs"].update(destination=["31", 0])),
        "workflow node 30 (ImageCompositeMasked): destination must be the inpainted picture "
        "(node 10's IMAGE)"),
    "a composite through another mask": (
        _edit(with_composite(vae_encode_for_inpaint()), lambda g: g.update({"31": {
            "class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "red"}}})
            or g["30"]["inputs"].update(mask=["31", 0])),
        "workflow node 30 (ImageCompositeMasked): mask must be the inpainting's ('photo.png', "
        "alpha, through the same mask nodes)"),
    "a composite through fewer mask nodes": (
        with_composite(with_mask_nodes(vae_encode_for_inpaint())),
        "workflow node 30 (ImageCompositeMasked): mask must be the inpainting's"),
    "a composite without a mask": (
        _edit(with_composite(vae_encode_for_inpaint()), lambda g: g["30"]["inputs"].pop("mask")),
        "workflow node 30 (ImageCompositeMasked): mask must be the inpainting's"),
    "a composite elsewhere": (
        with_composite(vae_encode_for_inpaint(), x=8),
        "workflow node 30 (ImageCompositeMasked): sdrt lays the result at x 0, y 0 at its own "
        "size (x 0, y 0, resize_source false), got x 8, y 0, resize_source False"),
    "a composite resized": (
        with_composite(vae_encode_for_inpaint(), resize_source=True),
        "got x 0, y 0, resize_source True"),
    "a VAE that does not decode": (
        _edit(vae_encode_for_inpaint(), lambda g: g.update({"30": {
            "class_type": "VAELoader", "inputs": {"vae_name": "other.safetensors"}}}) or
            g["11"]["inputs"].update(vae=["30", 0])),
        "workflow node 11 (VAEEncodeForInpaint) must encode with the VAE that decodes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_inpainting_refusals_name_the_node(case):
    graph, message = REFUSED[case]
    with pytest.raises(SdrtError) as e:
        comfy.read(graph)
    assert message in str(e.value), str(e.value)


def grown(mask, grow):
    """VAEEncodeForInpaint's mask written out: rounded (half to even), then each pixel set
    where the ``grow`` × ``grow`` box whose top-left corner is ceil((grow - 1) / 2) pixels up
    and left of it holds a set pixel."""
    m = np.round(mask)
    if not grow:
        return m
    pad = math.ceil((grow - 1) / 2)
    h, w = m.shape
    out = np.zeros_like(m)
    for y in range(h):
        for x in range(w):
            box = m[max(y - pad, 0):max(y - pad + grow, 0), max(x - pad, 0):max(x - pad + grow, 0)]
            out[y, x] = box.max() if box.size else 0
    return out


def bilinear(mask, height, width):
    """torch's bilinear resize (align_corners False) written out: each output pixel's centre
    mapped back to the input, clamped at the near edges, and its two neighbours blended along
    each axis."""
    def weights(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    (y0, y1, fy), (x0, x1, fx) = weights(height, mask.shape[0]), weights(width, mask.shape[1])
    rows = mask[y0] * (1 - fy)[:, None] + mask[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


@pytest.mark.parametrize("grow", [None, 0, 1, 2, 5, 6, 7])
def test_inpaint_mask_is_comfyuis(grow):
    rng = np.random.default_rng(grow or 0)
    mask = (rng.random((19, 23)) < 0.08).astype(np.float32)
    mask[rng.random(mask.shape) < 0.1] = 0.5  # halves: rounded to even (0)
    mask[3, 4] = 0.75
    got = comfy.inpaint_mask(mask, 23, 19, grow)
    want = mask if grow is None else grown(mask, grow)
    assert got.dtype == np.float32 and got.shape == (19, 23)
    assert np.array_equal(got, want), (grow, np.argwhere(got != want)[:5])
    if grow:  # an even box reaches one pixel further down and right than up and left
        one = np.zeros((9, 9), np.float32)
        one[4, 4] = 1
        ys, xs = np.nonzero(comfy.inpaint_mask(one, 9, 9, grow))
        pad = math.ceil((grow - 1) / 2)
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (
            4 - (grow - 1 - pad), 4 + pad, 4 - (grow - 1 - pad), 4 + pad)
    # At another size: scaled bilinearly first (then rounded and grown).
    small = rng.random((5, 7)).astype(np.float32)
    got = comfy.inpaint_mask(small, 16, 12, grow)
    scaled = bilinear(small.astype(np.float64), 12, 16)
    want = scaled if grow is None else grown(scaled, grow)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("source_size", [(30, 20), (24, 16)])
def test_composite_is_comfyuis_at_the_corner(source_size):
    # The source (the decoded picture) over the destination's top-left corner through the
    # mask scaled bilinearly to the source; the rest of the destination as it was.
    rng = np.random.default_rng(3)
    destination = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (*source_size[::-1], 3), dtype=np.uint8)
    mask = rng.random((7, 9)).astype(np.float32)
    got = np.asarray(comfy.composite(Image.fromarray(destination), Image.fromarray(source),
                                     mask))
    w, h = source_size
    weight = bilinear(mask.astype(np.float64), h, w)[..., None]
    want = destination.astype(np.float64)
    want[:h, :w] = source * weight + destination[:h, :w] * (1 - weight)
    assert got.shape == destination.shape
    assert np.abs(got.astype(int) - np.rint(want)).max() == 0
    # The destination read as LoadImage reads it: its alpha dropped, not laid over white.
    rgba = np.dstack([destination, np.zeros((20, 30), np.uint8)])
    again = comfy.composite(Image.fromarray(rgba, "RGBA"), Image.fromarray(source), mask)
    assert np.array_equal(np.asarray(again), got)


@pytest.mark.parametrize("tapered", [True, False])
def test_mask_operations_are_comfyuis(tapered):
    # GrowMask as ComfyUI runs it: scipy's grey dilation (erosion below 0) by a 3x3 cross (or
    # square), once per pixel of expand; InvertMask 1 - mask.
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(7)
    mask = ((rng.random((21, 17)) < 0.1) * rng.random((21, 17))).astype(np.float32)
    mask[0, 5] = mask[20, 16] = 1  # at the edges
    c = 0 if tapered else 1
    footprint = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    for expand in (1, 3, -1, -2):
        step = ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion
        want = 1 - mask
        for _ in range(abs(expand)):
            want = step(want, footprint=footprint)
        got = comfy.mask_operations(mask, (("invert",), ("grow", expand, tapered)))
        assert got.dtype == np.float32 and np.array_equal(got, want), (expand, tapered)
    assert np.array_equal(comfy.mask_operations(mask, ()), mask)


def _photo(tmp_path, seed=1):
    """A 32x24 RGBA photo: random colours everywhere (under the mask too), the alpha 0 over
    a rectangle (ComfyUI's MASK: 1 there), 100 and 200 in a few pixels (0.6 and 0.2: rounded to
    1 and 0). Returns (its RGB, the MASK as ComfyUI reads it)."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[6:14, 10:20, 3] = 0
    rgba[18, 3, 3], rgba[20, 26, 3] = 100, 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "photo.png")
    return rgba[..., :3], 1 - rgba[..., 3].astype(np.float32) / 255


def _generate(args, out, capsys):
    code, _, err = _run(["generate", *args, "-o", str(out)], capsys)
    assert code == 0, err
    return _pixels(out)


def _options(tmp_path, rgb, mask, strength, sampler="euler_a_normal"):
    """The options asking for the same inpainting: the photo without its alpha, the mask as
    white-on-black, no mask blur."""
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask-options.png")
    return ["beautiful scenery nature glass bottle", "--negative", "text, watermark", "--seed",
            "4", "--steps", "3", "--guidance", "6.5", "--sampler", sampler, "--init-image",
            str(tmp_path / "rgb.png"), "--mask", str(tmp_path / "mask-options.png"),
            "--mask-blur", "0", "--strength", str(strength)]


def test_cli_vae_encode_for_inpaint(tiny_dir, tmp_path, capsys):
    rgb, mask = _photo(tmp_path)
    (tmp_path / "wf.json").write_text(json.dumps(_small(vae_encode_for_inpaint())))
    got = _generate(["--workflow", str(tmp_path / "wf.json"), "--model", tiny_dir,
                     "--init-image", str(tmp_path / "photo.png")], tmp_path / "wf.png", capsys)
    repaint = grown(mask, 6)
    assert repaint[5:16, 9:22].all() and repaint.sum() < 0.5 * repaint.size
    want = _generate([*_options(tmp_path, rgb, repaint, 1), "--model", tiny_dir],
                     tmp_path / "options.png", capsys)
    inside, outside = repaint == 1, repaint == 0
    # The same inpainting: equal where it repaints; the options paste the photo back outside
    # the mask (A1111's overlay), the workflow keeps what the VAE decoded there (ComfyUI's).
    assert np.array_equal(got[inside], want[inside])
    assert np.array_equal(want[outside], rgb[outside])
    assert np.abs(got[outside].astype(int) - rgb[outside]).mean() > 8
    with Image.open(tmp_path / "wf.png") as im:
        assert "Mask blur: 0" in im.text["parameters"], im.text["parameters"]


def test_cli_composite_lays_the_result_over_the_picture(tiny_dir, tmp_path, capsys):
    rgb, mask = _photo(tmp_path)
    paths = {}
    for name, graph in (("plain", vae_encode_for_inpaint()),
                        ("composite", with_composite(vae_encode_for_inpaint()))):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(_small(graph)))
    plain, got = (_generate(["--workflow", str(paths[name]), "--model", tiny_dir, "--init-image",
                             str(tmp_path / "photo.png")], tmp_path / f"{name}.png", capsys)
                  for name in ("plain", "composite"))
    weight = mask[..., None]  # (the MASK ungrown, at the picture's size)
    want = np.rint(plain * weight + rgb * (1 - weight))
    assert np.array_equal(got, want)
    assert np.array_equal(got[mask == 0], rgb[mask == 0])
    assert np.array_equal(got[mask == 1], plain[mask == 1])


def test_cli_mask_nodes(tiny_dir, tmp_path, capsys):
    # InvertMask and GrowMask before VAEEncodeForInpaint: the options' mask is the photo's
    # MASK inverted, dilated by 3 (square), eroded by 1 (cross), then grown by 6 (its
    # written-out rule, ``grown``).
    ndimage = pytest.importorskip("scipy.ndimage")
    rgb, mask = _photo(tmp_path, seed=3)
    mask = 1 - mask  # (the alpha inverted, so that InvertMask gives the rectangle back)
    Image.fromarray(np.dstack([rgb, np.rint(255 * (1 - mask)).astype(np.uint8)]), "RGBA").save(
        tmp_path / "photo.png")
    (tmp_path / "wf.json").write_text(json.dumps(_small(with_mask_nodes(
        vae_encode_for_inpaint()))))
    got = _generate(["--workflow", str(tmp_path / "wf.json"), "--model", tiny_dir,
                     "--init-image", str(tmp_path / "photo.png")], tmp_path / "wf.png", capsys)
    square, cross = np.ones((3, 3)), np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    m = 1 - mask
    for _ in range(3):
        m = ndimage.grey_dilation(m, footprint=square)
    repaint = grown(ndimage.grey_erosion(m, footprint=cross), 6)
    assert 0 < repaint.mean() < 1
    want = _generate([*_options(tmp_path, rgb, repaint, 1), "--model", tiny_dir],
                     tmp_path / "options.png", capsys)
    assert np.array_equal(got[repaint == 1], want[repaint == 1])


def test_cli_set_latent_noise_mask_takes_the_mask_file(tiny_dir, tmp_path, capsys):
    rgb, _ = _photo(tmp_path)
    red = np.zeros((24, 32, 3), np.uint8)  # the mask in the red channel (LoadImageMask's)
    red[4:12, 6:22, 0] = 255
    red[..., 1] = 255  # (green and blue say otherwise: only red may decide)
    Image.fromarray(red).save(tmp_path / "m.png")
    (tmp_path / "wf.json").write_text(json.dumps(_small(set_latent_noise_mask(denoise=0.6),
                                                        sampler="euler")))
    base = ["--workflow", str(tmp_path / "wf.json"), "--model", tiny_dir, "--init-image",
            str(tmp_path / "photo.png")]
    code, _, err = _run(["generate", *base, "-o", str(tmp_path / "no.png")], capsys)
    assert code == 2 and "inpaints through the red of image 'mask.png': pass --mask PATH" in err
    assert len(err.strip().splitlines()) == 1, err
    got = _generate([*base, "--mask", str(tmp_path / "m.png")], tmp_path / "wf.png", capsys)
    repaint = red[..., 0].astype(np.float32) / 255
    want = _generate([*_options(tmp_path, rgb, repaint, 0.6, "euler_normal"), "--model",
                      tiny_dir], tmp_path / "options.png", capsys)
    inside, outside = repaint == 1, repaint == 0
    assert np.array_equal(got[inside], want[inside])
    assert np.abs(got[inside].astype(int) - rgb[inside]).mean() > 8
    assert np.abs(got[outside].astype(int) - rgb[outside]).mean() > 2  # (decoded, not pasted)


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory):
    """The tiny model with an inpainting UNet (9 input channels)."""
    from sdrt.engine.tiny import TINY, write_model
    folder = str(tmp_path_factory.mktemp("comfy-inpaint") / "model")
    torch.manual_seed(5)
    write_model(folder, {**TINY, "unet": {**TINY["unet"], "in_channels": 9}})
    return folder


def test_cli_inpaint_model_conditioning_on_an_inpainting_model(tiny_inpainting, tmp_path,
                                                                capsys):
    rgb, mask = _photo(tmp_path, seed=2)
    (tmp_path / "wf.json").write_text(json.dumps(_small(inpaint_conditioning(denoise=0.8))))
    got = _generate(["--workflow", str(tmp_path / "wf.json"), "--model", tiny_inpainting,
                     "--init-image", str(tmp_path / "photo.png")], tmp_path / "wf.png", capsys)
    repaint = mask  # (soft where the alpha is: the pipeline cuts it at half)
    want = _generate([*_options(tmp_path, rgb, repaint, 0.8), "--model", tiny_inpainting],
                     tmp_path / "options.png", capsys)
    inside = repaint >= 0.5
    assert np.array_equal(got[inside], want[inside])
    # --mask names the file whose alpha the workflow's LoadImage MASK reads.
    Image.fromarray(np.dstack([rgb, np.full((24, 32), 255, np.uint8)]), "RGBA").save(
        tmp_path / "opaque.png")
    again = _generate(["--workflow", str(tmp_path / "wf.json"), "--model", tiny_inpainting,
                       "--init-image", str(tmp_path / "opaque.png"), "--mask",
                       str(tmp_path / "photo.png")], tmp_path / "again.png", capsys)
    assert np.array_equal(again, got)


def outpaint_workflow(pad=(16, 8, 0, 8), feathering=6, grow=8):
    """ComfyUI's outpainting example: LoadImage → ImagePadForOutpaint → VAEEncodeForInpaint
    (the pad's IMAGE and MASK)."""
    g = vae_encode_for_inpaint(grow=grow, mask=("12", 1))
    left, top, right, bottom = pad
    g["12"] = {"class_type": "ImagePadForOutpaint",
               "inputs": {"image": ["10", 0], "left": left, "top": top, "right": right,
                          "bottom": bottom, "feathering": feathering}}
    g["11"]["inputs"]["pixels"] = ["12", 0]
    return g


def comfy_pad(rgb, left, top, right, bottom, feathering):
    """ImagePadForOutpaint written out as ComfyUI's loop: a 0.5 grey canvas, the picture at
    (left, top), the MASK 1 outside it and, within it, ((f - d) / f)² where the distance d to
    the nearest padded side (top/left: i, j; bottom/right: h - i, w - j) is under f."""
    h, w = rgb.shape[:2]
    canvas = np.full((h + top + bottom, w + left + right, 3), 128, np.uint8)
    canvas[top:top + h, left:left + w] = rgb
    mask = np.ones(canvas.shape[:2], np.float32)
    inner = np.zeros((h, w), np.float32)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        for i in range(h):
            for j in range(w):
                d = min(i if top else h, h - i if bottom else h, j if left else w,
                        w - j if right else w)
                if d < feathering:
                    inner[i, j] = ((feathering - d) / feathering) ** 2
    mask[top:top + h, left:left + w] = inner
    return canvas, mask


@pytest.mark.parametrize("pad,feathering", [((16, 8, 0, 8), 6), ((0, 0, 24, 0), 5),
                                            ((8, 8, 8, 8), 0), ((8, 0, 0, 0), 12)])
def test_outpaint_is_comfyuis(pad, feathering):
    rgb = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    canvas, mask = comfy.outpaint(Image.fromarray(rgb), (*pad, feathering), 4096)
    want_canvas, want_mask = comfy_pad(rgb, *pad, feathering)
    assert np.array_equal(np.asarray(canvas), want_canvas)
    np.testing.assert_allclose(mask, want_mask, rtol=1e-6, atol=0)
    assert mask.dtype == np.float32
    with pytest.raises(SdrtError, match=f"ImagePadForOutpaint pads the 32x24 image to "
                                        f"{canvas.width}x{canvas.height}; each side must be at "
                                        f"most {max(canvas.size) - 1} "):
        comfy.outpaint(Image.fromarray(rgb), (*pad, feathering), max(canvas.size) - 1)


def test_outpaint_reads():
    flow = comfy.read(outpaint_workflow())
    assert (flow.outpaint, flow.mask, flow.grow_mask, flow.init_image) == (
        (16, 8, 0, 8, 6), (None, "outpaint"), 8, "photo.png")
    g = with_composite(outpaint_workflow(), destination=["12", 0], mask=["12", 1])
    assert comfy.read(g).composite
    refusals = [
        (_edit(outpaint_workflow(), lambda g: g["11"].update(class_type="VAEEncode")),
         "workflow node 12 (ImagePadForOutpaint): sdrt paints around a picture only when "
         "inpainting"),
        (_edit(outpaint_workflow(), lambda g: g["11"]["inputs"].update(mask=["10", 1])),
         "workflow node 11 (VAEEncodeForInpaint): mask must be the MASK of the "
         "ImagePadForOutpaint node its pixels come from"),
        (_edit(outpaint_workflow(), lambda g: g["11"]["inputs"].update(pixels=["10", 0])),
         "workflow node 11 (VAEEncodeForInpaint): mask must be the MASK of the "
         "ImagePadForOutpaint"),
        (_edit(outpaint_workflow(), lambda g: g["12"]["inputs"].update(left=-8)),
         "workflow node 12 (ImagePadForOutpaint): left, top, right, bottom and feathering must "
         "be integers from 0 to 8192, got -8, 8, 0, 8, 6"),
        (with_composite(outpaint_workflow(), mask=["12", 1]),
         "workflow node 30 (ImageCompositeMasked): destination must be the inpainted picture "
         "(node 12's IMAGE)"),
    ]
    for graph, message in refusals:
        with pytest.raises(SdrtError) as e:
            comfy.read(graph)
        assert message in str(e.value), str(e.value)


def test_cli_outpaint(tiny_dir, tmp_path, capsys):
    rgb = np.random.default_rng(6).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    (tmp_path / "wf.json").write_text(json.dumps(_small(outpaint_workflow())))
    base = ["--workflow", str(tmp_path / "wf.json"), "--model", tiny_dir, "--init-image",
            str(tmp_path / "photo.png")]
    got = _generate(base, tmp_path / "wf.png", capsys)
    canvas, mask = comfy_pad(rgb, 16, 8, 0, 8, 6)
    assert got.shape == canvas.shape == (40, 48, 3)
    repaint = grown(mask, 8)
    want = _generate([*_options(tmp_path, canvas, repaint, 1), "--model", tiny_dir],
                     tmp_path / "options.png", capsys)
    assert np.array_equal(got[repaint == 1], want[repaint == 1])
    assert repaint[:8].all() and repaint[:, :16].all() and not repaint[16:24, 24:48].any()
    code, _, err = _run(["generate", *base, "--mask", str(tmp_path / "photo.png"), "-o",
                         str(tmp_path / "no.png")], capsys)
    assert code == 2 and "outpaints through its ImagePadForOutpaint's mask: --mask does not " \
                         "apply" in err, err
    # Laid over the canvas through the pad's MASK (ungrown)
    (tmp_path / "laid.json").write_text(json.dumps(_small(with_composite(
        outpaint_workflow(), destination=["12", 0], mask=["12", 1]))))
    laid = _generate(["--workflow", str(tmp_path / "laid.json"), *base[2:]],
                     tmp_path / "laid.png", capsys)
    weight = mask[..., None]
    assert np.array_equal(laid, np.rint(got * weight + canvas * (1 - weight)))
