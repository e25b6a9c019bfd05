"""CFG++ samplers (cfgpp_*, ComfyUI's *_cfg_pp, A1111's "DDIM CFG++") in the pipeline: the
unconditional pass runs whatever the guidance scale (1 and below too, the scale as given), its
prediction reaches the sampler, and the picture is diffusers' networks stepped by hand with
CFG++'s rule (ComfyUI's Euler CFG++, A1111's DDIM CFG++ with its scale divided by 12.5). The
ComfyUI samplers' steps themselves are checked against ComfyUI's loops in
test_comfy_samplers.py."""
import numpy as np
import pytest
import torch

from conftest import assert_close_abs, run_eagerly
from sdrt.engine import Pipeline
from sdrt.engine.request import GenerationRequest
from sdrt.engine.samplers import make_schedule

SIZE, STEPS = 32, 4
PROMPT, NEGATIVE = "a red fox in the snow", "blurry, grey"
IMAGE_ATOL = 2e-3  # images in [0, 1]: float32 networks, reordered sums


@pytest.fixture(scope="module")
def pipes(tiny_sd1):
    folder, theirs = tiny_sd1
    return theirs, Pipeline.from_pretrained(folder, device="cpu", dtype="fp32")


def _latents(pipe, seed=3):
    side = SIZE // pipe.vae_scale_factor
    return torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(seed))


def _by_hand(theirs, ours, scale, negative):
    """ComfyUI's euler_cfg_pp over sdrt's schedule with diffusers' text encoder, UNet and VAE:
    x0 the guided prediction, x0u the negative prompt's, x' = x0 + sigma' (x - x0u) / sigma."""
    sched = make_schedule(ours.scheduler_config, "cfgpp_euler", STEPS)
    with torch.no_grad():
        cond, uncond = theirs.encode_prompt(PROMPT, "cpu", 1, True, negative)
        s = sched.sigmas.double()
        x = _latents(ours).double() * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            inp = (x / (s[i] ** 2 + 1) ** 0.5).float()
            eps = theirs.unet(torch.cat([inp, inp]), t,
                              encoder_hidden_states=torch.cat([uncond, cond])).sample.double()
            eps_u, eps_c = eps.chunk(2)
            x0 = x - s[i] * (eps_u + scale * (eps_c - eps_u))
            x0u = x - s[i] * eps_u
            x = x0 if s[i + 1] == 0 else x0 + s[i + 1] * (x - x0u) / s[i]
        image = theirs.vae.decode(x.float() / theirs.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _ours(pipe, sampler, scale, negative=NEGATIVE):
    out = np.full((1, SIZE, SIZE, 3), np.nan, dtype=np.float32)
    out[:] = pipe(PROMPT, negative_prompt=negative, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, guidance_scale=scale, sampler=sampler,
                  latents=_latents(pipe), output_type="np", prompt_syntax="plain")
    return out


@pytest.mark.parametrize("scale", [1.0, 0.6, 4.0])
def test_image_is_diffusers_networks_stepped_by_hand(pipes, scale):
    # At 1 and below too: the unconditional pass runs and the scale is kept as given.
    theirs, ours = pipes
    assert_close_abs(_ours(ours, "cfgpp_euler", scale), _by_hand(theirs, ours, scale, NEGATIVE),
                     IMAGE_ATOL, f"cfgpp_euler at scale {scale}")


def _ddim_by_hand(theirs, ours, scale):
    """A1111's ddim_cfgpp (eta 0) over sdrt's DDIM schedule with diffusers' networks: the
    noise guided at scale / 12.5, x0 from it, renoised along the unconditional noise."""
    sched = make_schedule(ours.scheduler_config, "cfgpp_ddim", STEPS)
    with torch.no_grad():
        cond, uncond = theirs.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        x = _latents(ours).double()
        for i, t in enumerate(sched.timesteps):
            eps = theirs.unet(torch.cat([x, x]).float(), t,
                              encoder_hidden_states=torch.cat([uncond, cond])).sample.double()
            eps_u, eps_c = eps.chunk(2)
            e_t = eps_u + scale / 12.5 * (eps_c - eps_u)
            a, a_prev = sched.alphas[i].double(), sched.alphas_prev[i].double()
            x0 = (x - (1 - a).sqrt() * e_t) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_u
        image = theirs.vae.decode(x.float() / theirs.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("scale", [7.0, 12.5])
def test_a1111_ddim_cfg_pp_is_diffusers_networks_stepped_by_hand(pipes, scale):
    theirs, ours = pipes
    assert_close_abs(_ours(ours, "cfgpp_ddim", scale), _ddim_by_hand(theirs, ours, scale),
                     IMAGE_ATOL, f"cfgpp_ddim at scale {scale}")
    from sdrt.engine.infotext import sampler_id
    assert sampler_id("DDIM CFG++") == sampler_id("ddim_cfgpp") == "cfgpp_ddim"


def test_negative_prompt_counts_at_scale_1(pipes):
    # At guidance 1 a plain sampler runs no unconditional pass (the negative prompt is
    # unused); a CFG++ one steps along it.
    _, ours = pipes
    plain = [_ours(ours, "euler", 1.0, negative) for negative in (NEGATIVE, "a cat")]
    cfg_pp = [_ours(ours, "cfgpp_euler", 1.0, negative) for negative in (NEGATIVE, "a cat")]
    assert np.array_equal(plain[0], plain[1])
    assert np.abs(cfg_pp[0] - cfg_pp[1]).max() > 1e-3


def test_request_runs_guidance_and_keeps_the_scale():
    request = GenerationRequest(prompt=["a", "b"], sampler="cfgpp_res_multistep_a_karras",
                                guidance_scale=(0.5, 1.0), num_images_per_prompt=2).check()
    assert request.guidance and request.cfg_pp
    assert request.row_scales() == [0.5, 0.5, 1.0, 1.0]
    plain = GenerationRequest(prompt=["a", "b"], sampler="euler",
                              guidance_scale=(0.5, 2.0)).check()
    assert plain.guidance and plain.row_scales() == [1.0, 2.0]
    assert not GenerationRequest(prompt="a", sampler="euler_cfgpp_x").cfg_pp


@pytest.mark.parametrize("sampler", ["cfgpp_euler_a", "cfgpp_dpmpp_2m_karras", "cfgpp_ddim"])
def test_static_plan_equals_eager(pipes, sampler):
    # The plan, compiled with guidance, serves a CFG++ request at scale 1.
    _, ours = pipes
    ours.compile(SIZE, SIZE, num_inference_steps=STEPS, sampler=sampler)
    try:
        kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, guidance_scale=1.0, sampler=sampler, seed=5,
                  output_type="np")
        assert_close_abs(ours(**kw), run_eagerly(ours, **kw), 1e-5, sampler)
    finally:
        ours.runtime = None

