"""A1111's variation seed (``subseed``, ``subseed_strength``): the slerp against A1111's formula
written out in NumPy, the pipeline's noise against the noise built by hand (its seed's
generator going on to draw the sampler's noise), the CLI's PNG info and ``--from-png``, and the
A1111 API."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline
from sdrt.engine.errors import SdrtError
from sdrt.engine.stages import cpu_randn, slerp_a1111
from sdrt.engine.tiny import tiny_components
from test_cli import _run


def slerp_numpy(val, low, high):
    """A1111's slerp (modules/processing.py) written out in float64 NumPy, on one image's
    (C, H, W) noise: norms and cosines along axis 1."""
    low, high = low.astype(np.float64), high.astype(np.float64)
    low_n = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_n = high / np.linalg.norm(high, axis=1, keepdims=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = np.arccos(dot)
    so = np.sin(omega)
    return (np.sin((1 - val) * omega) / so)[:, None] * low + (np.sin(val * omega) / so)[:, None] \
        * high


@pytest.mark.parametrize("val", [0.0, 0.25, 0.5, 1.0])
def test_slerp_is_a1111s(val):
    g = torch.Generator().manual_seed(4)
    low, high = torch.randn(4, 9, 7, generator=g), torch.randn(4, 9, 7, generator=g)
    got = slerp_a1111(val, low, high)
    np.testing.assert_allclose(got.numpy(), slerp_numpy(val, low.numpy(), high.numpy()),
                               atol=1e-5, rtol=1e-5)
    if val == 0:
        assert torch.allclose(got, low, atol=1e-6)
    # (near-parallel noise: A1111's linear branch, which weighs low by val)
    near = slerp_a1111(val, low, low * 1.0001)
    np.testing.assert_allclose(near.numpy(), slerp_numpy(val, low.numpy(),
                                                          (low * 1.0001).numpy()), atol=1e-5)


ARGS = dict(height=64, width=64, num_inference_steps=3, sampler="euler_a", output_type="np",
            guidance_scale=4.0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


def test_pipeline_noise_is_the_slerp_and_the_seed_goes_on(pipe):
    shape = (2, 4, 8, 8)
    got = pipe("a fox", num_images_per_prompt=2, generator=[
        torch.Generator().manual_seed(s) for s in (3, 4)], subseed=9, subseed_strength=0.4,
        **ARGS)
    assert pipe.last_subseed == 9
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    base = cpu_randn(shape, gens)  # (the generators go on from here: euler_a's noise)
    noise = torch.stack([slerp_a1111(0.4, base[i], torch.randn(
        shape[1:], generator=torch.Generator().manual_seed(9 + i))) for i in range(2)])
    want = pipe("a fox", num_images_per_prompt=2, generator=gens, latents=noise, **ARGS)
    assert np.abs(got - want).max() <= 1e-5
    plain = pipe("a fox", num_images_per_prompt=2, generator=[
        torch.Generator().manual_seed(s) for s in (3, 4)], **ARGS)
    assert np.abs(got - plain).max() > 1e-3 and pipe.last_subseed is None
    zero = pipe("a fox", num_images_per_prompt=2, generator=[
        torch.Generator().manual_seed(s) for s in (3, 4)], subseed=9, subseed_strength=0.0,
        **ARGS)
    assert np.array_equal(zero, plain)
    # a list: one subseed per image
    listed = pipe("a fox", num_images_per_prompt=2, generator=[
        torch.Generator().manual_seed(s) for s in (3, 4)], subseed=[9, 10],
        subseed_strength=0.4, **ARGS)
    assert np.array_equal(listed, got)


@pytest.mark.parametrize("kwargs,message", [
    (dict(subseed_strength=1.5), "subseed_strength must be a number from 0 to 1, got 1.5"),
    (dict(subseed_strength=float("nan")), "subseed_strength must be a number from 0 to 1"),
    (dict(subseed=-3, subseed_strength=0.5), "subseed must be -1 \\(random\\), an integer"),
    (dict(subseed=[1, 2, 3], subseed_strength=0.5), "subseed must be one integer or a list of "
                                                    "1 \\(one per image\\), got a list of 3"),
])
def test_bad_variation_settings(pipe, kwargs, message):
    with pytest.raises(SdrtError, match=message):
        pipe("a fox", seed=1, **{**ARGS, "num_inference_steps": 1}, **kwargs)


def test_cli_png_info_and_from_png(tmp_path, capsys):
    out = tmp_path / "v.png"
    base = ["generate", "a fox", "--steps", "2", "--width", "64", "--height", "64",
            "--sampler", "euler_a"]
    code, _, err = _run([*base, "--seed", "5", "--batch", "2", "--subseed", "11",
                         "--subseed-strength", "0.35", "-o", str(out)], capsys)
    assert code == 0, err
    second = tmp_path / "v-1.png"
    with Image.open(second) as im:
        text = im.text["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    assert "Seed: 6," in text and "Variation seed: 12, Variation seed strength: 0.35" in text
    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--from-png", str(second), "-o", str(again)], capsys)
    assert code == 0, err
    with Image.open(again) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels)
    plain = tmp_path / "plain.png"
    code, _, err = _run([*base, "--seed", "6", "-o", str(plain)], capsys)
    with Image.open(plain) as im:
        assert "Variation" not in im.text["parameters"]
        assert np.abs(np.asarray(im.convert("RGB"), dtype=int) - pixels).max() > 2


def test_a1111_api_variation_seed():
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.serve.local import LocalServer
    from test_serve import TIMEOUT, assert_same_image, config
    with LocalServer(config()) as url:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
            "prompt": "a fox", "seed": 21, "subseed": 7, "subseed_strength": 0.5, "steps": 2,
            "width": 32, "height": 32, "batch_size": 2, "sampler_name": "Euler a",
            "cfg_scale": 5})
        assert r.status_code == 200, r.text
        out = r.json()
    info = json.loads(out["info"])
    assert (info["all_seeds"], info["all_subseeds"], info["subseed_strength"]) == (
        [21, 22], [7, 8], 0.5)
    assert "Variation seed: 8, Variation seed strength: 0.5" in info["infotexts"][1]
    ref = demo_pipeline(torch.device("cpu"), torch.float32)
    import base64
    import io
    for i in range(2):
        png = Image.open(io.BytesIO(base64.b64decode(out["images"][i])))
        want = ref("a fox", height=32, width=32, num_inference_steps=2, sampler="euler_a",
                   guidance_scale=5.0, seed=21 + i, subseed=7 + i, subseed_strength=0.5)[0]
        assert_same_image(png, want, f"variation seed, image {i}")
