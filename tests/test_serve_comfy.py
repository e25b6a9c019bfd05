"""ComfyUI's HTTP API on ``sdrt serve`` over real HTTP on 127.0.0.1, driven as ComfyUI's own
script example (``script_examples/basic_api_example.py``) drives ComfyUI: ``urllib`` posts the
API-format workflow to /prompt, then /history/{prompt_id} is polled and /view fetches the
image. The image is the library's for the same settings; the refusals are 400s naming the
node or field."""
import copy
import io
import json
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.demo.model import demo_pipeline  # noqa: E402
from sdrt.engine.images import to_rgb8  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_comfy import (DEFAULT, _advanced, _custom, _hires, _img2img, _pixel_hires,  # noqa: E402
                        _refined, _sdxl_text)
from test_serve import TIMEOUT, assert_same_image, config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server():
    with LocalServer(config()) as url:
        yield url


@pytest.fixture(scope="module")
def ref_pipe():
    return demo_pipeline(torch.device("cpu"), torch.float32)


def _queue(url, graph, **extra):
    """basic_api_example.py's queue_prompt: urllib, a JSON body."""
    data = json.dumps({"prompt": graph, "client_id": str(uuid.uuid4()), **extra}).encode()
    request = urllib.request.Request(f"{url}/prompt", data=data)
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def _history(url, prompt_id):
    """Polled until the prompt is done (bounded)."""
    for _ in range(int(TIMEOUT / 0.1)):
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=TIMEOUT) as r:
            entry = json.loads(r.read())
        if entry:
            return entry[prompt_id]
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish")


def _view(url, image):
    query = urllib.parse.urlencode(image)
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=TIMEOUT) as r:
        return r.read()


def _workflow(url, graph, seed=11, batch=1):
    g = copy.deepcopy(graph)
    g["4"]["inputs"]["ckpt_name"] = httpx.get(f"{url}/models/checkpoints").json()[0]
    g["3"]["inputs"].update(seed=seed, steps=2, cfg=7.0, sampler_name="euler_ancestral")
    if "5" in g:
        g["5"]["inputs"].update(width=64, height=64, batch_size=batch)
    return g


def test_text_to_image_as_comfyuis_script_example(server, ref_pipe):
    url = server
    graph = _workflow(url, DEFAULT, batch=2)
    ui = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler", "title": "Ksampler — ü"}]}
    queued = _queue(url, graph, extra_data={"extra_pnginfo": {"workflow": ui,
                                                              "parameters": "not ours"}})
    assert set(queued) == {"prompt_id", "number", "node_errors"} and queued["node_errors"] == {}
    entry = _history(url, queued["prompt_id"])
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    assert entry["prompt"][1] == queued["prompt_id"] and entry["prompt"][2] == graph
    images = entry["outputs"]["9"]["images"]
    assert [im["type"] for im in images] == ["output", "output"]
    assert images[0]["filename"].startswith("ComfyUI_") and images[0]["filename"].endswith(".png")
    for i, image in enumerate(images):
        png = Image.open(io.BytesIO(_view(url, image)))
        png.load()
        assert json.loads(png.text["prompt"]) == graph  # reopens in ComfyUI, and --workflow
        assert json.loads(png.text["workflow"]) == ui  # (the web UI's own, as SaveImage saves it)
        assert png.text["parameters"] != json.dumps("not ours")  # (sdrt's A1111 info stays)
        assert "Seed: %d" % (11 + i) in png.text["parameters"]
        want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                        height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                        sampler="euler_a_normal", seed=11 + i)[0]
        assert_same_image(png, want, f"ComfyUI prompt, image {i}")
    assert httpx.get(f"{url}/queue").json() == {"queue_running": [], "queue_pending": []}
    assert queued["prompt_id"] in httpx.get(f"{url}/history").json()


def test_prompts_are_read_as_comfyui_reads_them(server, ref_pipe):
    # ComfyUI's weights (relative to the empty prompt; (x:w) sets w) and its repetition of a
    # shorter prompt's chunks: the library's prompt_syntax="comfy".
    url = server
    graph = _workflow(url, DEFAULT, seed=9)
    long = "(a fox:1.3) in snow, " + ", ".join(f"word{i}" for i in range(30))
    graph["6"]["inputs"]["text"] = long
    graph["7"]["inputs"]["text"] = "(blurry:1.4)"
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    call = dict(negative_prompt="(blurry:1.4)", height=64, width=64, num_inference_steps=2,
                guidance_scale=7.0, sampler="euler_a_normal", seed=9)
    want = ref_pipe(long, prompt_syntax="comfy", **call)[0]
    assert_same_image(png, want, "ComfyUI's prompt weights")
    a1111 = ref_pipe(long, **call)[0]
    assert np.abs(np.asarray(a1111, dtype=int) - np.asarray(want, dtype=int)).max() > 2
    for text, fragment in (("a fox embedding:nothere", "prompt names embedding:nothere, which "
                                                       "is not a loaded textual-inversion"),
                           ("(a:inf) fox", "prompt weight of 'a' must be finite, got inf")):
        graph["6"]["inputs"]["text"] = text
        r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "prompt"


def test_freeu_node(server, ref_pipe):
    # A FreeU_V2 node on the model: the library's image with enable_freeu(style="comfy_v2");
    # the next prompt without one runs without it.
    url = server
    graph = _workflow(url, DEFAULT, seed=12)
    graph["20"] = {"class_type": "FreeU_V2", "inputs": {"model": ["4", 0], "b1": 1.3, "b2": 1.4,
                                                       "s1": 0.9, "s2": 0.2}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    call = dict(negative_prompt="text, watermark", height=64, width=64, num_inference_steps=2,
                guidance_scale=7.0, sampler="euler_a_normal", seed=12)
    ref_pipe.enable_freeu(0.9, 0.2, 1.3, 1.4, "comfy_v2")
    try:
        want = ref_pipe("beautiful scenery nature glass bottle", **call)[0]
    finally:
        ref_pipe.disable_freeu()
    plain = ref_pipe("beautiful scenery nature glass bottle", **call)[0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(want, dtype=int)).max() > 2
    for g, expected, what in ((graph, want, "FreeU_V2"),
                              (_workflow(url, DEFAULT, seed=12), plain, "after FreeU")):
        entry = _history(url, _queue(url, g)["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
        assert_same_image(png, expected, what)


def test_perturbed_attention_guidance_node(server, ref_pipe):
    url = server
    graph = _workflow(url, DEFAULT, seed=13)
    graph["20"] = {"class_type": "PerturbedAttentionGuidance",
                   "inputs": {"model": ["4", 0], "scale": 3.0}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                    sampler="euler_a_normal", seed=13, pag_scale=3.0)[0]
    assert_same_image(png, want, "PerturbedAttentionGuidance")


def test_rescale_cfg_node(server, ref_pipe):
    # On top of PAG: ComfyUI rescales the guided prediction before PAG's term is added.
    url = server
    graph = _workflow(url, DEFAULT, seed=14)
    graph["20"] = {"class_type": "PerturbedAttentionGuidance",
                   "inputs": {"model": ["4", 0], "scale": 2.0}}
    graph["21"] = {"class_type": "RescaleCFG", "inputs": {"model": ["20", 0], "multiplier": 0.6}}
    graph["3"]["inputs"]["model"] = ["21", 0]
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                    sampler="euler_a_normal", seed=14, pag_scale=2.0, guidance_rescale=0.6,
                    guidance_rescale_style="comfy")[0]
    assert_same_image(png, want, "RescaleCFG")
    graph["21"]["inputs"]["multiplier"] = 1.5
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400 and "multiplier must be a number from 0 to 1, got 1.5" in \
        r.text, r.text


def test_model_sampling_discrete_node(server, ref_pipe):
    # The workflow's objective and zero-SNR schedule for its batch only: the next workflow
    # runs the model's own.
    url = server
    graph = _workflow(url, DEFAULT, seed=15)
    graph["20"] = {"class_type": "ModelSamplingDiscrete",
                   "inputs": {"model": ["4", 0], "sampling": "v_prediction", "zsnr": True}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    kw = dict(prompt="beautiful scenery nature glass bottle", negative_prompt="text, watermark",
              height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
              sampler="euler_a_normal", seed=15)
    own = ref_pipe.scheduler_config
    ref_pipe.set_scheduler_config(prediction_type="v_prediction",
                                  rescale_betas_zero_snr=True, timestep_spacing="trailing")
    try:
        want = ref_pipe(**kw)[0]
    finally:
        ref_pipe.scheduler_config = own
    assert_same_image(png, want, "ModelSamplingDiscrete")
    del graph["20"]
    graph["3"]["inputs"]["model"] = ["4", 0]
    entry = _history(url, _queue(url, graph)["prompt_id"])
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    assert_same_image(png, ref_pipe(**kw)[0], "the model's own schedule after it")


def test_object_info_drives_a_workflow(server, ref_pipe):
    # A client that builds its workflow from /object_info's menus (the checkpoint, a sampler
    # and scheduler pair) gets a workflow sdrt runs; every pair the menus offer together is
    # one sdrt has (KSampler's two lists are ComfyUI's, not sdrt's: checked per pair).
    url = server
    info = httpx.get(f"{url}/object_info", timeout=TIMEOUT).json()
    assert set(info) >= {"CheckpointLoaderSimple", "KSampler", "VAEDecode", "SaveImage"}
    # (every route under /api/ too, as ComfyUI serves them to its newer clients)
    assert httpx.get(f"{url}/api/object_info", timeout=TIMEOUT).json() == info
    assert info["SaveImage"]["output_node"] and info["KSampler"]["output"] == ["LATENT"]
    ckpt = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert ckpt == httpx.get(f"{url}/models/checkpoints", timeout=TIMEOUT).json()
    k = info["KSampler"]["input"]["required"]
    assert "dpmpp_2m_sde_gpu" in k["sampler_name"][0] and "karras" in k["scheduler"][0]
    assert k["steps"][1]["min"] == 1 and info["KSampler"]["input_order"]["required"][0] == "model"
    graph = _workflow(url, DEFAULT)
    graph["4"]["inputs"]["ckpt_name"] = ckpt[0]
    graph["3"]["inputs"].update(sampler_name="heun", scheduler="karras")
    queued = httpx.post(f"{url}/api/prompt", json={"prompt": graph}, timeout=TIMEOUT).json()
    entry = _history(url, queued["prompt_id"])
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                    sampler="heun_karras", seed=11)[0]
    assert_same_image(png, want, "heun on karras from /object_info")
    # The same through ComfyUI's custom sampling nodes, which /object_info lists too
    assert {"SamplerCustomAdvanced", "KSamplerSelect", "BasicScheduler", "CFGGuider",
            "RandomNoise"} <= set(info)
    entry = _history(url, _queue(url, _custom(graph))["prompt_id"])
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    assert_same_image(png, want, "heun on karras through SamplerCustomAdvanced")
    one = httpx.get(f"{url}/object_info/KSampler", timeout=TIMEOUT).json()
    assert one == {"KSampler": info["KSampler"]}
    assert httpx.get(f"{url}/object_info/SamplerDPMPP_SDE", timeout=TIMEOUT).json() == {}
    assert info["LatentUpscaleBy"]["input"]["required"]["upscale_method"][0] == [
        "nearest-exact", "bilinear", "bicubic"]
    stats = httpx.get(f"{url}/system_stats", timeout=TIMEOUT).json()
    assert stats["devices"][0]["type"] == "cpu" and stats["system"]["pytorch_version"]
    assert stats["system"]["ram_total"] >= stats["system"]["ram_free"] > 0
    for path in ("/embeddings", "/extensions"):
        assert httpx.get(f"{url}{path}", timeout=TIMEOUT).json() == []


def test_hires_fix_workflow(server, ref_pipe):
    # ComfyUI's latent hires fix: the library's hires fix with its settings (the second
    # sampler's noise drawn from the first's generator, as sdrt's hires fix draws it).
    from sdrt.engine.hires import Hires, generate
    url = server
    graph = _hires(_workflow(url, DEFAULT, seed=7), steps=2, denoise=0.6,
                   sampler_name="heun", scheduler="karras")
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    assert png.size == (96, 96)
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (nearest-exact), " \
           "Hires sampler: Heun Karras" in png.text["parameters"], png.text["parameters"]
    want = generate(ref_pipe, Hires(scale=1.5, upscaler="Latent (nearest-exact)", steps=2,
                                    strength=0.6, sampler="heun_karras"),
                    ["beautiful scenery nature glass bottle"], "text, watermark", 64, 64, 2,
                    "euler_a_normal", [torch.Generator().manual_seed(7)],
                    guidance_scale=7.0)[0]
    assert_same_image(png, want, "ComfyUI hires fix")
    pixels = _pixel_hires(_workflow(url, DEFAULT, seed=7), steps=2, denoise=0.6)
    entry = _history(url, _queue(url, pixels)["prompt_id"])
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = generate(ref_pipe, Hires(scale=1.5, upscaler="Lanczos", steps=2, strength=0.6),
                    ["beautiful scenery nature glass bottle"], "text, watermark", 64, 64, 2,
                    "euler_a_normal", [torch.Generator().manual_seed(7)],
                    guidance_scale=7.0)[0]
    assert_same_image(png, want, "ComfyUI hires fix in pixels")
    graph["21"]["inputs"]["steps"] = 10 ** 6
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400 and "steps" in r.text, r.text


def test_image_to_image_with_an_upload(server, ref_pipe):
    url = server
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    files = {"image": ("photo.png", buffer.getvalue(), "image/png")}
    first = httpx.post(f"{url}/upload/image", files=files).json()
    assert first == {"name": "photo.png", "subfolder": "", "type": "input"}
    again = httpx.post(f"{url}/upload/image", files=files).json()
    assert again["name"] == "photo (1).png"  # taken: renamed, as ComfyUI does
    graph = _workflow(url, _img2img(), seed=5)
    graph["3"]["inputs"]["denoise"] = 0.7
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    image=to_rgb8(init), strength=0.7, num_inference_steps=2,
                    guidance_scale=7.0, sampler="euler_a_normal", seed=5)[0]
    assert_same_image(png, want, "ComfyUI image to image")
    # The same through a KSamplerAdvanced from step 1 of 3: the last 2 steps of 3
    graph = _advanced(_workflow(url, _img2img(), seed=5), steps=3, start_at_step=1)
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    image=to_rgb8(init), strength=2 / 3, num_inference_steps=3,
                    guidance_scale=7.0, sampler="euler_a_normal", seed=5)[0]
    assert_same_image(png, want, "ComfyUI KSamplerAdvanced")


def test_inpainting_with_an_uploaded_alpha_mask(server, ref_pipe):
    # ComfyUI's inpainting example: one uploaded PNG, its alpha the mask (LoadImage's MASK),
    # VAEEncodeForInpaint growing it by 6 pixels. The image is the library's inpainting of the
    # picture without its alpha, through the mask grown as ComfyUI grows it, not pasted over
    # the picture; /object_info lists the inpainting nodes.
    from test_comfy_inpaint import (grown, set_latent_noise_mask, vae_encode_for_inpaint,
                                    with_composite)
    url = server
    rng = np.random.default_rng(8)
    rgba = rng.integers(0, 256, (64, 64, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[20:40, 8:30, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    name = httpx.post(f"{url}/upload/image",
                      files={"image": ("hole.png", buffer.getvalue(), "image/png")}).json()["name"]
    graph = _workflow(url, vae_encode_for_inpaint(), seed=6)
    graph["10"]["inputs"]["image"] = name
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    mask = grown(1 - rgba[..., 3].astype(np.float32) / 255, 6)
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    image=Image.fromarray(rgba[..., :3]), mask_image=mask, strength=1.0,
                    num_inference_steps=2, guidance_scale=7.0, sampler="euler_a_normal",
                    seed=6)[0]
    assert_same_image(png, want, "ComfyUI VAEEncodeForInpaint")
    # Laid over the picture by an ImageCompositeMasked through the MASK, ungrown
    graph = with_composite(graph)
    entry = _history(url, _queue(url, graph)["prompt_id"])
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    weight = 1 - rgba[..., 3:].astype(np.float32) / 255
    laid = np.rint(np.asarray(want, np.float32) * weight + rgba[..., :3] * (1 - weight))
    assert_same_image(png, Image.fromarray(laid.astype(np.uint8)), "ImageCompositeMasked")
    # A LoadImageMask of a file never uploaded is a 400 naming it
    graph = _workflow(url, set_latent_noise_mask(), seed=6)
    graph["10"]["inputs"]["image"] = name
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400 and "workflow loads image 'mask.png', which was not uploaded" \
        in r.json()["error"]["message"], r.text
    info = httpx.get(f"{url}/object_info", timeout=TIMEOUT).json()
    assert info["VAEEncodeForInpaint"]["input"]["required"]["grow_mask_by"][1]["default"] == 6
    assert info["InpaintModelConditioning"]["output"] == ["CONDITIONING", "CONDITIONING",
                                                          "LATENT"]
    assert set(info["LoadImageMask"]["input"]["required"]["channel"][0]) == {
        "alpha", "red", "green", "blue"}


def _png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_outpainting(server, ref_pipe):
    # ImagePadForOutpaint → VAEEncodeForInpaint: the library's inpainting of the canvas
    # (written out as ComfyUI's loop) through its MASK grown by 8; a canvas past
    # SDRT_MAX_SIDE is a 400.
    from test_comfy_inpaint import comfy_pad, grown, outpaint_workflow
    url = server
    rgb = np.random.default_rng(9).integers(0, 256, (48, 48, 3), np.uint8)
    name = httpx.post(f"{url}/upload/image", files={
        "image": ("wide.png", _png_bytes(rgb), "image/png")}).json()["name"]
    graph = _workflow(url, outpaint_workflow(pad=(16, 0, 0, 16), feathering=8), seed=4)
    graph["10"]["inputs"]["image"] = name
    entry = _history(url, _queue(url, graph)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    canvas, mask = comfy_pad(rgb, 16, 0, 0, 16, 8)
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    image=Image.fromarray(canvas), mask_image=grown(mask, 8), strength=1.0,
                    num_inference_steps=2, guidance_scale=7.0, sampler="euler_a_normal",
                    seed=4)[0]
    assert png.size == (64, 64)
    assert_same_image(png, want, "ComfyUI ImagePadForOutpaint")
    graph["12"]["inputs"]["right"] = 4096
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400 and "ImagePadForOutpaint pads the 48x48 image to 4160x64" in \
        r.json()["error"]["message"], r.text


def test_upload_mask_as_comfyuis_mask_editor(server):
    # ComfyUI's mask editor: the mask drawn in an image's alpha, posted with original_ref; the
    # upload is the original with that alpha (LoadImage's MASK), under the mask's name.
    url = server
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (16, 24, 3), np.uint8)
    name = httpx.post(f"{url}/upload/image", files={
        "image": ("base.png", _png_bytes(rgb), "image/png")}).json()["name"]
    drawn = rng.integers(0, 256, (16, 24, 4), np.uint8)  # (its colours are not kept)
    drawn[..., 3] = 255
    drawn[4:10, 5:15, 3] = 0

    def post(ref, mask=drawn, file="clipspace-mask.png"):
        return httpx.post(f"{url}/upload/mask", timeout=TIMEOUT,
                          files={"image": (file, _png_bytes(mask, "RGBA"), "image/png")},
                          data={"original_ref": json.dumps(ref) if isinstance(ref, dict)
                                else ref, "overwrite": "true"})
    r = post({"filename": name, "type": "input", "subfolder": ""})
    assert r.json() == {"name": "clipspace-mask.png", "subfolder": "", "type": "input"}, r.text
    stored = np.asarray(Image.open(io.BytesIO(_view(url, {"filename": "clipspace-mask.png",
                                                          "type": "input"}))))
    assert stored.shape == (16, 24, 4)
    assert np.array_equal(stored[..., :3], rgb) and np.array_equal(stored[..., 3], drawn[..., 3])
    # An output as the original, named with ComfyUI's " [output]" annotation
    entry = _history(url, _queue(url, _workflow(url, DEFAULT, seed=3))["prompt_id"])
    out = entry["outputs"]["9"]["images"][0]["filename"]
    big = np.zeros((64, 64, 4), np.uint8)
    big[..., 3] = 128
    assert post({"filename": f"{out} [output]"}, big, "m2.png").json()["name"] == "m2.png"
    stored = np.asarray(Image.open(io.BytesIO(_view(url, {"filename": "m2.png",
                                                          "type": "input"}))))
    made = np.asarray(Image.open(io.BytesIO(_view(url, {"filename": out, "type": "output"}))))
    assert np.array_equal(stored[..., :3], made[..., :3]) and (stored[..., 3] == 128).all()
    for ref, mask, fragment in (
            ("{not json", drawn, "original_ref must be JSON naming the original's filename"),
            ({"type": "input"}, drawn, "original_ref must be JSON"),
            ({"filename": "gone.png", "type": "input"}, drawn,
             "original_ref names 'gone.png' of type 'input', which is not here"),
            ({"filename": name, "type": "input", "subfolder": "clipspace"}, drawn,
             "original_ref's subfolder must be empty"),
            ({"filename": name, "type": "input"}, big, "image must be the original's size, "
                                                       "24x16, got 64x64")):
        r = post(ref, mask)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_bad_bodies_are_400s_naming_the_field(server):
    url = server
    graph = _workflow(url, DEFAULT)
    for body, param, fragment in (
            ({"prompt": graph, "extra_data": "x"}, "extra_data",
             "extra_data must be an object, got 'x'"),
            ({"prompt": graph, "prompt_id": "../../etc/passwd"}, "prompt_id",
             "prompt_id must be a new string of 1 to 256 printable characters without / or \\"),
            ({"prompt": graph, "client_id": 5}, "client_id", "client_id must be a string"),
            ({"prompt": graph, "extra_data": {"extra_pnginfo": {"wörk flow\u2603": {}}}},
             "extra_data.extra_pnginfo", "keys are PNG text keywords"),
            ({"prompt": graph, "extra_data": {"extra_pnginfo": [1]}},
             "extra_data.extra_pnginfo", "must be an object"),
            ({"prompt": graph, "extra_data": {"extra_pnginfo": {"a  b": 1}}},
             "extra_data.extra_pnginfo", "two in a row")):
        r = httpx.post(f"{url}/prompt", json=body, timeout=TIMEOUT)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert fragment in error["message"] and error["param"] == param, error
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(f"{url}/prompt", content=deep, timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"], r.text
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    r = httpx.post(f"{url}/upload/image", files={"image": ("dot.png", tiny.getvalue())},
                   timeout=TIMEOUT)
    name = r.json()["name"]
    graph = _workflow(url, DEFAULT)
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400 and "prompt: the LoadImage's picture" in r.text and \
        "must be at least 2 pixels high and wide" in r.text, r.text  # (the tiny VAE's 2)


@pytest.mark.parametrize("edit,param,fragment", [
    (lambda g: g["4"]["inputs"].update(ckpt_name="sd_xl_base_1.0.safetensors"), "prompt",
     "ckpt_name must name the server's model"),
    (lambda g: g["3"].update(class_type="SamplerDPMPP_SDE"), "prompt",
     "node 3 (SamplerDPMPP_SDE) is not supported"),
    (lambda g: (g.update({"30": {"class_type": "VAELoader", "inputs": {"vae_name": "v.pt"}}}),
                g["8"]["inputs"].update(vae=["30", 0])), "prompt",
     "decodes with VAE 'v.pt' (a VAELoader), which --vae-dir does not have"),
    (lambda g: g["5"]["inputs"].update(width=65), "width", "width must be a multiple of"),
    (lambda g: g["3"]["inputs"].update(steps=0), "steps", "steps"),
    (lambda g: g["6"]["inputs"].update(text=5), "prompt", "text must be a string"),
    (lambda g: g["5"]["inputs"].update(batch_size=500), "batch_size", "batch_size"),
    (lambda g: [_sdxl_text(g, node, text, text + ", in snow", size=(64, 64))
                for node, text in (("6", "a fox"), ("7", "blurry"))], "text_g",
     "text_g is not used by SD 1.x models"),
    (lambda g: g.update(_refined(g, end=1)), "prompt",
     "workflow refines with checkpoint 'sd_xl_refiner_1.0.safetensors'; the server runs no "
     "refiner (sdrt serve --refiner PATH)"),
])
def test_bad_workflows_are_400s_naming_the_field(server, edit, param, fragment):
    url = server
    graph = _workflow(url, DEFAULT)
    edit(graph)
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param, error
    assert httpx.get(f"{url}/queue").json()["queue_running"] == []


def test_malformed_requests(server):
    url = server
    for body in (b"{not json", b"[]", json.dumps({"prompt": "a cat"}).encode()):
        r = httpx.post(f"{url}/prompt", content=body, timeout=TIMEOUT)
        assert r.status_code == 400 and "error" in r.json(), r.text
    graph = _workflow(url, _img2img())
    graph["10"]["inputs"]["image"] = "never-uploaded.png"
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400 and "was not uploaded" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/history/no-such-id").json() == {}
    r = httpx.get(f"{url}/view", params={"filename": "nope.png", "type": "output"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "filename"
    with pytest.raises(urllib.error.HTTPError):
        _queue(url, _workflow(url, DEFAULT), prompt_id=123)
    r = httpx.post(f"{url}/upload/image", files={"image": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
    r = httpx.post(f"{url}/upload/image", files={"other": ("x.png", b"", "image/png")})
    assert r.status_code == 400 and "multipart form field 'image'" in r.text, r.text


def test_websocket_as_comfyuis_websockets_example(server, ref_pipe):
    """websockets_api_example.py: connect /ws with a clientId (websocket-client), queue with
    that client_id, read messages until ``executing`` with node null for the prompt, then the
    history and the images."""
    websocket = pytest.importorskip("websocket")
    url = server
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws{url[4:]}/ws?clientId={client_id}", timeout=TIMEOUT)
    try:
        first = json.loads(ws.recv())
        assert first["type"] == "status" and first["data"]["sid"] == client_id
        graph = _workflow(url, DEFAULT, seed=21)
        prompt_id = _queue(url, graph, client_id=client_id)["prompt_id"]
        seen = []
        for _ in range(100):  # bounded
            message = json.loads(ws.recv())
            seen.append(message["type"])
            data = message["data"]
            if message["type"] == "executing" and data["node"] is None and \
                    data["prompt_id"] == prompt_id:
                break
        else:
            raise AssertionError(f"no end of execution in {seen}")
    finally:
        ws.close()
    kinds = [k for k in seen if k != "status"]
    assert kinds == ["execution_start", "executing", "executed", "execution_success",
                     "executing"], seen
    entry = _history(url, prompt_id)
    png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                    height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                    sampler="euler_a_normal", seed=21)[0]
    assert_same_image(png, want, "ComfyUI over the websocket")


def test_save_image_websocket_as_comfyuis_ws_images_example(server, ref_pipe):
    """websockets_api_example_ws_images.py: a SaveImageWebsocket node; the client keeps each
    binary message (past its 8-byte header) that arrives while that node is executing, until
    ``executing`` with node null. No file is kept and the history has no output for it."""
    websocket = pytest.importorskip("websocket")
    url = server
    client_id = str(uuid.uuid4())
    graph = _workflow(url, DEFAULT, seed=31, batch=2)
    graph["save_image_websocket_node"] = {"class_type": "SaveImageWebsocket",
                                          "inputs": {"images": ["8", 0]}}
    del graph["9"]
    ws = websocket.WebSocket()
    ws.connect(f"ws{url[4:]}/ws?clientId={client_id}", timeout=TIMEOUT)
    images, current = [], ""
    try:
        prompt_id = _queue(url, graph, client_id=client_id)["prompt_id"]
        for _ in range(200):  # bounded
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break
                    current = data["node"]
            elif current == "save_image_websocket_node":
                assert out[:8] == bytes([0, 0, 0, 1, 0, 0, 0, 2])  # preview image, PNG
                images.append(out[8:])
        else:
            raise AssertionError("no end of execution")
    finally:
        ws.close()
    assert len(images) == 2
    for i, data in enumerate(images):
        png = Image.open(io.BytesIO(data))
        png.load()
        assert not png.text  # (a preview: no metadata)
        want = ref_pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                        height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                        sampler="euler_a_normal", seed=31 + i)[0]
        assert_same_image(png, want, f"SaveImageWebsocket image {i}")
    entry = _history(url, prompt_id)
    assert entry["status"]["status_str"] == "success" and entry["outputs"] == {}


def test_websocket_needs_the_api_key():
    websocket = pytest.importorskip("websocket")
    with LocalServer(config(api_key="s3cret")) as url:
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(f"ws{url[4:]}/ws?clientId=x", timeout=TIMEOUT)
        ws = websocket.create_connection(f"ws{url[4:]}/ws?clientId=x", timeout=TIMEOUT,
                                         header=["Authorization: Bearer s3cret"])
        assert json.loads(ws.recv())["type"] == "status"
        ws.close()


def test_sdxl_text_workflow_on_an_sdxl_server(sdxl_base_folder):
    # CLIPTextEncodeSDXL's second prompts and micro-conditioning reach the pipeline: the
    # server's image is the library's with prompt_2, negative_prompt_2 and the sizes.
    from sdrt.engine import Pipeline
    folder, _ = sdxl_base_folder
    with LocalServer(config(model=folder)) as url:
        g = _workflow(url, DEFAULT)
        g["5"]["inputs"].update(width=32, height=32)
        _sdxl_text(g, "6", "a fox", "a red fox in snow", size=(64, 48), crop=(8, 4),
                   target=(40, 24))
        _sdxl_text(g, "7", "blurry", "grey", size=(64, 48), crop=(8, 4), target=(40, 24))
        entry = _history(url, _queue(url, g)["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
        g["7"] = copy.deepcopy(DEFAULT["7"])  # a plain CLIPTextEncode negative beside it
        g["7"]["inputs"]["text"] = "blurry"
        entry = _history(url, _queue(url, g)["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        mixed = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32")
    want = pipe("a fox", prompt_2="a red fox in snow", negative_prompt="blurry",
                original_size=(48, 64), crops_coords_top_left=(4, 8), target_size=(24, 40),
                negative_original_size=(32, 32), negative_crops_coords_top_left=(0, 0),
                negative_target_size=(32, 32), height=32, width=32, num_inference_steps=2,
                guidance_scale=7.0, sampler="euler_a_normal", seed=11)[0]
    assert_same_image(mixed, want, "CLIPTextEncodeSDXL beside CLIPTextEncode on the server")
    want = pipe("a fox", prompt_2="a red fox in snow", negative_prompt="blurry",
                negative_prompt_2="grey", original_size=(48, 64), crops_coords_top_left=(4, 8),
                target_size=(24, 40), height=32, width=32, num_inference_steps=2,
                guidance_scale=7.0, sampler="euler_a_normal", seed=11)[0]
    assert_same_image(png, want, "CLIPTextEncodeSDXL on the server")
    plain = pipe("a fox", negative_prompt="blurry", height=32, width=32, num_inference_steps=2,
                 guidance_scale=7.0, sampler="euler_a_normal", seed=11)[0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(want, dtype=int)).max() > 2


def test_names_as_comfyuis_front_end_writes_them(server, ref_pipe, tmp_path):
    # LoadImage's " [input]" annotation and a subfolder (the mask editor's "clipspace/..."),
    # and a LoraLoader's Windows subfolder ("SD1.5\\name"), as ComfyUI writes them.
    url = server
    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    name = httpx.post(f"{url}/upload/image", files={"image": ("front.png", buffer.getvalue())},
                      timeout=TIMEOUT).json()["name"]
    outs = []
    for written in (name, f"{name} [input]", f"clipspace/{name} [input]"):
        graph = _workflow(url, DEFAULT, seed=16)
        graph["10"] = {"class_type": "LoadImage", "inputs": {"image": written}}
        graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0],
                                                              "vae": ["4", 2]}}
        graph["3"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
        entry = _history(url, _queue(url, graph)["prompt_id"])
        assert entry["status"]["status_str"] == "success", (written, entry["status"])
        outs.append(np.asarray(Image.open(io.BytesIO(
            _view(url, entry["outputs"]["9"]["images"][0])))))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    graph["10"]["inputs"]["image"] = "ComfyUI_00001_.png [output]"
    r = httpx.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert r.status_code == 400 and "which was not uploaded" in r.text, r.text


def test_queue_delete_interrupt_history_and_free():
    # A long batch window holds the prompts in the queue while the calls arrive: a deleted
    # one leaves no trace, an interrupted one ends in its history as ComfyUI's does, the rest
    # run; then the history's delete and clear, /free, and bodies that are refused by name.
    with LocalServer(config(batch_window_ms=4000, max_batch=8)) as url:
        ids = [_queue(url, _workflow(url, DEFAULT, seed=30 + i))["prompt_id"] for i in range(3)]
        post = lambda path, body: httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
        assert post("/queue", {"delete": [ids[1]]}).status_code == 200
        assert post("/interrupt", {"prompt_id": ids[2]}).status_code == 200
        done = _history(url, ids[0])
        assert done["status"]["status_str"] == "success"
        interrupted = _history(url, ids[2])
        assert interrupted["status"]["status_str"] == "error"
        assert interrupted["status"]["messages"][-1][0] == "execution_interrupted"
        assert interrupted["outputs"] == {}
        assert set(httpx.get(f"{url}/history").json()) == {ids[0], ids[2]}
        more = [_queue(url, _workflow(url, DEFAULT, seed=40 + i))["prompt_id"] for i in range(2)]
        assert post("/queue", {"clear": True}).status_code == 200
        for _ in range(100):
            if not httpx.get(f"{url}/queue").json()["queue_running"]:
                break
            time.sleep(0.05)
        assert httpx.get(f"{url}/queue").json() == {"queue_running": [], "queue_pending": []}
        assert not set(more) & set(httpx.get(f"{url}/history").json())
        image = done["outputs"]["9"]["images"][0]
        assert post("/history", {"delete": [ids[0]]}).status_code == 200
        assert httpx.get(f"{url}/history/{ids[0]}").json() == {}
        assert httpx.get(f"{url}/view", params=image).status_code == 404
        assert post("/history", {"clear": True}).status_code == 200
        assert httpx.get(f"{url}/history").json() == {}
        assert post("/free", {"unload_models": True, "free_memory": True}).status_code == 200
        assert httpx.post(f"{url}/interrupt", timeout=TIMEOUT).status_code == 200  # (no body)
        for path, body, param in (("/queue", {"delete": "x"}, "delete"),
                                  ("/queue", {"clear": 1}, "clear"),
                                  ("/history", {"delete": [1]}, "delete"),
                                  ("/free", {"free_memory": "yes"}, "free_memory"),
                                  ("/interrupt", {"prompt_id": 5}, "prompt_id"),
                                  ("/free", [1], None)):
            r = post(path, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_history_keeps_the_newest_prompts_and_their_images(monkeypatch):
    from sdrt.serve import comfy_api
    monkeypatch.setattr(comfy_api, "MAX_HISTORY", 2)
    jobs = comfy_api.ComfyJobs()
    for i in range(3):
        jobs.running[f"p{i}"] = []
        jobs.finish(f"p{i}", {"outputs": {}}, {f"f{i}.png": b"png"})
    assert list(jobs.history) == ["p1", "p2"] and not jobs.running
    assert set(jobs.files) == {"f1.png", "f2.png"} and set(jobs.outputs) == {"p1", "p2"}
