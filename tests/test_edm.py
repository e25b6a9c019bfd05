"""EDM models (Playground v2.5, CosXL-style fine-tunes): the samplers against diffusers'
EDMEulerScheduler and EDMDPMSolverMultistepScheduler call by call (the same deterministic
stand-in model and tolerance as tests/test_samplers.py), and the VAE's per-channel
latents_mean/latents_std against diffusers' AutoencoderKL scaling."""
import math
import warnings

import pytest
import torch

from sdrt.engine.errors import SdrtError
from sdrt.engine.samplers import SchedulerConfig, default_sampler, make_schedule, sample
from test_samplers import LinearModel, _assert_close, _latents

PLAYGROUND = {"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
              "euler_at_final": False, "final_sigmas_type": "zero", "lower_order_final": True,
              "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0,
              "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002, "solver_order": 2,
              "solver_type": "midpoint", "thresholding": False}
CONFIGS = {
    "playground": PLAYGROUND,
    # v-prediction EDM (CosXL's kind), unit sigma_data, a wider range.
    "v_edm": {"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction",
              "sigma_data": 1.0, "sigma_min": 0.001, "sigma_max": 120.0},
    # log-spaced sigmas, landing on sigma_min, another rho.
    "exponential": {**PLAYGROUND, "sigma_schedule": "exponential",
                    "final_sigmas_type": "sigma_min", "rho": 5.0},
}
_CLASSES = {"euler": ("EDMEulerScheduler", {}),
            "dpmpp_2m": ("EDMDPMSolverMultistepScheduler", {}),
            "dpmpp_2m_karras": ("EDMDPMSolverMultistepScheduler", {"sigma_schedule": "karras"})}


def _theirs(sampler, cfg, steps, noise, x0=None, strength=1.0):
    """diffusers' SDXL pipeline loop over an EDM scheduler: (model, final latents, init sigma)."""
    diffusers = pytest.importorskip("diffusers")
    name, extra = _CLASSES[sampler]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = getattr(diffusers, name).from_config(cfg, **extra)
    sch.set_timesteps(steps)
    timesteps = sch.timesteps
    if x0 is None:
        x = noise * sch.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start:]
        sch.set_begin_index(t_start)
        x = sch.add_noise(x0, noise, timesteps[:1])
    model = LinearModel()
    for t in timesteps:
        x = sch.step(model(sch.scale_model_input(x, t), t), t, x).prev_sample
    return model, x, float(sch.init_noise_sigma)


def _ours(sampler, cfg, steps, noise, x0=None, strength=1.0):
    sched = make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps, strength)
    x = sched.noise_latents(noise) if x0 is None else sched.noise_image(x0, noise)
    model = LinearModel()
    return model, sample(sampler, model, x, sched), sched


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (4, 1.0), (14, 1.0), (25, 1.0),
                                            (20, 0.6), (10, 0.35)])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("sampler", list(_CLASSES))
def test_matches_diffusers_edm_schedulers(sampler, config, steps, strength):
    cfg = CONFIGS[config]
    noise = _latents(1)
    x0 = None if strength == 1.0 else 0.8 * _latents(2)
    ref_model, ref_x, ref_sigma = _theirs(sampler, cfg, steps, noise, x0, strength)
    our_model, our_x, sched = _ours(sampler, cfg, steps, noise, x0, strength)
    ref_t = torch.stack([t for _, t in ref_model.calls])
    our_t = torch.stack([t for _, t in our_model.calls])
    torch.testing.assert_close(our_t, ref_t, rtol=1e-6, atol=1e-6)
    assert sched.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6)
    for i, ((ours, _), (theirs, t)) in enumerate(zip(our_model.calls, ref_model.calls)):
        _assert_close(ours, theirs, f"model input of call {i} (t={t.item():.4f})")
    _assert_close(our_x, ref_x, "final latents")
    assert ref_x.abs().max() > 0.05  # the comparison is of something


def test_euler_ancestral_on_edm_is_k_diffusions_step():
    """No diffusers class runs ancestral sampling on an EDM model; the step is k-diffusion's
    (Euler down to sigma_down, then sigma_up of fresh noise) over EDM's denoiser, checked
    against that formula in float64."""
    cfg = SchedulerConfig.from_dict(PLAYGROUND)
    sched = make_schedule(cfg, "euler_a", 6)
    noise = torch.randn(6, 1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x_start = sched.noise_latents(_latents(1))
    ours = sample("euler_a", LinearModel(), x_start, sched, noise=noise)
    model, x, sd = LinearModel(), x_start.double(), 0.5
    sigmas = sched.sigmas.double()
    for i, t in enumerate(sched.timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        out = model((x / (s**2 + sd**2) ** 0.5).float(), t).double()
        x0 = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2) ** 0.5 * out
        up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        down = (s_next**2 - up**2) ** 0.5
        x = x + (x - x0) / s * (down - s) + noise[i].double() * up
    _assert_close(ours, x.float(), "euler_a on EDM")
    assert sched.timesteps[0] == pytest.approx(0.25 * math.log(80.0), rel=1e-6)


def test_default_samplers_of_edm_classes():
    assert default_sampler(SchedulerConfig.from_dict(PLAYGROUND)) == "dpmpp_2m"
    assert default_sampler(SchedulerConfig.from_dict(CONFIGS["v_edm"])) == "euler"


@pytest.mark.parametrize("sampler,kw,match", [
    ("ddim", {}, "sampler ddim does not run an EDM model"),
    ("lcm", {}, "sampler lcm does not run an EDM model"),
    ("euler", {"denoising_end": 0.8}, "cannot split its schedule"),
    ("euler", {"cfg": {"sigma_min": 90.0}}, r"sigma_min \(90.0\) must be below sigma_max"),
    ("euler", {"cfg": {"sigma_data": 0}}, "sigma_data must be positive"),
    ("euler", {"cfg": {"prediction_type": "sample"}}, "predicts epsilon or v_prediction"),
    ("euler", {"cfg": {"sigma_schedule": "linear"}}, "sigma_schedule='linear' is not one of"),
])
def test_edm_refusals(sampler, kw, match):
    with pytest.raises(SdrtError, match=match):
        cfg = SchedulerConfig.from_dict({**PLAYGROUND, **kw.pop("cfg", {})})
        make_schedule(cfg, sampler, 10, **kw)


# -- the VAE's per-channel latent statistics ---------------------------------------------------

MEAN, STD = [-1.6574, 1.886, -1.383, 2.5155], [8.4927, 5.9022, 6.5498, 5.2299]  # Playground's


def test_latents_mean_and_std_scale_as_diffusers():
    """diffusers' SDXL pipelines: encode (z - mean) * scaling_factor / std; decode
    latents * std / scaling_factor + mean."""
    from sdrt.engine.stages import scale_latents
    from sdrt.engine.vae import AutoencoderKL, VAEConfig
    cfg = VAEConfig.from_dict({"block_out_channels": [8, 8], "norm_num_groups": 4,
                               "down_block_types": ["DownEncoderBlock2D"] * 2,
                               "up_block_types": ["UpDecoderBlock2D"] * 2,
                               "layers_per_block": 1, "scaling_factor": 0.5,
                               "latents_mean": MEAN, "latents_std": STD})
    vae = AutoencoderKL(cfg)
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0)) * 4
    mean, std = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    scaled = scale_latents(vae, z)
    torch.testing.assert_close(scaled, (z - mean) * 0.5 / std, rtol=1e-6, atol=1e-6)
    seen = []
    vae.decode = lambda latents: seen.append(latents) or latents
    from sdrt.engine.stages import vae_decode
    vae_decode(vae, scaled)
    torch.testing.assert_close(seen[0], scaled * std / 0.5 + mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(seen[0], z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra,match", [
    ({"latents_mean": MEAN}, "latents_mean must be given with latents_std"),
    ({"latents_std": STD}, "latents_std must be given with latents_mean"),
    ({"latents_mean": MEAN[:3], "latents_std": STD}, "latents_mean must be a list of 4 numbers"),
    ({"latents_mean": MEAN, "latents_std": [1, 0, 1, 1]}, "latents_std must be a positive"),
    ({"latents_mean": MEAN, "latents_std": STD, "shift_factor": 0.1},
     "shift_factor must be null with latents_mean"),
])
def test_latents_statistics_refusals(extra, match):
    from sdrt.engine.vae import VAEConfig
    with pytest.raises(SdrtError, match=match):
        VAEConfig.from_dict(extra)


# -- a Playground v2.5-like model, end to end against diffusers --------------------------------

H, W, STEPS = 32, 48, 5
PROMPT, NEGATIVE = "a red fox in the snow, 35mm photo", "blurry, low quality"


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    """(sdrt pipeline, diffusers StableDiffusionXLPipeline) of a tiny SDXL base saved as
    Playground v2.5 ships: the EDM DPM-Solver config and a VAE with latents_mean/std."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from sdrt.engine import Pipeline
    from sdxl_models import VAE, build_diffusers_pipeline, randomize
    folder = str(tmp_path_factory.mktemp("playground") / "model")
    ref = build_diffusers_pipeline("base", f"{folder}-tokenizer", seed=3)
    vae = AutoencoderKL(**{**VAE, "scaling_factor": 0.5}, latents_mean=MEAN, latents_std=STD)
    randomize(vae, torch.Generator().manual_seed(4))
    ref.register_modules(vae=vae.eval(),
                         scheduler=EDMDPMSolverMultistepScheduler.from_config(PLAYGROUND))
    ref.save_pretrained(folder, safe_serialization=True)
    ref = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(folder, device="cpu"), ref


def _reference(ref, sampler, **kwargs):
    import diffusers
    name, extra = _CLASSES[sampler]
    ref.scheduler = getattr(diffusers, name).from_config(PLAYGROUND, **extra)
    with torch.no_grad():
        return ref(**kwargs).images


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_playground_txt2img_matches_diffusers(playground, sampler):
    from conftest import assert_close_abs
    ours, ref = playground
    assert ours.scheduler_config.edm and ours.vae.config.latents_mean == tuple(MEAN)
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(7))
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W,
              num_inference_steps=STEPS, guidance_scale=3.0, latents=latents, output_type="np")
    expected = _reference(ref, sampler, **kw)
    assert expected.std() > 0.01
    got = ours(sampler=sampler if sampler != "dpmpp_2m" else None, prompt_syntax="plain", **kw)
    assert_close_abs(got, expected, 2e-3, f"Playground-like txt2img, {sampler}")


def test_playground_img2img_matches_diffusers(playground):
    import numpy as np
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from conftest import assert_close_abs
    ours, ref = playground
    ref_i2i = StableDiffusionXLImg2ImgPipeline(**ref.components)
    ref_i2i.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8))
    kw = dict(prompt=PROMPT, image=init, strength=0.6, num_inference_steps=STEPS,
              guidance_scale=3.0, output_type="np")
    expected = _reference(ref_i2i, "dpmpp_2m", generator=torch.Generator().manual_seed(2), **kw)
    got = ours(seed=2, prompt_syntax="plain", **kw)
    assert_close_abs(got, expected, 2e-3, "Playground-like img2img")


def test_playground_refuses_samplers_it_cannot_run(playground):
    ours, _ = playground
    with pytest.raises(SdrtError, match="sampler ddim does not run an EDM model"):
        ours(PROMPT, height=H, width=W, num_inference_steps=2, sampler="ddim", seed=1)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_playground_static_plan_equals_eager(playground, sampler):
    from conftest import run_eagerly
    ours, _ = playground
    ours.runtime = None
    try:
        plan = ours.compile(height=H, width=W, num_inference_steps=STEPS, sampler=sampler)
        kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W,
                  num_inference_steps=STEPS, guidance_scale=3.0, sampler=sampler, seed=3,
                  output_type="np")
        static = ours(**kw)
        assert list(ours.runtime.plans.values()) == [plan]
        eager = run_eagerly(ours, **kw)
        assert eager.std() > 0.01
        assert abs(static - eager).max() <= 1e-5
    finally:
        ours.runtime = None


def test_single_files_marked_edm_get_edm_configs():
    """ComfyUI's markers: edm_mean/edm_std (Playground v2.5: its VAE statistics and EDM
    scheduler, as the diffusers folder's configs), edm_vpred.sigma_max/min (EDM
    v-prediction); an unmarked SDXL file keeps SDXL's."""
    from sdrt.engine.configs import model_config
    from sdrt.engine.loading import single_file_configs
    marked = {"edm_mean": lambda: torch.tensor(MEAN).view(1, 4, 1, 1),
              "edm_std": lambda: torch.tensor(STD).view(1, 4, 1, 1)}
    configs = single_file_configs("sdxl", None, marked)
    playground = model_config("playground-v2.5")
    assert configs["scheduler"] == playground["scheduler"]
    assert configs["vae"] == {**playground["vae"], "latents_mean": pytest.approx(MEAN),
                              "latents_std": pytest.approx(STD)}
    assert configs["unet"] == playground["unet"] == model_config("sdxl")["unet"]
    cosxl = single_file_configs("sdxl", None, {"edm_vpred.sigma_max": lambda: torch.tensor(120.0),
                                               "edm_vpred.sigma_min": lambda: torch.tensor(0.001)})
    cfg = SchedulerConfig.from_dict(cosxl["scheduler"])
    assert (cfg.edm, cfg.prediction_type, cfg.sigma_data, cfg.sigma_max) == \
        (True, "v_prediction", 1.0, 120.0)
    assert cfg.sigma_min == pytest.approx(0.001)
    assert cosxl["vae"] == model_config("sdxl")["vae"]
    plain = single_file_configs("sdxl", None, {})
    assert plain["scheduler"] == model_config("sdxl")["scheduler"]
    assert single_file_configs("sdxl", "v_prediction", marked)["scheduler"]["prediction_type"] \
        == "v_prediction"


def test_single_files_marked_v_pred_get_v_prediction():
    """ComfyUI's and A1111's v_pred marker (a v-prediction fine-tune of SDXL, NoobAI-XL
    V-Pred's kind) and ztsnr beside it (zero terminal SNR: the rescaled betas, trailing
    timesteps so that the first step starts at the last level, pure noise)."""
    from sdrt.engine.configs import model_config
    from sdrt.engine.loading import single_file_configs
    marker = lambda: torch.zeros(0)
    sdxl = model_config("sdxl")["scheduler"]
    v = single_file_configs("sdxl", None, {"v_pred": marker})["scheduler"]
    assert v == {**sdxl, "prediction_type": "v_prediction"}
    z = single_file_configs("sdxl", None, {"v_pred": marker, "ztsnr": marker})["scheduler"]
    assert z == {**sdxl, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                 "timestep_spacing": "trailing"}
    cfg = SchedulerConfig.from_dict(z)
    sched = make_schedule(cfg, "euler", 8)
    assert int(sched.timesteps[0]) == 999 and float(sched.sigmas[0]) == pytest.approx(4096.0)
    # ztsnr alone says nothing (ComfyUI reads it beside v_pred); an explicit epsilon wins.
    assert single_file_configs("sdxl", None, {"ztsnr": marker})["scheduler"] == sdxl
    assert single_file_configs("sdxl", "epsilon", {"v_pred": marker, "ztsnr": marker})[
        "scheduler"] == {**sdxl, "prediction_type": "epsilon"}


def test_playground_config_builds_and_runs_the_edm_path():
    """The real config (``playground-v2.5``) at toy widths: loads, and its schedule is EDM's."""
    from sdrt.engine.configs import model_config
    from sdrt.engine.vae import VAEConfig
    cfg = model_config("playground-v2.5")
    vae = VAEConfig.from_dict(cfg["vae"])
    assert vae.latents_mean == tuple(MEAN) and vae.latents_std == tuple(STD)
    sched = make_schedule(SchedulerConfig.from_dict(cfg["scheduler"]), "dpmpp_2m", 50)
    assert sched.sigma_data == 0.5 and float(sched.sigmas[0]) == pytest.approx(80.0)
    assert default_sampler(SchedulerConfig.from_dict(cfg["scheduler"])) == "dpmpp_2m"


def test_playground_exported_to_onnx_draws_the_same_image(playground, tmp_path):
    """sdrt's ONNX runtime on the export: float timesteps (0.25 ln sigma) reach the UNet and
    the VAE's latent statistics travel in the exported config."""
    pytest.importorskip("onnxruntime")
    from conftest import assert_close_abs
    from sdrt.engine import Pipeline
    from sdrt.export import export_onnx, onnx_components
    from diffusers import EDMDPMSolverMultistepScheduler
    ours, ref = playground
    folder = str(tmp_path / "model")
    ref.scheduler = EDMDPMSolverMultistepScheduler.from_config(PLAYGROUND)  # as shipped
    ref.save_pretrained(folder, safe_serialization=True)
    export_onnx(folder, str(tmp_path / "export"), height=H, width=W, batch=1)
    onnx_pipe = Pipeline(onnx_components(str(tmp_path / "export"), folder, "cpu"),
                         torch.device("cpu"), torch.float32)
    assert onnx_pipe.scheduler_config.edm and onnx_pipe.vae.config.latents_mean == tuple(MEAN)
    kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=3, guidance_scale=3.0,
              seed=5, sampler="dpmpp_2m", output_type="np")
    expected = ours(**kw)
    assert expected.std() > 0.01
    assert_close_abs(onnx_pipe(**kw), expected, 2e-3, "Playground-like ONNX image")
