"""ControlNet against diffusers: the module, its files (diffusers folders, diffusers-keyed and
original-layout single files), and whole pipelines (text to image, image to image,
inpainting, SDXL, several ControlNets, guess mode, part of the schedule) on the same
latents, plus the static plan against the eager path and the refusals."""
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import assert_close_abs, assert_close_rel, run_eagerly, sampler_loops
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.controlnet import load_controlnet, residual_scales
from sdxl_models import randomize
from test_pipeline import PROMPTS, _assert_lively, _diffusers_scheduler

# (The diffusers side comes through the fixtures, which skip where it is missing.)
pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_ATOL = 2e-3  # float32 images in [0, 1], as test_pipeline
H, W = 16, 24  # not square: a height/width swap fails


def _controlnet(unet, seed, **kw):
    """A diffusers ControlNet copied from ``unet``, every parameter redrawn (its zero convs
    too: a zero residual would make every comparison pass)."""
    from diffusers import ControlNetModel
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    if kw:
        net = ControlNetModel(**{**{k: v for k, v in net.config.items()
                                    if not k.startswith("_")}, **kw})
    randomize(net, torch.Generator().manual_seed(seed))
    return net.eval()


def _hint(seed, h=H, w=W):
    """A control image with edges in it: blocks of colour on noise."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[h // 4: h // 2, w // 3:] = 255
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """(family, our pipeline with ControlNets "a" and "b" loaded, diffusers pipeline,
    diffusers ControlNets by name, their folders)."""
    family, folder, ref = tiny_model
    if not hasattr(ref, "original_scheduler_config"):
        ref.original_scheduler_config = dict(ref.scheduler.config)
    root = tmp_path_factory.mktemp(f"controlnet-{family}")
    nets, folders = {}, {}
    for name, seed in (("a", 1), ("b", 2)):
        nets[name] = _controlnet(ref.unet, seed)
        folders[name] = str(root / name)
        nets[name].save_pretrained(folders[name], safe_serialization=True)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    for name in ("a", "b"):
        assert ours.load_controlnet(folders[name]) == name
    return family, ours, ref, nets, folders


def _reference(ref, nets, sampler, cls_name="StableDiffusionControlNetPipeline"):
    import diffusers
    from diffusers.models.controlnets import MultiControlNetModel
    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    pipe = getattr(diffusers, cls_name)(**ref.components, controlnet=controlnet)
    pipe.scheduler = _diffusers_scheduler(ref, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(seed, batch=2, h=H, w=W):
    return torch.randn(batch, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


# -- the module and its files -------------------------------------------------------------------

@pytest.mark.parametrize("guess_mode", [False, True])
@pytest.mark.parametrize("kw", [{}, {"controlnet_conditioning_channel_order": "bgr"},
                                {"global_pool_conditions": True}],
                         ids=["rgb", "bgr", "pooled"])
def test_module_matches_diffusers(tiny_model, tmp_path, kw, guess_mode):
    family, _, ref = tiny_model
    net = _controlnet(ref.unet, 3, **kw)
    net.save_pretrained(tmp_path / "net", safe_serialization=True)
    ours = load_controlnet(tmp_path / "net", "cpu", torch.float32)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 16, 24, generator=g)
    with torch.no_grad():
        down_ref, mid_ref = net(x, torch.tensor(601), ctx, hint, conditioning_scale=0.7,
                                guess_mode=guess_mode, return_dict=False)
        down, mid = ours(x, torch.tensor(601), ctx, hint,
                         residual_scales(ours, 0.7, guess_mode)[1])
    assert len(down) == len(down_ref) == 6
    for i, (a, b) in enumerate(zip(down + [mid], list(down_ref) + [mid_ref])):
        assert_close_rel(a, b, 1e-5, f"{family} {kw} residual {i}")


def _ldm_names(net):
    """The tiny ControlNet's state dict in the original ControlNet repository's names
    (2 levels, 2 ResNets each, attention on the first), written out by hand."""
    sd = net.state_dict()
    table = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "controlnet_mid_block": "middle_block_out.0",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2",
             "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.blocks.0": "input_hint_block.2",
             "controlnet_cond_embedding.blocks.1": "input_hint_block.4",
             "controlnet_cond_embedding.conv_out": "input_hint_block.6",
             "down_blocks.0.resnets.0": "input_blocks.1.0",
             "down_blocks.0.attentions.0": "input_blocks.1.1",
             "down_blocks.0.resnets.1": "input_blocks.2.0",
             "down_blocks.0.attentions.1": "input_blocks.2.1",
             "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
             "down_blocks.1.resnets.0": "input_blocks.4.0",
             "down_blocks.1.resnets.1": "input_blocks.5.0"}
    table.update({f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(6)})
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    out = {}
    for key, value in sd.items():
        module = max((m for m in table if key.startswith(m + ".")), key=len)
        rest = key[len(module) + 1:]
        if ".resnets." in module:
            head, _, tail = rest.partition(".")
            rest = f"{resnet[head]}.{tail}"
        out[f"{table[module]}.{rest}"] = value.contiguous()
    return out


@pytest.mark.parametrize("layout", ["ldm", "ldm-prefixed", "diffusers-keys"])
def test_single_files_load_as_the_folder(setup, tmp_path, layout):
    # A1111's and ComfyUI's files: one .safetensors in the original layout (with or without
    # the control_model. prefix of the .pth it came from), or diffusers' keys with no config;
    # each built in the base UNet's architecture.
    family, ours, _, nets, folders = setup
    net = nets["a"]
    sd = (net.state_dict() if layout == "diffusers-keys" else
          {("control_model." if layout == "ldm-prefixed" else "") + k: v
           for k, v in _ldm_names(net).items()})
    if layout == "ldm-prefixed":  # the whole SD model sits beside it in the .pth
        sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
    path = str(tmp_path / "control_sd_canny.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    name = ours.load_controlnet(path)
    try:
        assert name == "control_sd_canny"
        loaded, expected = ours.controlnets[name], ours.controlnets["a"]
        assert loaded.config == expected.config
        for (k, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items()):
            assert torch.equal(a, b), f"{family} {layout}: {k} differs"
    finally:
        ours.unload_controlnet(name)
    assert list(ours.controlnets) == ["a", "b"]


def test_refusals_of_other_files(setup, tmp_path):
    family, ours, ref, _, _ = setup
    from diffusers import ControlNetModel
    other = ControlNetModel.from_unet(ref.unet)
    wide = ControlNetModel(**{**other.config, "block_out_channels": (32, 32),
                              "conditioning_embedding_out_channels": (8, 16)})
    wide.save_pretrained(tmp_path / "wide", safe_serialization=True)
    with pytest.raises(SdrtError, match="for another model: its block_out_channels"):
        ours.load_controlnet(tmp_path / "wide")
    adapter = str(tmp_path / "t2iadapter_canny.safetensors")  # (T2I-Adapters: test_adapter)
    save_file({"adapter.body.0.block1.weight": torch.zeros(4, 4, 3, 3)}, adapter)
    with pytest.raises(SdrtError, match="not a T2I-Adapter .no body.N.block1 and conv_in"):
        ours.load_controlnet(adapter)
    style = str(tmp_path / "t2iadapter_style.safetensors")
    save_file({"style_embedding": torch.zeros(1, 8, 4)}, style)
    with pytest.raises(SdrtError, match="a T2I style adapter .CLIP-vision tokens., not a "
                                        "ControlNet or T2I-Adapter sdrt runs"):
        ours.load_controlnet(style)
    bare = str(tmp_path / "unet.safetensors")
    save_file({"conv_in.weight": torch.zeros(32, 4, 3, 3)}, bare)
    with pytest.raises(SdrtError, match="not a ControlNet"):
        ours.load_controlnet(bare)
    pickled = tmp_path / "control_v11p_sd15_canny.pth"
    pickled.write_bytes(b"PK")
    with pytest.raises(SdrtError, match="pickle checkpoints are not loaded"):
        ours.load_controlnet(str(pickled))
    with pytest.raises(SdrtError, match="does not exist"):
        ours.load_controlnet(str(tmp_path / "missing"))
    assert list(ours.controlnets) == ["a", "b"]


# -- whole pipelines ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_txt2img_matches_diffusers(setup, sampler):
    family, ours, ref, nets, _ = setup
    hint = _hint(5)
    pipe = _reference(ref, [nets["a"]], sampler)
    kw = dict(negative_prompt=["blurry"] * 2, height=H, width=W, num_inference_steps=6,
              guidance_scale=7.5, latents=_latents(7), output_type="np")
    expected = pipe(PROMPTS, image=hint, controlnet_conditioning_scale=0.8, **kw).images
    _assert_lively(expected, f"{family}/{sampler}")
    got = ours(PROMPTS, control_image=hint, controlnet="a", controlnet_conditioning_scale=0.8,
               sampler=sampler, **{**kw, "negative_prompt": "blurry"})
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} ControlNet txt2img {sampler}")
    # The residuals matter: without the ControlNet the image is another one.
    plain = ours(PROMPTS, sampler=sampler, **{**kw, "negative_prompt": "blurry"})
    assert np.abs(plain - got).max() > 20 * IMAGE_ATOL


def test_several_controlnets_guess_mode_and_part_of_the_schedule(setup):
    # Two ControlNets (their residuals summed), each with its scale and share of the steps;
    # heun calls the UNet twice a step, and diffusers counts the share per call.
    family, ours, ref, nets, _ = setup
    hints = [_hint(8), _hint(9)]
    for guess_mode in (False, True):
        pipe = _reference(ref, [nets["b"], nets["a"]], "heun")
        kw = dict(height=H, width=W, num_inference_steps=5, guidance_scale=5.0,
                  latents=_latents(10, batch=1), output_type="np", guess_mode=guess_mode,
                  controlnet_conditioning_scale=[0.6, 1.3])
        expected = pipe(PROMPTS[0], image=hints, control_guidance_start=[0.0, 0.3],
                        control_guidance_end=[0.7, 1.0], **kw).images
        got = ours(PROMPTS[0], control_image=hints, controlnet=["b", "a"],
                   control_guidance_start=[0.0, 0.3], control_guidance_end=[0.7, 1.0],
                   sampler="heun", **kw)
        assert_close_abs(got, expected, IMAGE_ATOL,
                         f"{family} two ControlNets, guess mode {guess_mode}")


def _in_region(net, mask):
    """``net`` with the A1111 ControlNet extension's effective_region_mask written over its
    outputs, as the reference: each residual times the mask bilinear at its size."""
    def hook(module, args, kwargs, out):
        at = lambda r: r * torch.nn.functional.interpolate(mask, size=r.shape[2:],
                                                           mode="bilinear").to(r.dtype)
        return [at(r) for r in out[0]], at(out[1])
    return net.register_forward_hook(hook, with_kwargs=True)


def test_region_masks_match_the_extension(setup):
    # A1111's effective_region_mask on a ControlNet (soft, the mask at each residual's size;
    # "b" beside it without one), in guess mode too, against diffusers' ControlNets with the
    # extension's rule written over their outputs; under a static plan; a white mask is no
    # mask.
    family, ours, ref, nets, _ = setup
    hints = [_hint(11), _hint(12)]
    soft = np.random.default_rng(4).random((5, 9)).astype(np.float32)
    soft[:, :4] = 1.0
    handle = _in_region(nets["a"], torch.from_numpy(soft)[None, None])
    try:
        for guess_mode in (False, True):
            pipe = _reference(ref, [nets["a"], nets["b"]], "euler")
            kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=5.0,
                      latents=_latents(13, batch=1), output_type="np", guess_mode=guess_mode,
                      controlnet_conditioning_scale=[1.2, 0.7])
            expected = pipe(PROMPTS[0], image=hints, **kw).images
            got = ours(PROMPTS[0], control_image=hints, controlnet=["a", "b"],
                       control_mask=[soft, None], sampler="euler", **kw)
            assert_close_abs(got, expected, IMAGE_ATOL,
                             f"{family} ControlNet region mask, guess mode {guess_mode}")
    finally:
        handle.remove()
    whole = ours(PROMPTS[0], control_image=hints, controlnet=["a", "b"], sampler="euler", **kw)
    assert np.abs(whole - got).max() > 20 * IMAGE_ATOL, "the region mask changed nothing"
    white = ours(PROMPTS[0], control_image=hints, controlnet=["a", "b"], sampler="euler",
                 control_mask=[np.ones((3, 3), np.float32), None], **kw)
    assert_close_abs(white, whole, 1e-5, f"{family} a white ControlNet region mask")
    args = dict(prompt=PROMPTS[0], control_image=hints, controlnet=["a", "b"],
                control_mask=[soft, None], sampler="euler", **kw)
    ours.compile(H, W, num_inference_steps=4, sampler="euler", guess_mode=True, strict=True,
                 controlnet=["a", "b"], control_masks=[True, False])
    try:
        static = ours(**args)
    finally:
        ours.runtime = None
    assert_close_abs(static, got, 1e-5, f"{family} ControlNet region mask, static plan")
    for kwargs, message in (
            (dict(control_mask=soft), "control_mask must be a list of 2 entries"),
            (dict(control_mask=[np.full((4, 4), 2.0, np.float32), None]),
             "control_mask values must be finite and in [0, 1]"),
            (dict(control_mask=[np.ones((2, 4, 4), np.float32), None]),
             "control_mask must be one mask per ControlNet, got a batch of 2")):
        with pytest.raises(SdrtError, match=re.escape(message)):
            ours(**{**args, **kwargs})
    for flags, message in ((True, "control_masks was given without controlnet"),
                           ([True], "control_masks must be True, False or a list of 2 of them")):
        with pytest.raises(SdrtError, match=re.escape(message)):
            ours.compile(H, W, num_inference_steps=4, sampler="euler",
                         controlnet=None if flags is True else ["a", "b"], control_masks=flags)
    with pytest.raises(SdrtError, match="control_mask was given without control_image"):
        ours(PROMPTS[0], control_mask=soft, height=H, width=W, num_inference_steps=4)


def _rescaled(net, factors):
    """A copy of the diffusers ControlNet ``net`` whose residual i comes out ``factors[i]``
    times as large (its 1×1 zero convs scaled: the reference for a control mode)."""
    import copy
    net = copy.deepcopy(net)
    convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block]
    assert len(convs) == len(factors)
    with torch.no_grad():
        for conv, f in zip(convs, factors):
            conv.weight.mul_(f)
            conv.bias.mul_(f)
    return net


def test_control_modes_match_diffusers_with_rescaled_residuals(setup):
    # A1111's control modes: "prompt" is diffusers' ControlNet with residual i scaled by
    # 0.825^(12 - i); "controlnet" also keeps them from the unconditional half, which is
    # diffusers' guess mode with its log ramp divided out.
    family, ours, ref, nets, _ = setup
    n = len(nets["a"].controlnet_down_blocks) + 1
    soft = 0.825 ** (12.0 - torch.arange(n, dtype=torch.float64))
    hint = _hint(30)
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=6.0,
              latents=_latents(31, batch=1), output_type="np",
              controlnet_conditioning_scale=1.5)
    for mode, label, guess, factors in (
            ("prompt", "My prompt is more important", False, soft),
            ("controlnet", 2, True, soft / torch.logspace(-1, 0, n, dtype=torch.float64))):
        pipe = _reference(ref, [_rescaled(nets["a"], factors.tolist())], "euler")
        expected = pipe(PROMPTS[0], image=hint, guess_mode=guess, **kw).images
        for given in (mode, label):
            got = ours(PROMPTS[0], control_image=hint, controlnet="a", sampler="euler",
                       control_mode=given, **kw)
            assert_close_abs(got, expected, IMAGE_ATOL, f"{family} control mode {given!r}")
        balanced = ours(PROMPTS[0], control_image=hint, controlnet="a", sampler="euler", **kw)
        assert np.abs(balanced - got).max() > 20 * IMAGE_ATOL, f"mode {mode} changed nothing"


def test_img2img_and_a_control_image_per_prompt(setup):
    family, ours, ref, nets, _ = setup
    pipe = _reference(ref, [nets["a"]], "ddim", "StableDiffusionControlNetImg2ImgPipeline")
    init, hints = _hint(11), [_hint(12), _hint(13)]
    # (diffusers' image-to-image and inpainting ControlNet pipelines default to other scales)
    kw = dict(strength=0.7, num_inference_steps=8, guidance_scale=6.0, output_type="np",
              controlnet_conditioning_scale=1.0)
    expected = pipe(PROMPTS, image=[init, init], control_image=hints,
                    generator=torch.Generator().manual_seed(14), **kw).images
    _assert_lively(expected, f"{family} img2img")
    got = ours(PROMPTS, image=[init, init], control_image=hints, controlnet="a", sampler="ddim",
               generator=torch.Generator().manual_seed(14), **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} ControlNet img2img")


def test_inpainting_matches_diffusers(setup):
    family, ours, ref, nets, _ = setup
    pipe = _reference(ref, [nets["a"]], "euler", "StableDiffusionControlNetInpaintPipeline")
    mask = np.zeros((H, W), np.float32)
    mask[4:12, 6:20] = 1
    init, hint = _hint(15), _hint(16)
    kw = dict(strength=0.9, num_inference_steps=6, guidance_scale=6.0, output_type="np",
              height=H, width=W, controlnet_conditioning_scale=1.2)
    expected = pipe(PROMPTS[1], image=init, mask_image=Image.fromarray(
        (mask * 255).astype(np.uint8)), control_image=hint,
        generator=torch.Generator().manual_seed(17), **kw).images
    got = ours(PROMPTS[1], image=init, mask_image=mask, control_image=hint, controlnet="a",
               seed=17, sampler="euler", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} ControlNet inpainting")


def test_the_control_image_sets_the_size(setup):
    family, ours, _, _, _ = setup
    got = ours(PROMPTS[0], control_image=_hint(18, 20, 12), controlnet="b", num_inference_steps=2,
               sampler="euler", output_type="np", seed=1)
    assert got.shape == (1, 20, 12, 3)


def test_static_plan_matches_eager(setup):
    # The plan's buffers: control images and the per-call scale table (a new scale or share
    # of the schedule needs no new plan); replacing a ControlNet drops the plans that ran it.
    family, ours, _, _, folders = setup
    try:
        with pytest.raises(SdrtError, match="guess_mode must be False, or True with controlnet"):
            ours.compile(H, W, num_inference_steps=4, sampler="dpmpp_2m", guess_mode=True)
        ours.compile(H, W, batch_size=1, num_inference_steps=4, sampler="dpmpp_2m")
        ours.compile(H, W, batch_size=1, num_inference_steps=4, sampler="dpmpp_2m",
                     controlnet=["a", "b"])
        for scale, end, mode in ((0.8, 1.0, "balanced"), (1.4, 0.5, ["controlnet", "prompt"])):
            kw = dict(prompt=PROMPTS[0], control_image=[_hint(19), _hint(20)],
                      controlnet=["a", "b"], controlnet_conditioning_scale=[scale, 0.5],
                      control_guidance_end=end, height=H, width=W, num_inference_steps=4,
                      sampler="dpmpp_2m", seed=21, output_type="np", control_mode=mode)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no plan built on demand: compile built it
                got = ours(**kw)
            expected = run_eagerly(ours, **kw)
            assert_close_abs(got, expected, 1e-5, f"{family} static ControlNet plan {scale}")
        shapes = [s for s in ours.runtime.plans if s.controls]
        assert [s.controls for s in shapes] == [("a", "b")]
        ours.load_controlnet(folders["b"], name="b")
        assert not any(s.controls for s in ours.runtime.plans)
        assert ours.runtime.plans, "the plan without ControlNets is kept"
    finally:
        ours.runtime = None
        ours.load_controlnet(folders["a"], name="a")
        ours.load_controlnet(folders["b"], name="b")


@pytest.mark.parametrize("kwargs,message", [
    (dict(controlnet=None, guess_mode=True), "guess_mode was given without control_image"),
    (dict(control_image="x.png"), "control_image must be a PIL image"),
    (dict(control_image=np.zeros((16, 24, 3), np.uint8)), "control_image array must hold floats"),
    (dict(control_image=np.full((16, 24, 3), 2.0)), "control_image values must be finite"),
    (dict(control_image="IMG", controlnet="c"), "controlnet 'c' is not loaded"),
    (dict(control_image="IMG", controlnet=["a", "a"]), "names a ControlNet twice"),
    (dict(control_image="IMG", controlnet=None), "control_image must be a list of 2 entries"),
    (dict(control_image="IMG", controlnet="a", controlnet_conditioning_scale=11),
     "controlnet_conditioning_scale must be a number from 0 to 10"),
    (dict(control_image="IMG", controlnet="a", controlnet_conditioning_scale=[1, 1]),
     "one value or a list of 1"),
    (dict(control_image="IMG", controlnet="a", control_guidance_start=0.5,
          control_guidance_end=0.5), "control_guidance_start must be below"),
    (dict(control_image="IMG", controlnet="a", guess_mode="yes"), "guess_mode must be true"),
    (dict(control_image="IMG", controlnet="a", control_mode="soft"),
     "control_mode must be one of balanced, prompt, controlnet"),
    (dict(control_image="IMG", controlnet="a", control_mode="prompt", guess_mode=True),
     "control_mode must be balanced in guess mode"),
    (dict(controlnet=None, control_mode="prompt"), "control_mode was given without"),
    (dict(control_image=["IMG", "IMG", "IMG"], controlnet="a", num_images_per_prompt=2),
     "one image or one per prompt"),
])
def test_bad_arguments_are_refused(setup, kwargs, message):
    family, ours, _, _, _ = setup
    kwargs = {"controlnet": "a", **kwargs}  # two are loaded
    image = lambda v: _hint(1) if isinstance(v, str) and v == "IMG" else v
    kwargs = {k: [image(x) for x in v] if isinstance(v, list) else image(v)
              for k, v in kwargs.items()}
    with pytest.raises(SdrtError, match=message):
        ours(PROMPTS[0], height=H, width=W, num_inference_steps=2, **kwargs)


def test_no_controlnet_loaded(tiny_model):
    _, folder, _ = tiny_model
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(SdrtError, match="no ControlNet is loaded"):
        pipe(PROMPTS[0], control_image=_hint(1), num_inference_steps=2)


# -- SDXL -------------------------------------------------------------------------------------

def test_sdxl_matches_diffusers(sdxl_base_folder, tmp_path):
    folder, ref = sdxl_base_folder
    net = _controlnet(ref.unet, 22)
    net.save_pretrained(tmp_path / "xl", safe_serialization=True)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    ours.load_controlnet(tmp_path / "xl")
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
    pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in ref.components.items()
                                                  if k not in ("image_encoder",
                                                               "feature_extractor")},
                                               controlnet=net)
    pipe.scheduler = EulerDiscreteScheduler.from_config(ref.original_scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    hint = _hint(23, 16, 16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(24))
    for guess_mode in (False, True):
        kw = dict(height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
                  latents=latents, output_type="np", guess_mode=guess_mode)
        expected = pipe(PROMPTS[0], image=hint, controlnet_conditioning_scale=0.9, **kw).images
        _assert_lively(expected, "sdxl controlnet")
        got = ours(PROMPTS[0], control_image=hint, controlnet_conditioning_scale=0.9,
                   sampler="euler", **kw)
        assert_close_abs(got, expected, IMAGE_ATOL, f"SDXL ControlNet, guess {guess_mode}")


def test_memory_estimate_counts_the_residuals():
    # A request with ControlNets holds their residuals and one ControlNet's down path beside
    # the UNet's skips: the UNet phase of the estimate a request is checked with grows by
    # that (SD 1.5 at 512², CFG, fused attention), and so does the whole estimate where that
    # phase is the peak (not at SD 1.5's sizes, where the VAE decoder's is).
    from sdrt.engine.configs import model_config
    from sdrt.engine.memory import _unet_phase
    from sdrt.engine.unet import UNetConfig
    unet = UNetConfig.from_dict(model_config("sd15")["unet"])
    plain = _unet_phase(unet, 64, 64, 2, 2, fused=True)
    controlled = _unet_phase(unet, 64, 64, 2, 2, fused=True, controlled=True)
    assert controlled[0] > plain[0] * 1.3, (plain, controlled)


@pytest.fixture(scope="module")
def demo_with_controlnet(tmp_path_factory):
    """The built-in model with a random ControlNet of its architecture (no diffusers)."""
    from sdrt.engine.demo.model import demo_config, demo_pipeline
    from sdrt.engine.tiny import controlnet_config, write_controlnet
    folder = str(tmp_path_factory.mktemp("demo-controlnet") / "net")
    write_controlnet(folder, controlnet_config(demo_config()["unet"], 2), seed=4)
    pipe = demo_pipeline()
    pipe.load_controlnet(folder, name="net")
    return pipe


@pytest.mark.parametrize("sampler", sampler_loops())
def test_every_sampler_under_a_static_plan(demo_with_controlnet, sampler):
    # The residual factors are indexed by UNet call, counted from the model's first call: every
    # sampler (two-call ones included, and image to image, which runs part of the schedule)
    # makes exactly as many calls as its schedule has timesteps, under the plan as eagerly.
    pipe = demo_with_controlnet
    hint = _hint(25, 32, 32)
    kw = dict(prompt="a red fox", control_image=hint, control_guidance_start=0.3,
              num_inference_steps=4, sampler=sampler, seed=3, height=32, width=32,
              output_type="np")
    try:
        for extra in ({}, {"image": _hint(26, 32, 32), "strength": 0.6}):
            pipe.compile(32, 32, num_inference_steps=4, sampler=sampler,
                         strength=extra.get("strength"), controlnet="net")
            got = pipe(**kw, **extra)
            assert_close_abs(got, run_eagerly(pipe, **kw, **extra), 1e-5,
                             f"{sampler} {extra and 'img2img'}")
    finally:
        pipe.runtime = None


def test_bad_names_and_paths_are_refused(setup, tmp_path):
    _, ours, _, _, folders = setup
    with pytest.raises(SdrtError, match="controlnet 'c' is not loaded \\(loaded: a, b\\)"):
        ours.unload_controlnet("c")
    with pytest.raises(SdrtError, match="controlnet name must be a non-empty string, got ''"):
        ours.load_controlnet(folders["a"], name="")
    with pytest.raises(SdrtError, match="controlnet path must be a folder or a .safetensors"):
        ours.load_controlnet(3)
    with pytest.raises(SdrtError, match="expected a ControlNet folder or .safetensors file"):
        (tmp_path / "net.json").write_text("{}")
        ours.load_controlnet(str(tmp_path / "net.json"))
    with pytest.raises(SdrtError, match="controlnet must be a loaded ControlNet's name"):
        ours.compile(H, W, num_inference_steps=2, sampler="euler", controlnet=[3])
    assert list(ours.controlnets) == ["a", "b"]
