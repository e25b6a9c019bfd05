"""``sdrt serve --refiner``: A1111's refiner_checkpoint and refiner_switch_at, and ComfyUI's SDXL
base-and-refiner workflow, over real HTTP on 127.0.0.1, equal to the library's base stopped at
the switch and the refiner finishing its latents; what is refused."""
import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")

H, W, STEPS, TIMEOUT = 32, 48, 3, 120


@pytest.fixture(scope="module")
def served(sdxl_base_folder, sdxl_refiner_folder):
    from sdrt.serve.config import ServeConfig
    from sdrt.serve.local import LocalServer, free_port
    base_dir, _ = sdxl_base_folder
    refiner_dir, _ = sdxl_refiner_folder
    config = ServeConfig(model=base_dir, refiner=refiner_dir, port=free_port(), max_batch=2,
                         batch_window_ms=50, default_steps=STEPS)
    with LocalServer(config) as url:
        yield (url, Pipeline.from_pretrained(base_dir, device="cpu"),
               Pipeline.from_pretrained(refiner_dir, device="cpu"))


def _expected(base, refiner, seeds, switch, prompt="a red fox", **kw):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    call = dict(num_inference_steps=STEPS, generator=generators, height=H, width=W, **kw)
    latents = base([prompt] * len(seeds), denoising_end=switch, output_type="latent", **call)
    call.pop("height"), call.pop("width")
    return refiner([prompt] * len(seeds), image=latents, denoising_start=switch, **call)


def _pixels(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a1111_refiner_checkpoint(served):
    url, base, refiner = served
    models = httpx.get(f"{url}/sdapi/v1/sd-models", timeout=TIMEOUT).json()
    assert len(models) == 2 and models[1]["title"].startswith("model [")
    body = dict(prompt="a red fox", negative_prompt="blurry", steps=STEPS, width=W, height=H,
                seed=9, cfg_scale=5, sampler_name="Euler", batch_size=2,
                refiner_checkpoint=models[1]["title"], refiner_switch_at=0.7)
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["extra_generation_params"]["Refiner switch at"] == 0.7
    assert "Refiner: model [" in info["infotexts"][1] and "Refiner switch at: 0.7" in \
        info["infotexts"][1], info["infotexts"][1]
    want = _expected(base, refiner, (9, 10), 0.7, negative_prompt="blurry", guidance_scale=5.0,
                     sampler="euler")
    for png, image in zip(r.json()["images"], want):
        got = _pixels(base64.b64decode(png))
        assert np.abs(got - np.asarray(image, dtype=np.int16)).max() <= 1
    plain = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": None},
                       timeout=TIMEOUT).json()["images"][0]
    assert np.abs(_pixels(base64.b64decode(plain)) -
                  _pixels(base64.b64decode(r.json()["images"][0]))).max() > 2
    for edit, field, fragment in (
            ({"refiner_checkpoint": "sd_xl_refiner_1.0"}, "refiner_checkpoint",
             "refiner_checkpoint must be the server's refiner 'model ["),
            ({"refiner_switch_at": 1.0}, "refiner_switch_at",
             "refiner_switch_at must be a number in (0, 1), got 1.0"),
            ({"enable_hr": True, "hr_scale": 2}, "refiner_checkpoint",
             "the refiner finishes text to image only")):
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, **edit}, timeout=TIMEOUT)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == field


def test_comfyui_base_and_refiner_workflow(served):
    from sdrt.engine.samplers import switch_after
    from test_comfy import DEFAULT, _refined, _small
    url, base, refiner = served
    graph = _refined(_small(DEFAULT), end=2)
    graph["4"]["inputs"]["ckpt_name"] = graph["12"]["inputs"]["ckpt_name"] = "model"
    graph["5"]["inputs"].update(width=W, height=H)
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    for _ in range(600):
        entry = httpx.get(f"{url}/history/{prompt_id}", timeout=TIMEOUT).json()
        if entry:
            break
        time.sleep(0.1)
    entry = entry[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["9"]["images"][0]
    data = httpx.get(f"{url}/view", params={"filename": image["filename"], "type": "output"},
                     timeout=TIMEOUT).content
    switch = switch_after(base.scheduler_config, "euler_a_normal", 3, 2)
    k = graph["3"]["inputs"]
    want = _expected(base, refiner, (k["noise_seed"],), switch, graph["6"]["inputs"]["text"],
                     negative_prompt=graph["7"]["inputs"]["text"], guidance_scale=k["cfg"],
                     sampler="euler_a_normal", prompt_syntax="comfy")[0]
    assert np.abs(_pixels(data) - np.asarray(want, dtype=np.int16)).max() <= 1
