"""``sdrt generate --controlnet``: the image equals the library call's, the PNG records each
unit as A1111's ControlNet extension does, the control image sets the size, bad options are
one line, and on CUDA the static plan equals the eager run. The ControlNets are written by
sdrt itself (no diffusers: the GPU machine has none)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdrt.engine.controlnet import ControlNetConfig, ControlNetModel
from test_cli import SMALL, _assert_one_error_line, _parameters, _pixels, _run, \
    _static_equals_eager, _warnings


def write_controlnet(folder, unet_config, vae_scale_factor, seed):
    """A diffusers ControlNet folder for a UNet of ``unet_config`` (a diffusers dict), with
    random weights; its hint encoder downsamples by ``vae_scale_factor``."""
    widths = [8 * 2 ** i for i in range(int(np.log2(vae_scale_factor)) + 1)]
    config = {k: v for k, v in unet_config.items() if k not in (
        "_class_name", "up_block_types", "out_channels", "sample_size", "center_input_sample")}
    config.update(_class_name="ControlNetModel", conditioning_embedding_out_channels=widths)
    with torch.device("meta"):
        net = ControlNetModel(ControlNetConfig.from_dict(config))
    g = torch.Generator().manual_seed(seed)
    weights = {k: (0.2 * torch.randn(p.shape, generator=g)) + (k.endswith("norm1.weight") or
                                                               k.endswith("norm2.weight"))
               for k, p in net.named_parameters()}
    os.makedirs(folder)
    save_file(weights, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A ControlNet for the built-in model, and a control image of 64×48 and one of 48×40."""
    from sdrt.engine.demo.model import demo_config
    root = tmp_path_factory.mktemp("cli-controlnet")
    cfg = demo_config()
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    net = write_controlnet(str(root / "cn_edges"), cfg["unet"], factor, 3)
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
    (["--controlnet", "NET", "--control-image", "HINT", "--init-image", "HINT", "--mask", "HINT",
      "--inpaint-area", "masked"], "cannot be combined with --inpaint-area masked"),
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
