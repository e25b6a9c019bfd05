"""The rescale of classifier-free guidance (``guidance_rescale``): diffusers' style against its
StableDiffusionPipeline, StableDiffusionXLPipeline and PAG pipeline on the same folder, latents
and sampler; ComfyUI's (RescaleCFG: the stds of the predicted velocities) against its formula
written out over a k-diffusion Euler loop; the static plan, the CLI and the workflow node."""
import numpy as np
import pytest
import torch

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from test_pipeline import IMAGE_ATOL, PROMPTS, _assert_lively, _diffusers_scheduler
from test_pipeline import pipes  # noqa: F401  (the fixture)

NEGATIVE = "blurry, low quality"


def _latents(seed, h=16, w=24):
    return torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler,rescale", [("euler", 0.7), ("ddim", 1.0), ("dpmpp_2m", 0.4)])
def test_diffusers_style_matches_diffusers(pipes, sampler, rescale):
    family, ours, ref = pipes
    ref.scheduler = _diffusers_scheduler(ref, sampler)
    args = dict(height=16, width=24, num_inference_steps=5, guidance_scale=9.0,
                latents=_latents(3), output_type="np")
    expected = ref(PROMPTS, negative_prompt=[NEGATIVE] * 2, guidance_rescale=rescale,
                   **args).images
    _assert_lively(expected, f"{family}/{sampler} guidance_rescale")
    got = ours(PROMPTS, negative_prompt=NEGATIVE, sampler=sampler, guidance_rescale=rescale,
               **args)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} rescale {rescale} with {sampler}")
    plain = ours(PROMPTS, negative_prompt=NEGATIVE, sampler=sampler, **args)
    assert np.abs(plain - got).max() > 5 * IMAGE_ATOL, "guidance_rescale changed nothing"


def test_with_pag_matches_diffusers(pipes):
    # diffusers' PAG pipelines rescale the output PAG's term is already in.
    from diffusers import StableDiffusionPAGPipeline
    family, ours, ref = pipes
    pag = StableDiffusionPAGPipeline(**ref.components, pag_applied_layers="mid")
    pag.set_progress_bar_config(disable=True)
    pag.scheduler = _diffusers_scheduler(ref, "euler")
    args = dict(height=16, width=24, num_inference_steps=4, guidance_scale=7.0,
                latents=_latents(5), output_type="np")
    expected = pag(PROMPTS, negative_prompt=[NEGATIVE] * 2, pag_scale=5.0,
                   guidance_rescale=0.6, **args).images
    got = ours(PROMPTS, negative_prompt=NEGATIVE, sampler="euler", pag_scale=5.0,
               guidance_rescale=0.6, **args)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} rescale with PAG")


def test_sdxl_matches_diffusers(sdxl_base_folder):
    from test_sdxl import H, PROMPTS as SDXL_PROMPTS, W, _latents as sdxl_latents, _ours, \
        _scheduler
    folder, ref = sdxl_base_folder
    ref.scheduler = _scheduler(ref, "euler")
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=8.0,
              latents=sdxl_latents(2, 3), output_type="np")
    with torch.no_grad():
        expected = ref(SDXL_PROMPTS, negative_prompt=[NEGATIVE] * 2, guidance_rescale=0.7,
                       **kw).images
    ours = _ours(folder)
    got = ours(SDXL_PROMPTS, negative_prompt=NEGATIVE, sampler="euler", prompt_syntax="plain",
               guidance_rescale=0.7, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "SDXL guidance_rescale")


def _comfy_reference(ref, prompts, latents, guidance, multiplier, steps, karras):
    """A k-diffusion Euler loop over diffusers' UNet, guided as ComfyUI's KSampler guides
    with a RescaleCFG node on the model: its ``rescale_cfg`` written out, on the predicted
    clean latents (``cond_denoised``) of each half."""
    from diffusers import EulerDiscreteScheduler
    sched = EulerDiscreteScheduler.from_config(ref.original_scheduler_config,
                                               use_karras_sigmas=karras)
    sched.set_timesteps(steps)
    v_pred = sched.config.prediction_type == "v_prediction"
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(prompts, "cpu", 1, True, [NEGATIVE] * len(prompts))
        context = torch.cat([uncond, cond])
        x = latents * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            sigma, sigma_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
            xx = torch.cat([x, x])
            out = ref.unet(xx / (sigma**2 + 1) ** 0.5, t, encoder_hidden_states=context).sample
            if v_pred:
                x0 = xx / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
            else:
                x0 = xx - sigma * out
            uncond_denoised, cond_denoised = x0.chunk(2)
            # ComfyUI's cfg_function hands the sampler_cfg_function x − denoised:
            c, u = x - cond_denoised, x - uncond_denoised
            xs = x / (sigma * sigma + 1.0)
            c = ((xs - (x - c)) * (sigma ** 2 + 1.0) ** 0.5) / sigma
            u = ((xs - (x - u)) * (sigma ** 2 + 1.0) ** 0.5) / sigma
            x_cfg = u + guidance * (c - u)
            ro_pos = torch.std(c, dim=(1, 2, 3), keepdim=True)
            ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
            x_final = multiplier * x_cfg * (ro_pos / ro_cfg) + (1.0 - multiplier) * x_cfg
            denoised = x - (x - (xs - x_final * sigma / (sigma * sigma + 1.0) ** 0.5))
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        image = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("sampler", ["euler", "euler_karras"])  # (whole and fractional t)
def test_comfy_style_matches_rescale_cfg(pipes, sampler):
    family, ours, ref = pipes
    latents = _latents(9)
    expected = _comfy_reference(ref, PROMPTS, latents, 8.0, 0.7, 5, sampler == "euler_karras")
    _assert_lively(expected, f"{family} RescaleCFG")
    args = dict(height=16, width=24, num_inference_steps=5, guidance_scale=8.0,
                latents=latents, output_type="np", sampler=sampler, prompt_syntax="plain")
    got = ours(PROMPTS, negative_prompt=NEGATIVE, guidance_rescale=0.7,
               guidance_rescale_style="comfy", **args)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} ComfyUI's RescaleCFG")
    diffusers_style = ours(PROMPTS, negative_prompt=NEGATIVE, guidance_rescale=0.7, **args)
    gap = np.abs(diffusers_style - got).max()
    if ref.scheduler.config.prediction_type == "v_prediction":  # the same velocities
        assert gap <= 1e-5, gap
    else:  # noise's stds are not velocities'
        assert gap > 5 * IMAGE_ATOL, "the styles agree on a noise-predicting UNet"


def test_static_plan_and_refusals(pipes):
    _, ours, _ = pipes
    args = dict(height=16, width=24, num_inference_steps=3, sampler="euler", seed=2,
                output_type="np", guidance_scale=8.0)
    ours.runtime = None
    for style in ("diffusers", "comfy"):
        eager = ours("a fox", guidance_rescale=0.5, guidance_rescale_style=style, **args)
        ours.compile(height=16, width=24, num_inference_steps=3, sampler="euler", strict=True,
                     guidance_rescale=0.5, guidance_rescale_style=style)
        try:
            static = ours("a fox", guidance_rescale=0.5, guidance_rescale_style=style, **args)
            assert np.abs(static - eager).max() <= 1e-5, style
            with pytest.raises(SdrtError, match="static plan"):  # (another factor)
                ours("a fox", guidance_rescale=0.4, guidance_rescale_style=style, **args)
        finally:
            ours.runtime = None
    # Without guidance there is nothing to rescale (as diffusers): the plain image.
    plain = ours("a fox", **{**args, "guidance_scale": 1.0})
    assert np.array_equal(ours("a fox", guidance_rescale=0.9, **{**args, "guidance_scale": 1.0}),
                          plain)
    with pytest.raises(SdrtError, match="guidance_rescale must be a number from 0 to 1, got 1.5"):
        ours("a fox", guidance_rescale=1.5, **args)
    with pytest.raises(SdrtError, match="guidance_rescale_style must be one of diffusers, "
                                        "comfy, got 'a1111'"):
        ours("a fox", guidance_rescale=0.5, guidance_rescale_style="a1111", **args)


def test_cli_and_workflow_node(tmp_path, capsys):
    # A RescaleCFG node is --guidance-rescale in ComfyUI's style (velocities' stds).
    import copy
    import json

    from sdrt.engine import comfy
    from sdrt.engine.cli import main
    from test_cli import _run, _warnings
    from test_comfy import DEFAULT, _pixels, _small
    folder = str(tmp_path / "tiny")
    assert main(["make-tiny", folder]) == 0
    graph = _small(DEFAULT)
    graph["20"] = {"class_type": "RescaleCFG", "inputs": {"model": ["4", 0], "multiplier": 0.8}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    options = ["beautiful scenery nature glass bottle", "--negative", "text, watermark", "--seed",
               "4", "--steps", "3", "--guidance", "9", "--sampler", "euler_a_normal",
               "--width", "32", "--height", "24", "--model", folder]
    outs = {}
    for name, args in (("workflow", ["--workflow", str(tmp_path / "wf.json"), "--model",
                                     folder, "--guidance", "9"]),
                       ("comfy", options + ["--guidance-rescale", "0.8",
                                            "--guidance-rescale-style", "comfy"]),
                       ("diffusers", options + ["--guidance-rescale", "0.8"]),
                       ("plain", options)):
        code, _, err = _run(["generate", *args, "-o", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
        outs[name] = _pixels(tmp_path / f"{name}.png").astype(int)
    assert np.array_equal(outs["workflow"], outs["comfy"])
    assert np.abs(outs["comfy"] - outs["plain"]).max() > 2
    assert np.abs(outs["comfy"] - outs["diffusers"]).max() > 2  # (make-tiny: noise)
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    want = pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                seed=4, num_inference_steps=3, guidance_scale=9.0, sampler="euler_a_normal",
                width=32, height=24, guidance_rescale=0.8, guidance_rescale_style="comfy")[0]
    assert np.abs(np.asarray(want, dtype=int) - outs["comfy"]).max() <= 1
    code, _, err = _run(["generate", *options, "--guidance-rescale", "2", "-o",
                         str(tmp_path / "bad.png")], capsys)
    assert code == 2 and "--guidance-rescale must be a number from 0 to 1, got 2" in err, err
    assert not (tmp_path / "bad.png").exists()
    code, _, err = _run(["generate", *options, "--guidance-rescale-style", "comfy", "-o",
                         str(tmp_path / "style.png")], capsys)
    assert code == 0 and _warnings(err) == ["--guidance-rescale-style does nothing here: it "
                                            "applies to --guidance-rescale above 0"], err
    two = copy.deepcopy(graph)
    two["21"] = {"class_type": "RescaleCFG", "inputs": {"model": ["20", 0]}}
    two["3"]["inputs"]["model"] = ["21", 0]
    with pytest.raises(SdrtError, match="workflow node 20 \\(RescaleCFG\\): sdrt runs one "
                                        "RescaleCFG node"):
        comfy.read(two)
    del graph["20"]["inputs"]["multiplier"]  # (its default, 0.7)
    assert comfy.read(graph).guidance_rescale == 0.7
    graph["20"]["inputs"]["multiplier"] = -0.1
    with pytest.raises(SdrtError, match="workflow node 20 \\(RescaleCFG\\): multiplier must be "
                                        "a number from 0 to 1, got -0.1"):
        comfy.read(graph)
