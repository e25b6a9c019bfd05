"""cubiq's ComfyUI_IPAdapter_plus nodes in ComfyUI workflows: IPAdapterAdvanced (with
IPAdapterModelLoader and CLIPVisionLoader, its image perhaps through PrepImageForClipVision)
read into sdrt's IP-Adapter settings, what sdrt does not run refused by node and field, the
reference image prepared as the nodes and ComfyUI's CLIP preprocessing prepare it (against
their steps written out here), and ``sdrt generate --workflow`` against the same settings
given as options. The server's ComfyUI API runs them in test_serve_ip_adapter.py."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdrt.engine import comfy
from sdrt.engine.errors import SdrtError
from test_cli import _run, tiny_dir  # noqa: F401  (tiny_dir: the fixture)
from test_comfy import DEFAULT, _pixels, _small
from test_ip_adapter import _own_encoder, _picture, _weights

ENCODER_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def with_ip_adapters(graph=DEFAULT, units=(("ip-adapter_sd15.safetensors", "ref.png", 0.8, 0.0,
                                            1.0, None),), **node):
    """``graph`` with an IPAdapterAdvanced node per unit (file, image, weight, start, end,
    PrepImageForClipVision's (interpolation, crop, sharpening) or None) chained between the
    checkpoint and the KSampler, the first nearest the checkpoint; ``node`` overrides the
    nodes' inputs."""
    g = copy.deepcopy(graph)
    model = g["3"]["inputs"]["model"]
    g["40"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": ENCODER_FILE}}
    for i, (name, image, weight, start, end, prep) in enumerate(units):
        loader, picture, apply, prepared = (str(41 + 4 * i + k) for k in range(4))
        g[loader] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": name}}
        g[picture] = {"class_type": "LoadImage", "inputs": {"image": image, "upload": "image"}}
        source = [picture, 0]
        if prep is not None:
            g[prepared] = {"class_type": "PrepImageForClipVision", "inputs": {
                "image": source, "interpolation": prep[0], "crop_position": prep[1],
                "sharpening": prep[2]}}
            source = [prepared, 0]
        g[apply] = {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": model, "ipadapter": [loader, 0], "image": source, "clip_vision": ["40", 0],
            "weight": weight, "weight_type": "linear", "combine_embeds": "concat",
            "start_at": start, "end_at": end, "embeds_scaling": "V only", **node}}
        model = [apply, 0]
    g["3"]["inputs"]["model"] = model
    return g


def test_ipadapter_nodes():
    units = (("plus.safetensors", "a.png", 0.8, 0.0, 1.0, ("LANCZOS", "top", 0.15)),
             ("plain.bin", "b.png", 0.5, 0.2, 0.9, None))
    flow = comfy.read(with_ip_adapters(units=units))
    assert flow.ip_adapters == [comfy.ImagePrompt(n, ENCODER_FILE, im, w, s, e, p)
                                for n, im, w, s, e, p in units]
    # (one image per node: every way of combining a batch's embeddings is the image's own)
    assert comfy.read(with_ip_adapters(units=units, combine_embeds="average")) == flow
    assert flow.checkpoint == "v1-5-pruned-emaonly.safetensors" and flow.loras == []


def _model_node(g):
    g["50"] = {"class_type": "TomePatchModel",
               "inputs": {"model": g["3"]["inputs"]["model"], "ratio": 0.3}}
    g["3"]["inputs"]["model"] = ["50", 0]


REFUSED = {
    "combine": (lambda g: g["43"]["inputs"].update(combine_embeds="median"),
                "combine_embeds must be 'concat' or 'add' or 'subtract' or 'average' or 'norm "
                "average'"),
    "scaling": (lambda g: g["43"]["inputs"].update(embeds_scaling="K+V"),
                "embeds_scaling must be 'V only'"),
    "negative image": (lambda g: g["43"]["inputs"].update(image_negative=["42", 0]),
                       "does not run an IP-Adapter's image_negative"),
    "mask": (lambda g: g["43"]["inputs"].update(attn_mask=["42", 0]),
             "node 43 (IPAdapterAdvanced): attn_mask links to output 0 of node 42 (LoadImage), "
             "whose outputs are 0 IMAGE, 1 MASK; attn_mask takes its MASK"),
    "mask channel": (lambda g: g.update({"45": {"class_type": "LoadImageMask", "inputs": {
        "image": "m.png", "channel": "luma"}}}) or g["43"]["inputs"].update(attn_mask=["45", 0]),
        "node 45 (LoadImageMask): channel must be one of alpha, red, green, blue"),
    "no encoder": (lambda g: g["43"]["inputs"].pop("clip_vision"),
                   "clip_vision must be a link"),
    "window": (lambda g: g["43"]["inputs"].update(start_at=0.5, end_at=0.5),
               "start_at and end_at must satisfy 0 <= start < end <= 1"),
    "model node": (_model_node, "node 50 (TomePatchModel) is not supported as the "
                                "sampled model: sdrt takes CheckpointLoaderSimple, LoraLoader, "
                                "LoraLoaderModelOnly, IPAdapterAdvanced, IPAdapter, "
                                "IPAdapterUnifiedLoader, FreeU, FreeU_V2, "
                                "PerturbedAttentionGuidance, RescaleCFG and ModelSamplingDiscrete "
                                "there"),
    "prep": (lambda g: g.__setitem__("44", {"class_type": "PrepImageForClipVision", "inputs": {
        "image": ["42", 0], "interpolation": "LANCZOS", "crop_position": "middle",
        "sharpening": 0.0}}) or g["43"]["inputs"].update(image=["44", 0]),
        "node 44 (PrepImageForClipVision): crop_position must be one of top, bottom"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_the_node(case):
    edit, message = REFUSED[case]
    g = with_ip_adapters()
    edit(g)
    with pytest.raises(SdrtError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        comfy.read(g)


# -- the reference image, as ComfyUI prepares it -----------------------------------------------

def _comfy_clip_preprocess(x, size):
    """ComfyUI's clip_preprocess (before normalising) on (1, H, W, 3) float32 in [0, 1]."""
    image = x.movedim(-1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        scale = size / min(image.shape[2], image.shape[3])
        image = torch.nn.functional.interpolate(
            image, size=(round(scale * image.shape[2]), round(scale * image.shape[3])),
            mode="bicubic", antialias=True)
        h, w = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, h:h + size, w:w + size]
    return torch.clip(255. * image, 0, 255).round()


def _cas(image, amount):
    """cubiq's contrast_adaptive_sharpening, its steps as they are."""
    img = torch.nn.functional.pad(image, (1, 1, 1, 1))
    a, b, c = img[..., :-2, :-2], img[..., :-2, 1:-1], img[..., :-2, 2:]
    d, e, f = img[..., 1:-1, :-2], img[..., 1:-1, 1:-1], img[..., 1:-1, 2:]
    g, h, i = img[..., 2:, :-2], img[..., 2:, 1:-1], img[..., 2:, 2:]
    mn = torch.stack((b, d, e, f, h)).min(axis=0)[0].clamp(min=0)
    mx = torch.stack((b, d, e, f, h)).max(axis=0)[0].clamp(max=1)
    mn2 = torch.stack((a, c, g, i)).min(axis=0)[0].clamp(min=0)
    mx2 = torch.stack((a, c, g, i)).max(axis=0)[0].clamp(max=1)
    mx, mn = mx + mx2, mn + mn2
    amp = torch.sqrt(torch.reciprocal(mx) * torch.minimum(mn, (2 - mx)))
    w = - amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    out = ((b + d + f + h) * w + e) * torch.reciprocal(1 + 4 * w)
    return torch.nan_to_num(out).clamp(0, 1)


def _prep(x, size, interpolation, crop_position, sharpening):
    """PrepImageForClipVision's prep_image on (1, H, W, 3), at ``size`` (its 224)."""
    _, oh, ow, _ = x.shape
    output = x.permute([0, 3, 1, 2])
    if crop_position == "pad":
        if oh != ow:
            pad = (oh - ow) // 2 if oh > ow else (ow - oh) // 2
            # torchvision's pad (left, top, right, bottom)
            sides = (pad, pad, 0, 0) if oh > ow else (0, 0, pad, pad)
            output = torch.nn.functional.pad(output, sides)
    else:
        crop = min(oh, ow)
        x0, y0 = (ow - crop) // 2, (oh - crop) // 2
        if "top" in crop_position:
            y0 = 0
        elif "bottom" in crop_position:
            y0 = oh - crop
        elif "left" in crop_position:
            x0 = 0
        elif "right" in crop_position:
            x0 = ow - crop
        output = output[:, :, y0:y0 + crop, x0:x0 + crop]
    pil = Image.fromarray(output[0].mul(255).byte().permute(1, 2, 0).numpy())  # ToPILImage
    pil = pil.resize((size, size), resample=Image.Resampling[interpolation])
    output = torch.from_numpy(np.asarray(pil, np.float32) / 255).permute(2, 0, 1)[None]
    if sharpening > 0:
        output = _cas(output, sharpening)
    return output.permute([0, 2, 3, 1])


@pytest.mark.parametrize("size,prep", [
    ((70, 50), None), ((40, 96), None), ((30, 30), None),
    ((70, 50), ("LANCZOS", "top", 0.15)), ((50, 90), ("BICUBIC", "right", 0.0)),
    ((90, 50), ("NEAREST", "bottom", 1.0)), ((50, 70), ("BILINEAR", "pad", 0.4)),
    ((70, 50), ("HAMMING", "pad", 0.0)), ((64, 64), ("BOX", "center", 0.6)),
    ((50, 90), ("LANCZOS", "top", 0.0)), ((90, 50), ("LANCZOS", "left", 0.0))])
def test_reference_image_is_prepared_as_comfyui_prepares_it(size, prep):
    w, h = size
    picture = _picture(7, w, h)
    x = torch.from_numpy(np.asarray(picture, np.float32) / 255)[None]
    if prep is not None:
        x = _prep(x, 30, *prep)
    want = _comfy_clip_preprocess(x, 30)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    got = np.full((30, 30, 3), 7, np.uint8)
    got[:] = np.asarray(comfy.clip_vision_image(picture, 30, prep))
    assert np.array_equal(got, want), np.abs(got.astype(int) - want).max()


# -- the CLI -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ip_files(tiny_dir, tmp_path_factory):
    """An IP-Adapter for the tiny model, a CLIP vision model under ComfyUI's usual name and a
    reference image."""
    from sdrt.engine import Pipeline
    from sdrt.engine.ip_adapter import cross_attentions
    root = tmp_path_factory.mktemp("comfy-ip")
    unet = Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="fp32").unet
    widths = tuple(a.to_q.out_features for a in cross_attentions(unet))
    save_file(_weights("plus", 6, widths, cross=unet.config.cross_attention_dim),
              str(root / "ip-adapter-plus_sd15.safetensors"))
    _own_encoder(root / ENCODER_FILE)
    _picture(4, 60, 44).save(root / "warrior.png")
    return root


def test_cli_workflow_equals_the_options(tiny_dir, ip_files, tmp_path, capsys):
    prep = ("LANCZOS", "top", 0.3)
    graph = with_ip_adapters(_small(DEFAULT), units=(
        ("ip-adapter-plus_sd15.safetensors", "warrior.png", 1.5, 0.1, 0.8, prep),))
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    # The options: the reference image as the nodes prepare it for the encoder (30 pixels)
    comfy.clip_vision_image(Image.open(ip_files / "warrior.png"), 30, prep).save(
        tmp_path / "prepared.png")
    files = ["--ip-adapter", str(ip_files / "ip-adapter-plus_sd15.safetensors"),
             "--image-encoder", str(ip_files / ENCODER_FILE)]
    outs = {}
    from test_comfy import SMALL_OPTIONS
    for name, argv in {
            "json": ["--workflow", str(tmp_path / "wf.json"), *files, "--ip-adapter-image",
                     str(ip_files / "warrior.png")],
            "options": [*SMALL_OPTIONS, "--ip-adapter",
                        f"{ip_files / 'ip-adapter-plus_sd15.safetensors'}:1.5",
                        "--image-encoder", str(ip_files / ENCODER_FILE), "--ip-adapter-image",
                        str(tmp_path / "prepared.png"), "--ip-adapter-start", "0.1",
                        "--ip-adapter-end", "0.8"],
            "without": SMALL_OPTIONS}.items():
        out = tmp_path / f"{name}.png"
        code, _, err = _run(["generate", *argv, "--model", tiny_dir, "-o", str(out)], capsys)
        assert code == 0, err
        outs[name] = _pixels(out)
    assert np.array_equal(outs["json"], outs["options"])
    assert np.abs(outs["json"].astype(int) - outs["without"]).max() > 10  # the adapter acts
    with Image.open(tmp_path / "json.png") as im:
        assert "ControlNet 0: \"Module: ip-adapter-auto, Model: ip-adapter-plus_sd15 [" \
               in im.text["parameters"] and "Guidance Start: 0.1, Guidance End: 0.8" \
               in im.text["parameters"], im.text["parameters"]


@pytest.mark.parametrize("drop,message", [
    ("--ip-adapter", "applies IP-Adapter 'ip-adapter-plus_sd15.safetensors': pass "
                     "--ip-adapter PATH/ip-adapter-plus_sd15.safetensors"),
    ("--image-encoder", f"reads its IP-Adapters' images with '{ENCODER_FILE}': pass "
                        f"--image-encoder PATH/{ENCODER_FILE}"),
    ("--ip-adapter-image", "gives an IP-Adapter image 'warrior.png': pass --ip-adapter-image "
                           "PATH/warrior.png")])
def test_cli_workflow_names_the_file_it_needs(tiny_dir, ip_files, tmp_path, capsys, drop,
                                              message):
    from test_cli import _assert_one_error_line
    graph = with_ip_adapters(_small(DEFAULT), units=(
        ("ip-adapter-plus_sd15.safetensors", "warrior.png", 1.0, 0.0, 1.0, None),))
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    given = {"--ip-adapter": str(ip_files / "ip-adapter-plus_sd15.safetensors"),
             "--image-encoder": str(ip_files / ENCODER_FILE),
             "--ip-adapter-image": str(ip_files / "other.png")}
    argv = [x for option, path in given.items() if option != drop for x in (option, path)]
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), *argv,
                         "--model", tiny_dir, "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2
    _assert_one_error_line(err, message)


# -- IPAdapterUnifiedLoader and the plain IPAdapter node ----------------------------------------

def with_unified(graph=DEFAULT, preset="PLUS (high strength)", image="ref.png", weight=0.8,
                 start=0.0, end=1.0, **node):
    """``graph`` as cubiq's simple example: checkpoint → IPAdapterUnifiedLoader → IPAdapter →
    KSampler."""
    g = copy.deepcopy(graph)
    g["60"] = {"class_type": "IPAdapterUnifiedLoader",
               "inputs": {"model": g["3"]["inputs"]["model"], "preset": preset}}
    g["61"] = {"class_type": "LoadImage", "inputs": {"image": image, "upload": "image"}}
    g["62"] = {"class_type": "IPAdapter", "inputs": {
        "model": ["60", 0], "ipadapter": ["60", 1], "image": ["61", 0], "weight": weight,
        "start_at": start, "end_at": end, "weight_type": "standard", **node}}
    g["3"]["inputs"]["model"] = ["62", 0]
    return g


def test_unified_loader_and_ipadapter_nodes():
    flow = comfy.read(with_unified(image="a.png", weight=0.6, start=0.1, end=0.7))
    assert flow.ip_adapters == [comfy.ImagePrompt(None, None, "a.png", 0.6, 0.1, 0.7, None,
                                                  "PLUS (high strength)")]
    # IPAdapterAdvanced on the unified loader's files, its own CLIP vision model if it has one
    g = with_ip_adapters(with_unified())
    g["43"]["inputs"]["ipadapter"] = ["60", 1]
    assert [p.preset for p in comfy.read(g).ip_adapters] == ["PLUS (high strength)"] * 2
    assert comfy.read(g).ip_adapters[-1].encoder == ENCODER_FILE  # (nearest the sampler)
    del g["43"]["inputs"]["clip_vision"]
    assert comfy.read(g).ip_adapters[-1].encoder is None


@pytest.mark.parametrize("edit,message", [
    (lambda g: g["60"]["inputs"].update(preset="FACEID PLUS V2"),
     "node 60 (IPAdapterUnifiedLoader): preset must be one of LIGHT - SD1.5 only (low "
     "strength), .*; FaceID reads an insightface embedding"),
    (lambda g: g["60"]["inputs"].update(ipadapter=["60", 1]), "does not chain unified loaders"),
    (lambda g: g.update({"63": {"class_type": "IPAdapterModelLoader",
                                "inputs": {"ipadapter_file": "x.safetensors"}}})
     or g["62"]["inputs"].update(ipadapter=["63", 0]),
     "node 63 (IPAdapterModelLoader) is not supported as IPAdapter's ipadapter: sdrt takes "
     "IPAdapterUnifiedLoader there"),
])
def test_unified_refusals(edit, message):
    g = with_unified()
    edit(g)
    with pytest.raises(SdrtError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".*", "XX").replace(".", r"\.").replace("XX", ".*")):
        comfy.read(g)


def test_preset_files_are_cubiqs_patterns():
    adapters = ["sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "ip-adapter_sd15.bin",
                "ip-adapter_sd15_light_v11.bin", "b/ip-adapter-plus_sd15.safetensors",
                "a/ip-adapter-plus_sd15.safetensors", "ip-adapter-full-face_sd15.safetensors",
                "ip-adapter_sdxl.safetensors"]
    encoders = ["CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]
    found = lambda preset, sdxl: comfy.preset_files(preset, sdxl, adapters, encoders)  # noqa: E731
    assert found("PLUS (high strength)", False) == ("a/ip-adapter-plus_sd15.safetensors",
                                                    encoders[1])  # the first, sorted
    assert found("PLUS (high strength)", True) == (adapters[0], encoders[1])
    assert found("STANDARD (medium strength)", False) == ("ip-adapter_sd15.bin", encoders[1])
    assert found("VIT-G (medium strength)", True) == ("ip-adapter_sdxl.safetensors", encoders[0])
    assert found("LIGHT - SD1.5 only (low strength)", False)[0] == adapters[2]
    assert found("FULL FACE - SD1.5 only (portraits stronger)", False)[0] == adapters[5]
    with pytest.raises(SdrtError, match="has no adapter for SDXL models"):
        found("LIGHT - SD1.5 only (low strength)", True)
    with pytest.raises(SdrtError, match="finds no adapter among ip-adapter_sdxl.safetensors"):
        comfy.preset_files("PLUS FACE (portraits)", True, adapters[-1:], encoders)
    with pytest.raises(SdrtError, match="finds no encoder among none"):
        comfy.preset_files("PLUS (high strength)", False, adapters, [])


def test_cli_unified_workflow_equals_the_advanced_one(tiny_dir, ip_files, tmp_path, capsys):
    # The preset finds the given files by name; IPAdapter's "standard" is IPAdapterAdvanced's
    # linear: one picture.
    files = ["--ip-adapter", str(ip_files / "ip-adapter-plus_sd15.safetensors"),
             "--image-encoder", str(ip_files / ENCODER_FILE), "--ip-adapter-image",
             str(ip_files / "warrior.png")]
    graphs = {"unified": with_unified(_small(DEFAULT), image="warrior.png", weight=1.2,
                                      start=0.2, end=0.9),
              "advanced": with_ip_adapters(_small(DEFAULT), units=(
                  ("ip-adapter-plus_sd15.safetensors", "warrior.png", 1.2, 0.2, 0.9, None),))}
    outs = {}
    for name, graph in graphs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(graph))
        out = tmp_path / f"{name}.png"
        code, _, err = _run(["generate", "--workflow", str(tmp_path / f"{name}.json"), *files,
                             "--model", tiny_dir, "-o", str(out)], capsys)
        assert code == 0, err
        outs[name] = _pixels(out)
    assert np.array_equal(outs["unified"], outs["advanced"])
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "unified.json"),
                         *files[2:], "--ip-adapter", str(ip_files / ENCODER_FILE), "--model",
                         tiny_dir, "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "preset 'PLUS (high strength)' finds no adapter among " \
                         f"{ENCODER_FILE}" in err, err


# -- weight types ------------------------------------------------------------------------------

# The transformer blocks (part, block, attention) of SD 1.5's UNet (16) and SDXL's (11)
SD15_PLACES = [("down", b, a) for b in range(3) for a in range(2)] + [("mid", 0, 0)] + \
    [("up", b, a) for b in (1, 2, 3) for a in range(3)]
SDXL_PLACES = [("down", b, a) for b in (1, 2) for a in range(2)] + [("mid", 0, 0)] + \
    [("up", b, a) for b in (0, 1) for a in range(3)]


def test_weight_types_by_transformer_block():
    w = 0.8
    # ComfyUI counts the transformer blocks as they run (down, mid, up); cubiq's SD 1.5
    # style transfer is blocks 0-3 and 9-15 of those, its composition 4 (a quarter) and 5
    assert comfy.block_scales("style transfer", w, SD15_PLACES[::-1], False) == {
        "down": {"block_0": [w, w], "block_1": [w, w], "block_2": [0.0, 0.0]}, "mid": 0.0,
        "up": {"block_1": [0.0, 0.0, w], "block_2": [w, w, w], "block_3": [w, w, w]}}
    assert comfy.block_scales("composition", w, SD15_PLACES, False)["down"] == {
        "block_0": [0.0, 0.0], "block_1": [0.0, 0.0], "block_2": [w * 0.25, w]}
    # SDXL: InstantStyle's blocks (style up_blocks.0.attentions.1, layout
    # down_blocks.2.attentions.1); "style and composition" takes the composition at 1
    assert comfy.block_scales("style transfer", w, SDXL_PLACES, True) == {
        "down": {"block_1": [0.0, 0.0], "block_2": [0.0, 0.0]}, "mid": 0.0,
        "up": {"block_0": [0.0, w, 0.0], "block_1": [0.0, 0.0, 0.0]}}
    both = comfy.block_scales("style and composition", w, SDXL_PLACES, True)
    assert both["down"]["block_2"] == [0.0, 1.0] and both["up"]["block_0"][1] == w
    # the ramps over 16 (SD 1.x) or 11 (SDXL) blocks, and the weak/strong parts
    ease = comfy.block_scales("ease in", w, SD15_PLACES, False)
    assert ease["down"]["block_0"][0] == w * 1.0
    assert ease["up"]["block_3"][2] == pytest.approx(w * (0.05 + 0.95 * (1 - 15 / 16)))
    middle = comfy.block_scales("reverse in-out", w, SDXL_PLACES, True)["mid"]
    assert middle == pytest.approx(w * (0.05 + 0.95 * abs(4 - 5.5) / 5.5))
    weak = comfy.block_scales("strong middle", w, SD15_PLACES, False)
    assert weak["mid"] == w and weak["down"]["block_1"] == [w * 0.2] * 2
    assert comfy.block_scales("linear", w, SD15_PLACES, False) == w


def test_weight_type_names():
    g = with_ip_adapters(units=(("a.safetensors", "a.png", 0.5, 0.0, 1.0, None),),
                         weight_type="style transfer")
    assert comfy.read(g).ip_adapters[0].weight_type == "style transfer"
    g = with_unified(weight_type="prompt is more important")
    assert comfy.read(g).ip_adapters[0].weight_type == "ease out"
    for graph, precise in ((with_ip_adapters(weight_type="style transfer precise"), "43"),
                           (with_unified(weight_type="linear"), "62")):
        with pytest.raises(SdrtError, match=f"node {precise} .*: weight_type must be one of"):
            comfy.read(graph)


def test_cli_weight_type_is_the_librarys_block_scales(tiny_dir, ip_files, tmp_path, capsys):
    from sdrt.engine import Pipeline
    from sdrt.engine.ip_adapter import block_places
    graph = with_ip_adapters(_small(DEFAULT), units=(
        ("ip-adapter-plus_sd15.safetensors", "warrior.png", 1.5, 0.0, 1.0, None),),
        weight_type="ease in")
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    out = tmp_path / "wf.png"
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), "--ip-adapter",
                         str(ip_files / "ip-adapter-plus_sd15.safetensors"), "--image-encoder",
                         str(ip_files / ENCODER_FILE), "--ip-adapter-image",
                         str(ip_files / "warrior.png"), "--model", tiny_dir, "-o", str(out)],
                        capsys)
    assert code == 0, err
    pipe = Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="fp32")
    pipe.load_ip_adapter(ip_files / "ip-adapter-plus_sd15.safetensors",
                         image_encoder=ip_files / ENCODER_FILE)
    want = pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                seed=4, num_inference_steps=3, guidance_scale=6.5, sampler="euler_a_normal",
                width=32, height=24, ip_adapter_image=comfy.clip_vision_image(
                    Image.open(ip_files / "warrior.png"), 30),
                ip_adapter_scale=comfy.block_scales("ease in", 1.5, block_places(pipe.unet),
                                                    False))[0]
    assert np.array_equal(_pixels(out), np.asarray(want))


# -- attention masks ---------------------------------------------------------------------------

def test_attn_mask_nodes():
    g = with_ip_adapters()
    g["45"] = {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "red"}}
    g["43"]["inputs"]["attn_mask"] = ["45", 0]
    assert comfy.read(g).ip_adapters[0].mask == ("m.png", "red")
    g["43"]["inputs"]["attn_mask"] = ["42", 1]  # LoadImage's MASK: its alpha
    assert comfy.read(g).ip_adapters[0].mask == ("ref.png", "alpha")


def test_masks_read_as_comfyui_reads_them():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (6, 5, 4), np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    assert np.array_equal(comfy.comfy_mask(image, "alpha"), 1 - rgba[..., 3] / np.float32(255))
    assert np.array_equal(comfy.comfy_mask(image, "green"), rgba[..., 1] / np.float32(255))
    opaque = comfy.comfy_mask(image.convert("RGB"), "alpha")  # no alpha: acts nowhere
    assert opaque.shape == (6, 5) and not opaque.any()
    grey = comfy.comfy_mask(Image.fromarray(rgba[..., 0], "L"), "red")
    assert np.array_equal(grey, rgba[..., 0] / np.float32(255))
    with_transparency = Image.fromarray(rgba[..., 0] % 4, "P")
    with_transparency.info["transparency"] = 2
    holes = comfy.comfy_mask(with_transparency, "alpha")
    assert np.array_equal(holes, (rgba[..., 0] % 4 == 2).astype(np.float32))


def _region_png(path, w=44, h=60):
    """A mask image: the left half red and opaque, the right transparent, soft in between."""
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 0] = np.linspace(255, 0, w)[None].astype(np.uint8)
    a[..., 3] = np.linspace(0, 255, w)[None].astype(np.uint8)
    Image.fromarray(a, "RGBA").save(path)


def test_cli_attn_mask_is_the_librarys_soft_region(tiny_dir, ip_files, tmp_path, capsys):
    from sdrt.engine import Pipeline
    _region_png(tmp_path / "region.png")
    graph = with_ip_adapters(_small(DEFAULT), units=(
        ("ip-adapter-plus_sd15.safetensors", "warrior.png", 1.5, 0.0, 1.0, None),))
    graph["45"] = {"class_type": "LoadImageMask", "inputs": {"image": "region.png",
                                                             "channel": "red"}}
    graph["43"]["inputs"]["attn_mask"] = ["45", 0]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    out = tmp_path / "wf.png"
    argv = ["generate", "--workflow", str(tmp_path / "wf.json"), "--ip-adapter",
            str(ip_files / "ip-adapter-plus_sd15.safetensors"), "--image-encoder",
            str(ip_files / ENCODER_FILE), "--ip-adapter-image", str(ip_files / "warrior.png"),
            "--model", tiny_dir, "-o", str(out)]
    code, _, err = _run(argv[:-2] + ["-o", str(tmp_path / "no.png")], capsys)
    assert code == 2 and "confines an IP-Adapter to mask 'region.png': pass --ip-adapter-mask " \
                         "PATH/region.png" in err, err
    code, _, err = _run(argv + ["--ip-adapter-mask", str(tmp_path / "region.png")], capsys)
    assert code == 0, err
    pipe = Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="fp32")
    pipe.load_ip_adapter(ip_files / "ip-adapter-plus_sd15.safetensors",
                         image_encoder=ip_files / ENCODER_FILE)
    call = dict(seed=4, num_inference_steps=3, guidance_scale=6.5, sampler="euler_a_normal",
                width=32, height=24, negative_prompt="text, watermark",
                ip_adapter_image=comfy.clip_vision_image(Image.open(ip_files / "warrior.png"),
                                                         30), ip_adapter_scale=1.5)
    region = comfy.comfy_mask(Image.open(tmp_path / "region.png"), "red")
    want = pipe("beautiful scenery nature glass bottle", **call, ip_adapter_mask=region,
                ip_adapter_mask_style="a1111")[0]
    assert np.array_equal(_pixels(out), np.asarray(want))
    unmasked = pipe("beautiful scenery nature glass bottle", **call)[0]
    assert np.abs(np.asarray(unmasked, int) - np.asarray(want)).max() > 10
