"""Perturbed-attention guidance (``pag_scale``) against diffusers' StableDiffusionPAGPipeline
(its default "mid" layers) on the same folder, latents and sampler, with and without
classifier-free guidance; the static plan; what it is refused beside."""
import numpy as np
import pytest
import torch

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from test_controlnet import setup  # noqa: F401  (the fixture)
from test_ip_adapter import sd1 as ip_sd1  # noqa: F401  (the fixture)
from test_pipeline import IMAGE_ATOL, PROMPTS, _assert_lively, _diffusers_scheduler


@pytest.fixture(scope="module")
def pipes(tiny_model):
    from diffusers import StableDiffusionPAGPipeline
    family, folder, ref = tiny_model
    if not hasattr(ref, "original_scheduler_config"):
        ref.original_scheduler_config = dict(ref.scheduler.config)
    pag = StableDiffusionPAGPipeline(**ref.components, pag_applied_layers="mid")
    pag.set_progress_bar_config(disable=True)
    pag.original_scheduler_config = ref.original_scheduler_config
    return family, Pipeline.from_pretrained(folder, device="cpu"), pag


@pytest.mark.parametrize("sampler,guidance", [("euler", 7.5), ("ddim", 1.0), ("dpmpp_2m", 5.0)])
def test_pag_matches_diffusers(pipes, sampler, guidance):
    family, ours, ref = pipes
    ref.scheduler = _diffusers_scheduler(ref, sampler)
    h, w = 16, 24
    latents = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(7))
    args = dict(height=h, width=w, num_inference_steps=5, guidance_scale=guidance,
                latents=latents, output_type="np")
    negative = "blurry, low quality" if guidance > 1 else None
    expected = ref(PROMPTS, negative_prompt=[negative] * 2 if negative else None,
                   pag_scale=8.0, **args).images
    _assert_lively(expected, f"{family}/{sampler} PAG")
    got = ours(PROMPTS, negative_prompt=negative, sampler=sampler, pag_scale=8.0, **args)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} PAG with {sampler}, cfg {guidance}")
    plain = ours(PROMPTS, negative_prompt=negative, sampler=sampler, **args)
    assert np.abs(plain - got).max() > 20 * IMAGE_ATOL, "PAG changed nothing"


def test_static_plan_and_refusals(pipes):
    _, ours, _ = pipes
    args = dict(height=16, width=24, num_inference_steps=3, sampler="euler", seed=2,
                output_type="np")
    ours.runtime = None
    eager = ours("a fox", pag_scale=3.0, **args)
    ours.compile(height=16, width=24, num_inference_steps=3, sampler="euler", strict=True,
                 pag_scale=3.0)
    try:
        assert np.abs(ours("a fox", pag_scale=3.0, **args) - eager).max() <= 1e-5
        with pytest.raises(SdrtError, match="static plan"):  # (another scale: another plan)
            ours("a fox", pag_scale=2.0, **args)
    finally:
        ours.runtime = None
    with pytest.raises(SdrtError, match="pag_scale cannot be combined with A1111's AND"):
        ours("a fox AND a cat", pag_scale=3.0, **args)
    with pytest.raises(SdrtError, match="pag_scale must be a number from 0 to 100, got 101"):
        ours("a fox", pag_scale=101, **args)


def test_cli_and_workflow_node(tmp_path, capsys):
    import copy
    import json

    from sdrt.engine import comfy
    from sdrt.engine.cli import main
    from test_cli import _run
    from test_comfy import DEFAULT, _pixels, _small
    folder = str(tmp_path / "tiny")
    assert main(["make-tiny", folder]) == 0
    graph = _small(DEFAULT)  # (at 128 x 96: the mid block's attention sees 4 x 3 pixels)
    graph["5"]["inputs"].update(width=128, height=96)
    graph["20"] = {"class_type": "PerturbedAttentionGuidance",
                   "inputs": {"model": ["4", 0], "scale": 4.0}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    options = ["beautiful scenery nature glass bottle", "--negative", "text, watermark", "--seed",
               "4", "--steps", "3", "--guidance", "6.5", "--sampler", "euler_a_normal",
               "--width", "128", "--height", "96", "--model", folder]
    outs = {}
    for name, args in (("workflow", ["--workflow", str(tmp_path / "wf.json"), "--model",
                                     folder]),
                       ("options", options + ["--pag-scale", "4"]), ("plain", options)):
        code, _, err = _run(["generate", *args, "-o", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
        outs[name] = _pixels(tmp_path / f"{name}.png").astype(int)
    assert np.array_equal(outs["workflow"], outs["options"])
    assert np.abs(outs["options"] - outs["plain"]).max() > 2
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    want = pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                seed=4, num_inference_steps=3, guidance_scale=6.5, sampler="euler_a_normal",
                width=128, height=96, pag_scale=4.0)[0]
    assert np.abs(np.asarray(want, dtype=int) - outs["options"]).max() <= 1
    two = copy.deepcopy(graph)
    two["21"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["20", 0]}}
    two["3"]["inputs"]["model"] = ["21", 0]
    with pytest.raises(SdrtError, match="workflow node 20 \\(PerturbedAttentionGuidance\\): "
                                        "sdrt runs one PerturbedAttentionGuidance node"):
        comfy.read(two)
    assert comfy.read(graph).pag_scale == 4.0
    del graph["20"]["inputs"]["scale"]  # (its default, 3)
    assert comfy.read(graph).pag_scale == 3.0


def test_sdxl_pag_matches_diffusers(sdxl_base_folder):
    # SDXL's mid block holds several transformer layers: every self-attention of them.
    from diffusers import StableDiffusionXLPAGPipeline

    from test_sdxl import H, NEGATIVE, PROMPTS, W, _latents, _ours, _scheduler
    folder, ref = sdxl_base_folder
    pag = StableDiffusionXLPAGPipeline(**ref.components, pag_applied_layers="mid")
    pag.set_progress_bar_config(disable=True)
    pag.scheduler = _scheduler(ref, "euler")
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=5.0,
              latents=_latents(2, 3), output_type="np")
    with torch.no_grad():
        expected = pag(PROMPTS, negative_prompt=[NEGATIVE] * 2, pag_scale=6.0, **kw).images
    ours = _ours(folder)
    got = ours(PROMPTS, negative_prompt=NEGATIVE, sampler="euler", prompt_syntax="plain",
               pag_scale=6.0, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "SDXL PAG")
    plain = ours(PROMPTS, negative_prompt=NEGATIVE, sampler="euler", prompt_syntax="plain", **kw)
    assert np.abs(plain - got).max() > 20 * IMAGE_ATOL, "PAG changed nothing"


def test_pag_with_a_controlnet_matches_diffusers(setup):
    # The ControlNet runs on every row of the call, the perturbed rows with the conditional
    # rows' image and scale (diffusers' StableDiffusionControlNetPAGPipeline).
    from test_controlnet import H, W, _hint, _latents, _reference
    family, ours, ref, nets, _ = setup
    pipe = _reference(ref, [nets["a"]], "euler", "StableDiffusionControlNetPAGPipeline")
    pipe.set_pag_applied_layers("mid")
    kw = dict(height=H, width=W, num_inference_steps=5, guidance_scale=6.0,
              latents=_latents(7), output_type="np", controlnet_conditioning_scale=0.9)
    expected = pipe(PROMPTS, negative_prompt=["blurry"] * 2, image=_hint(5), pag_scale=8.0,
                    **kw).images
    got = ours(PROMPTS, negative_prompt="blurry", control_image=_hint(5), controlnet="a",
               sampler="euler", pag_scale=8.0, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} PAG with a ControlNet")
    with pytest.raises(SdrtError, match="pag_scale cannot be combined with guess_mode yet"):
        ours(PROMPTS, control_image=_hint(5), controlnet="a", sampler="euler", pag_scale=8.0,
             guess_mode=True, **kw)


@pytest.mark.parametrize("kind,guidance", [("plain", 6.0), ("plus", 6.0), ("plain", 1.0)])
def test_pag_with_an_ip_adapter_matches_diffusers(ip_sd1, kind, guidance):
    # The perturbed rows take the conditional rows' image tokens, as diffusers' PAG
    # pipelines give them the positive image embeddings.
    from diffusers import StableDiffusionPAGPipeline

    from test_ip_adapter import KW as IP_KW, PROMPT, _latents as ip_latents, _picture
    ours, ref, root = ip_sd1
    pipe = StableDiffusionPAGPipeline(**{**ref.components, "unet": type(ref.unet).from_config(
        ref.unet.config)}, pag_applied_layers="mid")
    pipe.unet.load_state_dict(ref.unet.state_dict())
    pipe.unet.eval()
    pipe.scheduler = _diffusers_scheduler(ref, "euler")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(root), subfolder="", weight_name=f"{kind}.safetensors",
                         image_encoder_folder="image_encoder", low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(0.8)
    kw = {**IP_KW, "guidance_scale": guidance}
    picture, latents = _picture(7, 40, 52), ip_latents(8, batch=1)
    expected = pipe(PROMPT, ip_adapter_image=picture, latents=latents, pag_scale=5.0,
                    **kw).images
    _assert_lively(expected, f"PAG with IP-Adapter {kind}")
    got = ours(PROMPT, ip_adapter_image=picture, ip_adapter=kind, ip_adapter_scale=0.8,
               sampler="euler", latents=latents, pag_scale=5.0, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"PAG with IP-Adapter {kind}, cfg {guidance}")
    without = ours(PROMPT, ip_adapter_image=picture, ip_adapter=kind, ip_adapter_scale=0.8,
                   sampler="euler", latents=latents, **kw)
    assert np.abs(without - got).max() > 5 * IMAGE_ATOL, "PAG changed nothing"
