"""A1111's ControlNet extension API on ``sdrt serve --controlnet-dir`` over real HTTP on
127.0.0.1: units in ``alwayson_scripts.controlnet.args`` give the library's image with the
same ControlNet, image and settings, rows batch with their own control images, the PNG info
records each unit, the listing routes answer as the extension's, and what sdrt cannot run is a
400 naming the field."""
import base64
import io
import json

import numpy as np
import torch
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.comfy import comfy_hint  # noqa: E402
from sdrt.engine.demo.model import demo_config  # noqa: E402
from sdrt.engine.images import frame_init_image  # noqa: E402
from sdrt.engine.infotext import short_hash  # noqa: E402
from sdrt.engine.preprocess import frame_map  # noqa: E402
from sdrt.engine.tiny import controlnet_config, write_controlnet  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_serve import TIMEOUT, assert_same_image, b64_png, config, ref_pipe  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """--controlnet-dir with one ControlNet as a diffusers folder ("depthy") and one as a
    single .safetensors file ("edges"); two control images of other sizes than 64×64."""
    from safetensors.torch import load_file, save_file
    root = tmp_path_factory.mktemp("serve-controlnet")
    cfg = demo_config()
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    config = controlnet_config(cfg["unet"], factor)
    write_controlnet(str(root / "nets" / "depthy"), config, 5)
    folder = write_controlnet(str(root / "edges-folder"), config, 6)
    save_file(load_file(f"{folder}/diffusion_pytorch_model.safetensors"),
              str(root / "nets" / "edges.safetensors"))
    # A T2I-Adapter beside them, in the SDXL layout the demo UNet takes (its first level has
    # no attention), as sdrt's module names its weights.
    from sdrt.engine.adapter import AdapterConfig, T2IAdapter
    torch.manual_seed(8)
    adapter = T2IAdapter(AdapterConfig(channels=tuple(cfg["unet"]["block_out_channels"]),
                                       num_res_blocks=1, downscale_factor=2 * factor,
                                       adapter_type="full_adapter_xl"))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()},
              str(root / "nets" / "t2i_sketch.safetensors"))
    rng = np.random.default_rng(7)
    hints = []
    for w, h in ((80, 64), (64, 96)):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[h // 4: h // 2] = 255
        hints.append(Image.fromarray(a))
    return root, hints


@pytest.fixture(scope="module")
def server(assets):
    root, _ = assets
    with LocalServer(config(controlnet_dir=str(root / "nets"), max_batch=4)) as url:
        yield url


def _txt2img(url, units, seed=3, **extra):
    return httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
        "prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7, "seed": seed,
        "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"args": units}},
        **extra})


def _images(r):
    assert r.status_code == 200, r.text
    out = []
    for b64 in r.json()["images"]:
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        out.append(im)
    return out, json.loads(r.json()["info"])


def _load_nets(pipe, root, nets):
    """Load the assets' ControlNets ``nets`` (by name) into ``pipe``."""
    for name in nets:
        path = root / "nets" / name if name == "depthy" else root / "nets" / f"{name}.safetensors"
        pipe.load_controlnet(str(path), name=name)


def _hires_fix_image(server, units, seed):
    """The picture of a txt2img request with ``units`` and a 1.5x hires fix of 2 steps."""
    (image,), _ = _images(_txt2img(server, units, seed=seed, enable_hr=True, hr_scale=1.5,
                                   hr_second_pass_steps=2, denoising_strength=0.6, steps=2))
    return image


def _reference(pipe, root, nets, seed, images, prompt=PROMPT, negative="blurry", **kw):
    _load_nets(pipe, root, nets)
    try:
        return pipe(prompt, negative_prompt=negative, height=64, width=64,
                    num_inference_steps=2, guidance_scale=7.0, seed=seed, controlnet=list(nets),
                    control_image=images if len(nets) > 1 else images[0], **kw)[0]
    finally:
        pipe.unload_controlnet()


def test_lists(server, assets):
    root, _ = assets
    models = httpx.get(f"{server}/controlnet/model_list").json()["model_list"]
    edges_hash = short_hash(str(root / "nets" / "edges.safetensors"))[:8]
    sketch_hash = short_hash(str(root / "nets" / "t2i_sketch.safetensors"))[:8]
    assert models == ["depthy", f"edges [{edges_hash}]", f"t2i_sketch [{sketch_hash}]"]
    modules = httpx.get(f"{server}/controlnet/module_list").json()
    assert modules["module_list"][:3] == ["none", "canny", "invert"]
    assert modules["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]
    assert modules["module_detail"]["none"] == {"model_free": True, "sliders": []}
    aliases = httpx.get(f"{server}/controlnet/module_list?alias_names=true").json()
    assert "invert (from white bg & black line)" in aliases["module_list"]
    assert httpx.get(f"{server}/controlnet/version").json() == {"version": 2}


def test_units_give_the_library_image(server, assets, ref_pipe):
    root, hints = assets
    edges_hash = short_hash(str(root / "nets" / "edges.safetensors"))[:8]
    units = [{"enabled": True, "module": "none", "model": f"edges [{edges_hash}]",
              "image": b64_png(hints[0]), "weight": 0.8, "resize_mode": "Crop and Resize",
              "guidance_start": 0.0, "guidance_end": 0.6, "control_mode": "Balanced",
              "pixel_perfect": False, "processor_res": 512, "threshold_a": 64},
             {"enabled": False, "model": "nothing-loaded"},
             {"model": "depthy", "image": b64_png(hints[1]), "resize_mode": 0, "weight": 1.3}]
    (got,), info = _images(_txt2img(server, units))
    framed = [frame_map(hints[0], 64, 64, "crop"), frame_map(hints[1], 64, 64,
                                                                         "resize")]
    want = _reference(ref_pipe, root, ["edges", "depthy"], 3, framed,
                      controlnet_conditioning_scale=[0.8, 1.3], control_guidance_end=[0.6, 1.0])
    assert_same_image(got, want, "two ControlNet units")
    text = info["infotexts"][0]
    assert (f'ControlNet 0: "Module: none, Model: edges [{edges_hash}], Weight: 0.8, Resize '
            f'Mode: Crop and Resize, Guidance Start: 0, Guidance End: 0.6, Control Mode: '
            f'Balanced", ControlNet 1: "Module: none, Model: depthy, Weight: 1.3, Resize Mode: '
            f'Just Resize') in text
    assert info["extra_generation_params"]["ControlNet 1"].startswith("Module: none, Model: "
                                                                     "depthy")
    # Without units the plain model answers (the ControlNets are unloaded, not left on).
    r = httpx.post(f"{server}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
        "prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7, "seed": 3,
        "width": 64, "height": 64})
    (plain,), _ = _images(r)
    assert_same_image(plain, ref_pipe(PROMPT, negative_prompt="blurry", height=64, width=64,
                                      num_inference_steps=2, guidance_scale=7.0, seed=3)[0],
                      "no units")


def test_img2img_unit_without_image_takes_the_init_image(server, assets, ref_pipe):
    root, hints = assets
    init = frame_init_image(hints[1], 64, 64, "resize")
    r = httpx.post(f"{server}/sdapi/v1/img2img", timeout=TIMEOUT, json={
        "prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, "cfg_scale": 7, "seed": 9,
        "width": 64, "height": 64, "init_images": [b64_png(hints[1])], "denoising_strength": 0.6,
        "alwayson_scripts": {"ControlNet": {"args": [{"model": "edges",
                                                      "resize_mode": "Just Resize"}]}}})
    (got,), _ = _images(r)
    pipe = ref_pipe
    pipe.load_controlnet(str(root / "nets" / "edges.safetensors"), name="edges")
    try:
        want = pipe(PROMPT, negative_prompt="blurry", image=init, strength=0.6,
                    num_inference_steps=4, guidance_scale=7.0, seed=9,
                    control_image=frame_map(hints[1], 64, 64, "resize"))[0]
    finally:
        pipe.unload_controlnet()
    assert_same_image(got, want, "img2img unit on the init image")


def test_preprocessor_units(server, assets, ref_pipe):
    # A unit's module makes its image into the map before it is framed: canny at its
    # processor_res and thresholds, threshold at the "pixel perfect" resolution (the 64 × 96
    # image just resized to 64 × 64: its short side stays 64).
    from sdrt.engine.preprocess import preprocess
    root, hints = assets
    units = [{"model": "edges", "image": b64_png(hints[0]), "module": "canny",
              "processor_res": 256, "threshold_a": 50, "threshold_b": 150},
             {"model": "depthy", "image": b64_png(hints[1]), "module": "threshold",
              "pixel_perfect": True, "resize_mode": "Just Resize", "threshold_a": -1,
              "control_mode": "ControlNet is more important"}]
    (got,), info = _images(_txt2img(server, units, seed=5))
    maps = [frame_map(preprocess(hints[0], "canny", 256, 50, 150), 64, 64, "crop"),
            frame_map(preprocess(hints[1], "threshold", 64), 64, 64, "resize")]
    want = _reference(ref_pipe, root, ["edges", "depthy"], 5, maps,
                      control_mode=["balanced", "controlnet"])
    assert_same_image(got, want, "canny and threshold units")
    units_text = info["extra_generation_params"]
    assert units_text["ControlNet 0"].startswith(
        "Module: canny, Model: edges [") and ", Resize Mode: Crop and Resize, Processor Res: " \
        "256, Threshold A: 50, Threshold B: 150, Guidance Start: 0, Guidance End: 1, Pixel " \
        "Perfect: False, Control Mode: Balanced" in units_text["ControlNet 0"]
    assert "Module: threshold, Model: depthy, Weight: 1, Resize Mode: Just Resize, Processor " \
        "Res: 64, Threshold A: 127, Threshold B: -1, Guidance Start: 0, Guidance End: 1, " \
        "Pixel Perfect: True, Control Mode: ControlNet is more important" in \
        units_text["ControlNet 1"]


def test_a_t2i_adapter_unit(server, assets, ref_pipe):
    # A unit's model may be a T2I-Adapter of --controlnet-dir, as in A1111's extension.
    root, hints = assets
    r = _txt2img(server, [{"model": "t2i_sketch", "image": b64_png(hints[0]), "weight": 1.5}],
                 seed=12)
    (got,), _ = _images(r)
    ref_pipe.load_controlnet(str(root / "nets" / "t2i_sketch.safetensors"), name="t2i_sketch")
    try:
        want = ref_pipe(PROMPT, negative_prompt="blurry", height=64, width=64,
                        num_inference_steps=2, guidance_scale=7.0, seed=12,
                        control_image=frame_map(hints[0], 64, 64, "crop"),
                        controlnet_conditioning_scale=1.5)[0]
    finally:
        ref_pipe.unload_controlnet()
    assert_same_image(got, want, "T2I-Adapter unit")


def test_detect(server, assets):
    # The extension's POST /controlnet/detect: each input image's map, as the library makes it.
    from sdrt.engine.preprocess import preprocess
    _, hints = assets
    r = httpx.post(f"{server}/controlnet/detect", timeout=TIMEOUT, json={
        "controlnet_module": "canny", "controlnet_input_images": [b64_png(h) for h in hints],
        "controlnet_processor_res": 128, "controlnet_threshold_a": 80,
        "controlnet_threshold_b": -1})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "Success"
    for b64, hint in zip(r.json()["images"], hints, strict=True):
        got = Image.open(io.BytesIO(base64.b64decode(b64)))
        want = preprocess(hint, "canny", 128, 80, 200)
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
    for body, param, message in (
            ({"controlnet_module": "openpose"}, "controlnet_module", "does not run"),
            ({"controlnet_module": "canny", "controlnet_input_images": [b64_png(hints[0])],
              "controlnet_threshold_a": 0}, "controlnet_threshold_a",
             "controlnet_threshold_a (canny's Low Threshold) must be from 1 to 255"),
            ({"controlnet_module": "canny", "controlnet_processor_res": 2048,
              "controlnet_input_images": [b64_png(Image.new("RGB", (1200, 2)))]},
             "controlnet_processor_res", "would scale this 1200x2 picture to 1228800x2048"),
            ({"controlnet_module": "canny", "controlnet_input_images": []},
             "controlnet_input_images", "must be a list of 1 to 8 base64 images"),
            ({"controlnet_module": "canny", "controlnet_input_images": ["%%%"]},
             "controlnet_input_images[0]", "must be a base64-encoded image"),
            (["canny"], None, "must be a JSON object")):
        r = httpx.post(f"{server}/controlnet/detect", timeout=TIMEOUT, json=body)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == param
    r = httpx.post(f"{server}/controlnet/detect", timeout=TIMEOUT, content=b"{",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "must be valid JSON" in r.json()["error"]["message"]


def test_hires_fix_options(server, assets, ref_pipe):
    # enable_hr with a canny unit in both passes (softened in the second, as the extension
    # does) and one in the first pass only: the library's hires.generate with those parts,
    # each map framed again at the second pass's size, as the extension frames it.
    from sdrt.engine.hires import Hires, generate
    from sdrt.engine.preprocess import preprocess
    root, hints = assets
    units = [{"model": "edges", "image": b64_png(hints[0]), "module": "canny"},
             {"model": "depthy", "image": b64_png(hints[1]), "hr_option": "Low res only"}]
    got = _hires_fix_image(server, units, 6)
    _load_nets(ref_pipe, root, ("edges", "depthy"))
    try:
        maps, second = ([frame_map(preprocess(hints[0], "canny"), side, side, "crop"),
                         frame_map(hints[1], side, side, "crop")] for side in (64, 96))
        kw = dict(guidance_scale=7.0, control_image=maps, controlnet=["edges", "depthy"],
                  controlnet_conditioning_scale=[1.0, 1.0],
                  control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 1.0],
                  control_mode=["balanced", "balanced"],
                  control_units=[(True, True, True), (True, False, False)])

        def hires_fix(**extra):
            return generate(ref_pipe, Hires(scale=1.5, steps=2, strength=0.6), [PROMPT],
                            "blurry", 64, 64, 2, None, [torch.Generator().manual_seed(6)],
                            **kw, **extra)[0]
        want, resized = hires_fix(hires_control_image=second), hires_fix()
    finally:
        ref_pipe.unload_controlnet()
    assert_same_image(got, want, "hires fix with per-pass ControlNets")
    diff = np.abs(np.asarray(want, np.int16) - np.asarray(resized, np.int16))
    assert diff.max() > 2, "the second pass's framed maps changed nothing"


def test_effective_region_mask_with_a_hires_fix(server, assets, ref_pipe):
    # A unit's effective_region_mask (its red channel, soft: the library's control_mask)
    # beside a unit without one that runs in the first pass only: the library's hires fix
    # with the mask in both passes, at each pass's size.
    from sdrt.engine.hires import Hires, generate
    root, hints = assets
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    rgb[:, 14:, 0] = 0  # the right half out, whatever the other channels say
    units = [{"model": "edges", "image": b64_png(hints[0]),
              "effective_region_mask": b64_png(Image.fromarray(rgb))},
             {"model": "depthy", "image": b64_png(hints[1]), "hr_option": "Low res only"}]
    got = _hires_fix_image(server, units, 7)
    _load_nets(ref_pipe, root, ("edges", "depthy"))
    try:
        maps, second = ([frame_map(hints[0], side, side, "crop"),
                         frame_map(hints[1], side, side, "crop")] for side in (64, 96))

        def hires_fix(mask):
            return generate(ref_pipe, Hires(scale=1.5, steps=2, strength=0.6), [PROMPT],
                            "blurry", 64, 64, 2, None, [torch.Generator().manual_seed(7)],
                            guidance_scale=7.0, control_image=maps,
                            controlnet=["edges", "depthy"], control_mask=mask,
                            control_units=[(True, True, False), (True, False, False)],
                            hires_control_image=second)[0]
        want = hires_fix([rgb[..., 0].astype(np.float32) / 255, None])
        whole = hires_fix(None)
    finally:
        ref_pipe.unload_controlnet()
    assert_same_image(got, want, "a unit with an effective_region_mask, hires fix")
    diff = np.abs(np.asarray(want, np.int16) - np.asarray(whole, np.int16))
    assert diff.max() > 2, "the region mask changed nothing"


@pytest.mark.parametrize("unit,field,message", [
    ({"model": "edges", "image": "IMG", "module": "depth_midas"}, ".module",
     "sdrt does not run preprocessor 'depth_midas'"),
    ({"model": "edges", "image": "IMG", "module": "canny", "threshold_b": 400},
     ".threshold_b", "args[0].threshold_b (canny's High Threshold) must be from 1 to 255"),
    ({"model": "edges", "image": "IMG", "module": "canny", "processor_res": 10},
     ".processor_res", "must be from 64 to 2048"),
    ({"model": "edges", "image": "IMG", "module": "canny", "pixel_perfect": "yes"},
     ".pixel_perfect", "must be true or false"),
    ({"model": "edges", "image": "THIN", "module": "canny", "pixel_perfect": True},  # 16000×2:
     ".processor_res", "args[0].processor_res: canny at resolution 64 would scale this "
                       "16000x2 picture to 512000x64"),  # (pixel perfect for 64 × 64)
    ({"model": "sketch"}, ".model", "must name a ControlNet of --controlnet-dir"),
    ({"model": "edges", "image": "THIN"}, ".image",  # framed to cover 64 × 64: 512000 × 64
     "args[0].image: this 16000x2 map would be scaled to 512000x64 to cover 64x64"),
    ({"model": "edges", "image": "IMG", "weight": 12}, ".weight", "from 0 to 10"),
    ({"model": "edges", "image": "IMG", "guidance_start": 0.5, "guidance_end": 0.2},
     ".guidance_start", "must be below guidance_end"),
    ({"model": "edges", "image": "IMG", "control_mode": "Prompt first"},
     ".control_mode", "must be one of Balanced, My prompt is more important, ControlNet is "
                      "more important (or 0 to 2)"),
    ({"model": "edges", "image": "IMG", "control_mode": "prompt"},  # sdrt's name, not A1111's
     ".control_mode", "must be one of Balanced"),
    ({"model": "edges", "image": "IMG", "resize_mode": "Stretch"}, ".resize_mode",
     "Just Resize, Crop and Resize or Resize and Fill"),
    ({"model": "edges"}, ".image", "a txt2img unit needs its control image"),
    ({"model": "edges", "image": "IMG", "hr_option": "Low"}, ".hr_option",
     "must be one of Both, Low res only, High res only"),
    ({"model": "edges", "image": "not base64!"}, ".image", "must be a base64-encoded image"),
])
def test_bad_units_are_400s(server, assets, unit, field, message):
    _, hints = assets
    pictures = {"IMG": b64_png(hints[0]), "THIN": b64_png(Image.new("RGB", (16000, 2)))}
    unit = {k: pictures.get(v, v) if isinstance(v, str) else v for k, v in unit.items()}
    r = _txt2img(server, [unit])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"]
    assert error["param"] == f"alwayson_scripts.controlnet.args[0]{field}"


def test_the_same_controlnet_twice_and_other_scripts(server, assets):
    _, hints = assets
    unit = {"model": "edges", "image": b64_png(hints[0])}
    r = _txt2img(server, [unit, unit])
    assert r.status_code == 400 and "is in two units" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
        "prompt": PROMPT, "steps": 2, "width": 64, "height": 64,
        "alwayson_scripts": {"ADetailer": {"args": [{"ad_model": "face_yolov8n.pt"}]}}})
    assert r.status_code == 400 and "alwayson_scripts" in r.json()["error"]["message"]


def test_server_without_controlnet_dir(tmp_path):
    with LocalServer(config()) as url:
        assert httpx.get(f"{url}/controlnet/model_list").json() == {"model_list": []}
        r = _txt2img(url, [{"model": "edges", "image": "x"}])
        assert r.status_code == 400
        assert "--controlnet-dir" in r.json()["error"]["message"]


def test_comfyui_controlnet_nodes(server, assets, ref_pipe):
    # ComfyUI's ControlNetLoader (--controlnet-dir's file names, /models/controlnet and the
    # node's menu in /object_info) and ControlNetApplyAdvanced on an uploaded image.
    from test_comfy import DEFAULT, with_controlnets
    from test_serve_comfy import _history, _queue, _view, _workflow
    root, hints = assets
    files = httpx.get(f"{server}/models/controlnet", timeout=TIMEOUT).json()
    assert files == ["depthy", "edges.safetensors", "t2i_sketch.safetensors"]
    info = httpx.get(f"{server}/object_info/ControlNetLoader", timeout=TIMEOUT).json()
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == files
    r = httpx.post(f"{server}/upload/image", timeout=TIMEOUT,
                   files={"image": ("edges.png", base64.b64decode(b64_png(hints[0])), "image/png")})
    assert r.status_code == 200, r.text
    name = r.json()["name"]
    graph = with_controlnets(_workflow(server, DEFAULT), (("edges.safetensors", name, 0.9, 0.0,
                                                           0.5),))
    entry = _history(server, _queue(server, graph)["prompt_id"])
    png = Image.open(io.BytesIO(_view(server, entry["outputs"]["9"]["images"][0])))
    want = _reference(ref_pipe, root, ["edges"], 11, [comfy_hint(hints[0], 64, 64)],
                      prompt="beautiful scenery nature glass bottle",
                      negative="text, watermark", sampler="euler_a_normal",
                      controlnet_conditioning_scale=0.9,
                      control_guidance_end=0.5)
    assert_same_image(png, want, "ComfyUI ControlNetApplyAdvanced")
    assert 'ControlNet 0: "Module: none, Model: edges [' in png.text["parameters"]
    graph = with_controlnets(_workflow(server, DEFAULT), (("sketch.safetensors", name, 1.0, 0.0,
                                                           1.0),))
    r = httpx.post(f"{server}/prompt", timeout=TIMEOUT, json={"prompt": graph})
    assert r.status_code == 400 and "--controlnet-dir does not have" in r.text


def test_comfyui_preprocessor_node(server, assets, ref_pipe):
    # CannyEdgePreprocessor between the uploaded image and ControlNetApplyAdvanced: the
    # library's image from preprocess's map; /object_info describes the node.
    from sdrt.engine.preprocess import preprocess
    from test_comfy import DEFAULT, with_controlnets, with_preprocessor
    from test_serve_comfy import _history, _queue, _view, _workflow
    root, hints = assets
    info = httpx.get(f"{server}/object_info/CannyEdgePreprocessor", timeout=TIMEOUT).json()
    assert info["CannyEdgePreprocessor"]["input"]["required"]["low_threshold"][1]["default"] \
        == 100
    r = httpx.post(f"{server}/upload/image", timeout=TIMEOUT,
                   files={"image": ("photo.png", base64.b64decode(b64_png(hints[1])), "image/png")})
    name = r.json()["name"]
    graph = with_preprocessor(with_controlnets(_workflow(server, DEFAULT), (
        ("edges.safetensors", name, 1.0, 0.0, 1.0),)), "CannyEdgePreprocessor",
        low_threshold=40, high_threshold=120, resolution=64)
    entry = _history(server, _queue(server, graph)["prompt_id"])
    png = Image.open(io.BytesIO(_view(server, entry["outputs"]["9"]["images"][0])))
    edges = comfy_hint(preprocess(hints[1], "canny", 64, 40, 120), 64, 64)
    want = _reference(ref_pipe, root, ["edges"], 11, [edges],
                      prompt="beautiful scenery nature glass bottle",
                      negative="text, watermark", sampler="euler_a_normal")
    assert_same_image(png, want, "ComfyUI CannyEdgePreprocessor")
    assert "Module: canny" in png.text["parameters"]


def test_only_masked_inpainting_cuts_each_control_image_as_its_init_image(server, assets):
    # inpaint_full_res: each init image's job frames the unit's control image as that init
    # image (fitted to its size, cut to its mask's region), so the ControlNet lines up with
    # what is inpainted; the pixels away from the mask stay the init image's.
    _, hints = assets
    mask = np.zeros((96, 64), np.uint8)
    mask[30:60, 20:44] = 255
    body = {"prompt": PROMPT, "steps": 2, "cfg_scale": 7, "seed": 4, "width": 64, "height": 64,
            "init_images": [b64_png(hints[1])], "denoising_strength": 0.9,
            "mask": b64_png(Image.fromarray(mask)), "mask_blur": 0, "inpaint_full_res": True,
            "inpaint_full_res_padding": 8}
    runs = {}
    for name, units in (("plain", None), ("control", [{"model": "edges", "weight": 2.0,
                                                       "image": b64_png(hints[0])}])):
        extra = {"alwayson_scripts": {"controlnet": {"args": units}}} if units else {}
        r = httpx.post(f"{server}/sdapi/v1/img2img", timeout=TIMEOUT, json={**body, **extra})
        (runs[name],), _ = _images(r)
    a, b = (np.asarray(runs[k].convert("RGB"), dtype=int) for k in ("plain", "control"))
    assert a.shape == (96, 64, 3)
    assert np.abs(a - b).max() > 3, "the ControlNet changed nothing"
    assert np.abs(a - b)[:20].max() == 0, "pixels away from the mask changed"


def test_bad_unit_lists_and_folders(server, tmp_path):
    from sdrt.engine.errors import SdrtError
    from sdrt.serve.config import ServeConfig
    r = _txt2img(server, {"model": "edges"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "alwayson_scripts.controlnet.args"
    assert "must be a list of ControlNet units" in r.json()["error"]["message"]
    r = _txt2img(server, ["edges"])
    assert r.status_code == 400 and "args[0] must be an object" in r.json()["error"]["message"]
    with pytest.raises(SdrtError, match="controlnet-dir .* is not a folder"):
        ServeConfig(controlnet_dir=str(tmp_path / "missing"))
