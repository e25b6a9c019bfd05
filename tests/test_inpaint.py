"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same folder and seeds:
an inpainting UNet (9 input channels: latents, mask, masked-image latents) and a plain UNet
(diffusers' 4-channel path, which keeps the unmasked latents after every step)."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.stages import blank_inpaint_conditioning, scale_latents

IMAGE_ATOL = 2e-3  # float32; images are in [0, 1]
PROMPT = "a red fox in the snow, 35mm photo"


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """(ours, diffusers' inpainting pipeline) over a tiny SD 1-like inpainting model."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionInpaintPipeline

    from tiny_models import save_diffusers_folder
    folder = str(tmp_path_factory.mktemp("tiny-inpainting") / "model")
    ref = save_diffusers_folder(folder, "sd1", seed=4, in_channels=9)
    ref = StableDiffusionInpaintPipeline(**ref.components)
    ref.set_progress_bar_config(disable=True)
    ref.original_scheduler_config = dict(ref.scheduler.config)
    return Pipeline.from_pretrained(folder, device="cpu"), ref


@pytest.fixture(scope="module")
def plain(tiny_sd1):
    """(ours, diffusers' inpainting pipeline) over the tiny SD 1-like text-to-image model."""
    from diffusers import StableDiffusionInpaintPipeline
    folder, ref = tiny_sd1
    ref = StableDiffusionInpaintPipeline(**ref.components)
    ref.set_progress_bar_config(disable=True)
    ref.original_scheduler_config = dict(ref.scheduler.config)
    return Pipeline.from_pretrained(folder, device="cpu"), ref


def _scheduler(ref, sampler):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                           KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, PNDMScheduler)
    cls = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
           "euler_a": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler,
           "dpm2": KDPM2DiscreteScheduler, "dpm2_a": KDPM2AncestralDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler, "dpmpp_2m_sde": DPMSolverMultistepScheduler,
           }[sampler]
    sde = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpmpp_2m_sde" else {}
    return cls.from_config(ref.original_scheduler_config, **sde)


def _image(seed, size=(24, 16)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size=(24, 16)):
    """White (repaint) over a rectangle that crosses latent cells, black elsewhere."""
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[3:13, 5:18] = 255
    return Image.fromarray(m)


def _both(pair, sampler, **kw):
    ours, ref = pair
    ref.scheduler = _scheduler(ref, sampler)
    args = dict(prompt=PROMPT, image=_image(3), mask_image=_mask(), num_inference_steps=6,
                guidance_scale=6.0, negative_prompt="ugly", output_type="np", height=16,
                width=24, **kw)
    expected = ref(**args, generator=torch.Generator().manual_seed(11)).images
    got = ours(**args, seed=11, sampler=sampler)
    assert got.shape == expected.shape == (1, 16, 24, 3)
    assert expected.std() > 0.01, "reference image is flat"
    return got, expected


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler", 0.7), ("euler_a", 1.0),
                                              ("dpmpp_2m", 0.6), ("pndm", 1.0), ("heun", 0.7),
                                              ("dpm2_a", 1.0)])
def test_inpainting_unet_matches_diffusers(inpainting, sampler, strength):
    got, expected = _both(inpainting, sampler, strength=strength)
    assert_close_abs(got, expected, IMAGE_ATOL, f"9-channel inpaint {sampler} {strength}")


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler_a", 0.75),
                                              ("dpmpp_2m", 1.0), ("pndm", 0.8), ("dpm2", 0.75),
                                              ("dpmpp_2m_sde", 0.8), ("heun", 1.0)])
def test_plain_unet_inpaint_matches_diffusers(plain, sampler, strength):
    got, expected = _both(plain, sampler, strength=strength)
    assert_close_abs(got, expected, IMAGE_ATOL, f"4-channel inpaint {sampler} {strength}")


def test_plain_unet_keeps_the_unmasked_latents(plain):
    # After the last step the unmasked latents are the init image's, clean: decoding them
    # alone gives what the whole image decodes to there, whatever the prompt.
    ours, _ = plain
    run = lambda prompt: ours(prompt, image=_image(3), mask_image=_mask(), strength=1.0,
                              num_inference_steps=3, seed=2, output_type="latent")
    a, b = run(PROMPT), run("a lighthouse at dusk")
    keep = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(_mask(), dtype=np.float32) / 255)[None, None],
        size=a.shape[2:]) < 0.5
    keep = keep.expand_as(a)
    assert torch.equal(a[keep], b[keep])
    assert (a[~keep] - b[~keep]).abs().max() > 1e-3, "the masked latents ignored the prompt"


def test_mask_forms_agree(inpainting):
    ours, _ = inpainting
    white = np.asarray(_mask(), dtype=np.float32) / 255
    kw = dict(image=_image(3), num_inference_steps=2, seed=5, output_type="np")
    base = ours(PROMPT, mask_image=_mask(), **kw)
    for form in (white, white[..., None], white[None], white[..., None].repeat(3, -1),
                 torch.from_numpy(white)[None],
                 torch.from_numpy(white)[None, None], [_mask()],
                 _mask().convert("RGB"), _mask().resize((48, 32), Image.NEAREST)):
        assert np.array_equal(ours(PROMPT, mask_image=form, **kw), base), type(form)
    inverted = ours(PROMPT, mask_image=1 - white, **kw)
    assert np.abs(inverted - base).max() > 1e-3, "the mask made no difference"


def test_one_mask_per_init_image(inpainting):
    ours, _ = inpainting
    images, masks = [_image(3), _image(4)], [_mask(), _mask().transpose(Image.FLIP_TOP_BOTTOM)]
    kw = dict(num_inference_steps=2, seed=5, output_type="np")
    both = ours([PROMPT, PROMPT], image=images, mask_image=masks, **kw)
    assert both.shape == (2, 16, 24, 3)
    second = ours([PROMPT, PROMPT], image=[images[1]] * 2, mask_image=[masks[1]] * 2, **kw)
    assert_close_abs(both[1], second[1], 1e-5, "second image with its own mask")
    assert np.abs(both[0] - both[1]).max() > 1e-3


def test_blank_conditioning_is_a_full_mask_over_grey(inpainting):
    ours, _ = inpainting
    cond = blank_inpaint_conditioning(ours.vae, torch.float32, ours.device, 2, 16, 24,
                                      torch.float32)
    mean, _ = ours.vae.encode(torch.zeros(1, 3, 16, 24))
    h, w = 16 // ours.vae_scale_factor, 24 // ours.vae_scale_factor
    assert cond.shape == (2, 5, h, w)
    assert torch.equal(cond[:, :1], torch.ones(2, 1, h, w))
    assert torch.equal(cond[:, 1:], scale_latents(ours.vae, mean).expand(2, -1, -1, -1))


def test_inpainting_unet_text_to_image_static_matches_eager(inpainting, tmp_path_factory):
    # An inpainting model without a mask runs everything masked (A1111's way); the static
    # plan (eager over its buffers on a CPU) must give what the eager path gives.
    ours, _ = inpainting
    kw = dict(height=16, width=24, num_inference_steps=3, seed=7, output_type="np",
              guidance_scale=5.0, sampler="euler")
    eager = ours(PROMPT, **kw)
    assert eager.std() > 0.01
    static = Pipeline.from_pretrained(ours.source, device="cpu")
    static.compile(height=16, width=24, num_inference_steps=3, sampler="euler")
    assert static.runtime.plan_for is not None
    got = static(PROMPT, **kw)
    assert_close_abs(got, eager, 1e-5, "static plan of an inpainting UNet")


def test_inpainting_unet_img2img_without_mask(inpainting):
    ours, _ = inpainting
    out = ours(PROMPT, image=_image(3), strength=0.7, num_inference_steps=3, seed=1,
               output_type="np")
    assert out.shape == (1, 16, 24, 3) and np.isfinite(out).all()


def test_composable_prompt_on_an_inpainting_unet(inpainting):
    # A1111's AND: each part's row gets its image's mask and masked-image latents; two equal
    # halves are the prompt, with a mask per init image for two prompts.
    ours, _ = inpainting
    kw = dict(image=[_image(3), _image(4)], mask_image=[_mask(), ImageOps.invert(_mask())],
              num_inference_steps=3, guidance_scale=6.0, negative_prompt="ugly",
              output_type="np", height=16, width=24, seed=5, sampler="euler")
    halves = ours([f"{PROMPT}:0.5 AND {PROMPT}:0.5", "a house"], **kw)
    plain = ours([PROMPT, "a house"], **kw)
    assert_close_abs(halves, plain, 1e-5, "two halves on an inpainting UNet")
    assert np.abs(plain[0] - ours(PROMPT, **{**kw, "image": _image(4), "mask_image":
                                              _mask()})[0]).max() > 0.02, \
        "the init image changed nothing"


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask_image=_mask()), "mask_image needs image"),
    (dict(image=torch.zeros(1, 4, 2, 3), mask_image=_mask()), "got latents"),
    (dict(image=_image(3), mask_image=[]), "non-empty list"),
    (dict(image=_image(3), mask_image=[_mask()] * 2), "one mask or one per init image (1)"),
    (dict(image=_image(3), mask_image=np.ones((16, 24), dtype=np.uint8)), "floats in [0, 1]"),
    (dict(image=_image(3), mask_image=np.full((16, 24), 2.0)), "mask_image values must be"),
    (dict(image=_image(3), mask_image=np.full((16, 24), np.nan)), "inf/NaN"),
    (dict(image=_image(3), mask_image=np.ones((2, 16, 24, 2))), "must be (H, W)"),
    (dict(image=_image(3), mask_image=torch.ones(2, 16, 24)), "must be (H, W)"),
    (dict(image=_image(3), mask_image="mask.png"), "mask_image must be a PIL image"),
])
def test_bad_masks_raise(inpainting, kwargs, message):
    ours, _ = inpainting
    with pytest.raises(SdrtError) as e:
        ours(PROMPT, num_inference_steps=2, **kwargs)
    assert message in str(e.value)


def test_huge_mask_refused_before_conversion(inpainting):
    ours, _ = inpainting
    huge = Image.new("L", (2 * ours.limits.max_side + 1, 2 * ours.limits.max_side + 1))
    with pytest.raises(SdrtError, match="mask_image must be at most"):
        ours(PROMPT, image=_image(3), mask_image=huge, num_inference_steps=2)


def test_mask_with_denoising_start_refused(sdxl_base_folder):
    folder, _ = sdxl_base_folder
    ours = Pipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(SdrtError, match="denoising_start"):
        ours(PROMPT, image=_image(3, (64, 64)), mask_image=_mask((64, 64)),
             denoising_start=0.5, num_inference_steps=2)


@pytest.mark.parametrize("family,in_channels,prediction_type,expected", [
    ("sd1", 9, None, ("epsilon", 9)), ("sd1", 4, None, ("epsilon", 4)),
    ("sd2", 9, None, ("epsilon", 9)), ("sd2", 4, None, ("v_prediction", 4)),
    ("sd2", 9, "v_prediction", ("v_prediction", 9)), ("sdxl", 9, None, ("epsilon", 9))])
def test_single_file_configs_read_the_input_channels(family, in_channels, prediction_type,
                                                     expected):
    from sdrt.engine.convert_ldm import UNET_PREFIX
    from sdrt.engine.loading import single_file_configs
    conv = torch.randn(320, in_channels, 3, 3)
    configs = single_file_configs(family, prediction_type,
                                  {f"{UNET_PREFIX}input_blocks.0.0.weight": lambda: conv})
    assert (configs["scheduler"].get("prediction_type", "epsilon"),
            configs["unet"]["in_channels"]) == expected
    # SD 2's inpainting model is the 512-base one (epsilon); 768-v otherwise.
    if family == "sd2":
        assert configs["unet"]["sample_size"] == (64 if expected[0] == "epsilon" else 96)


@pytest.mark.parametrize("spread,expected", [(0.2, ("v_prediction", 96)), (0.05, ("epsilon", 64)),
                                             (None, ("v_prediction", 96))])
def test_sd2_single_files_objective_from_the_weights(spread, expected):
    # ComfyUI's test: the last attention block's norm1 bias spread (std > 0.09: v-prediction,
    # the 768-v configs; else epsilon, the 512-base ones); without the key, 768-v. A v_pred
    # marker and an explicit prediction_type win.
    from sdrt.engine.convert_ldm import UNET_PREFIX
    from sdrt.engine.loading import single_file_configs
    key = f"{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias"
    bias = torch.randn(1280, generator=torch.Generator().manual_seed(0)) * (spread or 0)
    source = {key: lambda: bias} if spread is not None else {}
    configs = single_file_configs("sd2", None, source)
    assert (configs["scheduler"]["prediction_type"], configs["unet"]["sample_size"]) == expected
    for marked, given in (({"v_pred": lambda: torch.zeros(0)}, None), ({}, "v_prediction")):
        configs = single_file_configs("sd2", given, {**source, **marked})
        assert configs["scheduler"]["prediction_type"] == "v_prediction"


def test_single_file_inpainting_checkpoint_loads(inpainting, tmp_path):
    from safetensors.torch import save_file

    from test_convert_ldm import to_ldm
    ours, ref = inpainting
    cfgs = {"unet": dict(ref.unet.config), "vae": dict(ref.vae.config),
            "text_encoder": ref.text_encoder.config.to_dict()}
    ldm, _ = to_ldm("sd1", (ref.unet, ref.vae, ref.text_encoder), cfgs)
    path = str(tmp_path / "inpainting.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    from_file = Pipeline.from_pretrained(path, device="cpu", config=ours.source)
    assert from_file.unet.config.in_channels == 9
    kw = dict(image=_image(3), mask_image=_mask(), num_inference_steps=2, seed=3,
              output_type="np")
    assert np.array_equal(from_file(PROMPT, **kw), ours(PROMPT, **kw))


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sdxl_inpaint_matches_diffusers(sdxl_base_folder, strength):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline
    folder, base = sdxl_base_folder
    ref = StableDiffusionXLInpaintPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = EulerDiscreteScheduler.from_config(base.original_scheduler_config)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    args = dict(prompt=PROMPT, image=_image(3, (64, 48)), mask_image=_mask((64, 48)),
                num_inference_steps=4, guidance_scale=5.0, strength=strength,
                height=48, width=64, output_type="np")
    expected = ref(**args, generator=torch.Generator().manual_seed(6)).images
    got = ours(**args, seed=6, sampler="euler")
    assert expected.std() > 0.01
    assert_close_abs(got, expected, IMAGE_ATOL, f"SDXL inpaint {strength}")


def test_onnx_export_of_an_inpainting_model(inpainting, tmp_path):
    # The 9-channel UNet exports, check-onnx passes, the folder names diffusers' inpainting
    # pipeline, and inpainting in onnxruntime gives the torch runtime's image.
    import json
    import os

    from sdrt.export import check_onnx, export_onnx, onnx_components
    ours, _ = inpainting
    out = str(tmp_path / "export")
    export_onnx(ours.source, out, height=16, width=24, batch=1)
    assert all(r.passed for r in check_onnx(out, ours.source))
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionInpaintPipeline"
    onnx_pipe = Pipeline(onnx_components(out, ours.source, "cpu"), torch.device("cpu"),
                         torch.float32)
    kw = dict(image=_image(3), mask_image=_mask(), num_inference_steps=3, seed=2,
              guidance_scale=6.0, output_type="np")
    assert_close_abs(onnx_pipe(PROMPT, **kw), ours(PROMPT, **kw), IMAGE_ATOL,
                     "inpainting in onnxruntime vs torch")


@pytest.mark.parametrize("content", ["latent_noise", "latent_nothing"])
def test_masked_content_in_latent_space(plain, content):
    # A1111's latent masked content: the masked init latents become unit noise or zeros
    # before they are noised; the kept latents end as the init image's all the same.
    ours, _ = plain
    kw = dict(image=_image(3), mask_image=_mask(), strength=0.6, num_inference_steps=4,
              sampler="ddim", seed=7, output_type="latent")
    original = ours(PROMPT, **kw)
    got = ours(PROMPT, masked_content=content, **kw)
    keep = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(_mask(), dtype=np.float32) / 255)[None, None],
        size=got.shape[2:]) < 0.5
    keep = keep.expand_as(got)
    assert torch.equal(got[keep], original[keep])
    assert (got[~keep] - original[~keep]).abs().max() > 1e-2
    assert torch.equal(got, ours(PROMPT, masked_content=content, **kw))  # seeded


def test_masked_content_is_checked(plain):
    ours, _ = plain
    with pytest.raises(SdrtError, match="masked_content must be one of original"):
        ours(PROMPT, image=_image(3), mask_image=_mask(), masked_content="fill",
             num_inference_steps=2)
    with pytest.raises(SdrtError, match="masked_content='latent_noise' needs mask_image"):
        ours(PROMPT, image=_image(3), masked_content="latent_noise", num_inference_steps=2)
