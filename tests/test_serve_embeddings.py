"""``sdrt serve --embedding-dir``: the folder's textual-inversion embeddings loaded at start, as
A1111 loads its embeddings folder, over real HTTP: A1111's ``/sdapi/v1/embeddings`` listing (the
skipped ones with the reason), a prompt writing one by name giving the library's image with the
same file loaded and A1111's ``TI hashes``, and ComfyUI's ``/embeddings`` and embedding:NAME."""
import base64
import io
import json
import uuid

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.demo.model import demo_pipeline  # noqa: E402
from sdrt.engine.infotext import short_hash  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_serve import TIMEOUT, assert_same_image, config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    width = demo_pipeline(torch.device("cpu"), torch.float32).text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(3)
    save_file({"emb_params": -0.3 + 0.8 * torch.randn(2, width, generator=g)},
              str(root / "inkstyle.safetensors"))
    (root / "more").mkdir()
    save_file({"emb_params": torch.randn(1, width + 8, generator=g)},
              str(root / "more" / "wide.safetensors"))
    save_file({"emb_params": torch.randn(1, width, generator=g)}, str(root / "cat.safetensors"))
    (root / "old.pt").write_bytes(b"not read")
    return root


@pytest.fixture(scope="module")
def server(folder):
    with LocalServer(config(embedding_dir=str(folder))) as url:
        yield url


@pytest.fixture(scope="module")
def ref(folder):
    pipe = demo_pipeline(torch.device("cpu"), torch.float32)
    pipe.load_textual_inversion(str(folder / "inkstyle.safetensors"))
    return pipe


def test_a1111_lists_and_uses_them(server, ref, folder):
    url = server
    listed = httpx.get(f"{url}/sdapi/v1/embeddings", timeout=TIMEOUT).json()
    width = ref.text_encoder.config.hidden_size
    assert listed["loaded"] == {"inkstyle": {"step": None, "sd_checkpoint": None,
                                             "sd_checkpoint_name": None, "shape": width,
                                             "vectors": 2}}
    assert set(listed["skipped"]) == {"wide", "cat", "old"}
    assert "pickle" in listed["skipped"]["old"]["reason"]
    assert "vocabulary" in listed["skipped"]["cat"]["reason"]
    assert str(width) in listed["skipped"]["wide"]["reason"]
    body = {"prompt": "a fox, inkstyle", "negative_prompt": "blur", "seed": 5, "steps": 2,
            "width": 32, "height": 32, "cfg_scale": 5, "sampler_name": "Euler a"}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    out = r.json()
    png = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
    want = ref("a fox, inkstyle", negative_prompt="blur", height=32, width=32,
               num_inference_steps=2, guidance_scale=5.0, sampler="euler_a", seed=5)[0]
    assert_same_image(png, want, "a prompt writing an embedding")
    plain = ref("a fox", negative_prompt="blur", height=32, width=32, num_inference_steps=2,
                guidance_scale=5.0, sampler="euler_a", seed=5)[0]
    assert max(abs(a - b) for a, b in zip(png.convert("L").getdata(),
                                          plain.convert("L").getdata())) > 2
    text = json.loads(out["info"])["infotexts"][0]
    assert f'TI hashes: "inkstyle: {short_hash(str(folder / "inkstyle.safetensors"))}"' in text
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "prompt": "a fox"}, timeout=TIMEOUT)
    assert "TI hashes" not in json.loads(r.json()["info"])["infotexts"][0]


def test_comfyui_lists_and_uses_them(server, ref):
    from test_comfy import DEFAULT
    from test_serve_comfy import _history, _queue, _view, _workflow
    url = server
    assert httpx.get(f"{url}/embeddings", timeout=TIMEOUT).json() == ["inkstyle"]
    graph = _workflow(url, DEFAULT, seed=8)
    graph["6"]["inputs"]["text"] = "a fox, (embedding:inkstyle:1.2)"
    entry = _history(url, _queue(url, graph, client_id=str(uuid.uuid4()))["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = ref("a fox, (embedding:inkstyle:1.2)", negative_prompt="text, watermark",
               prompt_syntax="comfy", height=64, width=64, num_inference_steps=2,
               guidance_scale=7.0, sampler="euler_a_normal", seed=8)[0]
    assert_same_image(png, want, "ComfyUI embedding:NAME")


def test_a_missing_folder_is_refused():
    from sdrt.engine.errors import SdrtError
    with pytest.raises(SdrtError, match="embedding-dir /nonexistent is not a folder"):
        config(embedding_dir="/nonexistent")
