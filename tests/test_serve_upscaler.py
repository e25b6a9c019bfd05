"""Upscale models on ``sdrt serve --upscaler-dir`` over real HTTP on 127.0.0.1: A1111's list
of upscalers, its Extras endpoints (``/sdapi/v1/extra-single-image``, ``extra-batch-images``)
giving the library's upscales (``engine.upscaler``) with A1111's crop, blend and
postprocessing text, the hires fix with a model upscaler, and every bad input a 4xx JSON
naming its field. Tiny files (nf 8, one block) and images of 24 to 40 pixels."""
import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.errors import SdrtError  # noqa: E402
from sdrt.engine.upscaler import load_upscaler  # noqa: E402
from sdrt.serve.a1111_upscale import ExtrasJob  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_serve import TIMEOUT, assert_same_image, config, png, ref_pipe  # noqa: E402,F401
from upscaler_files import compact_tensors, esrgan_tensors, write  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SINGLE, BATCH = "/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images"


def _picture(seed, width, height):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _b64(image, parameters=None):
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """--upscaler-dir: a ×4 ESRGAN (original layout), a ×2 compact Real-ESRGAN, a ×4 file of
    Real-ESRGAN's released name (A1111's "R-ESRGAN 4x+"), and a file that is no upscaler."""
    root = tmp_path_factory.mktemp("upscalers")
    write(root / "4x-Tiny.safetensors", esrgan_tensors(nf=8, gc=4, blocks=1))
    write(root / "compact-x2.safetensors", compact_tensors(nf=8, convs=1, scale=2))
    write(root / "RealESRGAN_x4plus.safetensors",
          esrgan_tensors("real-esrgan", nf=8, gc=4, blocks=1, seed=1))
    write(root / "broken.safetensors", {"conv.weight": compact_tensors()["body.0.weight"]})
    return root


@pytest.fixture(scope="module")
def served(folder):
    local = LocalServer(config(upscaler_dir=str(folder)))
    with local as url:
        yield url, local


def _library(folder, stem, image, scale):
    return load_upscaler(folder / f"{stem}.safetensors").upscale([image], scale)[0]


def _post(url, path, body):
    r = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def test_upscalers_lists_the_models_as_a1111(served, folder):
    url, _ = served
    items = httpx.get(f"{url}/sdapi/v1/upscalers", timeout=TIMEOUT).json()
    assert [u["name"] for u in items] == ["None", "Lanczos", "Nearest", "4x-Tiny", "broken",
                                          "compact-x2", "R-ESRGAN 4x+", "RealESRGAN_x4plus"]
    by_name = {u["name"]: u for u in items}
    assert by_name["Lanczos"]["model_path"] is None
    assert (by_name["4x-Tiny"]["scale"], by_name["compact-x2"]["scale"]) == (4, 2)
    alias = by_name["R-ESRGAN 4x+"]
    assert alias == {"name": "R-ESRGAN 4x+", "model_name": "RealESRGAN", "model_url": None,
                     "model_path": str(folder / "RealESRGAN_x4plus.safetensors"), "scale": 4}
    assert by_name["4x-Tiny"]["model_name"] == "ESRGAN"
    assert by_name["broken"]["scale"] is None  # listed; a request naming it gets the reason


def test_single_image_is_the_library_upscale(served, folder):
    # A ×4 ESRGAN asked for ×2 of a 36×28 image: one pass, then Lanczos to 72×56; the PNG
    # keeps the input's parameters and adds A1111's postprocessing text.
    url, _ = served
    image = _picture(1, 36, 28)
    out = _post(url, SINGLE, {"image": "data:image/png;base64," + _b64(image, "a fox"),
                              "upscaler_1": "4x-Tiny", "upscaling_resize": 2})
    text = "Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny"
    assert out["html_info"] == f"<p>{text}</p>"
    got = png(out["image"], (72, 56))
    assert got.info["postprocessing"] == text and got.info["parameters"] == "a fox"
    assert_same_image(got, _library(folder, "4x-Tiny", image, 2), "4x-Tiny ×2")


def test_resize_to_a_size_crops_about_the_centre(served, folder):
    # Covering 64×48 scales a 40×24 image by 2 (its height sets it), to 80×48; with
    # upscaling_crop that is cut to 64×48 about its centre, without it returned whole.
    url, _ = served
    image = _picture(2, 40, 24)
    body = {"image": _b64(image), "upscaler_1": "compact-x2", "resize_mode": 1,
            "upscaling_resize_w": 64, "upscaling_resize_h": 48}
    out = _post(url, SINGLE, body)
    up = _library(folder, "compact-x2", image, 2.0)
    want = Image.new("RGB", (64, 48))
    want.paste(up, (32 - up.width // 2, 24 - up.height // 2))
    assert_same_image(png(out["image"], (64, 48)), want, "compact-x2, cropped")
    assert out["html_info"] == ("<p>Postprocess upscale to: 64x48, Postprocess crop to: 64x48, "
                                "Postprocess upscaler: compact-x2</p>")
    out = _post(url, SINGLE, {**body, "upscaler_1": "Nearest", "upscaling_crop": False})
    assert_same_image(png(out["image"], (80, 48)), image.resize((80, 48), Image.NEAREST),
                      "Nearest, not cropped")
    # ×1.1 of 40×24 rounds down to 40×24 (multiples of 8), which the image covers already:
    # no resize by the scale, as in A1111's loop, and none to the size.
    out = _post(url, SINGLE, {"image": _b64(image), "upscaler_1": "Lanczos",
                              "upscaling_resize": 1.1})
    assert np.array_equal(np.asarray(png(out["image"], (40, 24))), np.asarray(image))


def test_upscaler_2_blends_at_its_visibility(served, folder):
    url, _ = served
    image = _picture(3, 36, 28)
    out = _post(url, SINGLE, {"image": _b64(image), "upscaler_1": "Lanczos",
                              "upscaler_2": "compact-x2", "extras_upscaler_2_visibility": 0.5})
    first = image.resize((72, 56), Image.LANCZOS)
    want = Image.blend(first, _library(folder, "compact-x2", image, 2), 0.5)
    assert_same_image(png(out["image"], (72, 56)), want, "Lanczos + compact-x2 at 0.5")
    assert out["html_info"] == ("<p>Postprocess upscale by: 2.0, Postprocess upscaler: "
                                "Lanczos, Postprocess upscaler 2: compact-x2</p>")
    # upscaler_1 None (the default) leaves the image as it is, as A1111's does.
    out = _post(url, SINGLE, {"image": _b64(image), "upscaler_2": "compact-x2",
                              "extras_upscaler_2_visibility": 0.5})
    assert out["html_info"] == "<p></p>"
    assert np.array_equal(np.asarray(png(out["image"], (36, 28))), np.asarray(image))


def test_batch_upscales_each_image(served, folder):
    # Two sizes, A1111's name for the Real-ESRGAN file; html_info is the last image's.
    url, _ = served
    images = [_picture(4, 32, 32), _picture(5, 24, 40)]
    out = _post(url, BATCH, {"imageList": [{"data": _b64(im), "name": f"{i}.png"}
                                           for i, im in enumerate(images)],
                             "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 1.5})
    assert out["html_info"] == "<p>Postprocess upscale by: 1.5, Postprocess upscaler: " \
                               "R-ESRGAN 4x+</p>"
    assert len(out["images"]) == 2
    for i, (b64, im) in enumerate(zip(out["images"], images)):
        want = _library(folder, "RealESRGAN_x4plus", im, 1.5)
        assert_same_image(png(b64, (int(im.width * 1.5 // 8 * 8),
                                    int(im.height * 1.5 // 8 * 8))), want, f"image {i}")
    assert _post(url, BATCH, {"imageList": [], "upscaler_1": "Lanczos"}) == \
        {"html_info": "<p></p>", "images": []}


def test_hires_fix_with_a_model_upscaler(served, folder, ref_pipe):
    from sdrt.engine.hires import Hires, generate
    url, _ = served
    out = _post(url, "/sdapi/v1/txt2img", {
        "prompt": "a fox", "seed": 5, "steps": 2, "cfg_scale": 7, "width": 32, "height": 32,
        "enable_hr": True, "hr_scale": 2, "hr_upscaler": "compact-x2",
        "hr_second_pass_steps": 1, "denoising_strength": 0.5})
    info = json.loads(out["info"])
    assert "Hires upscaler: compact-x2" in info["infotexts"][0]
    assert info["extra_generation_params"]["Hires upscaler"] == "compact-x2"
    got = png(out["images"][0], (64, 64))
    assert "Hires upscaler: compact-x2" in got.info["parameters"]
    import torch
    upscaler = load_upscaler(folder / "compact-x2.safetensors")
    want = generate(ref_pipe, Hires(scale=2, upscaler="compact-x2", steps=1, strength=0.5),
                    ["a fox"], "", 32, 32, 2, None, [torch.Generator().manual_seed(5)],
                    guidance_scale=7.0, upscaler=upscaler)[0]
    assert_same_image(got, want, "hires fix with compact-x2")


_IMAGE = _b64(_picture(6, 32, 32))
BAD = [
    (SINGLE, {"upscaler_1": "4x-Nothing"}, "upscaler_1"),
    (SINGLE, {"upscaler_1": "Lanczos", "upscaler_2": "SwinIR 4x",
              "extras_upscaler_2_visibility": 0.5}, "upscaler_2"),
    (SINGLE, {"upscaler_1": "broken"}, "upscaler_1"),  # a file that is no upscaler
    (SINGLE, {"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "gfpgan_visibility"),
    (SINGLE, {"upscaler_1": "Lanczos", "codeformer_visibility": 1}, "codeformer_visibility"),
    (SINGLE, {"codeformer_weight": 2}, "codeformer_weight"),
    (SINGLE, {"upscaler_1": "Lanczos", "extras_upscaler_2_visibility": 1.5},
     "extras_upscaler_2_visibility"),
    (SINGLE, {"upscaler_1": "Lanczos", "upscaling_resize": 0}, "upscaling_resize"),
    (SINGLE, {"upscaler_1": "Lanczos", "upscaling_resize": 100}, "upscaling_resize"),
    (SINGLE, {"upscaler_1": "Lanczos", "upscaling_resize": "two"}, "upscaling_resize"),
    (SINGLE, {"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode"),
    (SINGLE, {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 8192},
     "upscaling_resize_w"),
    (SINGLE, {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_h": 0},
     "upscaling_resize_h"),
    # Past the largest side (4096): ×8 of 600 pixels; covering 4096×64 with a 32×64 image
    # (×128, so 4096×8192); and below 8 pixels: ×2 of 3.
    (SINGLE, {"upscaler_1": "Lanczos", "upscaling_resize": 8,
              "image": _b64(_picture(7, 600, 8))}, "upscaling_resize"),
    (SINGLE, {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 4096,
              "upscaling_resize_h": 64, "image": _b64(_picture(7, 32, 64))},
     "upscaling_resize_w"),
    (SINGLE, {"upscaler_1": "Lanczos", "image": _b64(_picture(7, 3, 3))}, "upscaling_resize"),
    (SINGLE, {"upscaler_1": "Lanczos", "image": "not base64!!"}, "image"),
    (SINGLE, {"upscaler_1": "Lanczos", "image": base64.b64encode(b"text").decode()}, "image"),
    (SINGLE, {"upscaler_1": "Lanczos", "image": ""}, "image"),
    (BATCH, {"upscaler_1": "Lanczos"}, "imageList"),
    (BATCH, {"upscaler_1": "Lanczos", "imageList": [{"data": _IMAGE, "name": "a.png"},
                                                    {"data": "not base64!!", "name": "b.png"}]},
     "imageList"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True, "hr_upscaler": "4x-Nothing"},
     "hr_upscaler"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True, "hr_upscaler": "broken"},
     "hr_upscaler"),
]


@pytest.mark.parametrize("path, body, field", BAD, ids=[f"{b[2]}-{i}" for i, b in
                                                        enumerate(BAD)])
def test_bad_inputs_are_4xx_json_naming_the_field(served, path, body, field):
    url, _ = served
    if path == SINGLE:
        body = {"image": _IMAGE, **body}
    r = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in r.text
    if field == "hr_upscaler" and body["hr_upscaler"] != "broken":
        assert "compact-x2" in error["message"]  # the models a request may name


def test_a_model_lost_after_the_check_is_a_400_naming_the_field(served, monkeypatch):
    # The worker loads the model: a file gone or broken by then is the request's error, in
    # JSON, and the server keeps serving.
    url, local = served
    runner = local.server.runner
    monkeypatch.setattr(runner, "upscaler_path", lambda name: None)
    with pytest.raises(SdrtError, match="^upscaler_2 names upscaler 'compact-x2', which "
                                        "--upscaler-dir no longer has$"):
        ExtrasJob("Lanczos", "compact-x2", 0.5).run(runner, [_picture(8, 16, 16)])
    monkeypatch.undo()

    def broken(name):
        raise SdrtError(f"{name}: not a readable safetensors file")
    monkeypatch.setattr(runner, "upscaler", broken)
    r = httpx.post(f"{url}{SINGLE}", json={"image": _IMAGE, "upscaler_1": "4x-Tiny"},
                   timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "upscaler_1"
    assert "whose file does not load: 4x-Tiny: not a readable" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"
    assert os.path.isfile(runner.upscaler_path("4x-Tiny"))
