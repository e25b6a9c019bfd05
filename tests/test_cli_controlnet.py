"""``sdrt generate --controlnet``: the image equals the library call's, the PNG records each
unit as A1111's ControlNet extension does, the control image sets the size, bad options are
one line, and on CUDA the static plan equals the eager run. The ControlNets are written by
sdrt itself (``engine.tiny.write_controlnet``; no diffusers: the GPU machine has none)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine.tiny import controlnet_config, write_controlnet
from test_cli import SMALL, _assert_one_error_line, _parameters, _pixels, _run, \
    _static_equals_eager, _warnings


def _regenerates(png, options, tmp_path, capsys):
    """``--from-png png`` with ``options`` gives its pixels and PNG info, without a warning;
    returns the new file's path."""
    again = tmp_path / f"again-{png.stem}.png"
    code, _, err = _run(["generate", "--from-png", str(png), *options, "-o", str(again)],
                        capsys)
    assert code == 0, err
    assert _warnings(err) == []
    assert np.array_equal(_pixels(again), _pixels(png))
    assert _parameters(again) == _parameters(png)
    return again


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A ControlNet for the built-in model, and a control image of 64×48 and one of 48×40."""
    from sdrt.engine.demo.model import demo_config
    root = tmp_path_factory.mktemp("cli-controlnet")
    cfg = demo_config()
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    net = write_controlnet(str(root / "cn_edges"), controlnet_config(cfg["unet"], factor), 3)
    rng = np.random.default_rng(4)
    for name, (w, h) in (("hint.png", (64, 48)), ("small.png", (48, 40))):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[h // 3: h // 2] = 255
        Image.fromarray(a).save(root / name)
    return root, net


def test_generate_matches_the_library_and_records_the_unit(assets, tmp_path, capsys):
    root, net = assets
    base = ["generate", "a red fox", *SMALL, "--seed", "6", "--steps", "3"]
    out = tmp_path / "cn.png"
    code, _, err = _run(base + ["--controlnet", f"{net}:0.8", "--control-image",
                                str(root / "hint.png"), "--control-end", "0.7", "-o", str(out)],
                        capsys)
    assert code == 0, err
    params = _parameters(out)
    assert ('ControlNet 0: "Module: none, Model: cn_edges, Weight: 0.8, Resize Mode: Crop and '
            'Resize, Guidance Start: 0, Guidance End: 0.7, Control Mode: Balanced"') in params
    # The library, given the control image cropped to 64×64 as A1111's "Crop and Resize" does.
    from sdrt.engine.demo.model import demo_config, demo_pipeline
    from sdrt.engine.images import frame_init_image
    pipe = demo_pipeline()
    pipe.load_controlnet(net)
    with Image.open(root / "hint.png") as im:
        hint = frame_init_image(im.convert("RGB"), 64, 64, "crop")
    defaults = demo_config()["demo_defaults"]  # the CLI's guidance and sampler for it
    expected = pipe("a red fox", height=64, width=64, num_inference_steps=3,
                    guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"],
                    generator=[torch.Generator().manual_seed(6)], control_image=hint,
                    controlnet_conditioning_scale=0.8, control_guidance_end=0.7)[0]
    got = _pixels(out).astype(int)
    assert np.abs(got - np.asarray(expected).astype(int)).max() <= 1
    plain = tmp_path / "plain.png"
    assert _run(base + ["-o", str(plain)], capsys)[0] == 0
    assert np.abs(_pixels(plain).astype(int) - got).max() > 10, "the ControlNet changed nothing"
    # --control-mask: the library's control_mask (grey weighs the region).
    grey = np.zeros((64, 64), np.uint8)
    grey[:, :24], grey[:, 24:40] = 255, 128
    Image.fromarray(grey).save(tmp_path / "region.png")
    regional = tmp_path / "regional.png"
    code, _, err = _run(base + ["--controlnet", f"{net}:0.8", "--control-image",
                                str(root / "hint.png"), "--control-end", "0.7",
                                "--control-mask", str(tmp_path / "region.png"), "-o",
                                str(regional)], capsys)
    assert code == 0, err
    expected = pipe("a red fox", height=64, width=64, num_inference_steps=3,
                    guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"],
                    generator=[torch.Generator().manual_seed(6)], control_image=hint,
                    controlnet_conditioning_scale=0.8, control_guidance_end=0.7,
                    control_mask=grey.astype(np.float32) / 255)[0]
    masked = _pixels(regional).astype(int)
    assert np.abs(masked - np.asarray(expected).astype(int)).max() <= 1
    assert np.abs(masked - got).max() > 10, "the region mask changed nothing"


def test_control_image_sets_the_size_and_two_units(assets, tmp_path, capsys):
    root, net = assets
    out = tmp_path / "two.png"
    code, _, err = _run(["generate", "a red fox", "--steps", "2", "--seed", "1", "--controlnet",
                         net, "--control-image", str(root / "small.png"), "--controlnet",
                         f"{net}:0.5", "--control-image", str(root / "hint.png"),
                         "--guess-mode", "-o", str(out)], capsys)
    assert code == 0, err
    assert _warnings(err) == []
    with Image.open(out) as im:
        assert im.size == (48, 40)
    params = _parameters(out)
    assert 'ControlNet 1: "Module: none, Model: cn_edges-1, Weight: 0.5' in params
    assert params.count("Guess Mode: True") == 2


@pytest.mark.parametrize("extra,message", [
    (["--control-image", "HINT"], "--control-image needs --controlnet"),
    (["--controlnet", "NET"], "--control-image: give one per --controlnet (1 ControlNet, 0 "
                              "images)"),
    (["--controlnet", "NET:11", "--control-image", "HINT"], "the weight must be from 0 to 10"),
    (["--controlnet", "missing", "--control-image", "HINT"], "--controlnet missing does not "
                                                             "exist"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-start", "0.5",
      "--control-end", "0.5"], "--control-start must be below --control-end"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-end", "1.5"],
     "--control-end must be from 0 to 1"),
    (["--controlnet", "NET", "--control-image", "nothing.png"], "cannot read control image"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-mask", "none",
      "--control-mask", "none"], "--control-mask: give one per --controlnet ('none' for one "
                                 "without), got 2 for 1"),
    (["--control-mask", "HINT"], "--control-mask needs --controlnet"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-mask", "nothing.png"],
     "cannot read control mask"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-module", "depth_zoe"],
     "--control-module: sdrt does not run preprocessor 'depth_zoe'"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-module", "canny",
      "--control-module", "invert", "--control-module", "none"],
     "--control-module: give one for every --controlnet or one per --controlnet (1 "
     "ControlNets, 3 given)"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-mode", "prompt",
      "--guess-mode"], "--control-mode must be balanced with --guess-mode"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-mode", "soft"],
     "argument --control-mode: invalid choice: 'soft'"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-module", "canny",
      "--control-threshold-a", "0"], "--control-threshold-a (canny's Low Threshold) must be "
                                     "from 1 to 255"),
    (["--controlnet", "NET", "--control-image", "HINT", "--control-module", "canny",
      "--control-res", "4096"], "--control-res (canny's Resolution) must be from 64 to 2048"),
])
def test_bad_options_are_one_line(assets, tmp_path, capsys, extra, message):
    root, net = assets
    extra = [str(root / "hint.png") if e == "HINT" else net if e == "NET" else
             f"{net}:11" if e == "NET:11" else e for e in extra]
    code, _, err = _run(["generate", "a red fox", *SMALL, "-o", str(tmp_path / "x.png"),
                         *extra], capsys)
    assert code == 2
    _assert_one_error_line(err, message)
    assert not (tmp_path / "x.png").exists()


def test_preprocessors(assets, tmp_path, capsys):
    # --control-module makes the --control-image into the map before it is framed: the PNG is
    # the one made from the library's map with module none, and records the preprocessor and
    # its settings as A1111's extension does; --from-png runs it again.
    pytest.importorskip("cv2")
    from sdrt.engine.preprocess import preprocess
    root, net = assets
    base = ["generate", "a red fox", *SMALL, "--seed", "2", "--steps", "2", "--controlnet", net]
    canny, by_hand = tmp_path / "canny.png", tmp_path / "map.png"
    code, _, err = _run(base + ["--control-image", str(root / "hint.png"), "--control-module",
                                "canny", "--control-threshold-a", "60", "--pixel-perfect",
                                "-o", str(canny)], capsys)
    assert code == 0, err
    assert _warnings(err) == []
    with Image.open(root / "hint.png") as im:  # 64 × 48 cropped to 64 × 64: resolution 64
        preprocess(im, "canny", 64, 60, 200).save(tmp_path / "edges.png")
    code, _, err = _run(base + ["--control-image", str(tmp_path / "edges.png"), "-o",
                                str(by_hand)], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(canny), _pixels(by_hand))
    assert ('ControlNet 0: "Module: canny, Model: cn_edges, Weight: 1, Resize Mode: Crop and '
            'Resize, Processor Res: 64, Threshold A: 60, Threshold B: 200, Guidance Start: 0, '
            'Guidance End: 1, Pixel Perfect: True, Control Mode: Balanced"') in \
        _parameters(canny)
    again = _regenerates(canny, ["--controlnet", net, "--control-image",
                                 str(root / "hint.png")], tmp_path, capsys)
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()  # a unit whose preprocessor runs a network: named
    info.add_text("parameters", _parameters(canny).replace("Module: canny", "Module: depth"))
    Image.open(canny).save(tmp_path / "depth.png", pnginfo=info)
    code, _, err = _run(["generate", "--from-png", str(tmp_path / "depth.png"), "--controlnet",
                         net, "--control-image", str(root / "hint.png"), "-o", str(again)],
                        capsys)
    assert code == 0, err
    assert _warnings(err) == [f"--from-png {tmp_path / 'depth.png'} ran preprocessor depth for "
                              f"ControlNet cn_edges: sdrt does not run it; pass its map as "
                              f"--control-image"]
    code, _, err = _run(base + ["--control-image", str(root / "hint.png"), "--control-res",
                                "128", "-o", str(tmp_path / "x.png")], capsys)
    assert code == 0, err
    assert _warnings(err) == ["--control-res does nothing here: it applies to --control-module"]


def test_control_mode(assets, tmp_path, capsys):
    # --control-mode per ControlNet: the library's control_mode, recorded as A1111's label
    # and read back by --from-png.
    root, net = assets
    out = tmp_path / "modes.png"
    code, _, err = _run(["generate", "a red fox", *SMALL, "--seed", "3", "--steps", "2",
                         "--controlnet", net, "--control-image", str(root / "hint.png"),
                         "--controlnet", f"{net}:0.7", "--control-image", str(root / "small.png"),
                         "--control-mode", "controlnet", "--control-mode", "prompt", "-o",
                         str(out)], capsys)
    assert code == 0, err
    params = _parameters(out)
    assert "Guidance End: 1, Control Mode: ControlNet is more important\"" in params
    assert "Guidance End: 1, Control Mode: My prompt is more important\"" in params
    from sdrt.engine.demo.model import demo_config, demo_pipeline
    from sdrt.engine.images import frame_init_image
    pipe = demo_pipeline()
    pipe.load_controlnet(net, name="a")
    pipe.load_controlnet(net, name="b")
    hints = []
    for name in ("hint.png", "small.png"):
        with Image.open(root / name) as im:
            hints.append(frame_init_image(im.convert("RGB"), 64, 64, "crop"))
    defaults = demo_config()["demo_defaults"]
    expected = pipe("a red fox", height=64, width=64, num_inference_steps=2,
                    guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"],
                    generator=[torch.Generator().manual_seed(3)], control_image=hints,
                    controlnet_conditioning_scale=[1.0, 0.7],
                    control_mode=["controlnet", "prompt"])[0]
    assert np.abs(_pixels(out).astype(int) - np.asarray(expected).astype(int)).max() <= 1
    _regenerates(out, ["--controlnet", net, "--control-image", str(root / "hint.png"),
                       "--controlnet", net, "--control-image", str(root / "small.png")],
                 tmp_path, capsys)


def test_t2i_adapter(assets, tmp_path, capsys):
    # A T2I-Adapter file (sdrt's module's weights, diffusers' names, no config) is a
    # --controlnet like any other: the library's image, the unit in the PNG.
    from safetensors.torch import save_file

    from sdrt.engine.adapter import AdapterConfig, T2IAdapter
    root, _ = assets
    torch.manual_seed(5)
    # The demo UNet's first level has no attention: an SDXL-layout adapter fits it.
    adapter = T2IAdapter(AdapterConfig(channels=(32, 64, 128), num_res_blocks=1,
                                       downscale_factor=4, adapter_type="full_adapter_xl"))
    path = tmp_path / "t2i_sketch.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path))
    out = tmp_path / "adapter.png"
    code, _, err = _run(["generate", "a red fox", *SMALL, "--seed", "4", "--steps", "2",
                         "--controlnet", f"{path}:0.8", "--control-image", str(root / "hint.png"),
                         "-o", str(out)], capsys)
    assert code == 0, err
    assert 'ControlNet 0: "Module: none, Model: t2i_sketch [' in _parameters(out)
    from sdrt.engine.demo.model import demo_config, demo_pipeline
    from sdrt.engine.images import frame_init_image
    pipe = demo_pipeline()
    pipe.load_controlnet(str(path))
    with Image.open(root / "hint.png") as im:
        hint = frame_init_image(im.convert("RGB"), 64, 64, "crop")
    defaults = demo_config()["demo_defaults"]
    kw = dict(height=64, width=64, num_inference_steps=2,
              guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"])
    expected = pipe("a red fox", generator=[torch.Generator().manual_seed(4)], control_image=hint,
                    controlnet_conditioning_scale=0.8, **kw)[0]
    got = _pixels(out).astype(int)
    assert np.abs(got - np.asarray(expected).astype(int)).max() <= 1
    pipe.unload_controlnet()
    plain = pipe("a red fox", generator=[torch.Generator().manual_seed(4)], **kw)[0]
    assert np.abs(got - np.asarray(plain).astype(int)).max() > 3, "the adapter changed nothing"


def test_control_options_without_a_controlnet_warn(tmp_path, capsys):
    code, _, err = _run(["generate", "a red fox", *SMALL, "--guess-mode", "--control-end", "0.5",
                         "-o", str(tmp_path / "x.png")], capsys)
    assert code == 0, err
    assert _warnings(err) == ["--control-end does nothing here: it applies to --controlnet",
                              "--guess-mode does nothing here: it applies to --controlnet"]


@pytest.mark.gpu
def test_cuda_controlnet_builds_its_static_plan(assets, tmp_path, capsys):
    # The plan is built up front with the ControlNet in it, and replays the eager image.
    root, net = assets
    _static_equals_eager(["generate", "a red fox", "--steps", "4", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a", "--controlnet",
                          f"{net}:0.9", "--control-image", str(root / "hint.png"),
                          "--control-start", "0.25"], tmp_path, capsys)


@pytest.mark.gpu
def test_cuda_controlnet_region_mask_builds_its_static_plan(assets, tmp_path, capsys):
    # With --control-mask the plan holds the mask's weights as a buffer, built up front.
    root, net = assets
    grey = np.zeros((48, 64), np.uint8)
    grey[:, :20], grey[:, 20:40] = 255, 100
    Image.fromarray(grey).save(tmp_path / "region.png")
    _static_equals_eager(["generate", "a red fox", "--steps", "4", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a", "--controlnet",
                          f"{net}:0.9", "--control-image", str(root / "hint.png"),
                          "--control-mask", str(tmp_path / "region.png")], tmp_path, capsys)


def test_workflow_controlnets_equal_the_options(tmp_path, capsys):
    # ComfyUI's ControlNetApplyAdvanced nodes: the --controlnet of the loader's file name at
    # the node's strength, the --control-image of the LoadImage's name, each node's share of
    # the steps; the same image as the options give.
    from sdrt.engine.cli import main
    from test_comfy import DEFAULT, _small, with_controlnets
    model = str(tmp_path / "tiny")
    assert main(["make-tiny", model]) == 0
    unet = json.load(open(f"{model}/unet/config.json"))
    factor = 2 ** (len(json.load(open(f"{model}/vae/config.json"))["block_out_channels"]) - 1)
    nets = [write_controlnet(str(tmp_path / name), controlnet_config(unet, factor), seed)
            for name, seed in (("canny", 8), ("depth", 9))]
    rng = np.random.default_rng(5)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    graph = with_controlnets(_small(DEFAULT, sampler="euler"), (
        ("canny.safetensors", "input/a.png", 0.7, 0.0, 0.6),
        ("depth", "b.png", 1.2, 0.3, 1.0)))
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    out, ref = tmp_path / "out.png", tmp_path / "ref.png"
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), "--model", model,
                         "--controlnet", nets[1], "--controlnet", nets[0], "--control-image",
                         str(tmp_path / "b.png"), "--control-image", str(tmp_path / "a.png"),
                         "-o", str(out)], capsys)
    assert code == 0, err
    params = _parameters(out)
    assert "Model: canny, Weight: 0.7" in params and "Guidance End: 0.6" in params
    # The options: one --control-start/--control-end for all, so the second node's share is
    # the first's here; compare with a workflow whose nodes share one.
    same = with_controlnets(_small(DEFAULT, sampler="euler"), (
        ("canny.safetensors", "a.png", 0.7, 0.2, 0.9), ("depth", "b.png", 1.2, 0.2, 0.9)))
    (tmp_path / "same.json").write_text(json.dumps(same))
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "same.json"), "--model",
                         model, "--controlnet", nets[0], "--controlnet", nets[1],
                         "--control-image", str(tmp_path / "a.png"), "--control-image",
                         str(tmp_path / "b.png"), "-o", str(tmp_path / "same.png")], capsys)
    assert code == 0, err
    code, _, err = _run(["generate", "beautiful scenery nature glass bottle", "--negative",
                         "text, watermark", "--seed", "4", "--steps", "3", "--guidance", "6.5",
                         "--sampler", "euler_normal", "--width", "32", "--height", "24", "--model",
                         model, "--controlnet", f"{nets[0]}:0.7", "--controlnet",
                         f"{nets[1]}:1.2", "--control-image", str(tmp_path / "a.png"),
                         "--control-image", str(tmp_path / "b.png"), "--control-start", "0.2",
                         "--control-end", "0.9", "-o", str(ref)], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "same.png"), _pixels(ref))
    assert not np.array_equal(_pixels(out), _pixels(ref))
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), "--model", model,
                         "--controlnet", nets[0], "--control-image", str(tmp_path / "a.png"),
                         "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2
    _assert_one_error_line(err, "applies ControlNet 'depth': pass --controlnet "
                                "PATH/depth.safetensors")


def test_workflow_preprocessor_node_equals_control_module(assets, tmp_path, capsys):
    # A CannyEdgePreprocessor node between the LoadImage and the ControlNetApplyAdvanced is
    # --control-module canny with its thresholds and resolution.
    pytest.importorskip("cv2")
    from sdrt.engine.cli import main
    from test_comfy import DEFAULT, _small, with_controlnets, with_preprocessor
    root, _ = assets
    model = str(tmp_path / "tiny")
    assert main(["make-tiny", model]) == 0
    unet = json.load(open(f"{model}/unet/config.json"))
    factor = 2 ** (len(json.load(open(f"{model}/vae/config.json"))["block_out_channels"]) - 1)
    net = write_controlnet(str(tmp_path / "cn_edges"), controlnet_config(unet, factor), 8)
    graph = with_preprocessor(with_controlnets(_small(DEFAULT, sampler="euler"), (
        ("cn_edges", "hint.png", 0.9, 0.0, 1.0),)), "CannyEdgePreprocessor", low_threshold=60,
        high_threshold=180, resolution=128)
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    out, ref = tmp_path / "out.png", tmp_path / "ref.png"
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), "--model", model,
                         "--controlnet", net, "--control-image", str(root / "hint.png"), "-o",
                         str(out)], capsys)
    assert code == 0, err
    assert "Module: canny" in _parameters(out) and "Processor Res: 128, Threshold A: 60, " \
        "Threshold B: 180" in _parameters(out)
    code, _, err = _run(["generate", "beautiful scenery nature glass bottle", "--negative",
                         "text, watermark", "--seed", "4", "--steps", "3", "--guidance", "6.5",
                         "--sampler", "euler_normal", "--width", "32", "--height", "24", "--model",
                         model, "--controlnet", f"{net}:0.9", "--control-image",
                         str(root / "hint.png"),
                         "--control-module", "canny", "--control-res", "128",
                         "--control-threshold-a", "60", "--control-threshold-b", "180", "-o",
                         str(ref)], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(out), _pixels(ref))


def test_from_png_reads_the_units_back(assets, tmp_path, capsys):
    # A1111's ControlNet units in the PNG info: --from-png with the same ControlNet file and
    # control image regenerates the image (weight, guidance end and resize mode from the
    # PNG); without them it warns that the image will differ.
    root, net = assets
    first = tmp_path / "first.png"
    code, _, err = _run(["generate", "a red fox", *SMALL, "--seed", "8", "--steps", "3",
                         "--controlnet", f"{net}:0.6", "--control-image", str(root / "hint.png"),
                         "--control-end", "0.5", "--control-resize", "fill", "-o", str(first)],
                        capsys)
    assert code == 0, err
    _regenerates(first, ["--controlnet", net, "--control-image", str(root / "hint.png")],
                 tmp_path, capsys)
    code, _, err = _run(["generate", "--from-png", str(first), "-o", str(tmp_path / "x.png")],
                        capsys)
    assert code == 0, err
    assert any("used ControlNet cn_edges: pass --controlnet FILE" in w for w in _warnings(err))


def test_hires_fix_runs_the_controlnet_in_both_passes(assets, tmp_path, capsys):
    # The control image is framed at the second pass's size; the first pass gets it resized.
    root, net = assets
    base = ["generate", "a red fox", *SMALL, "--seed", "2", "--hr-scale", "1.5", "--hr-steps",
            "1"]
    code, _, err = _run(base + ["--controlnet", net, "--control-image", str(root / "hint.png"),
                                "-o", str(tmp_path / "cn.png")], capsys)
    assert code == 0, err
    assert _warnings(err) == []
    assert _run(base + ["-o", str(tmp_path / "plain.png")], capsys)[0] == 0
    with Image.open(tmp_path / "cn.png") as im:
        assert im.size == (96, 96)
    diff = np.abs(_pixels(tmp_path / "cn.png").astype(int) -
                  _pixels(tmp_path / "plain.png").astype(int))
    assert diff.max() > 10, "the ControlNet changed nothing"


def test_only_masked_inpainting_cuts_the_control_image_as_the_init_image(assets, tmp_path,
                                                                        capsys):
    # --inpaint-area masked: the control image is fitted to the init image's size and cut to
    # the same region (a control image that is the init image itself frames exactly as it).
    from sdrt.engine.inpaint import prepare
    root, net = assets
    with Image.open(root / "hint.png") as im:
        init = im.convert("RGB")
    mask = np.zeros((48, 64), np.float32)
    mask[10:22, 30:44] = 1
    for only_masked in (False, True):
        job = prepare(init, mask, 32, 32, only_masked, padding=4, resize_mode="crop")
        framed = job.frame_like(init, "crop")
        assert framed.size == job.image.size == (32, 32)
        assert np.array_equal(np.asarray(framed), np.asarray(job.image)), only_masked
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    base = ["generate", "a red fox", "--steps", "2", "--seed", "3", "--width", "32", "--height",
            "32", "--init-image", str(root / "hint.png"), "--mask", str(tmp_path / "mask.png"),
            "--inpaint-area", "masked", "--mask-blur", "0"]
    code, _, err = _run(base + ["--controlnet", f"{net}:2", "--control-image",
                                str(root / "small.png"), "-o", str(tmp_path / "cn.png")], capsys)
    assert code == 0, err
    assert _run(base + ["-o", str(tmp_path / "plain.png")], capsys)[0] == 0
    diff = np.abs(_pixels(tmp_path / "cn.png").astype(int) -
                  _pixels(tmp_path / "plain.png").astype(int))
    assert diff.max() > 3, "the ControlNet changed nothing"
    assert diff[:8].max() == 0, "pixels away from the mask changed"
