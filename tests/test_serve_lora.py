"""LoRAs on ``sdrt serve --lora-dir`` over real HTTP on 127.0.0.1: A1111's ``<lora:NAME:SCALE>``
prompt tags and ComfyUI's LoraLoader give the library's image with the same LoRA file at the
same scale; a request without one gets the plain model back; unknown names are 400s."""
import base64
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.demo.model import demo_pipeline  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_comfy import DEFAULT  # noqa: E402
from test_lora import random_lora, write_kohya  # noqa: E402
from test_serve import TIMEOUT, assert_same_image, config  # noqa: E402
from test_serve_comfy import _history, _queue, _view  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def ref_pipe():
    return demo_pipeline(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, ref_pipe):
    """Two kohya LoRAs for the built-in model, one in a subfolder (found by file name)."""
    folder = tmp_path_factory.mktemp("loras")
    models = {"unet": ref_pipe.unet, "text_encoder": ref_pipe.text_encoders["text_encoder"]}
    write_kohya(random_lora(models, seed=1, alpha=2.0), folder / "ink.safetensors")
    (folder / "styles").mkdir()
    write_kohya(random_lora(models, seed=2), folder / "styles" / "paper.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(lora_dir):
    with LocalServer(config(lora_dir=str(lora_dir), max_batch=4)) as url:
        yield url


def _reference(pipe, loras, seed, prompt=PROMPT):
    for name, path, scale in loras:
        pipe.load_lora(str(path), scale=scale, name=name)
    try:
        return pipe(prompt, negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
                    guidance_scale=7.0, seed=seed)[0]
    finally:
        pipe.unload_lora()


def _a1111(url, prompt, seed):
    r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
        "prompt": prompt, "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7, "seed": seed,
        "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    image.load()
    return image, json.loads(r.json()["info"])["infotexts"][0]


def test_a1111_lora_tags(server, ref_pipe, lora_dir):
    url = server
    names = {e["name"] for e in httpx.get(f"{url}/sdapi/v1/loras").json()}
    assert names == {"ink", "paper"}
    both = [("ink", lora_dir / "ink.safetensors", 0.7),
            ("paper", lora_dir / "styles" / "paper.safetensors", -0.4)]
    got, info = _a1111(url, f"{PROMPT} <lora:ink:0.7> <lora:paper:-0.4>", seed=3)
    assert_same_image(got, _reference(ref_pipe, both, 3), "two LoRAs")
    assert info.startswith(f"{PROMPT} <lora:ink:0.7> <lora:paper:-0.4>\n")  # as given
    from sdrt.engine.infotext import short_hash
    assert (f'Lora hashes: "ink: {short_hash(both[0][1])}, paper: '
            f'{short_hash(both[1][1])}"') in info
    plain = _reference(ref_pipe, [], 3)
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(plain)).max() > 8
    # One LoRA kept at another scale, the other unloaded; then none: the plain model back.
    got, _ = _a1111(url, f"<lora:ink> {PROMPT}", seed=3)
    assert_same_image(got, _reference(ref_pipe, [("ink", both[0][1], 1.0)], 3), "ink at 1")
    got, info = _a1111(url, PROMPT, seed=3)
    assert_same_image(got, plain, "no LoRA after LoRAs")
    assert "Lora hashes" not in info
    # Switching from one LoRA to another (the new one takes the old one's place in one
    # pass), and back, gives each one's image.
    for name, path, scale in (both[0], both[1], both[0], both[1]):
        got, _ = _a1111(url, f"{PROMPT} <lora:{name}:{scale}>", seed=4)
        assert_same_image(got, _reference(ref_pipe, [(name, path, scale)], 4), f"{name} alone")
    got, _ = _a1111(url, f"{PROMPT} <lora:paper:-0.4> <lora:ink:0.7>", seed=3)
    assert_same_image(got, _reference(ref_pipe, both, 3), "paper kept, ink in again")
    # A1111's two multipliers, the text encoders' then the UNet's (named too)
    for tag in ("<lora:ink:0.2:0.9>", "<lora:ink:te=0.2:unet=0.9>"):
        got, _ = _a1111(url, f"{PROMPT} {tag}", seed=3)
        assert_same_image(got, _reference(ref_pipe, [("ink", both[0][1], (0.9, 0.2))], 3), tag)


def test_comfyui_lora_loader(server, ref_pipe, lora_dir):
    url = server
    assert sorted(httpx.get(f"{url}/models/loras").json()) == ["ink.safetensors",
                                                               "paper.safetensors"]
    g = copy.deepcopy(DEFAULT)
    g["4"]["inputs"]["ckpt_name"] = httpx.get(f"{url}/models/checkpoints").json()[0]
    g["3"]["inputs"].update(seed=5, steps=2, cfg=7.0, sampler_name="euler_ancestral",
                            model=["10", 0])
    g["5"]["inputs"].update(width=64, height=64)
    g["6"]["inputs"].update(text=PROMPT, clip=["10", 1])
    g["7"]["inputs"].update(text="blurry", clip=["10", 1])
    g["10"] = {"class_type": "LoraLoader",
               # (its subfolder as ComfyUI on Windows writes it)
               "inputs": {"lora_name": "styles\\paper.safetensors", "strength_model": 0.6,
                          "strength_clip": 0.6, "model": ["4", 0], "clip": ["4", 1]}}
    # and a LoraLoaderModelOnly after it: its LoRA patches the UNet alone
    g["11"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"lora_name": "ink.safetensors", "strength_model": 0.5,
                          "model": ["10", 0]}}
    g["3"]["inputs"]["model"] = ["11", 0]
    entry = _history(url, _queue(url, g)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    # ComfyUI's euler_ancestral on "normal" steps is sdrt's euler_a.
    ref_pipe.load_lora(str(lora_dir / "styles" / "paper.safetensors"), scale=0.6, name="paper")
    ref_pipe.load_lora(str(lora_dir / "ink.safetensors"), scale=(0.5, 0.0), name="ink")
    try:
        want = ref_pipe(PROMPT, negative_prompt="blurry", height=64, width=64,
                        num_inference_steps=2, guidance_scale=7.0, sampler="euler_a", seed=5)[0]
    finally:
        ref_pipe.unload_lora()
    assert_same_image(got, want, "ComfyUI LoraLoader")


@pytest.mark.parametrize("prompt,fragment", [
    ("a cat <lora:nope:1>", "applies LoRA 'nope', which --lora-dir does not have"),
    ("a cat <lora:ink:x>", "has a multiplier that is not a number"),
    ("a cat <lora:ink:1:1:8>", "not its dynamic rank dyn"),
    ("a cat <lora:ink:1> <lora:ink:0.5>", "applies LoRA 'ink' twice"),
    ("a cat <lora:ink:1e9>", "a number from -100 to 100"),
])
def test_bad_lora_tags_are_400s(server, prompt, fragment):
    r = httpx.post(f"{server}/sdapi/v1/txt2img", timeout=TIMEOUT,
                   json={"prompt": prompt, "steps": 1, "width": 32, "height": 32})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "prompt"


def test_a_server_without_lora_dir_refuses_tags():
    with LocalServer(config()) as url:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                       json={"prompt": "a cat <lora:ink:1>", "steps": 1})
        assert r.status_code == 400 and "--lora-dir" in r.json()["error"]["message"], r.text
        assert httpx.get(f"{url}/sdapi/v1/loras").json() == []
