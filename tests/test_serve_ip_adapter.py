"""IP-Adapter units of A1111's ControlNet extension API on ``sdrt serve --controlnet-dir
--clip-vision-dir`` over real HTTP on 127.0.0.1: a unit gives the library's image with the
same adapter, encoder, reference image and settings, the module picks the encoder (the one
that fits when its name does not), the PNG info records the unit, a unit's
effective_region_mask gives the library's regional image, and what sdrt cannot run is a 400
naming the field."""
import base64
import io
import json

import pytest
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.infotext import short_hash  # noqa: E402
from sdrt.engine.ip_adapter import cross_attentions  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_ip_adapter import ENCODER, _own_encoder, _picture, _weights  # noqa: E402
from test_serve import TIMEOUT, assert_same_image, b64_png, config, ref_pipe  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, ref_pipe):
    """--controlnet-dir with a plain IP-Adapter ("style") and a plus one that reads a width
    no encoder has ("wide"); --clip-vision-dir with an encoder named for ViT-bigG that does
    not fit "style" and one with a neutral name that does."""
    root = tmp_path_factory.mktemp("serve-ip-adapter")
    (root / "nets").mkdir()
    (root / "clip").mkdir()
    widths = tuple(a.to_q.out_features for a in cross_attentions(ref_pipe.unet))
    cross = ref_pipe.unet.config.cross_attention_dim
    save_file(_weights("plain", 4, widths, cross=cross), str(root / "nets" / "style.safetensors"))
    save_file(_weights("plus", 5, widths, cross=cross, hidden=999),
              str(root / "nets" / "wide.safetensors"))
    _own_encoder(root / "clip" / "vision.safetensors")
    other = dict(ENCODER, projection_dim=16)
    from sdrt.engine.clip_vision import CLIPVisionModelWithProjection, VisionConfig
    model = CLIPVisionModelWithProjection(VisionConfig.from_dict(other))
    save_file({k: v.detach().contiguous().normal_() for k, v in model.state_dict().items()},
              str(root / "clip" / "clip_g.safetensors"))
    return root, _picture(9, 40, 56)


@pytest.fixture(scope="module")
def server(assets):
    root, _ = assets
    with LocalServer(config(controlnet_dir=str(root / "nets"),
                            clip_vision_dir=str(root / "clip"), max_batch=4)) as url:
        yield url


def _txt2img(url, units, seed=3):
    return httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
        "prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7, "seed": seed,
        "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"args": units}}})


def test_a_unit_gives_the_library_image(server, assets, ref_pipe):
    root, picture = assets
    digest = short_hash(str(root / "nets" / "style.safetensors"))[:8]
    modules = httpx.get(f"{server}/controlnet/module_list").json()
    assert "ip-adapter_clip_sd15" in modules["module_list"]
    unit = {"module": "ip-adapter_clip_sdxl", "model": f"style [{digest}]",
            "image": b64_png(picture), "weight": 0.7, "guidance_end": 0.8}
    r = _txt2img(server, [unit])
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    ref_pipe.load_ip_adapter(root / "nets" / "style.safetensors",
                             image_encoder=root / "clip" / "vision.safetensors", name="style")
    try:
        want = ref_pipe(PROMPT, negative_prompt="blurry", height=64, width=64,
                        num_inference_steps=2, guidance_scale=7.0, seed=3,
                        ip_adapter_image=picture, ip_adapter_scale=0.7,
                        ip_adapter_guidance_end=0.8)[0]
    finally:
        ref_pipe.unload_ip_adapter()
    assert_same_image(got, want, "an IP-Adapter unit")
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert (f'ControlNet 0: "Module: ip-adapter_clip_sdxl, Model: style [{digest}], Weight: '
            f'0.7, Resize Mode: Crop and Resize') in text


def test_effective_region_mask_gives_the_library_image(server, assets, ref_pipe):
    # The unit's effective_region_mask: its red channel, soft, weighs the adapter's attention
    # (the library's ip_adapter_mask_style="a1111").
    import numpy as np
    root, picture = assets
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    rgb[:, :20, 0] = 255  # the left half in, whatever the other channels say
    rgb[:, 20:, 0] //= 4
    unit = {"module": "ip-adapter_clip_sd15", "model": "style", "image": b64_png(picture),
            "weight": 1.5, "effective_region_mask": b64_png(Image.fromarray(rgb))}
    r = _txt2img(server, [unit], seed=4)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    ref_pipe.load_ip_adapter(root / "nets" / "style.safetensors",
                             image_encoder=root / "clip" / "vision.safetensors", name="style")
    try:
        kw = dict(negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
                  guidance_scale=7.0, seed=4, ip_adapter_image=picture, ip_adapter_scale=1.5)
        want = ref_pipe(PROMPT, ip_adapter_mask=rgb[..., 0].astype(np.float32) / 255,
                        ip_adapter_mask_style="a1111", **kw)[0]
        whole = ref_pipe(PROMPT, **kw)[0]
    finally:
        ref_pipe.unload_ip_adapter()
    assert_same_image(got, want, "an IP-Adapter unit with an effective_region_mask")
    assert np.abs(np.asarray(got, np.int16) - np.asarray(whole, np.int16)).max() > 8, \
        "the mask changed nothing"


@pytest.mark.parametrize("unit, field, message", [
    ({"module": "ip-adapter_clip_sd15", "model": "style", "effective_region_mask": 3},
     "[0].effective_region_mask", "must be a base64-encoded image or null, got 3"),
    ({"module": "none", "model": "style", "effective_region_mask": [1]},
     "[0].effective_region_mask", "must be a base64-encoded image or null, got [1]"),
    ({"module": "ip-adapter_face_id_plus", "model": "style"}, "[0].module",
     "FaceID reads an insightface embedding"),
    ({"module": "ip-adapter_clip_sd15", "model": "nothing"}, "[0].model",
     "must name an IP-Adapter file of --controlnet-dir"),
    ({"module": "ip-adapter-auto", "model": "wide"}, "[0].module",
     "no image encoder of --clip-vision-dir gives what IP-Adapter 'wide' reads"),
    ({"module": "ip-adapter_clip_sd15", "model": "style", "weight": 11}, "[0].weight",
     "must be a number from 0 to 10"),
])
def test_bad_units_are_400s(server, assets, unit, field, message):
    _, picture = assets
    r = _txt2img(server, [{"image": b64_png(picture), **unit}])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == f"alwayson_scripts.controlnet.args{field}"
    assert message in error["message"]


# -- cubiq's IPAdapterAdvanced node through the ComfyUI API ---------------------------------------

def _comfy_graph(url, picture, prep=None, adapter="style.safetensors",
                 encoder="vision.safetensors", weight_type="linear"):
    """The default workflow with one IPAdapterAdvanced node (its image uploaded as ref.png)."""
    from test_comfy_ip_adapter import with_ip_adapters
    from test_serve_comfy import _workflow
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    r = httpx.post(f"{url}/upload/image", files={"image": ("ref.png", buffer.getvalue(),
                                                           "image/png")})
    unit = (adapter, r.json()["name"], 0.7, 0.0, 0.8, prep)
    graph = _workflow(url, with_ip_adapters(units=(unit,), weight_type=weight_type))
    graph["40"]["inputs"]["clip_name"] = encoder
    return graph


def _comfy_want(ref_pipe, root, picture, prep=None, weight_type="linear", mask=None):
    """The library's image of ``_comfy_graph``'s workflow (weight 0.7, end 0.8) with the
    "style" adapter, the "vision" encoder and ``picture`` as the nodes prepare it."""
    from sdrt.engine.comfy import block_scales, clip_vision_image
    from sdrt.engine.ip_adapter import block_places
    ref_pipe.load_ip_adapter(root / "nets" / "style.safetensors",
                             image_encoder=root / "clip" / "vision.safetensors", name="style")
    try:
        return ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                        height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                        sampler="euler_a_normal", seed=11,
                        ip_adapter_image=clip_vision_image(picture, ENCODER["image_size"], prep),
                        ip_adapter_scale=block_scales(weight_type, 0.7,
                                                      block_places(ref_pipe.unet), False),
                        ip_adapter_guidance_end=0.8,
                        **({} if mask is None else dict(ip_adapter_mask=mask,
                                                        ip_adapter_mask_style="a1111")))[0]
    finally:
        ref_pipe.unload_ip_adapter()


@pytest.mark.parametrize("weight_type", ["linear", "style transfer"])
def test_comfyui_ipadapter_node_gives_the_library_image(server, assets, ref_pipe, weight_type):
    # The reference image as the node and ComfyUI's CLIP preprocessing prepare it, the
    # node's weight, start and end: the library's image with the same adapter and encoder.
    from test_serve_comfy import _history, _queue, _view
    root, picture = assets
    info = httpx.get(f"{server}/object_info/IPAdapterAdvanced").json()["IPAdapterAdvanced"]
    assert "style transfer" in info["input"]["required"]["weight_type"][0]
    assert "vision.safetensors" in httpx.get(f"{server}/models/clip_vision").json()
    prep = ("BICUBIC", "left", 0.25)
    graph = _comfy_graph(server, picture, prep, weight_type=weight_type)
    entry = _history(server, _queue(server, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(server, entry["outputs"]["9"]["images"][0])))
    assert_same_image(png, _comfy_want(ref_pipe, root, picture, prep, weight_type),
                      f"a ComfyUI IPAdapterAdvanced node, {weight_type}")
    assert "ControlNet 0: \"Module: ip-adapter-auto, Model: style [" in png.text["parameters"]


@pytest.mark.parametrize("files,message", [
    ({"adapter": "nothing.safetensors"}, "IPAdapterModelLoader loads 'nothing.safetensors', "
                                         "which --controlnet-dir does not have"),
    ({"encoder": "nothing.safetensors"}, "CLIPVisionLoader loads 'nothing.safetensors', which "
                                         "--clip-vision-dir does not have"),
    ({"encoder": "clip_g.safetensors"}, "IP-Adapter 'style' does not read what "
                                        "'clip_g.safetensors' gives"),
])
def test_comfyui_ipadapter_bad_files_are_400s(server, assets, files, message):
    _, picture = assets
    r = httpx.post(f"{server}/prompt", json={"prompt": _comfy_graph(server, picture, **files)})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"], r.text


def test_comfyui_unified_loader_finds_its_files_by_name(server, assets, ref_pipe):
    # cubiq's simple example: IPAdapterUnifiedLoader's preset finds the adapter in
    # --controlnet-dir and the encoder in --clip-vision-dir by their names.
    import shutil

    from test_comfy_ip_adapter import with_unified
    from test_serve_comfy import _history, _queue, _view, _workflow
    root, picture = assets
    adapter = root / "nets" / "ip-adapter-plus_sd15.safetensors"
    encoder = root / "clip" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    name = httpx.post(f"{server}/upload/image", files={
        "image": ("ref.png", buffer.getvalue(), "image/png")}).json()["name"]
    graph = _workflow(server, with_unified(image=name, weight=0.7, end=0.8))
    r = httpx.post(f"{server}/prompt", json={"prompt": graph})
    assert r.status_code == 400 and "preset 'PLUS (high strength)' finds no adapter among " \
        "style.safetensors, wide.safetensors" in r.json()["error"]["message"], r.text
    shutil.copy(root / "nets" / "style.safetensors", adapter)
    shutil.copy(root / "clip" / "vision.safetensors", encoder)
    try:
        entry = _history(server, _queue(server, graph)["prompt_id"])
    finally:
        adapter.unlink()
        encoder.unlink()
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(server, entry["outputs"]["9"]["images"][0])))
    assert_same_image(png, _comfy_want(ref_pipe, root, picture),
                      "cubiq's unified loader and IPAdapter node")


def test_comfyui_attn_mask_gives_the_librarys_region(server, assets, ref_pipe):
    # The attn_mask from an uploaded RGBA image's alpha (LoadImage's MASK, inverted as ComfyUI
    # reads it): the library's regional image, soft and bilinear as the extension's.
    import numpy as np

    from sdrt.engine.comfy import comfy_mask
    from test_comfy_ip_adapter import _region_png
    from test_serve_comfy import _history, _queue, _view
    root, picture = assets
    _region_png(root / "region.png")
    with open(root / "region.png", "rb") as f:
        name = httpx.post(f"{server}/upload/image", files={
            "image": ("region.png", f.read(), "image/png")}).json()["name"]
    graph = _comfy_graph(server, picture)
    graph["43"]["inputs"]["attn_mask"] = ["70", 1]
    graph["70"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    entry = _history(server, _queue(server, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(server, entry["outputs"]["9"]["images"][0])))
    region = comfy_mask(Image.open(root / "region.png"), "alpha")
    assert 0 < region.mean() < 1 and np.ptp(region) == 1
    assert_same_image(png, _comfy_want(ref_pipe, root, picture, mask=region),
                      "a ComfyUI IPAdapterAdvanced node with an attn_mask")
