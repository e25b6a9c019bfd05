"""ComfyUI's upscale-model nodes (UpscaleModelLoader, ImageUpscaleWithModel, then perhaps
ImageScale or ImageScaleBy): read from workflows as a hires fix in pixels and as an upscale of
the saved images, run as ComfyUI runs them (one pass of the model, then the scale node's own
resize, then VAEEncode's cut to multiples of 8), refused by name around anything else, and
served by the ComfyUI API over real HTTP with a tiny ESRGAN file from --upscaler-dir. The
references are written out here: the published network (``upscaler_files.reference``) or
sdrt's model pass, then ComfyUI's resizes (``comfy.utils.common_upscale`` and ``lanczos``)."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdrt.engine import comfy
from sdrt.engine.comfy import ModelUpscale
from sdrt.engine.errors import SdrtError
from sdrt.engine.hires import Hires, _comfy_upscale
from sdrt.engine.upscaler import load_upscaler
from test_cli import tiny_dir  # noqa: F401  (the fixture)
from test_comfy import DEFAULT, _img2img, _pixel_hires
from upscaler_files import compact_tensors, esrgan_tensors, reference, write

pytestmark = pytest.mark.usefixtures("one_thread")

# The upscale models the parsing tests' workflows name, by stem, with their scales.
SCALES = {"4x-UltraSharp": 4, "RealESRGAN_x2plus": 2, "R-ESRGAN 4x+": 4, "1x_filter": 1}


def scale_of(name):
    """``comfy.read``'s upscaler_scale over ``SCALES``."""
    if name not in SCALES:
        raise SdrtError("--upscaler-dir has no such model")
    return SCALES[name]


def model_hires(graph=DEFAULT, model="4x-UltraSharp.safetensors", scale=None, **second):
    """ComfyUI's hires fix in pixels through a model (the usual "2x with a 4x model"): the
    first picture decoded (node 22), ImageUpscaleWithModel (24) of UpscaleModelLoader (25),
    then the scale node ``scale`` (node 20; None: none), VAEEncode (23), the second KSampler
    (21)."""
    g = _pixel_hires(graph, **second)
    g["24"] = {"class_type": "ImageUpscaleWithModel", "inputs": {
        "upscale_model": ["25", 0], "image": ["22", 0]}}
    g["25"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}}
    if scale is None:
        del g["20"]
        g["23"]["inputs"]["pixels"] = ["24", 0]
    else:
        g["20"] = {"class_type": scale["class_type"], "inputs": {**scale["inputs"],
                                                                 "image": ["24", 0]}}
    return g


def final_upscale(graph=DEFAULT, model="RealESRGAN_x2plus.safetensors", scale=None):
    """``graph``'s decoded images (node 8) upscaled before the save node: ImageUpscaleWithModel
    (30) of UpscaleModelLoader (31), then the scale node ``scale`` (32; None: none)."""
    g = copy.deepcopy(graph)
    g["30"] = {"class_type": "ImageUpscaleWithModel", "inputs": {
        "upscale_model": ["31", 0], "image": ["8", 0]}}
    g["31"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}}
    g["9"]["inputs"]["images"] = ["30", 0]
    if scale is not None:
        g["32"] = {"class_type": scale["class_type"], "inputs": {**scale["inputs"],
                                                                 "image": ["30", 0]}}
        g["9"]["inputs"]["images"] = ["32", 0]
    return g


def by(scale_by, method="lanczos"):
    return {"class_type": "ImageScaleBy", "inputs": {"upscale_method": method,
                                                     "scale_by": scale_by}}


def to(width, height, method="bicubic", crop="disabled"):
    return {"class_type": "ImageScale", "inputs": {"upscale_method": method, "width": width,
                                                   "height": height, "crop": crop}}


# -- reading workflows ---------------------------------------------------------------------------

@pytest.mark.parametrize("first,model,scale,hires", [
    # 512² by a 4x model (2048²) and ImageScaleBy 0.5: the usual 2x, sizes in multiples of 8
    ((512, 512), "4x-UltraSharp.safetensors", by(0.5),
     Hires(upscaler="4x-UltraSharp", resize_x=1024, resize_y=1024,
           comfy_upscale=("lanczos", 1024, 1024, "disabled"))),
    # the model alone (a 2x model, named as A1111 and ComfyUI folders hold it)
    ((512, 768), "upscale_models/RealESRGAN_x2plus.pth", None,
     Hires(upscaler="RealESRGAN_x2plus", resize_x=1024, resize_y=1536,
           comfy_upscale=(None, 1024, 1536, "disabled"))),
    # round(2048 * 0.3) = 614 pixels, which VAEEncode cuts to 608
    ((512, 512), "4x-UltraSharp", by(0.3, "bicubic"),
     Hires(upscaler="4x-UltraSharp", resize_x=608, resize_y=608,
           comfy_upscale=("bicubic", 614, 614, "disabled"))),
    # ImageScale to a width, the height in proportion: round(3072 * 1000 / 2048) = 1500 → 1496
    ((512, 768), "R-ESRGAN 4x+", to(1000, 0, "area"),
     Hires(upscaler="R-ESRGAN 4x+", resize_x=1000, resize_y=1496,
           comfy_upscale=("area", 1000, 1500, "disabled"))),
    # ImageScale to another shape, cut about the centre first
    ((512, 512), "4x-UltraSharp.safetensors", to(768, 512, "bilinear", "center"),
     Hires(upscaler="4x-UltraSharp", resize_x=768, resize_y=512,
           comfy_upscale=("bilinear", 768, 512, "center"))),
    # ImageScale to 0 x 0 passes the picture on
    ((256, 256), "4x-UltraSharp.safetensors", to(0, 0),
     Hires(upscaler="4x-UltraSharp", resize_x=1024, resize_y=1024,
           comfy_upscale=(None, 1024, 1024, "disabled"))),
])
def test_hires_fix_through_a_model_is_read(first, model, scale, hires):
    g = model_hires(model=model, scale=scale)
    g["5"]["inputs"].update(width=first[0], height=first[1])
    flow = comfy.read(g, scale_of)
    want = Hires(**{**hires.__dict__, "steps": 14, "strength": 0.5})
    assert flow.hires == want
    assert flow.upscale is None and (flow.width, flow.height) == first
    # the second pass is at the size VAEEncode gives, which the hires fix's target keeps
    assert want.target(*first)[:2] == (want.resize_x, want.resize_y)
    assert want.check({}, 4096, 150, model_upscalers=(want.upscaler,)) == want


def test_upscale_of_the_saved_images_is_read():
    plain = comfy.read(DEFAULT)
    flow = comfy.read(final_upscale(), scale_of)
    assert flow.upscale == ModelUpscale("RealESRGAN_x2plus", 2)
    assert flow == comfy.Workflow(**{**plain.__dict__, "upscale": flow.upscale})
    assert flow.upscale.scaling(512, 512) == (None, 1024, 1024, "disabled")
    flow = comfy.read(final_upscale(model="4x-UltraSharp.pth", scale=by(0.5, "area")), scale_of)
    assert flow.upscale == ModelUpscale("4x-UltraSharp", 4, "area", scale_by=0.5)
    assert flow.upscale.scaling(512, 768) == ("area", 1024, 1536, "disabled")
    flow = comfy.read(final_upscale(scale=to(0, 1000, "nearest-exact", "center")), scale_of)
    assert flow.upscale.scaling(512, 768) == ("nearest-exact", 667, 1000, "center")
    # with a hires fix through a model too, and on image to image
    both = comfy.read(final_upscale(model_hires(scale=by(0.5))), scale_of)
    assert both.hires.comfy_upscale == ("lanczos", 1024, 1024, "disabled")
    assert both.upscale == ModelUpscale("RealESRGAN_x2plus", 2)
    flow = comfy.read(final_upscale(_img2img()), scale_of)
    assert flow.upscale == ModelUpscale("RealESRGAN_x2plus", 2) and flow.init_image


def test_scaling_is_comfyuis_sizes():
    # ImageScaleBy: round(side * scale_by), Python's rounding (half to even)
    assert ModelUpscale("m", 1, "bilinear", scale_by=0.5).scaling(5, 7) == \
        ("bilinear", 2, 4, "disabled")
    # ImageScale with one side 0: the other in proportion to the model's output, at least 1
    assert ModelUpscale("m", 2, "bicubic", height=3).scaling(100, 10) == \
        ("bicubic", 30, 3, "disabled")
    assert ModelUpscale("m", 2, "bicubic", height=1).scaling(10, 200) == \
        ("bicubic", 1, 1, "disabled")


R = r"workflow node "
REFUSED = {
    "a scale without a model before the save node": (
        lambda: _edit(final_upscale(scale=by(0.5)), lambda g: g["32"]["inputs"].update(
            image=["8", 0])),
        R + r"8 \(VAEDecode\) is not supported as ImageScaleBy's image: sdrt takes "
            r"ImageUpscaleWithModel there"),
    "a scale before the model": (
        lambda: _edit(final_upscale(scale=by(0.5)), lambda g: (
            g["32"]["inputs"].update(image=["8", 0]), g["30"]["inputs"].update(image=["32", 0]),
            g["9"]["inputs"].update(images=["30", 0]))),
        R + r"32 \(ImageScaleBy\) is not supported as ImageUpscaleWithModel's image: sdrt "
            r"takes VAEDecode there"),
    "two models in a row": (
        lambda: _edit(final_upscale(), lambda g: (
            g.update({"33": {"class_type": "ImageUpscaleWithModel", "inputs": {
                "upscale_model": ["31", 0], "image": ["8", 0]}}}),
            g["30"]["inputs"].update(image=["33", 0]))),
        R + r"33 \(ImageUpscaleWithModel\) is not supported as ImageUpscaleWithModel's image"),
    "another model loader": (
        lambda: _edit(final_upscale(), lambda g: g["31"].update(
            class_type="UpscaleModelLoaderPlus")),
        R + r"31 \(UpscaleModelLoaderPlus\) is not supported as ImageUpscaleWithModel's "
            r"upscale_model: sdrt takes UpscaleModelLoader there"),
    "an upscaled init image": (
        lambda: _edit(_img2img(), lambda g: g.update({
            "24": {"class_type": "ImageUpscaleWithModel", "inputs": {
                "upscale_model": ["25", 0], "image": ["10", 0]}},
            "25": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "1x_filter"}},
            "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["24", 0],
                                                         "vae": ["4", 2]}}})),
        R + r"10 \(LoadImage\) is not supported as ImageUpscaleWithModel's image: sdrt takes "
            r"VAEDecode there"),
    "an unknown method": (
        lambda: final_upscale(scale=by(0.5, "bislerp")),
        R + r"32 \(ImageScaleBy\): upscale_method must be one of nearest-exact, bilinear, "
            r"area, bicubic, lanczos, got 'bislerp'"),
    "a scale of 0": (lambda: final_upscale(scale=by(0)),
                     R + r"32 \(ImageScaleBy\): scale_by must be a positive number, got 0"),
    "an unknown crop": (
        lambda: final_upscale(scale=to(64, 64, crop="top")),
        R + r"32 \(ImageScale\): width and height must be 0 or more and crop \"disabled\" or "
            r"\"center\", got 64, 64 and 'top'"),
    "a model name that is not a string": (
        lambda: final_upscale(model=3),
        R + r"31 \(UpscaleModelLoader\): model_name must be a file name, got 3"),
    "an unknown model": (
        lambda: final_upscale(model="models/nope.pth"),
        R + r"31 \(UpscaleModelLoader\): model_name 'models/nope.pth': --upscaler-dir has no "
            r"such model"),
    "a hires fix to nothing": (
        lambda: model_hires(scale=by(0.003)),
        R + r"20 \(ImageScaleBy\) makes the 512x512 picture 6x6, which VAEEncode cuts to "
            r"nothing"),
    "a hires fix of an image": (
        lambda: model_hires(_img2img(), scale=by(0.5)),
        R + r"21 \(KSampler\): sdrt's hires fix redraws text to image"),
    "a hires fix encoding with another VAE": (
        lambda: _edit(model_hires(scale=by(0.5)), lambda g: (
            g.update({"40": {"class_type": "VAELoader", "inputs": {"vae_name": "v"}}}),
            g["23"]["inputs"].update(vae=["40", 0]))),
        R + r"23 \(VAEEncode\) must take the VAE that decodes the picture \(node 8's\)"),
    "another scale node after the model": (
        lambda: _edit(model_hires(scale=by(0.5)), lambda g: g["20"].update(
            class_type="ImageScaleToTotalPixels")),
        R + r"20 \(ImageScaleToTotalPixels\) is not supported as VAEEncode's pixels"),
}


def _edit(graph, edit):
    edit(graph)
    return graph


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_the_node(case):
    graph, message = REFUSED[case]
    with pytest.raises(SdrtError, match=message):
        comfy.read(graph(), scale_of)


def test_a_model_needs_its_scale():
    with pytest.raises(SdrtError, match=r"node 31 \(UpscaleModelLoader\) loads "
                                        r"'RealESRGAN_x2plus.safetensors': reading a workflow "
                                        r"that upscales with a model needs the upscale models"):
        comfy.read(final_upscale())
    assert comfy.read(DEFAULT) == comfy.read(DEFAULT, scale_of)  # none asked for: none read


# -- running them: one pass of the model, ComfyUI's resize, VAEEncode's cut ----------------------

def comfy_resize(y, method, width, height, crop="disabled"):
    """ComfyUI's ``common_upscale`` of (1, 3, H, W) floats, written out: the centre cut to the
    new aspect, then its ``lanczos`` (8 bits, truncated, PIL) or torch's ``interpolate``."""
    if crop == "center":
        h, w = y.shape[-2:]
        if w / h > width / height:
            x = round((w - w * ((width / height) / (w / h))) / 2)
            y = y[..., :, x:w - x]
        elif w / h < width / height:
            t = round((h - h * ((w / h) / (width / height))) / 2)
            y = y[..., t:h - t, :]
    if method != "lanczos":
        return F.interpolate(y, size=(height, width), mode=method)
    pixels = np.clip(255.0 * y[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    resized = Image.fromarray(pixels).resize((width, height), resample=Image.LANCZOS)
    return torch.from_numpy(np.asarray(resized).astype(np.float32) / 255).permute(2, 0, 1)[None]


def to_pil(y):
    return Image.fromarray(np.rint(y[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255)
                           .astype(np.uint8))


def assert_close(got, want, what):
    """Equal to within one level of 255 (the model's float rounding may round a pixel the
    other way); says where and by how much otherwise."""
    a = np.asarray(got.convert("RGB"), dtype=np.int16)
    b = np.asarray(want.convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"{what}: differs by {diff.max()} levels at " \
                            f"{np.unravel_index(diff.argmax(), diff.shape)}"


def _picture(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("method,size,crop", [
    (None, None, "disabled"),                  # the model's pass alone: 96 x 64
    ("lanczos", (37, 50), "disabled"),         # down and up at once, odd sizes, 8 bits first
    ("bicubic", (40, 24), "disabled"),         # torch's bicubic overshoots: clamped at the end
    ("bilinear", (40, 40), "center"),          # 96 x 64 cut to 64 x 64 about the centre
    ("area", (48, 32), "disabled"),
    ("nearest-exact", (100, 70), "center"),
])
def test_one_pass_is_comfyuis(tmp_path, method, size, crop):
    tensors = esrgan_tensors(blocks=1)
    up = load_upscaler(write(tmp_path / "x4.safetensors", tensors))
    image = _picture(24, 16)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    y = reference(tensors, x, "esrgan").clamp(0, 1)  # ComfyUI clamps the model's output
    if method is not None:
        y = comfy_resize(y, method, *size, crop)
    got = up.one_pass([image], method, *(size or (None, None)), crop)[0]
    assert got.size == (size or (96, 64))
    assert_close(got, to_pil(y), f"{method} {size} {crop}")


def test_hires_upscale_is_cut_as_vae_encode_cuts(tmp_path):
    up = load_upscaler(write(tmp_path / "x2.safetensors", compact_tensors(scale=2)))
    image = _picture(40, 32, seed=1)
    # 80 x 64, lanczos to 61 x 58; VAEEncode keeps 56 x 56 from (61 % 8) // 2 = 2, (58 % 8) // 2
    scaling = ("lanczos", 61, 58, "disabled")
    whole = up.one_pass([image], *scaling)[0]
    got = _comfy_upscale(up, [image], scaling, 56, 56)[0]
    assert np.array_equal(np.asarray(got), np.asarray(whole)[1:57, 2:58])
    with pytest.raises(SdrtError, match=r"gives a 80x64 picture where the workflow read "
                                        r"160x128: its file changed since"):
        _comfy_upscale(up, [image], (None, 160, 128, "disabled"), 160, 128)
    with pytest.raises(SdrtError, match=r"the hires fix's 64x56 is not what VAEEncode cuts "
                                        r"ComfyUI's 61x58 upscale to"):
        _comfy_upscale(up, [image], scaling, 64, 56)  # (a size given over the workflow's)
    with pytest.raises(SdrtError, match=r"is x2 now, x4 when the workflow was read"):
        ModelUpscale("x2", 4).run(up, [image])


# -- the ComfyUI API -----------------------------------------------------------------------------

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.demo.model import demo_pipeline  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_serve import TIMEOUT, assert_same_image, config  # noqa: E402
from test_serve_comfy import _history, _queue, _view, _workflow  # noqa: E402

PROMPT, NEGATIVE = "beautiful scenery nature glass bottle", "text, watermark"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """--upscaler-dir: a tiny ESRGAN x4 (original layout) and a compact x2."""
    folder = tmp_path_factory.mktemp("upscale_models")
    write(folder / "4x-Tiny.safetensors", esrgan_tensors(blocks=1, seed=3))
    write(folder / "2x-Compact.safetensors", compact_tensors(scale=2, seed=4))
    return folder


@pytest.fixture(scope="module")
def server(models):
    with LocalServer(config(upscaler_dir=str(models))) as url:
        yield url


@pytest.fixture(scope="module")
def ref_pipe():
    return demo_pipeline(torch.device("cpu"), torch.float32)


def _run_pass(up, image):
    """sdrt's one model pass over a PIL image, as floats (1, 3, H, W)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return up.run(x).cpu()


def _saved(url, graph):
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    png.load()
    return png


def test_object_info_lists_the_upscale_nodes(server):
    url = server
    info = httpx.get(f"{url}/object_info", timeout=TIMEOUT).json()
    names = ["2x-Compact.safetensors", "4x-Tiny.safetensors"]
    assert info["UpscaleModelLoader"]["input"]["required"] == {"model_name": [names]}
    assert info["UpscaleModelLoader"]["output"] == ["UPSCALE_MODEL"]
    assert info["UpscaleModelLoader"]["category"] == "loaders"
    one = httpx.get(f"{url}/object_info/ImageUpscaleWithModel", timeout=TIMEOUT).json()
    node = one["ImageUpscaleWithModel"]
    assert node["input"]["required"] == {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}
    assert node["output"] == ["IMAGE"] and node["category"] == "image/upscaling"
    scale_by = info["ImageScaleBy"]["input"]["required"]
    assert scale_by["upscale_method"][0] == list(comfy.SCALE_METHODS)
    assert scale_by["scale_by"][1]["min"] == 0.01
    assert httpx.get(f"{url}/models/upscale_models", timeout=TIMEOUT).json() == names


def test_served_hires_fix_through_a_model(server, ref_pipe, models):
    # 64² drawn, the 4x model (256²), ImageScaleBy 0.37 lanczos: round(94.72) = 95 pixels,
    # which VAEEncode cuts to 88 from the 3rd; the second pass redraws that.
    url = server
    graph = model_hires(_workflow(url, DEFAULT, seed=7), model="4x-Tiny.safetensors",
                        scale=by(0.37), steps=2, denoise=0.6)
    png = _saved(url, graph)
    assert png.size == (88, 88)
    assert "Hires resize: 88x88, Hires steps: 2, Hires upscaler: 4x-Tiny" in \
        png.text["parameters"], png.text["parameters"]
    # By hand: the first pass, the model's pass, ComfyUI's lanczos, the cut, then image to
    # image over ceil(2 / 0.6) = 4 steps running its last 2, the generator going on.
    g = [torch.Generator().manual_seed(7)]
    common = dict(negative_prompt=[NEGATIVE], guidance_scale=7.0, sampler="euler_a_normal")
    first = ref_pipe([PROMPT], height=64, width=64, num_inference_steps=2, generator=g,
                     output_type="pil", **common)[0]
    up = load_upscaler(models / "4x-Tiny.safetensors")
    big = to_pil(comfy_resize(_run_pass(up, first), "lanczos", 95, 95))
    image = big.crop((3, 3, 91, 91))
    want = ref_pipe([PROMPT], image=[image], strength=0.6, num_inference_steps=4, generator=g,
                    output_type="pil", **common)[0]
    assert_same_image(png, want, "ComfyUI hires fix through a model")


def test_served_upscale_of_the_saved_image(server, ref_pipe, models):
    # 64² drawn, the 2x compact model (128²), ImageScaleBy 0.75 bicubic: 96² saved.
    url = server
    graph = final_upscale(_workflow(url, DEFAULT, seed=5), model="2x-Compact.safetensors",
                          scale=by(0.75, "bicubic"))
    png = _saved(url, graph)
    assert png.size == (96, 96)
    assert "Size: 64x64" in png.text["parameters"]  # the size drawn at, as A1111 records it
    drawn = ref_pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64,
                     num_inference_steps=2, guidance_scale=7.0, sampler="euler_a_normal",
                     seed=5)[0]
    up = load_upscaler(models / "2x-Compact.safetensors")
    want = to_pil(comfy_resize(_run_pass(up, drawn), "bicubic", 96, 96))
    assert_close(png, want, "ComfyUI upscale of the saved image")
    # the model alone: its one pass
    png = _saved(url, final_upscale(_workflow(url, DEFAULT, seed=5), model="4x-Tiny"))
    assert png.size == (256, 256)
    assert_close(png, to_pil(_run_pass(load_upscaler(models / "4x-Tiny.safetensors"), drawn)),
                 "ComfyUI upscale with the model alone")


@pytest.mark.parametrize("graph,fragment", [
    (lambda g: final_upscale(g, model="nope.safetensors"),
     "workflow node 31 (UpscaleModelLoader): model_name 'nope.safetensors': --upscaler-dir has "
     "no such model (GET /models/upscale_models lists those it has)"),
    (lambda g: model_hires(g, model="RealESRGAN_x2plus.pth", scale=by(0.5)),
     "workflow node 25 (UpscaleModelLoader): model_name 'RealESRGAN_x2plus.pth': "
     "--upscaler-dir has no such model"),
    (lambda g: final_upscale(g, model="4x-Tiny.safetensors", scale=to(5000, 0)),
     "the model upscale of the saved images makes them 5000x5000 (from 64x64); each side must "
     "be from 1 to"),
    (lambda g: model_hires(g, model="4x-Tiny.safetensors", scale=by(0.5), steps=10 ** 6),
     "steps"),
], ids=["unknown model", "unknown hires model", "too large", "second pass checked"])
def test_bad_upscales_are_400s(server, graph, fragment):
    url = server
    r = httpx.post(f"{url}/prompt", json={"prompt": graph(_workflow(url, DEFAULT))},
                   timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == "prompt", error
    assert httpx.get(f"{url}/queue", timeout=TIMEOUT).json()["queue_running"] == []


# -- sdrt generate --workflow --upscaler-dir -------------------------------------------------------

def test_cli_workflow_upscales_as_comfyui(tiny_dir, tmp_path, capsys):
    """The CLI runs both shapes as the server does: (a) a hires fix through the model, cut as
    VAEEncode cuts, redrawn; (b) the saved images upscaled. Each against the library's calls
    composed by hand; a workflow naming a model without --upscaler-dir is one line."""
    import json

    from sdrt.engine import Pipeline
    from test_cli import _assert_one_error_line, _run
    from test_comfy import _small
    models = tmp_path / "upscale_models"
    models.mkdir()
    write(models / "4x-Tiny.safetensors", esrgan_tensors(blocks=1, seed=3))
    write(models / "2x-Compact.safetensors", compact_tensors(scale=2, seed=4))
    pipe = Pipeline.from_pretrained(tiny_dir, device="cpu")
    common = dict(negative_prompt=[NEGATIVE], guidance_scale=6.5, sampler="euler_a_normal")

    def cli(graph, name, *extra):
        (tmp_path / f"{name}.json").write_text(json.dumps(graph))
        out = tmp_path / f"{name}.png"
        code, _, err = _run(["generate", "--workflow", str(tmp_path / f"{name}.json"), "--model",
                             tiny_dir, *extra, "-o", str(out)], capsys)
        return code, err, out

    # (a) 32 x 24 drawn, ×4 (128 x 96), ImageScaleBy 0.37: 47 x 36, cut to 40 x 32 about the
    # centre, redrawn over ceil(2 / 0.6) = 4 steps running the last 2.
    graph = model_hires(_small(DEFAULT), model="4x-Tiny.safetensors", scale=by(0.37), steps=2,
                        denoise=0.6)
    code, err, out = cli(graph, "hires", "--upscaler-dir", str(models))
    assert code == 0, err
    png = Image.open(out)
    assert png.size == (40, 32)
    assert "Hires upscaler: 4x-Tiny" in png.text["parameters"], png.text["parameters"]
    g = [torch.Generator().manual_seed(4)]
    first = pipe([PROMPT], height=24, width=32, num_inference_steps=3, generator=g,
                 output_type="pil", **common)[0]
    big = to_pil(comfy_resize(_run_pass(load_upscaler(models / "4x-Tiny.safetensors"), first),
                              "lanczos", 47, 36))
    want = pipe([PROMPT], image=[big.crop((3, 2, 43, 34))], strength=0.6,
                num_inference_steps=4, generator=g, output_type="pil", **common)[0]
    assert_close(png, want, "the CLI's hires fix through a model")

    # (b) 32 x 24 drawn, ×2 (64 x 48), ImageScaleBy 0.75 bicubic: 48 x 36 saved
    graph = final_upscale(_small(DEFAULT), model="2x-Compact.safetensors",
                          scale=by(0.75, "bicubic"))
    code, err, out = cli(graph, "final", "--upscaler-dir", str(models))
    assert code == 0, err
    png = Image.open(out)
    assert png.size == (48, 36) and "Size: 32x24" in png.text["parameters"]
    drawn = pipe([PROMPT], height=24, width=32, num_inference_steps=3,
                 generator=[torch.Generator().manual_seed(4)], output_type="pil", **common)[0]
    up = load_upscaler(models / "2x-Compact.safetensors")
    assert_close(png, to_pil(comfy_resize(_run_pass(up, drawn), "bicubic", 48, 36)),
                 "the CLI's upscale of the saved image")

    code, err, out = cli(graph, "no-dir")
    assert code != 0 and not out.exists()
    _assert_one_error_line(err, "pass --upscaler-dir DIR (the folder holding "
                                "2x-Compact.safetensors)")
