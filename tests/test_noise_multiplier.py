"""A1111's "Noise multiplier for img2img" (``initial_noise_multiplier``): image to image's
initial noise times the multiplier (the pipeline against that noise given as ``latents``,
drawn after the init image's posterior sample as the pipeline draws it), refused without an
image; ``--noise-multiplier`` with PNG info and ``--from-png``; the A1111 API's img2img field."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline
from sdrt.engine.errors import SdrtError
from sdrt.engine.stages import cpu_randn
from sdrt.engine.tiny import tiny_components
from test_cli import _parameters, _run, assert_png_round_trip

INIT = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
ARGS = dict(image=INIT, strength=0.7, num_inference_steps=4, sampler="euler", output_type="np",
            guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_the_initial_noise_is_multiplied(pipe, sampler):
    args = {**ARGS, "sampler": sampler}
    got = pipe("a fox", generator=torch.Generator().manual_seed(3),
               initial_noise_multiplier=1.3, **args)
    g = torch.Generator().manual_seed(3)
    cpu_randn((1, 4, 8, 8), g)  # the init image's posterior sample, drawn first
    noise = cpu_randn((1, 4, 8, 8), g)
    want = pipe("a fox", generator=torch.Generator().manual_seed(3), latents=noise * 1.3,
                **args)
    assert np.abs(got - want).max() <= 1e-5
    plain = pipe("a fox", generator=torch.Generator().manual_seed(3), **args)
    assert np.abs(got - plain).max() > 1e-3
    one = pipe("a fox", generator=torch.Generator().manual_seed(3),
               initial_noise_multiplier=1.0, **args)
    assert np.array_equal(one, plain)


@pytest.mark.parametrize("kwargs,message", [
    (dict(initial_noise_multiplier=1.1, image=None),
     "initial_noise_multiplier must be 1 without an image"),
    (dict(initial_noise_multiplier=-0.5), "initial_noise_multiplier must be a number from 0 "
                                          "to 10, got -0.5"),
    (dict(initial_noise_multiplier=float("inf")), "initial_noise_multiplier must be a number"),
])
def test_bad_multipliers(pipe, kwargs, message):
    with pytest.raises(SdrtError, match=message):
        pipe("a fox", seed=1, **{**ARGS, **kwargs})


def test_cli_png_info_and_from_png(tmp_path, capsys):
    init = tmp_path / "init.png"
    INIT.save(init)
    base = ["generate", "a fox", "--steps", "2", "--sampler", "euler", "--seed", "5",
            "--init-image", str(init), "--strength", "0.6"]
    assert_png_round_trip(base, ["--noise-multiplier", "1.2"], ", Noise multiplier: 1.2",
                          tmp_path, capsys, from_png=["--init-image", str(init)])
    # (--from-png with --init-image redraws at the PNG's denoising strength)
    assert "Denoising strength: 0.6" in _parameters(tmp_path / "again.png")
    for value in ("nan", "-1"):  # (refused with or without an init image)
        for argv in (base, base[:-4]):
            code, _, err = _run([*argv, f"--noise-multiplier={value}", "-o",
                                 str(tmp_path / "x.png")], capsys)
            assert code == 2 and "--noise-multiplier must be a number from 0 to 10" in err, err


def test_a1111_api_initial_noise_multiplier():
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.serve.local import LocalServer
    from test_serve import TIMEOUT, assert_same_image, config
    buffer = io.BytesIO()
    INIT.resize((32, 32)).save(buffer, format="PNG")
    body = {"prompt": "a fox", "init_images": [base64.b64encode(buffer.getvalue()).decode()],
            "denoising_strength": 0.6, "seed": 8, "steps": 2, "sampler_name": "Euler",
            "cfg_scale": 5}
    with LocalServer(config()) as url:
        r = httpx.post(f"{url}/sdapi/v1/img2img", timeout=TIMEOUT,
                       json={**body, "initial_noise_multiplier": 1.25})
    assert r.status_code == 200, r.text
    assert ", Noise multiplier: 1.25" in json.loads(r.json()["info"])["infotexts"][0]
    ref = demo_pipeline(torch.device("cpu"), torch.float32)
    want = ref("a fox", image=INIT.resize((32, 32)), strength=0.6, num_inference_steps=2,
               sampler="euler", guidance_scale=5.0, seed=8, initial_noise_multiplier=1.25)[0]
    png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert_same_image(png, want, "initial_noise_multiplier")
    plain = ref("a fox", image=INIT.resize((32, 32)), strength=0.6, num_inference_steps=2,
                sampler="euler", guidance_scale=5.0, seed=8)[0]
    assert np.abs(np.asarray(want, dtype=int) - np.asarray(plain, dtype=int)).max() > 2
