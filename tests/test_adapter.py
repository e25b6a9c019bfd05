"""T2I-Adapters against diffusers: the module (full, SDXL and light adapters, one- and
three-channel), its files (diffusers folders, diffusers-keyed and original-layout single
files), and whole pipelines (SD 1.x-like and SDXL-like tiny models, scale and share of the
steps, beside a ControlNet, under a static plan) on the same latents, plus the refusals."""
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_close_abs, run_eagerly
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.adapter import load_adapter
from sdxl_models import randomize
from test_controlnet import IMAGE_ATOL, _controlnet, _hint, _latents
from test_pipeline import PROMPTS, _assert_lively, _diffusers_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapter(seed, **kw):
    """A diffusers T2IAdapter, every parameter drawn (its convs' output keeps its scale)."""
    from diffusers import T2IAdapter
    adapter = T2IAdapter(**kw)
    randomize(adapter, torch.Generator().manual_seed(seed))
    return adapter.eval()


def test_sdrt_written_adapter_is_diffusers_adapter(tiny_sd1_folder, tmp_path):
    # engine.tiny's adapter for a model (what the GPU tests load, where diffusers may be
    # missing): diffusers reads the folder and computes the same features.
    import json

    from diffusers import T2IAdapter

    from sdrt.engine.tiny import adapter_config, write_adapter
    with open(f"{tiny_sd1_folder}/unet/config.json") as fh:
        config = adapter_config(json.load(fh), 2)
    folder = write_adapter(str(tmp_path / "adapter"), config, seed=3)
    ours = load_adapter(folder, "cpu", torch.float32)
    ref = T2IAdapter.from_pretrained(folder).eval()
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert len(got) == len(want) == len(config["channels"])
    for i, (a, b) in enumerate(zip(got, want)):
        assert b.abs().mean() > 0.1, f"feature {i} is near zero"
        assert_close_abs(a, b, 1e-5, f"feature {i}")


def _original_names(state, light):
    """A diffusers adapter's state dict in the original T2I-Adapter repository's names."""
    n = 1 + max(int(m.group(1)) for k in state
                if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        m = re.match(r"adapter\.body\.(\d+)\.(resnets\.(\d+)\.)?(.*)$", key)
        if m is None:
            out[key.removeprefix("adapter.")] = value
        elif light:
            inner = f"body.{m.group(3)}." if m.group(2) else ""
            out[f"body.{m.group(1)}.{inner}{m.group(4)}"] = value
        else:
            i, j = int(m.group(1)), int(m.group(3) or 0)
            out[f"body.{i * n + j}.{m.group(4)}"] = value
    return out


@pytest.mark.parametrize("kw", [
    dict(in_channels=3, channels=[32, 64, 64], num_res_blocks=2, downscale_factor=8),
    # one-channel (sketch, canny) with three ResNets a level
    dict(in_channels=1, channels=[32, 64, 64, 64], num_res_blocks=3, downscale_factor=8),
    dict(in_channels=3, channels=[32, 64, 96, 96], num_res_blocks=2, downscale_factor=16,
         adapter_type="full_adapter_xl"),
    dict(in_channels=3, channels=[32, 64, 64], num_res_blocks=4, downscale_factor=8,
         adapter_type="light_adapter"),
], ids=["full", "gray", "xl", "light"])
def test_module_and_files_match_diffusers(tmp_path, kw):
    ref = _adapter(1, **kw)
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    # one .safetensors with the folder's config.json beside it
    (tmp_path / "beside").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / "beside" / name).write_bytes((tmp_path / "folder" / name).read_bytes())
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    light = kw.get("adapter_type") == "light_adapter"
    if kw.get("adapter_type") != "full_adapter_xl":  # the original repository had no XL
        save_file(_original_names(state, light), str(tmp_path / "original.safetensors"))
    x = torch.rand(2, kw["in_channels"], 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x)
    paths = sorted(tmp_path.iterdir())
    paths[paths.index(tmp_path / "beside")] = tmp_path / "beside" / \
        "diffusion_pytorch_model.safetensors"
    for path in paths:
        ours = load_adapter(path, "cpu", torch.float32)
        assert ours.config.adapter_type == kw.get("adapter_type", "full_adapter"), path.name
        with torch.no_grad():
            got = ours(x)
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close_abs(a, b, 1e-5, f"{path.name} feature {i}")


@pytest.fixture(scope="module")
def sd1(tiny_sd1, tmp_path_factory):
    """(our pipeline with adapters "rgb" and "gray" and ControlNet "net" loaded, diffusers
    pipeline, diffusers adapters by name, ControlNet)."""
    folder, ref = tiny_sd1
    if not hasattr(ref, "original_scheduler_config"):
        ref.original_scheduler_config = dict(ref.scheduler.config)
    root = tmp_path_factory.mktemp("adapters")
    ours = Pipeline.from_pretrained(folder, device="cpu")
    # The tiny VAE halves the size: an unshuffle by 2 meets the latents.
    adapters = {"rgb": _adapter(3, in_channels=3, channels=[32, 64], num_res_blocks=2,
                                downscale_factor=2),
                "gray": _adapter(4, in_channels=1, channels=[32, 64], num_res_blocks=1,
                                 downscale_factor=2)}
    for name, adapter in adapters.items():
        adapter.save_pretrained(root / name, safe_serialization=True)
        assert ours.load_controlnet(root / name) == name
    net = _controlnet(ref.unet, 5)
    net.save_pretrained(root / "net", safe_serialization=True)
    ours.load_controlnet(root / "net")
    return ours, ref, adapters, net


def _adapter_pipe(ref, adapter, sampler, cls_name="StableDiffusionAdapterPipeline"):
    import diffusers
    cls = getattr(diffusers, cls_name)
    import inspect
    wanted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in ref.components.items() if k in wanted}, adapter=adapter,
               **{k: None for k in ("safety_checker", "feature_extractor") if k in wanted
                  and k not in ref.components})
    pipe.scheduler = _diffusers_scheduler(ref, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["rgb", "gray"])
def test_txt2img_matches_diffusers(sd1, name):
    ours, ref, adapters, _ = sd1
    hint = _hint(6)
    pipe = _adapter_pipe(ref, adapters[name], "euler")
    kw = dict(height=16, width=24, num_inference_steps=5, guidance_scale=7.0,
              latents=_latents(8), output_type="np")
    image = hint.convert("L") if name == "gray" else hint
    # (diffusers' adapter pipeline wants an image per prompt; sdrt repeats one)
    expected = pipe(PROMPTS, image=[image, image], adapter_conditioning_scale=0.7, **kw).images
    _assert_lively(expected, f"adapter {name}")
    got = ours(PROMPTS, control_image=image, controlnet=name, controlnet_conditioning_scale=0.7,
               sampler="euler", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"T2I-Adapter {name}")
    plain = ours(PROMPTS, sampler="euler", **kw)
    assert np.abs(plain - got).max() > 20 * IMAGE_ATOL, "the adapter changed nothing"


def test_sdxl_matches_diffusers_with_a_share_of_the_steps(sdxl_base_folder, tmp_path):
    # SDXL's adapter pipeline applies the features on the first steps only
    # (adapter_conditioning_factor): sdrt's control_guidance_end.
    folder, ref = sdxl_base_folder
    if not hasattr(ref, "original_scheduler_config"):
        ref.original_scheduler_config = dict(ref.scheduler.config)
    adapter = _adapter(9, in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=4,
                       adapter_type="full_adapter_xl")
    adapter.save_pretrained(tmp_path / "xl", safe_serialization=True)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    ours.load_controlnet(tmp_path / "xl")
    pipe = _adapter_pipe(ref, adapter, "euler", "StableDiffusionXLAdapterPipeline")
    hint = _hint(10, 16, 16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    for factor in (1.0, 0.5):
        kw = dict(height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
                  latents=latents, output_type="np")
        expected = pipe(PROMPTS[0], image=hint, adapter_conditioning_scale=1.2,
                        adapter_conditioning_factor=factor, **kw).images
        got = ours(PROMPTS[0], control_image=hint, controlnet_conditioning_scale=1.2,
                   control_guidance_end=factor, sampler="euler", **kw)
        assert_close_abs(got, expected, IMAGE_ATOL, f"SDXL T2I-Adapter, factor {factor}")
    # It unshuffles by 4: a size of 8 rows + 4 cannot be unshuffled.
    with pytest.raises(SdrtError, match="height and width must be multiples of 4 for "
                                        "T2I-Adapter 'xl'"):
        ours(PROMPTS[0], control_image=hint, height=14, width=16, num_inference_steps=2)


def test_beside_a_controlnet_under_a_static_plan(sd1):
    # An adapter and a ControlNet in one call (features and residuals both added), control
    # modes and shares of the schedule: the plan (its buffers: images and the scale table)
    # gives the eager image.
    ours, _, _, _ = sd1
    try:
        ours.compile(16, 24, batch_size=1, num_inference_steps=4, sampler="dpmpp_2m",
                     controlnet=["rgb", "net"])
        for mode, end in (("balanced", 1.0), (["controlnet", "prompt"], 0.6)):
            kw = dict(prompt=PROMPTS[0], control_image=[_hint(12), _hint(13)],
                      controlnet=["rgb", "net"], controlnet_conditioning_scale=[0.9, 0.6],
                      control_guidance_end=end, control_mode=mode, height=16, width=24,
                      num_inference_steps=4, sampler="dpmpp_2m", seed=14, output_type="np")
            got = ours(**kw)
            assert_close_abs(got, run_eagerly(ours, **kw), 1e-5, f"static plan, mode {mode}")
            if mode == "balanced":
                alone = ours(**{**kw, "control_image": _hint(13), "controlnet": "net",
                                "controlnet_conditioning_scale": 0.6})
                assert np.abs(alone - got).max() > 5 * IMAGE_ATOL, "the adapter changed nothing"
    finally:
        ours.runtime = None


def test_refusals(sd1, sdxl_base_folder, tmp_path):
    ours, _, _, _ = sd1
    four = _adapter(1, in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=4)
    four.save_pretrained(tmp_path / "four", safe_serialization=True)
    with pytest.raises(SdrtError, match=r"its features \(width@size\) are 32@1/2, 64@1/4, "
                                        r"this UNet takes 32@1/1, 64@1/2"):
        ours.load_controlnet(tmp_path / "four")
    # An SD 1.x adapter on an SDXL-like UNet (other widths), and an SDXL one on SD 1.x.
    wide = _adapter(1, in_channels=3, channels=[64, 128], num_res_blocks=1, downscale_factor=2)
    wide.save_pretrained(tmp_path / "wide", safe_serialization=True)
    with pytest.raises(SdrtError, match=r"is for another model: its features \(width@size\) "
                                        r"are 64@1/1, 128@1/2"):
        ours.load_controlnet(tmp_path / "wide")
    # The original repository's general block, with a skip conv no released adapter has.
    original = _original_names({k: v.contiguous() for k, v in wide.state_dict().items()}, False)
    save_file({**original, "body.0.skep.weight": torch.zeros(1)},
              str(tmp_path / "skep.safetensors"))
    with pytest.raises(SdrtError, match="skip or strided-conv downsampling layers"):
        ours.load_controlnet(tmp_path / "skep.safetensors")
    assert "wide" not in ours.controlnets and "skep" not in ours.controlnets
