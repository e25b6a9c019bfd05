"""A1111's "Resize seed from" (``seed_resize_from``): the centring against A1111's
``ImageRNG.first`` written out in NumPy, the pipeline's noise against the noise built by hand
(variation seeds slerped at the resized size, the generators going on as a plain draw leaves
them), the CLI's PNG info and ``--from-png``, and the A1111 API's ``seed_resize_from_h``/``_w``."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline
from sdrt.engine.errors import SdrtError
from sdrt.engine.stages import centred_noise, cpu_randn, vary_noise
from sdrt.engine.tiny import tiny_components
from test_cli import _parameters, _run, assert_png_round_trip


def centred_numpy(noise, small):
    """A1111's seed resize (modules/rng.py, ``ImageRNG.first``) on one image's (C, H, W) noise,
    written out: the offsets halved with Python's floor, a side too large cut from both ends."""
    x = noise.copy()
    shape, noise_shape = noise.shape, small.shape
    dx = (shape[2] - noise_shape[2]) // 2
    dy = (shape[1] - noise_shape[1]) // 2
    w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
    h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
    tx = 0 if dx < 0 else dx
    ty = 0 if dy < 0 else dy
    dx = max(-dx, 0)
    dy = max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = small[:, dy:dy + h, dx:dx + w]
    return x


@pytest.mark.parametrize("small", [(6, 6), (10, 12), (6, 12), (5, 7), (11, 9), (8, 10)],
                         ids=["inside", "larger", "mixed", "odd_inside", "odd_larger", "same"])
def test_centring_is_a1111s(small):
    g = torch.Generator().manual_seed(2)
    noise, piece = torch.randn(2, 3, 8, 10, generator=g), torch.randn(2, 3, *small, generator=g)
    got = centred_noise(noise, piece)
    for i in range(2):
        np.testing.assert_array_equal(got[i].numpy(), centred_numpy(noise[i].numpy(),
                                                                    piece[i].numpy()))
    assert not torch.equal(got, noise)


ARGS = dict(height=64, width=64, num_inference_steps=3, sampler="euler_a", output_type="np",
            guidance_scale=4.0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


def _gens():
    return [torch.Generator().manual_seed(s) for s in (3, 4)]


@pytest.mark.parametrize("variation", [False, True], ids=["plain", "variation_seed"])
def test_pipeline_noise_is_centred_and_the_seed_goes_on(pipe, variation):
    # 48 high, 80 wide at 64×64: cut at the sides, framed above and below
    extra = dict(subseed=9, subseed_strength=0.4) if variation else {}
    got = pipe("a fox", num_images_per_prompt=2, generator=_gens(), seed_resize_from=(48, 80),
               **extra, **ARGS)
    small = cpu_randn((2, 4, 6, 10), _gens())  # what the seeds draw at 80×48
    if variation:
        small = vary_noise(small, [9, 10], 0.4)  # (slerped at that size, as A1111 does)
    gens = _gens()
    noise = centred_noise(cpu_randn((2, 4, 8, 8), gens), small)  # gens go on from here
    want = pipe("a fox", num_images_per_prompt=2, generator=gens, latents=noise, **ARGS)
    assert np.abs(got - want).max() <= 1e-5
    plain = pipe("a fox", num_images_per_prompt=2, generator=_gens(), **extra, **ARGS)
    assert np.abs(got - plain).max() > 1e-3
    same = pipe("a fox", num_images_per_prompt=2, generator=_gens(), seed_resize_from=(64, 64),
                **extra, **ARGS)
    assert np.array_equal(same, plain)


def test_a_seed_keeps_its_noise_at_another_size(pipe):
    # The point of it: the 32×32 image's noise is the middle of the 64×48 image's.
    kw = dict(num_inference_steps=1, sampler="euler", output_type="latent", guidance_scale=1.0)
    small = cpu_randn((1, 4, 4, 4), torch.Generator().manual_seed(7))
    noise = pipe._seeded_noise(pipe.check(pipe_request(seed_resize_from=(32, 32))),
                               (1, 4, 8, 6), torch.Generator().manual_seed(7))
    assert torch.equal(noise[:, :, 2:6, 1:5], small)
    assert pipe("a fox", seed=7, height=64, width=48, seed_resize_from=(32, 32), **kw).shape \
        == (1, 4, 8, 6)


def pipe_request(**kw):
    from sdrt.engine.request import GenerationRequest
    return GenerationRequest(prompt="a fox", **kw).check()


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed_resize_from=(4, 64)), "seed_resize_from must be at least 8 pixels \\(the VAE's "
                                     "scale factor\\) wide and high, got 64x4"),
    (dict(seed_resize_from=(0, 64)), "seed_resize_from must be None or a pair \\(height, width\\)"
                                     " of integers from 1 to 4096, got \\(0, 64\\)"),
    (dict(seed_resize_from=512), "seed_resize_from must be None or a pair"),
    (dict(seed_resize_from=(64, 64), latents=torch.zeros(1, 4, 8, 8)),
     "seed_resize_from changes the noise the seed draws; it cannot be combined with latents"),
    (dict(subseed_strength=0.5, latents=torch.zeros(1, 4, 8, 8)),
     "subseed_strength changes the noise the seed draws"),
])
def test_bad_settings(pipe, kwargs, message):
    with pytest.raises(SdrtError, match=message):
        pipe("a fox", seed=1, **{**ARGS, "num_inference_steps": 1}, **kwargs)


def test_cli_png_info_and_from_png(tmp_path, capsys):
    base = ["generate", "a fox", "--steps", "2", "--width", "64", "--height", "48",
            "--sampler", "euler_a", "--seed", "5"]
    out = assert_png_round_trip(base, ["--seed-resize-from", "40x56"],
                                ", Seed resize from: 40x56", tmp_path, capsys)
    assert "Seed: 5, Size: 64x48," in _parameters(out)
    hires = tmp_path / "hires.png"  # (the first pass's noise; the second's goes on)
    code, _, err = _run([*base, "--seed-resize-from", "40x56", "--hr-scale", "1.5", "-o",
                         str(hires)], capsys)
    assert code == 0, err
    with Image.open(hires) as im:
        assert ", Seed resize from: 40x56, Denoising strength: 0.75" in im.text["parameters"]
        assert im.size == (96, 72)
    code, _, err = _run([*base, "--seed-resize-from", "1x64", "-o", str(tmp_path / "x.png")],
                        capsys)
    # (the demo model's VAE scales by 2)
    assert code == 2 and "--seed-resize-from must be at least 2 pixels" in err, err
    code, _, err = _run([*base, "--seed-resize-from", "64x64", "--init-image", str(out),
                         "--sd-upscale", "2", "--sd-upscale-overlap", "8", "-o",
                         str(tmp_path / "up.png")], capsys)
    assert code == 2 and "--seed-resize-from cannot be combined with --sd-upscale" in err, err


def test_a1111_api_seed_resize():
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.serve.local import LocalServer
    from test_serve import TIMEOUT, assert_same_image, config
    body = {"prompt": "a fox", "seed": 21, "steps": 2, "width": 32, "height": 48,
            "batch_size": 2, "sampler_name": "Euler a", "cfg_scale": 5}
    with LocalServer(config()) as url:
        post = lambda **kw: httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                                       json={**body, **kw})
        r = post(seed_resize_from_w=48, seed_resize_from_h=24)
        off = post(seed_resize_from_w=48, seed_resize_from_h=-1)
        bad = [post(seed_resize_from_w=48, seed_resize_from_h=1),  # (the demo's VAE: 2×)
               post(seed_resize_from_w=5000, seed_resize_from_h=64)]
    assert r.status_code == 200 and off.status_code == 200, r.text + off.text
    info = json.loads(r.json()["info"])
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (48, 24)
    text = info["infotexts"][1]
    assert text.endswith(", Seed resize from: 48x24") and "Seed: 22," in text, text
    assert "Seed resize" not in json.loads(off.json()["info"])["infotexts"][0]
    for response, field in zip(bad, ("seed_resize_from_h", "seed_resize_from_w")):
        assert response.status_code == 400 and response.json()["error"]["param"] == field, \
            response.text
    ref = demo_pipeline(torch.device("cpu"), torch.float32)
    png = lambda b64: Image.open(io.BytesIO(base64.b64decode(b64)))
    for i in range(2):
        kw = dict(height=48, width=32, num_inference_steps=2, sampler="euler_a",
                  guidance_scale=5.0, seed=21 + i)
        assert_same_image(png(r.json()["images"][i]), ref("a fox", seed_resize_from=(24, 48),
                                                          **kw)[0], f"seed resize, image {i}")
        assert_same_image(png(off.json()["images"][i]), ref("a fox", **kw)[0], "off")
