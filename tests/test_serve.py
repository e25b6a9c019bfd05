"""``sdrt serve`` over real HTTP on 127.0.0.1: the official ``openai`` SDK and ``httpx`` as
clients, the built-in model on the CPU, small sizes (32×32, 64×64) and 1–2 steps.

Servers run in this process on a thread (``LocalServer``), except where the process itself is
under test (RSS, SIGTERM), which starts ``python -m sdrt.serve``. Every loop is bounded in count
and every wait in time; nothing here asserts a duration.
"""
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from sdrt.engine.demo.model import demo_config, demo_pipeline  # noqa: E402
from sdrt.engine.infotext import SAMPLER_LABELS  # noqa: E402
from sdrt.engine.inpaint import prepare  # noqa: E402
from sdrt.serve.config import ServeConfig  # noqa: E402
from sdrt.serve.local import LocalServer, free_port, wait_healthy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds any one HTTP call may take on a loaded 2-core machine


# Small networks on a shared CPU: one torch thread (conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref_pipe():
    """The built-in model called directly, for the images the API must reproduce."""
    return demo_pipeline(torch.device("cpu"), torch.float32)


def config(**kw):
    base = dict(port=free_port(), max_batch=4, batch_window_ms=100, max_queue=64,
                max_body_bytes=2 ** 20, default_steps=2)
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def main_server():
    local = LocalServer(config())
    with local as url:
        yield url, local


def png(b64, size=None):
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    im = Image.open(io.BytesIO(data))
    im.load()
    if size is not None:
        assert im.size == size, f"PNG is {im.size}, asked for {size}"
    return im


def reference(pipe, prompt, seed, size=(64, 64), steps=2, guidance=7.5, negative=None,
              sampler=None, **kw):
    w, h = size
    return pipe(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                guidance_scale=guidance, sampler=sampler, seed=seed, **kw)[0]


def assert_same_image(got, want, what):
    """Equal to within one level of 255: a batched call may round a pixel the other way."""
    a = np.asarray(got.convert("RGB"), dtype=np.int16)
    b = np.asarray(want.convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    diff = np.abs(a - b)
    where = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= 1, f"{what}: differs by {diff.max()} levels at {where} " \
                            f"({(diff > 1).sum()} values past 1)"


def metric(url, name, labels=""):
    """One sample of /metrics (0 if absent)."""
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


# -- OpenAI's Images API -----------------------------------------------------------------------

def test_openai_sdk_gets_the_images_the_library_makes(main_server, ref_pipe):
    url, _ = main_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=TIMEOUT)
    res = client.images.generate(prompt="a red fox", n=2, size="64x64",
                                 response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 11, "negative_prompt": "blur",
                                             "guidance_scale": 6.5})
    assert isinstance(res.created, int) and abs(res.created - time.time()) < 3600
    assert len(res.data) == 2
    for i, item in enumerate(res.data):
        got = png(item.b64_json, (64, 64))
        # Image i uses seed + i, as the library called alone with that seed.
        assert_same_image(got, reference(ref_pipe, "a red fox", 11 + i, guidance=6.5,
                                         negative="blur"), f"image {i}")
        assert "Seed: " + str(11 + i) in got.info["parameters"]

    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a fox", size="64x64", response_format="url")
    assert "response_format" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a fox", size="64x64", extra_body={"background":
                                                                         "transparent"})
    assert "background must be auto or opaque" in str(e.value)
    assert httpx.get(f"{url}/sdapi/v1/interrogate", timeout=TIMEOUT).json()["error"][
        "message"] == ("GET /sdapi/v1/interrogate is not served by sdrt: it serves OpenAI's, "
                       "A1111's and ComfyUI's endpoints listed at GET /docs")
    # diffusers' guidance_rescale, as an extra
    res = client.images.generate(prompt="a red fox", size="64x64", extra_body={
        "steps": 2, "seed": 12, "guidance_scale": 9.0, "guidance_rescale": 0.7})
    assert_same_image(png(res.data[0].b64_json, (64, 64)),
                      reference(ref_pipe, "a red fox", 12, guidance=9.0, negative="",
                                guidance_rescale=0.7), "guidance_rescale")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a fox", size="64x64",
                               extra_body={"guidance_rescale": 1.5})
    assert "guidance_rescale must be a number from 0 to 1, got 1.5" in str(e.value)


def test_openai_sdk_edits_inpaint_and_redraw(main_server, ref_pipe):
    # images.edit with a mask (transparent = repaint, OpenAI's convention) inpaints; without
    # one it redraws the whole image; both are the library's images for the same seeds.
    url, _ = main_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=TIMEOUT)
    rng = np.random.default_rng(4)
    init = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    rgba = np.full((48, 64, 4), 255, dtype=np.uint8)
    rgba[8:40, 16:48, 3] = 0  # transparent: repaint here
    mask = Image.fromarray(rgba, "RGBA")
    extra = {"steps": 2, "seed": 9, "guidance_scale": 6.0}
    res = client.images.edit(image=("in.png", _png_file(init), "image/png"),
                             mask=("mask.png", _png_file(mask), "image/png"),
                             prompt="a red fox", n=2, extra_body=extra)
    # The library's inpainting, pasted over the image through the mask (engine.inpaint).
    job = prepare(init, 1 - rgba[..., 3].astype(np.float32) / 255, 64, 48)
    for i, item in enumerate(res.data):
        want = job.finish(reference(ref_pipe, "a red fox", 9 + i, size=(64, 48), guidance=6.0,
                                    image=job.image, mask_image=job.mask, strength=1.0))
        got = png(item.b64_json, (64, 48))
        assert_same_image(got, want, f"inpainted image {i}")
        assert np.array_equal(np.asarray(got)[:8], np.asarray(init)[:8])  # kept: exact
    res = client.images.edit(image=("in.png", _png_file(init), "image/png"), prompt="a fox",
                             size="32x32", extra_body={**extra, "strength": 0.6})
    want = reference(ref_pipe, "a fox", 9, size=(32, 32), guidance=6.0, image=init,
                     strength=0.6)
    assert_same_image(png(res.data[0].b64_json, (32, 32)), want, "redrawn image")
    # Without a mask, an image with transparency is its own mask (OpenAI's rule)
    holed = _png_file(Image.fromarray(np.dstack([np.asarray(init), rgba[..., 3]]), "RGBA"))
    own, given = (client.images.edit(image=("in.png", holed, "image/png"), prompt="a red fox",
                                     extra_body=extra, **kw).data[0].b64_json
                  for kw in ({}, {"mask": ("mask.png", _png_file(mask), "image/png")}))
    assert np.array_equal(np.asarray(png(own, (64, 48))), np.asarray(png(given, (64, 48))))
    assert np.array_equal(np.asarray(png(own, (64, 48)))[:8], np.asarray(init)[:8])

    def refused(**kw):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(**{"prompt": "a fox", "extra_body": extra, **kw})
        return str(e.value)
    image = ("in.png", _png_file(init), "image/png")
    assert "mask must be a PNG with an alpha channel" in refused(
        image=image, mask=("m.png", _png_file(init), "image/png"))
    assert "mask must have the image's size 64x48" in refused(
        image=image, mask=("m.png", _png_file(mask.resize((32, 24))), "image/png"))
    assert "image must be an image file" in refused(image=("in.png", b"text", "image/png"))
    assert "image must be one image file, got 2" in refused(image=[image, image])
    assert "strength" in refused(image=image, extra_body={**extra, "strength": 0})


def test_edits_need_a_multipart_body(main_server):
    url, _ = main_server
    r = httpx.post(f"{url}/v1/images/edits", json={"prompt": "a fox"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/images/edits", data={"prompt": "a fox", "steps": "two"},
                   files={"image": ("i.png", _png_file(Image.new("RGB", (32, 32))))},
                   timeout=TIMEOUT)
    assert r.status_code == 422 and r.json()["error"]["param"] == "steps", r.text
    r = httpx.post(f"{url}/v1/images/edits", data={"prompt": "a fox"}, timeout=TIMEOUT,
                   files={"mask": ("m.png", _png_file(Image.new("RGBA", (32, 32))))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text


# -- A1111's API -------------------------------------------------------------------------------

def test_a1111_txt2img_fields_round_trip(main_server, ref_pipe):
    url, _ = main_server
    body = {"prompt": "a fox, in snow: at night", "negative_prompt": "blurry, dark",
            "seed": 123, "sampler_name": "Euler", "cfg_scale": 5, "steps": 2, "width": 64,
            "height": 32, "batch_size": 2, "n_iter": 1, "restore_faces": False,
            # (what the webuiapi client sends: A1111's Euler reads no eta, and runs without
            # churn at noise multiplier 1)
            "eta": 1.0, "s_churn": 0, "s_tmin": 0, "s_tmax": 0, "s_noise": 1.0}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [123, 124] and info["seed"] == 123
    assert info["sampler_name"] == "Euler" and info["cfg_scale"] == 5
    assert (info["width"], info["height"], info["steps"]) == (64, 32, 2)
    assert out["parameters"]["prompt"] == body["prompt"]
    assert out["parameters"]["sampler_name"] == "Euler"
    assert len(out["images"]) == len(info["infotexts"]) == 2
    for i, b64 in enumerate(out["images"]):
        got = png(b64, (64, 32))
        assert got.info["parameters"] == info["infotexts"][i]
        assert info["infotexts"][i].startswith(
            'a fox, in snow: at night\nNegative prompt: blurry, dark\nSteps: 2, Sampler: Euler, '
            f'CFG scale: 5, Seed: {123 + i}, Size: 64x32, Model hash: ')
        assert_same_image(got, reference(ref_pipe, body["prompt"], 123 + i, (64, 32),
                                         guidance=5.0, negative="blurry, dark",
                                         sampler="euler"), f"image {i}")
    # DDIM at A1111's eta (webuiapi sends 1.0): fresh noise a step, as the library's eta
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "sampler_name": "DDIM",
                                                   "batch_size": 1}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert "Eta DDIM: 1" in json.loads(r.json()["info"])["infotexts"][0]
    assert_same_image(png(r.json()["images"][0], (64, 32)), reference(
        ref_pipe, body["prompt"], 123, (64, 32), guidance=5.0, negative="blurry, dark",
        sampler="ddim", eta=1.0), "DDIM at eta 1")
    # Numbers as A1111's pydantic coerces them (published payloads send these): the same
    loose = {**body, "seed": 123.0, "steps": "2", "width": 64.0, "cfg_scale": "5",
             "restore_faces": 0, "batch_size": 1}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=loose, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert_same_image(png(r.json()["images"][0], (64, 32)), png(out["images"][0], (64, 32)),
                      "coerced fields")

    # A1111's clip skip (override_settings), and batch_size x n_iter images.
    r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
        "prompt": "x", "seed": 5, "steps": 1, "width": 32, "height": 32, "batch_size": 1,
        "n_iter": 2, "cfg_scale": 1, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [5, 6] and len(r.json()["images"]) == 2
    assert "Clip skip: 2" in info["infotexts"][0]
    assert_same_image(png(r.json()["images"][1]),
                      reference(ref_pipe, "x", 6, (32, 32), 1, 1.0, clip_skip=1), "clip skip")


def test_builtin_model_requests_run_at_its_own_defaults(ref_pipe):
    """Without --model and --steps, a request that gives no steps or guidance runs at the
    built-in model's demo_defaults (as `sdrt generate`); what a request gives still wins."""
    tuned = demo_config()["demo_defaults"]
    steps, guidance = tuned["num_inference_steps"], tuned["guidance_scale"]
    assert (steps, guidance) != (20, 7.0) and guidance != 7.5, "the test would not tell"
    label = SAMPLER_LABELS[tuned["sampler"]]
    with LocalServer(config(default_steps=None)) as url:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                       json={"prompt": "a red circle on a blue background", "seed": 3})
        assert r.status_code == 200, r.text
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert f"Steps: {steps}, Sampler: {label}, CFG scale: {guidance:g}, Seed: 3," in text
        assert_same_image(png(r.json()["images"][0]), reference(
            ref_pipe, "a red circle on a blue background", 3, (32, 32), steps, guidance),
            "A1111 at the built-in defaults")

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=TIMEOUT)
        res = client.images.generate(prompt="a green square", size="32x32",
                                     response_format="b64_json", extra_body={"seed": 4})
        got = png(res.data[0].b64_json, (32, 32))
        assert f"Steps: {steps}, Sampler: {label}, CFG scale: {guidance:g}, Seed: 4," \
            in got.info["parameters"]
        assert_same_image(got, reference(ref_pipe, "a green square", 4, (32, 32), steps,
                                         guidance), "OpenAI at the built-in defaults")

        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
            "prompt": "x", "seed": 3, "steps": 2, "cfg_scale": 7, "width": 32, "height": 32})
        assert "Steps: 2, Sampler: " in json.loads(r.json()["info"])["infotexts"][0]
        assert "CFG scale: 7, " in json.loads(r.json()["info"])["infotexts"][0]


def test_a1111_img2img(main_server, ref_pipe):
    url, _ = main_server
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    for encoded in (b64, "data:image/png;base64," + b64):  # both forms A1111 accepts
        r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT, json={
            "prompt": "a fox", "init_images": [encoded], "denoising_strength": 0.5,
            "steps": 2, "cfg_scale": 7, "seed": 7, "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["parameters"]["init_images"] is None  # not echoed back, as A1111
        info = json.loads(out["info"])
        assert "Denoising strength: 0.5" in info["infotexts"][0]
        assert_same_image(png(out["images"][0], (64, 64)),
                          reference(ref_pipe, "a fox", 7, guidance=7.0, image=init, strength=0.5),
                          "img2img")


def test_a1111_img2img_resize_modes(main_server, ref_pipe):
    # resize_mode 1 and 2 frame a 96x48 init image into 64x64 (engine.images.fit_image, A1111's
    # crop and fill), 3 encodes a 32x32 one and resizes its latents; over a whole inpainted
    # picture the mask is framed with the image.
    from sdrt.engine.images import blur_mask, fit_image
    url, _ = main_server
    rng = np.random.default_rng(2)
    wide = Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8))
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    body = {"prompt": "a fox", "denoising_strength": 0.6, "steps": 2, "cfg_scale": 7,
            "seed": 3, "width": 64, "height": 64}
    got = {}
    for mode, init in ((1, wide), (2, wide), (3, small)):
        r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT, json={
            **body, "init_images": [_b64(_png_file(init))], "resize_mode": mode})
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["resize_mode"] == mode
        got[mode] = png(r.json()["images"][0], (64, 64))
        call = (dict(image=init, latent_resize=True) if mode == 3 else
                dict(image=fit_image(wide, 64, 64, ("crop", "fill")[mode - 1])))
        assert_same_image(got[mode], reference(ref_pipe, "a fox", 3, guidance=7.0,
                                               strength=0.6, **call), f"resize mode {mode}")
    assert np.abs(np.asarray(got[1], dtype=int) - np.asarray(got[2])).max() > 8

    mask = np.zeros((48, 96), dtype=np.float32)
    mask[:, 60:80] = 1
    r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT, json={
        **body, "init_images": [_b64(_png_file(wide))], "resize_mode": 2, "mask_blur": 0,
        "mask": _b64(_png_file(Image.fromarray((mask * 255).astype(np.uint8)))),
        "inpainting_fill": 1, "inpaint_full_res": False})
    assert r.status_code == 200, r.text
    job = prepare(wide, blur_mask(mask, 0), 64, 64, resize_mode="fill")
    expected = job.finish(reference(ref_pipe, "a fox", 3, guidance=7.0, image=job.image,
                                    strength=0.6, mask_image=job.mask))
    assert_same_image(png(r.json()["images"][0], (64, 64)), expected, "inpaint, fill")


def test_a1111_inpaint(main_server, ref_pipe):
    # A1111's inpainting fields: the mask (here as A1111's canvas sends it, opaque where
    # painted), inverted, blurred, at the strength given; the image is the library's, framed
    # as A1111 frames it (engine.inpaint): over the whole picture, and only the masked area.
    from sdrt.engine.images import blur_mask
    url, _ = main_server
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    painted = np.zeros((64, 64, 4), dtype=np.uint8)
    painted[16:48, 8:40, 3] = 255

    def b64(im):
        buffer = io.BytesIO()
        im.save(buffer, format="PNG")
        return _b64(buffer.getvalue())
    body = {"prompt": "a fox", "init_images": [b64(init)], "mask": b64(Image.fromarray(painted)),
            "inpainting_mask_invert": 1, "mask_blur": 2, "inpainting_fill": 1,
            "inpaint_full_res": False, "denoising_strength": 0.9, "steps": 2, "cfg_scale": 7,
            "seed": 5, "width": 64, "height": 64}
    r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT, json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Mask blur: 2" in info["infotexts"][0]
    repaint = np.ones((64, 64), dtype=np.float32)
    repaint[16:48, 8:40] = 0  # inverted: all but the painted part
    job = prepare(init, blur_mask(repaint, 2), 64, 64)
    expected = job.finish(reference(ref_pipe, "a fox", 5, guidance=7.0, image=job.image,
                                    strength=0.9, mask_image=job.mask))
    assert_same_image(png(r.json()["images"][0], (64, 64)), expected, "inpaint")
    plain = reference(ref_pipe, "a fox", 5, guidance=7.0, image=init, strength=0.9)
    assert np.abs(np.asarray(expected, dtype=int) - np.asarray(plain)).max() > 8

    # Only the masked area (A1111's default), here the painted part at 32x32, padding 4.
    body.update(inpainting_mask_invert=0, inpaint_full_res=True, inpaint_full_res_padding=4,
                width=32, height=32)
    r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT, json=body)
    assert r.status_code == 200, r.text
    assert "Inpaint area: Only masked, Masked area padding: 4" in \
        json.loads(r.json()["info"])["infotexts"][0]
    job = prepare(init, blur_mask(1 - repaint, 2), 32, 32, only_masked=True, padding=4)
    expected = job.finish(reference(ref_pipe, "a fox", 5, size=(32, 32), guidance=7.0,
                                    image=job.image, strength=0.9, mask_image=job.mask))
    got = png(r.json()["images"][0], (64, 64))  # the init image's size
    assert_same_image(got, expected, "inpaint only masked")
    assert np.array_equal(np.asarray(got)[:, 56:], np.asarray(init)[:, 56:])

    # A1111's default masked content, fill: the masked part filled before it is encoded.
    del body["inpainting_fill"]
    r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT, json=body)
    assert r.status_code == 200, r.text
    assert "Masked content: fill" in json.loads(r.json()["info"])["infotexts"][0]
    job = prepare(init, blur_mask(1 - repaint, 2), 32, 32, only_masked=True, padding=4,
                  fill=True)
    filled = job.finish(reference(ref_pipe, "a fox", 5, size=(32, 32), guidance=7.0,
                                  image=job.image, strength=0.9, mask_image=job.mask))
    assert_same_image(png(r.json()["images"][0], (64, 64)), filled, "inpaint with fill")
    assert np.abs(np.asarray(filled, dtype=int) - np.asarray(expected)).max() > 8

    # Latent noise: the filled picture encoded, its masked latents then unit noise.
    r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT,
                   json={**body, "inpainting_fill": 2})
    assert r.status_code == 200, r.text
    assert "Masked content: latent noise" in json.loads(r.json()["info"])["infotexts"][0]
    noised = job.finish(reference(ref_pipe, "a fox", 5, size=(32, 32), guidance=7.0,
                                  image=job.image, strength=0.9, mask_image=job.mask,
                                  masked_content="latent_noise"))
    assert_same_image(png(r.json()["images"][0], (64, 64)), noised, "inpaint, latent noise")


def test_a1111_hires_fix(main_server, ref_pipe):
    # enable_hr with A1111's fields: the library's two passes (engine.hires) for the same
    # seeds; the "off" values of what sdrt does not have are accepted.
    from sdrt.engine.hires import Hires, generate
    url, _ = main_server
    body = {"prompt": "a fox", "seed": 21, "steps": 2, "cfg_scale": 7, "width": 32,
            "height": 32, "batch_size": 2, "enable_hr": True, "hr_scale": 1.5,
            "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.55,
            "hr_sampler_name": "", "hr_checkpoint_name": "Use same checkpoint",
            "restore_faces": False, "tiling": None, "subseed_strength": 0, "styles": [],
            "seed_resize_from_h": -1, "script_name": None,
            "alwayson_scripts": {"controlnet": {"args": []}}}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["width"] == 32 and info["denoising_strength"] == 0.55
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent" in info["infotexts"][0]
    hires = Hires(scale=1.5, steps=2, strength=0.55)
    for i in range(2):
        g = [torch.Generator().manual_seed(21 + i)]
        want = generate(ref_pipe, hires, ["a fox"], "", 32, 32, 2, None, g,
                        guidance_scale=7.0)[0]
        assert_same_image(png(out["images"][i], (48, 48)), want, f"hires image {i}")


def test_a1111_samplers_and_models(main_server):
    url, _ = main_server
    samplers = httpx.get(f"{url}/sdapi/v1/samplers", timeout=TIMEOUT).json()
    assert {s["name"] for s in samplers} == set(SAMPLER_LABELS.values())
    models = httpx.get(f"{url}/sdapi/v1/sd-models", timeout=TIMEOUT).json()
    assert len(models) == 1 and len(models[0]["hash"]) == 10
    assert models[0]["title"] == f"{models[0]['model_name']} [{models[0]['hash']}]"
    assert "/v1/images/generations" in httpx.get(f"{url}/openapi.json", timeout=TIMEOUT).text
    # What A1111 clients read to fill their menus, each name one the hires fix takes.
    from sdrt.engine.hires import UPSCALERS
    upscalers = httpx.get(f"{url}/sdapi/v1/upscalers", timeout=TIMEOUT).json()
    latent = httpx.get(f"{url}/sdapi/v1/latent-upscale-modes", timeout=TIMEOUT).json()
    assert upscalers[0]["name"] == "None"
    assert set(u["name"] for u in upscalers[1:]) | {m["name"] for m in latent} == set(UPSCALERS)
    options = httpx.get(f"{url}/sdapi/v1/options", timeout=TIMEOUT).json()
    assert options["sd_model_checkpoint"] == models[0]["title"]


def test_a1111_schedule_types(main_server, ref_pipe):
    # A1111 1.9 sends a sampler and a schedule type apart: the pair is the old "X Karras"
    # label, and the PNG info writes it so. A hires pass takes the first pass's pair, or its
    # own.
    url, _ = main_server
    schedulers = httpx.get(f"{url}/sdapi/v1/schedulers", timeout=TIMEOUT).json()
    assert [(s["name"], s["label"]) for s in schedulers] == [
        ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
        ("exponential", "Exponential"), ("polyexponential", "Polyexponential"),
        ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
        ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"),
        ("ddim", "DDIM"), ("beta", "Beta")]
    base = {"prompt": "a fox", "seed": 9, "steps": 3, "width": 32, "height": 32,
            "cfg_scale": 6}

    def run(**fields):
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**base, **fields}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()

    pair = run(sampler_name="DPM++ 2M SDE", scheduler="Karras")
    infotext = json.loads(pair["info"])["infotexts"][0]
    assert "Sampler: DPM++ 2M SDE Karras," in infotext, infotext
    assert_same_image(png(pair["images"][0]),
                      reference(ref_pipe, "a fox", 9, (32, 32), 3, 6.0,
                                sampler="dpmpp_2m_sde_karras"), "DPM++ 2M SDE + Karras")
    assert run(sampler_name="DPM++ 2M SDE Karras")["images"] == pair["images"]
    # the sigma schedules: A1111's own levels, written as A1111 writes them
    for name, label, sid in (("align_your_steps", "Align Your Steps",
                              "dpmpp_2m_align_your_steps"),
                             ("SGM Uniform", "SGM Uniform", "dpmpp_2m_sgm_uniform")):
        other = run(sampler_name="DPM++ 2M", scheduler=name)
        infotext = json.loads(other["info"])["infotexts"][0]
        assert f"Sampler: DPM++ 2M, Schedule type: {label}," in infotext, infotext
        assert_same_image(png(other["images"][0]),
                          reference(ref_pipe, "a fox", 9, (32, 32), 3, 6.0, sampler=sid), label)
    automatic = run(sampler_name="Heun", scheduler="Automatic")
    assert_same_image(png(automatic["images"][0]),
                      reference(ref_pipe, "a fox", 9, (32, 32), 3, 6.0, sampler="heun"),
                      "Heun")
    # A1111 1.9's defaults: DPM++ 2M SDE is exponential unless Uniform is asked for, and the
    # PNG says which.
    exponential = run(sampler_name="DPM++ 2M SDE")
    assert "Sampler: DPM++ 2M SDE Exponential," in json.loads(exponential["info"])["infotexts"][0]
    assert_same_image(png(exponential["images"][0]),
                      reference(ref_pipe, "a fox", 9, (32, 32), 3, 6.0,
                                sampler="dpmpp_2m_sde_exponential"), "DPM++ 2M SDE automatic")
    uniform = run(sampler_name="DPM++ 2M SDE", scheduler="Uniform")
    assert "Sampler: DPM++ 2M SDE, Schedule type: Uniform," in \
        json.loads(uniform["info"])["infotexts"][0]
    assert uniform["images"] != exponential["images"]
    hires = run(sampler_name="DPM2", scheduler="Karras", enable_hr=True, hr_scale=1.5,
                hr_second_pass_steps=2, hr_sampler_name="Euler", hr_scheduler="Karras")
    infotext = json.loads(hires["info"])["infotexts"][0]
    assert "Sampler: DPM2 Karras," in infotext and "Hires sampler: Euler Karras" in infotext, \
        infotext


def test_a1111_options_png_info_and_lists(main_server, ref_pipe):
    # What A1111 clients call around generating: setting the model (only the loaded one) and
    # a server-wide clip skip, reading an image's PNG info back, the queue's state, and the
    # lists sdrt has nothing in.
    url, _ = main_server
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}
                           ).status_code == 200
        # (webuiapi's set_options(get_options()): what GET returns posts back as it is)
        assert client.post("/sdapi/v1/options", json=client.get("/sdapi/v1/options").json()
                           ).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={  # a hires fix naming the loaded model
            "prompt": "x", "steps": 1, "width": 32, "height": 32, "enable_hr": True,
            "hr_scale": 1.5, "hr_checkpoint_name": title,
            "alwayson_scripts": {"ADetailer": {"args": [False, False, {}]}}})  # (off)
        assert r.status_code == 200, r.text
        for body, param in (({"sd_model_checkpoint": "v1-5-pruned.safetensors"},
                             "sd_model_checkpoint"),
                            ({"sd_vae": "vae-ft-mse.safetensors"}, "sd_vae"),
                            ({"CLIP_stop_at_last_layers": 3}, "CLIP_stop_at_last_layers"),
                            ({"samples_format": "jpg"}, "samples_format")):
            r = client.post("/sdapi/v1/options", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        body = {"prompt": "x", "seed": 5, "steps": 1, "width": 32, "height": 32,
                "cfg_scale": 1}
        try:
            assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}
                               ).status_code == 200
            assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
            out = client.post("/sdapi/v1/txt2img", json=body).json()
        finally:
            client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
        infotext = json.loads(out["info"])["infotexts"][0]
        assert "Clip skip: 2" in infotext
        assert_same_image(png(out["images"][0]),
                          reference(ref_pipe, "x", 5, (32, 32), 1, 1.0, clip_skip=1),
                          "server-wide clip skip")
        assert "Clip skip" not in json.loads(client.post("/sdapi/v1/txt2img", json=body)
                                             .json()["info"])["infotexts"][0]
        # PNG info, as A1111's "PNG Info" tab reads it.
        info = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]}).json()
        assert info["info"] == infotext
        p = info["parameters"]
        assert (p["Prompt"], p["Steps"], p["Seed"], p["Clip skip"]) == ("x", "1", "5", "2")
        assert (p["Size-1"], p["Size-2"]) == ("32", "32")
        plain = base64.b64encode(_png_file(Image.new("RGB", (8, 8)))).decode()
        assert client.post("/sdapi/v1/png-info", json={"image": plain}).json() == {
            "info": "", "items": {}, "parameters": {}}
        for bad in ({"image": "not base64!!"}, {"image": base64.b64encode(b"text").decode()},
                    {}, {"image": base64.b64encode(_bomb_png()).decode()}):
            r = client.post("/sdapi/v1/png-info", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
        state = client.get("/sdapi/v1/progress").json()
        assert state["progress"] == 0 and state["state"]["job_count"] >= 0
        assert client.get("/sdapi/v1/sd-vae").json() == []
        assert client.get("/sdapi/v1/prompt-styles").json() == []
        assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200


# -- the scheduler -----------------------------------------------------------------------------

def test_concurrent_mixed_requests_batch_without_changing_images(main_server, ref_pipe):
    """40 concurrent requests of mixed sizes and guidance: all answered, some run in batches
    (the /metrics histogram), and each image is the one its request makes alone."""
    url, _ = main_server
    singles_before = metric(url, "sdrt_batch_size_bucket", '{le="1.0"}')
    calls_before = metric(url, "sdrt_batch_size_count")
    shapes = [(64, 64), (32, 32)]
    guidances = [7.5, 4.0, 1.0]  # 1.0: guidance off, another batch key
    specs = [dict(prompt=f"prompt {i}", size=shapes[i % 2], guidance=guidances[i % 3],
                  seed=1000 + i, openai=i % 4 == 0) for i in range(40)]

    async def one(client, s):
        w, h = s["size"]
        if s["openai"]:
            r = await client.post("/v1/images/generations", json={
                "prompt": s["prompt"], "size": f"{w}x{h}", "seed": s["seed"], "steps": 2,
                "guidance_scale": s["guidance"]})
            return r.status_code, r.json()["data"][0]["b64_json"] if r.status_code == 200 \
                else r.text
        r = await client.post("/sdapi/v1/txt2img", json={
            "prompt": s["prompt"], "width": w, "height": h, "seed": s["seed"], "steps": 2,
            "cfg_scale": s["guidance"]})
        return r.status_code, r.json()["images"][0] if r.status_code == 200 else r.text

    async def all_of_them():
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(one(client, s) for s in specs))

    results = asyncio.run(asyncio.wait_for(all_of_them(), 5 * TIMEOUT))
    for s, (status, payload) in zip(specs, results):
        assert status == 200, f"{s}: {status} {payload}"
    for s, (_, b64) in zip(specs, results):
        assert_same_image(png(b64, s["size"]),
                          reference(ref_pipe, s["prompt"], s["seed"], s["size"],
                                    guidance=s["guidance"]), str(s))
    calls = metric(url, "sdrt_batch_size_count") - calls_before
    batched = calls - (metric(url, "sdrt_batch_size_bucket", '{le="1.0"}') - singles_before)
    assert batched >= 1, f"no pipeline call ran more than one image ({calls:g} calls, " \
                         f"{metric(url, 'sdrt_batch_fallbacks_total'):g} batches run again " \
                         f"one by one)"


def test_queue_flood_gets_429_and_accepted_requests_complete():
    local = LocalServer(config(max_queue=2, max_batch=1, batch_window_ms=0))
    with local as url:
        async def flood():
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                return await asyncio.gather(*(client.post("/sdapi/v1/txt2img", json={
                    "prompt": f"p{i}", "width": 64, "height": 64, "steps": 6, "seed": i})
                    for i in range(16)))
        responses = asyncio.run(asyncio.wait_for(flood(), 5 * TIMEOUT))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) >= 1 and codes.count(200) >= 3, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"].isdigit()
                assert "queue is full" in r.json()["error"]["message"]
            else:
                png(r.json()["images"][0], (64, 64))
        assert metric(url, "sdrt_errors_total", '{kind="queue_full"}') == codes.count(429)
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
            "prompt": "after", "width": 32, "height": 32, "steps": 1})
        assert r.status_code == 200, r.text


def test_a_request_waiting_past_its_deadline_gets_503():
    local = LocalServer(config(request_timeout_s=0.3, max_batch=1, batch_window_ms=0))
    with local as url:
        async def six():
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                return await asyncio.gather(*(client.post("/sdapi/v1/txt2img", json={
                    "prompt": f"p{i}", "width": 64, "height": 64, "steps": 30, "seed": i})
                    for i in range(6)))
        responses = asyncio.run(asyncio.wait_for(six(), 5 * TIMEOUT))
        codes = [r.status_code for r in responses]
        # The first is taken at once and runs to the end; those queued behind it time out.
        assert set(codes) <= {200, 503} and codes.count(200) >= 1 and 503 in codes, codes
        for r in responses:
            if r.status_code == 503:
                assert "deadline" in r.json()["error"]["message"], r.text
        assert local.server.scheduler.depth() == 0


def test_a_client_that_disconnects_frees_its_slot(ref_pipe):
    local = LocalServer(config(max_queue=1, max_batch=1, batch_window_ms=0))
    with local as url:
        scheduler = local.server.scheduler
        slow = {}

        def run_slow():  # occupies the worker for a few seconds
            slow["r"] = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
                "prompt": "slow", "width": 64, "height": 64, "steps": 100, "seed": 1})
        thread = threading.Thread(target=run_slow)
        thread.start()
        deadline = time.monotonic() + 30
        while scheduler.running() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the worker runs the slow request
        assert scheduler.running() == 1 and "r" not in slow
        # The waiting client gives up: its queued job must leave the queue.
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/sdapi/v1/txt2img", timeout=1.0, json={
                "prompt": "gives up", "width": 64, "height": 64, "steps": 2})
        deadline = time.monotonic() + 10
        while scheduler.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.depth() == 0, "the disconnected request is still queued"
        # Its slot is free: with max_queue=1, this one is queued, not refused.
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
            "prompt": "next", "width": 32, "height": 32, "steps": 1})
        assert r.status_code == 200, r.text
        thread.join(TIMEOUT)
        assert slow["r"].status_code == 200, slow["r"].text
        assert metric(url, "sdrt_errors_total", '{kind="disconnected"}') == 1
        assert metric(url, "sdrt_images_total") == 2  # the abandoned request never ran


# -- bad input ---------------------------------------------------------------------------------

def _b64(data):
    return base64.b64encode(data).decode()


def b64_png(image):
    """A PIL image as a base64 PNG, as request bodies carry images."""
    return _b64(_png_file(image))


def _png_file(im):
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return buffer.getvalue()


def _tiny_png():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return _b64(buffer.getvalue())


GEN, T2I, I2I = "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
MALFORMED = [  # (endpoint, body: dict or raw bytes, what the message must name)
    (GEN, {"prompt": 1}, "prompt"),
    (GEN, {}, "prompt"),
    (GEN, {"prompt": None}, "prompt"),
    (GEN, {"prompt": "a", "n": "2"}, "n"),
    (GEN, {"prompt": "a", "n": 0}, "n"),
    (GEN, {"prompt": "a", "n": 10000}, "n"),
    (GEN, {"prompt": "a", "n": 2.5}, "n"),
    (GEN, {"prompt": "a", "size": "0x0"}, "size"),
    (GEN, {"prompt": "a", "size": "99999x99999"}, "size"),
    (GEN, {"prompt": "a", "size": "64"}, "size"),
    (GEN, {"prompt": "a", "size": "61x61"}, "size"),
    (GEN, {"prompt": "a", "size": 64}, "size"),
    (GEN, {"prompt": "a", "response_format": "url"}, "response_format"),
    (GEN, {"prompt": "a", "response_format": "jpeg"}, "response_format"),
    (GEN, {"prompt": "a", "sampler": "dpm_adaptive"}, "sampler"),
    (GEN, b'{"prompt": "a", "guidance_scale": NaN}', "guidance_scale"),
    (GEN, b'{"prompt": "a", "guidance_scale": Infinity}', "guidance_scale"),
    (GEN, {"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    (GEN, {"prompt": "a", "guidance_scale": "high"}, "guidance_scale"),
    (GEN, {"prompt": "a", "steps": 0}, "steps"),
    (GEN, {"prompt": "a", "steps": 100000}, "steps"),
    (GEN, {"prompt": "a", "steps": True}, "steps"),
    (GEN, {"prompt": "a", "seed": -5}, "seed"),
    (GEN, {"prompt": "a", "seed": 2 ** 64}, "seed"),
    (GEN, b'{"prompt": "\\ud800"}', "prompt"),
    (GEN, b'{"prompt": "a",', "JSON"),
    (GEN, b"[1, 2]", "request body"),
    (GEN, b"", "request body"),
    (T2I, {"prompt": "a", "cfg_scale": "high"}, "cfg_scale"),  # ("7" is 7, as A1111 reads it)
    (T2I, {"prompt": "a", "steps": 2.5}, "steps"),
    (T2I, {"prompt": "a", "sampler_name": "DPM adaptive"}, "sampler_name"),
    (T2I, {"prompt": "a", "sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
    (T2I, {"prompt": "a", "sampler_name": "Euler Karras", "scheduler": "Beta"}, "scheduler"),
    (T2I, {"prompt": "a", "sampler_name": "Euler", "scheduler": "Karras Exponential"},
     "scheduler"),
    (T2I, {"prompt": "a", "scheduler": "Align Your Steps"}, "scheduler"),
    (T2I, {"prompt": "a", "scheduler": 7}, "scheduler"),
    (T2I, {"prompt": "a", "width": 65, "height": 64}, "width"),
    (T2I, {"prompt": "a", "batch_size": 0}, "batch_size"),
    (T2I, {"prompt": "a", "batch_size": 40, "n_iter": 40}, "batch_size"),
    (T2I, {"prompt": "a", "n_iter": 0}, "n_iter"),
    # A1111 settings a request overrides: those sdrt has, checked as /sdapi/v1/options does
    (T2I, {"prompt": "a", "override_settings": {"sd_model_checkpoint": "other.safetensors"}},
     "override_settings"),
    (T2I, {"prompt": "a", "override_settings": {"eta_noise_seed_delta": 31337}},
     "override_settings"),
    (T2I, {"prompt": "a", "override_settings": {"sd_vae": "other.safetensors"}},
     "override_settings"),
    (T2I, {"prompt": "a", "override_settings": ["CLIP_stop_at_last_layers"]},
     "override_settings"),
    (T2I, {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 0}},
     "CLIP_stop_at_last_layers"),
    (T2I, {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 3}},
     "CLIP_stop_at_last_layers"),  # the tiny text encoder has 2 layers
    # A1111's sampler settings other than those sdrt runs, where the sampler reads them
    (T2I, {"prompt": "a", "sampler_name": "Euler a", "eta": 0.5}, "eta"),
    (T2I, {"prompt": "a", "sampler_name": "DDIM", "eta": 1.5}, "eta"),
    (T2I, {"prompt": "a", "sampler_name": "DDIM CFG++", "eta": 0.5}, "eta"),
    (T2I, {"prompt": "a", "sampler_name": "Euler", "s_churn": 0.4}, "s_churn"),
    (T2I, {"prompt": "a", "sampler_name": "DPM++ 2M SDE", "s_noise": 1.003}, "s_noise"),
    (T2I, {"prompt": "a", "sampler_name": "Euler", "enable_hr": True,
           "hr_sampler_name": "Euler a", "eta": 0.3}, "eta"),
    (T2I, {"prompt": "a", "restore_faces": True}, "restore_faces"),
    (T2I, {"prompt": "a", "tiling": 2}, "tiling"),
    (T2I, {"prompt": "a", "refiner_checkpoint": "sd_xl_refiner_1.0"}, "refiner_checkpoint"),
    (T2I, {"prompt": "a", "subseed_strength": 1.5}, "subseed_strength"),
    (T2I, {"prompt": "a", "subseed_strength": 0.3, "subseed": -5}, "subseed"),
    (T2I, {"prompt": "a", "styles": ["cinematic"]}, "styles"),
    (T2I, {"prompt": "a", "script_name": "x/y/z plot"}, "script_name"),
    (T2I, {"prompt": "a", "alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}},
     "alwayson_scripts"),
    (T2I, {"prompt": "a", "alwayson_scripts": {"ADetailer": {"args": [True, False]}}},
     "alwayson_scripts"),  # (switched on; [False, ...] is its off value, accepted)
    (T2I, {"prompt": "a", "enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, "hr_upscaler"),
    (T2I, {"prompt": "a", "enable_hr": True, "hr_scale": 0.5}, "hr_scale"),
    (T2I, {"prompt": "a", "enable_hr": True, "hr_resize_x": 5000}, "hr_resize_x"),
    (T2I, {"prompt": "a", "enable_hr": True, "hr_sampler_name": "DPM adaptive"},
     "hr_sampler_name"),
    (T2I, {"prompt": "a", "enable_hr": True, "hr_scheduler": "Karras Exponential"},
     "hr_scheduler"),
    (T2I, {"prompt": "a", "enable_hr": True, "hr_checkpoint_name": "other.safetensors"},
     "hr_checkpoint_name"),
    (T2I, {"prompt": "a", "enable_hr": True, "denoising_strength": 0}, "denoising_strength"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "resize_mode": 4}, "resize_mode"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "resize_mode": "crop"}, "resize_mode"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": _tiny_png(), "resize_mode": 3,
           "inpaint_full_res": False}, "resize_mode"),
    (I2I, {"prompt": "a", "resize_mode": 3,
           "init_images": [_tiny_png(), _b64(_png_file(Image.new("RGB", (32, 64))))]},
     "init_images"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "initial_noise_multiplier": 11},
     "initial_noise_multiplier"),
    (I2I, {"prompt": "a"}, "init_images"),
    (I2I, {"prompt": "a", "init_images": []}, "init_images"),
    (I2I, {"prompt": "a", "init_images": ["not base64!!"]}, "init_images"),
    (I2I, {"prompt": "a", "init_images": [_b64(b"hello, not an image")]}, "init_images"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "denoising_strength": 0},
     "denoising_strength"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": "not base64!!"}, "mask"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": _b64(b"text")}, "mask"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": _tiny_png(),
           "inpainting_fill": 4}, "inpainting_fill"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": _tiny_png(),
           "inpaint_full_res_padding": -1}, "inpaint_full_res_padding"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": _b64(_png_file(
        Image.new("L", (64, 64)))), "inpaint_full_res": True}, "mask"),  # nothing masked
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": _tiny_png(),
           "mask_blur": -1}, "mask_blur"),
    (I2I, {"prompt": "a", "init_images": [_tiny_png()], "mask": _tiny_png(),
           "inpainting_mask_invert": 2}, "inpainting_mask_invert"),
]


def test_malformed_bodies_get_4xx_json_naming_the_field(main_server):
    url, _ = main_server
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for endpoint, body, field in MALFORMED:
            if isinstance(body, bytes):
                r = client.post(endpoint, content=body,
                                headers={"content-type": "application/json"})
            else:
                r = client.post(endpoint, json=body)
            what = f"{endpoint} {body!r:.80}"
            assert 400 <= r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
            message = r.json()["error"]["message"]
            assert field in message and "\n" not in message, f"{what}: {message!r}"
            assert "Traceback" not in r.text
        # Bodies past the limit (1 MiB here): with a Content-Length, and chunked without one.
        r = client.post(GEN, json={"prompt": "x" * (2 ** 20 + 10)})
        assert r.status_code == 413 and "request body" in r.json()["error"]["message"]

        def chunks():
            for _ in range(20):
                yield b"x" * 2 ** 17
        r = client.post(GEN, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        # ... and the server keeps serving.
        r = client.post(T2I, json={"prompt": "still here", "width": 32, "height": 32,
                                   "steps": 1})
        assert r.status_code == 200, r.text
        assert client.get("/health").json()["status"] == "ok"


def test_api_key_is_required_when_set():
    local = LocalServer(config(api_key="sekrit"))
    with local as url:
        r = httpx.post(f"{url}{GEN}", json={"prompt": "a"}, timeout=TIMEOUT)
        assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
        r = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"},
                      timeout=TIMEOUT)
        assert r.status_code == 401
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200  # probes
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0,
                              timeout=TIMEOUT)
        with pytest.raises(openai.AuthenticationError):
            wrong.images.generate(prompt="a", size="32x32")
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0,
                              timeout=TIMEOUT)
        res = right.images.generate(prompt="a", size="32x32", extra_body={"steps": 1})
        png(res.data[0].b64_json, (32, 32))


# -- the process: CLI, memory, SIGTERM ----------------------------------------------------------

def test_cli_refuses_bad_options_before_importing_torch():
    script = (
        "import contextlib, io, sys\n"
        "from sdrt.serve.cli import main\n"
        "cases = [['--max-batch', '0'], ['--compile', '10x10'], ['--port', 'x'],\n"
        "         ['--model', '/no/such/model'], ['--replicas', '2'], ['--batch-window-ms', '-1'],\n"
        "         ['--max-queue', '0'], ['--timeout', '0'], ['--lora-dir', '/no/such/dir'],\n"
        "         ['--refiner', '/no/such/refiner'], ['--prediction-type', 'sample']]\n"
        "for argv in cases:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(argv)\n"
        "    lines = err.getvalue().splitlines()\n"
        "    assert rc == 2 and len(lines) == 1 and lines[0].startswith('sdrt: error: '), "
        "(argv, rc, lines)\n"
        "    print(lines[0])\n"
        "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=TIMEOUT, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max-batch must be a positive integer, got 0" in out.stdout
    assert "model path /no/such/model does not exist" in out.stdout
    assert "lora-dir /no/such/dir is not a folder" in out.stdout
    assert "refiner path /no/such/refiner does not exist" in out.stdout
    assert "argument --prediction-type: invalid choice: 'sample'" in out.stdout


def _rss(pid):
    import psutil
    return psutil.Process(pid).memory_info().rss


def test_process_memory_is_flat_and_sigterm_loses_no_accepted_request():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdrt.serve", "--port", str(port), "--max-batch", "2",
         "--threads", "1", "--steps", "1", "--compile", "32x32", "--batch-window-ms", "50"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = wait_healthy(url, timeout_s=180)
        # --compile: the plans are built before /health says ok.
        assert any(p.startswith("32x32") for p in health["static_plans"]), health
        assert metric(url, "sdrt_static_plan_builds_total") >= 1

        body = {"prompt": "rss", "width": 32, "height": 32, "steps": 1, "cfg_scale": 1}
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            for i in range(200):
                r = client.post(T2I, json={**body, "seed": i})
                assert r.status_code == 200, r.text
                if i == 19:
                    rss_20 = _rss(proc.pid)
        rss_200 = _rss(proc.pid)
        assert rss_200 <= 1.10 * rss_20, f"RSS grew from {rss_20 / 2**20:.0f} MiB after 20 " \
                                         f"requests to {rss_200 / 2**20:.0f} MiB after 200"

        # SIGTERM with requests queued and running: every one of them is answered.
        accepted = metric(url, "sdrt_requests_accepted_total")
        results = [None] * 6

        def send(i):
            try:
                results[i] = httpx.post(f"{url}{T2I}", timeout=TIMEOUT, json={
                    "prompt": f"drain {i}", "width": 64, "height": 64, "steps": 8, "seed": i})
            except httpx.HTTPError as e:
                results[i] = e
        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while metric(url, "sdrt_requests_accepted_total") < accepted + 6 \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # until all six are in the server's hands
        assert metric(url, "sdrt_queue_depth") >= 1, "nothing queued at SIGTERM"
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(TIMEOUT)
        for i, r in enumerate(results):
            assert isinstance(r, httpx.Response) and r.status_code == 200, f"request {i}: {r}"
            png(r.json()["images"][0], (64, 64))
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):  # no longer listening
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _bomb_png(width=60000, height=60000):
    """A PNG whose header claims a picture past PIL's decompression-bomb limit."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))
