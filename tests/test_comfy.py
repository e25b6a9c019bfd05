"""ComfyUI workflows (API format) read into ``sdrt generate``'s settings: ComfyUI's own default
graph and its usual variations (LoRAs, CLIPSetLastLayer, image to image), the refusals of what
sdrt would not run as ComfyUI does, and the CLI end to end (a .json and a ComfyUI PNG)."""
import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdrt.engine import comfy
from sdrt.engine.errors import SdrtError
from sdrt.engine.hires import Hires
from test_cli import _run, tiny_dir  # noqa: F401  (tiny_dir: the fixture)

# ComfyUI's default text-to-image workflow as "Save (API Format)" writes it.
DEFAULT = {
    "3": {"class_type": "KSampler",
          "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
                     "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
                     "scheduler": "normal", "seed": 8566257, "steps": 20}},
    "4": {"class_type": "CheckpointLoaderSimple",
          "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage",
          "inputs": {"batch_size": 1, "height": 512, "width": 512}},
    "6": {"class_type": "CLIPTextEncode",
          "inputs": {"clip": ["4", 1], "text": "beautiful scenery nature glass bottle"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "text, watermark"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def _with_loras():
    """Two LoraLoaders chained after the checkpoint and CLIPSetLastLayer -2 before the
    encoders, dpmpp_2m on karras steps."""
    g = copy.deepcopy(DEFAULT)
    g["10"] = {"class_type": "LoraLoader",
               "inputs": {"lora_name": "styles/ink.safetensors", "strength_model": 0.8,
                          "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}}
    g["11"] = {"class_type": "LoraLoader",
               "inputs": {"lora_name": "detail.safetensors", "strength_model": 0.5,
                          "strength_clip": 0.5, "model": ["10", 0], "clip": ["10", 1]}}
    g["12"] = {"class_type": "CLIPSetLastLayer",
               "inputs": {"stop_at_clip_layer": -2, "clip": ["11", 1]}}
    g["3"]["inputs"].update(model=["11", 0], sampler_name="dpmpp_2m", scheduler="karras")
    g["6"]["inputs"]["clip"] = g["7"]["inputs"]["clip"] = ["12", 0]
    return g


def _img2img():
    g = copy.deepcopy(DEFAULT)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    g["3"]["inputs"].update(latent_image=["11", 0], denoise=0.6)
    del g["5"]
    return g


def test_default_workflow():
    flow = comfy.read(DEFAULT)
    assert flow == comfy.Workflow(
        prompt="beautiful scenery nature glass bottle", negative="text, watermark",
        seed=8566257, steps=20, guidance=8.0, sampler="euler_normal", width=512, height=512,
        batch=1,
        checkpoint="v1-5-pruned-emaonly.safetensors", output="9", filename_prefix="ComfyUI",
        sampler_node="3")


def test_loras_and_clip_skip():
    flow = comfy.read(_with_loras())
    assert flow.loras == [("styles/ink.safetensors", 0.8), ("detail.safetensors", 0.5)]
    assert (flow.clip_skip, flow.sampler) == (1, "dpmpp_2m_karras")


def test_lora_strengths_for_the_model_and_the_clip():
    # LoraLoader's two strengths: one scale where they agree, else (UNet's, text encoders');
    # LoraLoaderModelOnly patches the UNet alone.
    g = _with_loras()
    g["10"]["inputs"]["strength_clip"] = 0.3
    g["13"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "lora_name": "hyper.safetensors", "strength_model": 0.9, "model": ["11", 0]}}
    g["3"]["inputs"]["model"] = ["13", 0]
    assert comfy.read(g).loras == [("styles/ink.safetensors", (0.8, 0.3)),
                                   ("detail.safetensors", 0.5), ("hyper.safetensors", (0.9, 0.0))]


def test_a_lora_loader_whose_clip_no_prompt_reads_patches_the_unet_alone():
    # ComfyUI then encodes the prompts without it: sdrt's (UNet's, 0) scale.
    g = _with_loras()
    g["12"]["inputs"]["clip"] = ["10", 1]  # (the second LoraLoader's CLIP output unread)
    assert comfy.read(g).loras == [("styles/ink.safetensors", 0.8),
                                   ("detail.safetensors", (0.5, 0.0))]
    g["12"]["inputs"]["clip"] = ["4", 1]
    assert comfy.read(g).loras == [("styles/ink.safetensors", (0.8, 0.0)),
                                   ("detail.safetensors", (0.5, 0.0))]
    g["7"]["inputs"]["clip"] = ["11", 1]  # one prompt with the LoRAs, the other without
    with pytest.raises(SdrtError, match="must encode with the LoraLoaders"):
        comfy.read(g)


def test_previews_beside_the_saved_image_are_not_drawn():
    g = copy.deepcopy(DEFAULT)
    g["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    assert comfy.read(g).output == "9"
    g["21"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}
    with pytest.raises(SdrtError, match="must have one SaveImage or SaveImageWebsocket node .*"
                                        "got 2 and 1"):
        comfy.read(g)
    del g["9"], g["21"]
    assert comfy.read(g).output == "20"  # (a preview alone is the output)


def test_image_to_image():
    flow = comfy.read(_img2img())
    assert (flow.init_image, flow.strength, flow.width, flow.height) == \
        ("photo.png", 0.6, None, None)


@pytest.mark.parametrize("sampler,scheduler,ours", [
    ("euler_ancestral", "normal", "euler_a_normal"),
    ("ddim", "ddim_uniform", "euler_ddim_uniform"),
    ("lcm", "sgm_uniform", "lcm"), ("dpmpp_2m", "simple", "dpmpp_2m_simple"),
    ("dpmpp_2m_sde_gpu", "karras", "dpmpp_2m_sde_karras"),
    ("dpm_2_ancestral", "normal", "dpm2_a_normal"),
    ("heun", "karras", "heun_karras"), ("euler", "karras", "euler_karras"),
    ("dpm_2", "simple", "dpm2_simple"), ("uni_pc_bh2", "karras", "uni_pc_bh2_karras"),
    ("euler", "beta", "euler_comfy_beta"), ("dpmpp_2s_ancestral", "karras", "dpmpp_2s_a_karras"),
    ("dpmpp_2m", "kl_optimal", "dpmpp_2m_comfy_kl_optimal"),
    ("lms", "karras", "lms_karras"), ("euler_ancestral", "karras", "euler_a_karras"),
    ("dpmpp_3m_sde_gpu", "karras", "dpmpp_3m_sde_karras")])
def test_sampler_pairs(sampler, scheduler, ours):
    g = copy.deepcopy(DEFAULT)
    g["3"]["inputs"].update(sampler_name=sampler, scheduler=scheduler)
    assert comfy.read(g).sampler == ours


def _edit(edit):
    g = copy.deepcopy(DEFAULT)
    edit(g)
    return g


def with_controlnets(graph=DEFAULT, units=(("control_v11p_sd15_canny.safetensors", "edges.png",
                                             0.7, 0.1, 0.8),)):
    """``graph`` with a ControlNetApplyAdvanced node per unit (name, image, strength, start,
    end) chained between the prompts and the KSampler, the first nearest the prompts."""
    g = copy.deepcopy(graph)
    positive, negative = g["3"]["inputs"]["positive"], g["3"]["inputs"]["negative"]
    for i, (name, image, strength, start, end) in enumerate(units):
        loader, picture, apply = (str(30 + 3 * i + k) for k in range(3))
        g[loader] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}}
        g[picture] = {"class_type": "LoadImage", "inputs": {"image": image}}
        g[apply] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": positive, "negative": negative, "control_net": [loader, 0],
            "image": [picture, 0], "strength": strength, "start_percent": start,
            "end_percent": end}}
        positive, negative = [apply, 0], [apply, 1]
    g["3"]["inputs"].update(positive=positive, negative=negative)
    return g


def test_controlnet_nodes():
    units = (("canny.safetensors", "a.png", 0.7, 0.1, 0.8), ("depth", "b.png", 1.2, 0.0, 1.0))
    flow = comfy.read(with_controlnets(units=units))
    assert flow.controlnets == [comfy.Control(*u) for u in units]
    assert (flow.prompt, flow.negative) == ("beautiful scenery nature glass bottle",
                                            "text, watermark")


def with_preprocessor(graph, node_class, **inputs):
    """``graph`` (``with_controlnets``' one unit) with a preprocessor node between its
    LoadImage and its ControlNetApplyAdvanced."""
    g = copy.deepcopy(graph)
    g["40"] = {"class_type": node_class, "inputs": {"image": ["31", 0], **inputs}}
    g["32"]["inputs"]["image"] = ["40", 0]
    return g


def test_preprocessor_nodes():
    # comfyui_controlnet_aux's CannyEdgePreprocessor (its defaults where an input is absent)
    # and ComfyUI's ImageInvert between the image and the ControlNet; their settings checked
    # as the preprocessor's, a bad one naming the node.
    canny = comfy.read(with_preprocessor(with_controlnets(), "CannyEdgePreprocessor",
                                         low_threshold=50, high_threshold=150))
    assert canny.controlnets[0].image == "edges.png"
    assert canny.controlnets[0].preprocessor == ("canny", 512, 50, 150)
    invert = comfy.read(with_preprocessor(with_controlnets(), "ImageInvert"))
    assert invert.controlnets[0].preprocessor == ("invert", None, None, None)
    with pytest.raises(SdrtError, match=r"workflow node 40 \(CannyEdgePreprocessor\): "
                                        r"high_threshold \(canny's High Threshold\) must be from "
                                        r"1 to 255"):
        comfy.read(with_preprocessor(with_controlnets(), "CannyEdgePreprocessor",
                                     high_threshold=300))
    with pytest.raises(SdrtError, match=r"workflow node 40 \(Canny\) is not supported as "
                                        r"ControlNetApplyAdvanced's image: sdrt takes LoadImage "
                                        r"or CannyEdgePreprocessor or ImageInvert there"):
        comfy.read(with_preprocessor(with_controlnets(), "Canny", low_threshold=0.4))


def _positive_only(g):
    """The old ControlNetApply: the positive prompt only."""
    g["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "c"}}
    g["21"] = {"class_type": "LoadImage", "inputs": {"image": "a.png"}}
    g["22"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["6", 0], "control_net": ["20", 0], "image": ["21", 0], "strength": 1}}
    g["3"]["inputs"]["positive"] = ["22", 0]


def _swapped_outputs(g):
    g.update(with_controlnets(g))
    g["3"]["inputs"].update(positive=["32", 1], negative=["32", 0])


REFUSED = {
    "upscaled latent": (lambda g: g.update({
        "20": {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}}}),
        "node 20 (LatentUpscale) is not supported as VAEDecode's samples"),
    "custom sampler without its sampler node": (
        lambda g: g["3"].update(class_type="SamplerCustom"),
        "node 3 (SamplerCustom): sampler must be a link"),
    "VAE of another checkpoint": (lambda g: g.update({
        "20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["20", 2]}}}),
        "node 8 (VAEDecode) must decode with the sampled model's checkpoint VAE or a "
        "VAELoader's"),
    "VAE from an unknown node": (lambda g: g.update({
        "20": {"class_type": "VAELoaderPlus", "inputs": {"vae_name": "vae.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["20", 0]}}}),
        "node 20 (VAELoaderPlus) is not supported as VAEDecode's vae"),
    "unknown sampler pair": (lambda g: g["3"]["inputs"].update(sampler_name="dpm_adaptive"),
                             "sampler_name 'dpm_adaptive' with scheduler 'normal' has no sdrt"),
    "no karras variant": (lambda g: g["3"]["inputs"].update(sampler_name="lcm",
                                                            scheduler="karras"),
                          "'lcm' with scheduler 'karras' has no sdrt sampler"),
    "two outputs": (lambda g: g.update({"20": copy.deepcopy(g["9"])}),
                    "one SaveImage or SaveImageWebsocket node (and any PreviewImage nodes, "
                    "which sdrt does not draw), or one PreviewImage, got 2 and 0"),
    "denoise on empty latent": (lambda g: g["3"]["inputs"].update(denoise=0.5),
                                "denoise 0.5 on an empty latent"),
    "missing node": (lambda g: g["3"]["inputs"].update(positive=["99", 0]),
                     "positive links to node 99, which the workflow does not have"),
    "text not a string": (lambda g: g["6"]["inputs"].update(text=["30", 0]),
                          "text must be a string"),
    "steps not an integer": (lambda g: g["3"]["inputs"].update(steps=2.5),
                             "steps must be an integer, got 2.5"),
    "ControlNet on the positive prompt only": (
        _positive_only, "node 22 (ControlNetApply) must condition both the positive and the "
                        "negative prompt"),
    "ControlNet outputs swapped": (_swapped_outputs, "node 32 (ControlNetApplyAdvanced) must "
                                                     "condition both"),
    "ControlNet shares out of order": (
        lambda g: g.update(with_controlnets(g, (("c", "a.png", 1.0, 0.6, 0.5),))),
        "start_percent and end_percent must satisfy 0 <= start < end <= 1"),
    "ControlNet preprocessor": (
        lambda g: g.update({**with_controlnets(g), "31": {
            "class_type": "Canny", "inputs": {"image": ["40", 0]}}}),
        "node 31 (Canny) is not supported as ControlNetApplyAdvanced's image"),
}


@pytest.mark.parametrize("size,crop", [
    ((80, 50), (15, 0, 65, 50)),   # wide: (80 - 50) / 2 columns off each side
    ((69, 40), (14, 0, 55, 40)),   # 14.5 rounds to 14, as Python rounds (to even)
    ((40, 100), (0, 30, 40, 70)),  # tall
    ((64, 64), (0, 0, 64, 64)),    # already square: scaled only
])
def test_control_hint_is_comfyuis_center_crop_and_nearest_exact(size, crop):
    # What ComfyUI's ControlNet does to its hint for a 64 × 64 (pixels) latent: the middle
    # of the aspect ratio, then torch's nearest-exact.
    import torch
    rng = np.random.default_rng(sum(size))
    x = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    got = np.asarray(comfy.comfy_hint(Image.fromarray(x), 64, 64))
    left, top, right, bottom = crop
    cut = torch.from_numpy(x[top:bottom, left:right].copy()).permute(2, 0, 1)[None].float()
    want = torch.nn.functional.interpolate(cut, size=(64, 64), mode="nearest-exact")
    np.testing.assert_array_equal(got, want[0].permute(1, 2, 0).numpy().astype(np.uint8))
    assert comfy.comfy_hint(Image.fromarray(x), 96, 48).size == (96, 48)



@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_the_node(case):
    edit, message = REFUSED[case]
    with pytest.raises(SdrtError, match=message.replace("(", r"\(").replace(")", r"\)")):
        comfy.read(_edit(edit))


def _advanced(graph, **inputs):
    """``graph`` with its KSampler made a KSamplerAdvanced, as ComfyUI's node takes it."""
    g = copy.deepcopy(graph)
    k = g["3"]["inputs"]
    g["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "enable", "noise_seed": k["seed"], "steps": k["steps"], "cfg": k["cfg"],
        "sampler_name": k["sampler_name"], "scheduler": k["scheduler"],
        "positive": k["positive"], "negative": k["negative"], "latent_image": k["latent_image"],
        "model": k["model"], "start_at_step": 0, "end_at_step": 10000,
        "return_with_leftover_noise": "disable", **inputs}}
    return g


def _custom(graph, advanced=True, scheduler=None):
    """``graph`` with its KSampler made ComfyUI's custom sampling: a SamplerCustomAdvanced
    (RandomNoise, CFGGuider) or a SamplerCustom, a KSamplerSelect and a BasicScheduler (or
    the ``scheduler`` node given)."""
    g = copy.deepcopy(graph)
    k = g["3"]["inputs"]
    g["20"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": k["sampler_name"]}}
    g["21"] = scheduler or {"class_type": "BasicScheduler", "inputs": {
        "model": k["model"], "scheduler": k["scheduler"], "steps": k["steps"],
        "denoise": k.get("denoise", 1.0)}}
    if advanced:
        g["22"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": k["seed"]}}
        g["23"] = {"class_type": "CFGGuider", "inputs": {
            "model": k["model"], "positive": k["positive"], "negative": k["negative"],
            "cfg": k["cfg"]}}
        g["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["22", 0], "guider": ["23", 0], "sampler": ["20", 0], "sigmas": ["21", 0],
            "latent_image": k["latent_image"]}}
    else:
        g["3"] = {"class_type": "SamplerCustom", "inputs": {
            "model": k["model"], "add_noise": True, "noise_seed": k["seed"], "cfg": k["cfg"],
            "positive": k["positive"], "negative": k["negative"], "sampler": ["20", 0],
            "sigmas": ["21", 0], "latent_image": k["latent_image"]}}
    return g


@pytest.mark.parametrize("advanced", [True, False])
@pytest.mark.parametrize("graph", [DEFAULT, _with_loras(), _img2img()])
def test_custom_sampling_reads_as_the_ksampler(graph, advanced):
    # SamplerCustom(Advanced) with KSamplerSelect and BasicScheduler: the KSampler's settings.
    assert comfy.read(_custom(graph, advanced)) == comfy.read(graph)


def test_custom_sampling_schedulers():
    karras = {"class_type": "KarrasScheduler",
              "inputs": {"steps": 12, "sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}}
    flow = comfy.read(_custom(DEFAULT, scheduler=karras))
    assert (flow.sampler, flow.steps) == ("euler_karras", 12)
    turbo = {"class_type": "SDTurboScheduler", "inputs": {"model": ["4", 0], "steps": 1,
                                                          "denoise": 1.0}}
    flow = comfy.read(_custom(DEFAULT, scheduler=turbo))
    assert (flow.sampler, flow.steps) == ("euler_simple", 1)
    # one step from sigma_max, the simple schedule's, is SDTurboScheduler's (timestep 999)
    from sdrt.engine.samplers import SchedulerConfig, make_schedule
    cfg = SchedulerConfig.from_dict({"num_train_timesteps": 1000, "beta_start": 0.00085,
                                     "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    assert make_schedule(cfg, "euler_simple", 1).timesteps.tolist() == [999.0]
    ays = {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SDXL",
                                                                "steps": 10, "denoise": 1.0}}
    flow = comfy.read(_custom(DEFAULT, scheduler=ays))
    assert (flow.sampler, flow.steps) == ("euler_comfy_ays_sdxl", 10)
    ays["inputs"]["model_type"] = "SVD"
    with pytest.raises(SdrtError, match="model_type must be SD1 or SDXL, got 'SVD'"):
        comfy.read(_custom(DEFAULT, scheduler=ays))
    basic = _custom(DEFAULT)
    basic["23"] = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0],
                                                          "conditioning": ["6", 0]}}
    flow = comfy.read(basic)
    assert (flow.guidance, flow.prompt) == (1.0, "beautiful scenery nature glass bottle")


@pytest.mark.parametrize("edit,message", [
    (lambda g: g["21"]["inputs"].update(sigma_max=10.0),
     "node 21 (KarrasScheduler): sdrt runs Karras levels over the model's range"),
    (lambda g: g["21"]["inputs"].update(steps=2),
     "node 21 (SDTurboScheduler): sdrt runs its one step"),
    (lambda g: g["22"].update(class_type="DisableNoise"),
     "node 22 (DisableNoise) is not supported as SamplerCustomAdvanced's noise"),
    (lambda g: g["8"]["inputs"].update(samples=["3", 1]),
     "node 8 (VAEDecode): samples takes node 3's denoised_output"),
    (lambda g: g["20"]["inputs"].update(sampler_name="dpm_adaptive"),
     "node 3 (SamplerCustomAdvanced): sampler_name 'dpm_adaptive'")])
def test_custom_sampling_refusals(edit, message):
    schedulers = {"KarrasScheduler": {"class_type": "KarrasScheduler", "inputs": {
        "steps": 12, "sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}},
        "SDTurboScheduler": {"class_type": "SDTurboScheduler", "inputs": {
            "model": ["4", 0], "steps": 1, "denoise": 1.0}}}
    name = re.search(r"\((\w+Scheduler)\)", message)
    g = _custom(DEFAULT, scheduler=schedulers[name.group(1)] if name else None)
    edit(g)
    with pytest.raises(SdrtError, match=re.escape(message)):
        comfy.read(g)
    plain = _custom(DEFAULT, advanced=False)
    plain["3"]["inputs"]["add_noise"] = False
    with pytest.raises(SdrtError, match=re.escape("node 3 (SamplerCustom): add_noise False")):
        comfy.read(plain)


def test_ksampler_advanced():
    # Noise added, the whole schedule: the KSampler's settings.
    assert comfy.read(_advanced(DEFAULT)) == comfy.read(DEFAULT)
    # On an image from step 7 of 20: image to image keeping the last 13 steps, the same
    # calls as the 20-step schedule's from the 8th (every step count and start, as int()
    # rounds steps * strength).
    from sdrt.engine.samplers import SchedulerConfig, make_schedule
    flow = comfy.read(_advanced(_img2img(), start_at_step=7))
    assert flow.init_image == "photo.png" and flow.strength == pytest.approx(13 / 20)
    cfg = SchedulerConfig.from_dict({"_class_name": "EulerDiscreteScheduler"})
    full = make_schedule(cfg, flow.sampler, 20)
    assert torch.equal(make_schedule(cfg, flow.sampler, 20, flow.strength).timesteps,
                       full.timesteps[7:])
    for steps in range(1, 60):
        for start in range(steps):
            flow = comfy.read(_advanced(_img2img(), steps=steps, start_at_step=start))
            assert int(steps * flow.strength) == steps - start, (steps, start)


@pytest.mark.parametrize("inputs,message", [
    ({"add_noise": "disable"}, "add_noise 'disable': sdrt samples from noise it adds"),
    ({"end_at_step": 12}, "end_at_step 12 stops before the last of its 20 steps"),
    ({"start_at_step": 3}, "start_at_step must be 0 on an empty latent"),
    ({"noise_seed": "x"}, "noise_seed must be an integer"),
])
def test_ksampler_advanced_refusals(inputs, message):
    with pytest.raises(SdrtError, match=f"workflow node 3 \\(KSamplerAdvanced\\).*{message}"):
        comfy.read(_advanced(DEFAULT, **inputs))
    with pytest.raises(SdrtError, match="start_at_step must be .* below steps \\(20\\) on an "
                                        "image, got 20"):
        comfy.read(_advanced(_img2img(), start_at_step=20))


def _hires(graph=DEFAULT, upscale=None, **second):
    """ComfyUI's latent hires fix (its "hiresfix" example): the KSampler's latents through a
    LatentUpscaleBy (or ``upscale``) to a second KSampler on the same model and prompts."""
    g = copy.deepcopy(graph)
    g["20"] = upscale or {"class_type": "LatentUpscaleBy", "inputs": {
        "samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}}
    g["21"] = {"class_type": "KSampler", "inputs": {
        **g["3"]["inputs"], "latent_image": ["20", 0], "seed": 1, "steps": 14, "denoise": 0.5,
        **second}}
    g["8"]["inputs"]["samples"] = ["21", 0]
    return g


def _pixel_hires(graph=DEFAULT, **second):
    """ComfyUI's hires fix in pixels: the first picture decoded, scaled by ImageScaleBy
    (lanczos) and encoded again for the second KSampler."""
    g = _hires(graph, **second)
    g["20"] = {"class_type": "ImageScaleBy", "inputs": {
        "image": ["22", 0], "upscale_method": "lanczos", "scale_by": 1.5}}
    g["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    g["23"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 2]}}
    g["21"]["inputs"]["latent_image"] = ["23", 0]
    return g


def test_hires_fix():
    flow = comfy.read(_hires())
    assert flow == dataclasses.replace(comfy.read(DEFAULT), hires=Hires(
        scale=1.5, upscaler="Latent (nearest-exact)", steps=14, strength=0.5))
    assert comfy.read(_hires(sampler_name="dpmpp_2m", scheduler="karras")).hires.sampler == \
        "dpmpp_2m_karras"
    sized = {"class_type": "LatentUpscale", "inputs": {
        "samples": ["3", 0], "upscale_method": "bicubic", "width": 768, "height": 640,
        "crop": "center"}}
    assert comfy.read(_hires(upscale=sized)).hires == Hires(
        upscaler="Latent (bicubic)", steps=14, strength=0.5, resize_x=768, resize_y=640)
    advanced = _advanced(_hires(steps=20), start_at_step=12)
    advanced["21"], advanced["3"] = advanced["3"], _hires()["3"]  # (the second one advanced)
    advanced["21"]["inputs"]["latent_image"] = ["20", 0]
    advanced["8"]["inputs"]["samples"] = ["21", 0]
    hires = comfy.read(advanced).hires
    assert (hires.steps, hires.schedule_steps(20)) == (8, (20, 8))
    assert comfy.read(_pixel_hires()).hires == Hires(scale=1.5, upscaler="Lanczos", steps=14,
                                                     strength=0.5)


@pytest.mark.parametrize("edit,message", [
    (lambda g: g["20"]["inputs"].update(upscale_method="bislerp"),
     "node 20 (LatentUpscaleBy): upscale_method 'bislerp'"),
    (lambda g: g["21"]["inputs"].update(positive=["7", 0]),
     "node 21 (KSampler): a hires fix's second sampler must take the first's positive"),
    (lambda g: g["21"]["inputs"].update(cfg=5),
     "node 21 (KSampler): a hires fix's second sampler must take the first's cfg (8)"),
    (lambda g: g.update({"20": {"class_type": "LatentUpscale", "inputs": {
        "samples": ["3", 0], "upscale_method": "bilinear", "width": 768, "height": 512,
        "crop": "disabled"}}}), "crop 'disabled' to 768x512: sdrt keeps the 512x512"),
    (lambda g: g["20"]["inputs"].update(samples=["5", 0]),
     "node 5 (EmptyLatentImage) is not supported as LatentUpscaleBy's samples"),
])
def test_hires_fix_refusals(edit, message):
    g = _pixel_hires()
    g["20"]["inputs"]["upscale_method"] = "bicubic"
    with pytest.raises(SdrtError, match=r"node 20 \(ImageScaleBy\): upscale_method 'bicubic': "
                                        r"sdrt upscales images by lanczos"):
        comfy.read(g)
    g = _pixel_hires()
    g["23"]["inputs"]["vae"] = ["30", 0]
    g["30"] = {"class_type": "VAELoader", "inputs": {"vae_name": "v.safetensors"}}
    with pytest.raises(SdrtError, match=r"node 23 \(VAEEncode\) must take the VAE that decodes "
                                        r"the picture \(node 8's\)"):
        comfy.read(g)
    g = _hires()
    edit(g)
    with pytest.raises(SdrtError, match=re.escape(message)):
        comfy.read(g)
    with pytest.raises(SdrtError, match=r"node 21 \(KSampler\): sdrt's hires fix redraws text "
                                        r"to image"):
        comfy.read(_hires(_img2img()))


def _with_vae(graph):
    """``graph`` decoding (and encoding) with a VAELoader's VAE."""
    g = copy.deepcopy(graph)
    g["30"] = {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse.safetensors"}}
    for node in g.values():
        if node["class_type"] in ("VAEDecode", "VAEEncode"):
            node["inputs"]["vae"] = ["30", 0]
    return g


def test_vae_loader():
    assert comfy.read(_with_vae(DEFAULT)).vae == "vae-ft-mse.safetensors"
    assert comfy.read(_with_vae(_img2img())).vae == "vae-ft-mse.safetensors"
    g = _with_vae(_img2img())
    g["11"]["inputs"]["vae"] = ["4", 2]
    with pytest.raises(SdrtError, match=r"node 11 \(VAEEncode\) must encode with the VAE that "
                                        r"decodes \(node 30's\)"):
        comfy.read(g)
    g = _with_vae(DEFAULT)
    g["30"]["inputs"]["vae_name"] = 3
    with pytest.raises(SdrtError, match=r"node 30 \(VAELoader\): vae_name must be a file name"):
        comfy.read(g)


def test_ui_format_is_refused(tmp_path):
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(SdrtError, match="in ComfyUI's UI format: save it with 'Save"):
        comfy.load(str(path))
    path.write_text("{not json")
    with pytest.raises(SdrtError, match="is not JSON"):
        comfy.load(str(path))


# -- the CLI -----------------------------------------------------------------------------------

def _small(graph, seed=4, sampler="euler_ancestral"):
    g = copy.deepcopy(graph)
    g["3"]["inputs"].update(seed=seed, steps=3, cfg=6.5, sampler_name=sampler,
                            scheduler="normal")
    if "5" in g:
        g["5"]["inputs"].update(width=32, height=24)
    return g


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# The options that ask for what _small(DEFAULT) does.
SMALL_OPTIONS = ["beautiful scenery nature glass bottle", "--negative", "text, watermark",
                 "--seed", "4", "--steps", "3", "--guidance", "6.5", "--sampler",
                 "euler_a_normal", "--width", "32", "--height", "24"]


def draw(sources, extra, tmp_path, capsys):
    """{name: pixels} of ``sdrt generate`` with each source's arguments (``sources``: name →
    arguments) and ``extra`` (the model ...)."""
    outs = {}
    for name, source in sources.items():
        out = tmp_path / f"{name}.png"
        code, _, err = _run(["generate", *source, *extra, "-o", str(out)], capsys)
        assert code == 0, err
        outs[name] = _pixels(out)
    return outs


def test_cli_workflow_json_and_png_equal_the_options(tiny_dir, tmp_path, capsys):
    graph = _small(DEFAULT)
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    info = PngInfo()  # a ComfyUI PNG: the API-format graph in its "prompt" text chunk
    info.add_text("prompt", json.dumps(graph))
    info.add_text("workflow", json.dumps({"nodes": [], "links": []}))
    Image.new("RGB", (8, 8)).save(tmp_path / "comfy.png", pnginfo=info)
    outs = draw({"json": ["--workflow", str(tmp_path / "wf.json")],
                 "png": ["--workflow", str(tmp_path / "comfy.png")], "options": SMALL_OPTIONS},
                ["--model", tiny_dir], tmp_path, capsys)
    assert outs["json"].shape == (24, 32, 3) and outs["json"].std() > 5
    assert np.array_equal(outs["json"], outs["options"])
    assert np.array_equal(outs["png"], outs["options"])
    code, _, err = _run(["generate", "--from-png", str(tmp_path / "comfy.png"), "--model",
                         tiny_dir, "-o", str(tmp_path / "no.png")], capsys)
    assert code == 2 and "holds a ComfyUI workflow: pass it as --workflow" in err, err
    # An option given on the command line wins over the workflow's value.
    out = tmp_path / "seed.png"
    assert _run(["generate", "--workflow", str(tmp_path / "wf.json"), "--seed", "5", "--model",
                 tiny_dir, "-o", str(out)], capsys)[0] == 0
    assert not np.array_equal(_pixels(out), outs["json"])


def test_cli_workflow_hires_fix_equals_the_options(tiny_dir, tmp_path, capsys):
    graph = _hires(_small(DEFAULT), steps=2, denoise=0.6, sampler_name="euler",
                   scheduler="karras")
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    hires = ["--hr-scale", "1.5", "--hr-upscaler", "Latent (nearest-exact)", "--hr-steps", "2",
             "--strength", "0.6", "--hr-sampler", "euler_karras"]
    outs = draw({"json": ["--workflow", str(tmp_path / "wf.json")],
                 "options": SMALL_OPTIONS + hires}, ["--model", tiny_dir], tmp_path, capsys)
    assert outs["json"].shape == (32, 48, 3) and outs["json"].std() > 5
    assert np.array_equal(outs["json"], outs["options"])
    with Image.open(tmp_path / "json.png") as im:
        assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (nearest-exact), " \
               "Hires sampler: Euler Karras" in im.text["parameters"], im.text["parameters"]


def test_cli_workflow_pixel_hires_fix_equals_the_options(tiny_dir, tmp_path, capsys):
    graph = _pixel_hires(_small(DEFAULT), steps=2, denoise=0.6)
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    hires = ["--hr-scale", "1.5", "--hr-upscaler", "Lanczos", "--hr-steps", "2", "--strength",
             "0.6"]
    outs = draw({"json": ["--workflow", str(tmp_path / "wf.json")],
                 "options": SMALL_OPTIONS + hires}, ["--model", tiny_dir], tmp_path, capsys)
    assert outs["json"].shape == (32, 48, 3)
    assert np.array_equal(outs["json"], outs["options"])


def test_cli_workflow_image_to_image(tiny_dir, tmp_path, capsys):
    (tmp_path / "wf.json").write_text(json.dumps(_small(_img2img(), sampler="euler")))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
                    ).save(tmp_path / "photo.png")
    out, ref = tmp_path / "out.png", tmp_path / "ref.png"
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), "--model",
                         tiny_dir, "--init-image", str(tmp_path / "photo.png"), "-o", str(out)],
                        capsys)
    assert code == 0, err
    code, _, err = _run(["generate", "beautiful scenery nature glass bottle", "--negative",
                         "text, watermark", "--seed", "4", "--steps", "3", "--guidance", "6.5",
                         "--sampler", "euler_normal", "--strength", "0.6", "--init-image",
                         str(tmp_path / "photo.png"), "--model", tiny_dir, "-o", str(ref)],
                        capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(out), _pixels(ref))


@pytest.mark.parametrize("graph,extra,message", [
    (DEFAULT, [], "loads checkpoint 'v1-5-pruned-emaonly.safetensors': pass --model PATH"),
    (_with_loras(), ["--model", "{tiny}"],
     "applies LoRA 'styles/ink.safetensors' (<lora:ink:0.8>): pass --lora PATH/ink.safetensors"),
    (_img2img(), ["--model", "{tiny}"],
     "starts from image 'photo.png' (image to image): pass --init-image PATH"),
    (DEFAULT, ["--model", "{tiny}", "--from-png", "{tmp}/x.png"],
     "--from-png and --workflow both give the settings"),
])
def test_cli_workflow_refusals_are_one_line(tiny_dir, tmp_path, capsys, graph, extra, message):
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    extra = [e.format(tiny=tiny_dir, tmp=tmp_path) for e in extra]
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), *extra, "-o",
                         str(tmp_path / "o.png")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _sdxl_text(g, node_id, text_l, text_g, size=(1024, 1024), crop=(0, 0), target=None):
    """Node ``node_id``'s CLIPTextEncode made a CLIPTextEncodeSDXL (sizes as (width, height),
    crop as (w, h): ComfyUI's inputs)."""
    target = target or size
    g[node_id] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": g[node_id]["inputs"]["clip"], "text_l": text_l, "text_g": text_g,
        "width": size[0], "height": size[1], "crop_w": crop[0], "crop_h": crop[1],
        "target_width": target[0], "target_height": target[1]}}


def test_sdxl_text_nodes():
    # text_l is the prompt (CLIP ViT-L's), text_g the prompt_2 (bigG's) where it differs; the
    # sizes the micro-conditioning where they are not the image's and uncropped.
    g = copy.deepcopy(DEFAULT)
    _sdxl_text(g, "6", "a fox", "a red fox in snow", size=(2048, 1536), crop=(32, 16),
               target=(512, 512))
    _sdxl_text(g, "7", "blurry", "blurry", size=(2048, 1536), crop=(32, 16), target=(512, 512))
    flow = comfy.read(g)
    assert (flow.prompt, flow.prompt_2, flow.negative, flow.negative_2) == (
        "a fox", "a red fox in snow", "blurry", None)
    assert (flow.original_size, flow.crop, flow.target_size) == ((1536, 2048), (16, 32), None)
    plain = copy.deepcopy(DEFAULT)
    for node, text in (("6", "beautiful scenery nature glass bottle"),
                       ("7", "text, watermark")):
        _sdxl_text(plain, node, text, text, size=(512, 512))
    assert comfy.read(plain) == comfy.read(DEFAULT)  # the defaults: a plain CLIPTextEncode's
    # A CLIPTextEncode beside a CLIPTextEncodeSDXL conditions on the image's size, as
    # ComfyUI's defaults (the latent's size, no crop); either way round.
    mixed = copy.deepcopy(DEFAULT)
    _sdxl_text(mixed, "6", "a", "a g", size=(1024, 768))
    flow = comfy.read(mixed)
    assert (flow.prompt_2, flow.negative_2) == ("a g", None)
    assert (flow.original_size, flow.crop, flow.target_size) == ((768, 1024), None, (768, 1024))
    assert flow.negative_sizes == ((512, 512), (0, 0), (512, 512))
    other = copy.deepcopy(DEFAULT)
    _sdxl_text(other, "7", "b", "b", size=(640, 512), crop=(8, 0))
    flow = comfy.read(other)
    assert (flow.original_size, flow.crop, flow.target_size) == (None, None, None)
    assert flow.negative_sizes == ((512, 640), (0, 8), (512, 640))
    init = _img2img()
    _sdxl_text(init, "6", "a", "a")
    with pytest.raises(SdrtError, match="node 7 \\(CLIPTextEncode\\) conditions on the image's "
                                        "size beside a CLIPTextEncodeSDXL prompt"):
        comfy.read(init)


def test_cli_sdxl_text_workflow_equals_the_options(sdxl_base_folder, tmp_path, capsys):
    # CLIPTextEncodeSDXL on an SDXL model: the image of --prompt-2, --negative-2 and the
    # micro-conditioning options.
    folder, _ = sdxl_base_folder
    g = _small(DEFAULT)
    _sdxl_text(g, "6", "a fox", "a red fox in snow", size=(64, 48), crop=(8, 4),
               target=(40, 24))
    _sdxl_text(g, "7", "blurry", "grey", size=(64, 48), crop=(8, 4), target=(40, 24))
    (tmp_path / "wf.json").write_text(json.dumps(g))
    options = ["a fox", "--prompt-2", "a red fox in snow", "--negative", "blurry",
               "--negative-2", "grey", "--original-size", "64x48", "--crop", "8,4",
               "--target-size", "40x24", *SMALL_OPTIONS[3:]]
    outs = draw({"json": ["--workflow", str(tmp_path / "wf.json")], "options": options,
                 "plain": ["a fox", "--negative", "blurry", *SMALL_OPTIONS[3:]]},
                ["--model", folder], tmp_path, capsys)
    assert np.array_equal(outs["json"], outs["options"])
    assert not np.array_equal(outs["json"], outs["plain"])
    # a CLIPTextEncodeSDXL prompt beside a CLIPTextEncode negative: the negative on the
    # image's size (32x24), the prompt on its node's
    g["7"] = copy.deepcopy(DEFAULT["7"])
    g["7"]["inputs"]["text"] = "blurry"
    (tmp_path / "mixed.json").write_text(json.dumps(g))
    options = ["a fox", "--prompt-2", "a red fox in snow", "--negative", "blurry",
               "--original-size", "64x48", "--crop", "8,4", "--target-size", "40x24",
               "--negative-original-size", "32x24", "--negative-target-size", "32x24",
               "--negative-crop", "0,0", *SMALL_OPTIONS[3:]]
    mixed = draw({"json": ["--workflow", str(tmp_path / "mixed.json")], "options": options,
                  "same": options[:11] + SMALL_OPTIONS[3:]}, ["--model", folder], tmp_path,
                 capsys)
    assert np.array_equal(mixed["json"], mixed["options"])
    assert not np.array_equal(mixed["json"], mixed["same"])


def _refined(graph=DEFAULT, end=2, refiner_text=None):
    """``graph`` as ComfyUI's SDXL example samples it: its KSampler the base's
    KSamplerAdvanced, stopping at ``end`` with its leftover noise, then a refiner checkpoint's
    KSamplerAdvanced from there (no noise added), the refiner's prompts CLIPTextEncode (or
    CLIPTextEncodeSDXLRefiner, ``refiner_text``: {"ascore": ..., ...}), its VAE decoding."""
    g = _advanced(graph, end_at_step=end, return_with_leftover_noise="enable")
    k = g["3"]["inputs"]
    g["12"] = {"class_type": "CheckpointLoaderSimple",
               "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}}
    for node, text_node in (("15", "6"), ("16", "7")):
        g[node] = {"class_type": "CLIPTextEncode",
                   "inputs": {"clip": ["12", 1], "text": g[text_node]["inputs"]["text"]}}
        if refiner_text is not None:
            g[node]["class_type"] = "CLIPTextEncodeSDXLRefiner"
            g[node]["inputs"].update(refiner_text[node])
    g["11"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **k, "add_noise": "disable", "noise_seed": 0, "start_at_step": end,
        "end_at_step": 10000, "return_with_leftover_noise": "disable", "model": ["12", 0],
        "positive": ["15", 0], "negative": ["16", 0], "latent_image": ["3", 0]}}
    g["8"]["inputs"].update(samples=["11", 0], vae=["12", 2])
    return g


def test_sdxl_base_and_refiner():
    g = _refined(_small(DEFAULT), end=2)
    flow = comfy.read(g)
    assert (flow.refiner, flow.refiner_steps, flow.steps) == ("sd_xl_refiner_1.0.safetensors",
                                                              2, 3)
    assert (flow.aesthetic_score, flow.negative_aesthetic_score) == (None, None)
    assert flow.sampler_node == "3" and flow.checkpoint == "v1-5-pruned-emaonly.safetensors"
    scores = {"15": {"ascore": 7.0, "width": 32, "height": 24},
              "16": {"ascore": 2.0, "width": 32, "height": 24}}
    flow = comfy.read(_refined(_small(DEFAULT), end=2, refiner_text=scores))
    assert (flow.aesthetic_score, flow.negative_aesthetic_score) == (7.0, 2.0)


@pytest.mark.parametrize("edit,message", [
    (lambda g: g["11"]["inputs"].update(add_noise="enable"),
     "node 11 (KSamplerAdvanced): the refiner must add no noise"),
    (lambda g: g["11"]["inputs"].update(start_at_step=1),
     "run from the base's end_at_step (2) to the end"),
    (lambda g: g["3"]["inputs"].update(return_with_leftover_noise="disable"),
     "node 3 (KSamplerAdvanced): an SDXL base before a refiner must add noise"),
    (lambda g: g["11"]["inputs"].update(cfg=3.0), "cfg must be the base's"),
    (lambda g: g["11"]["inputs"].update(scheduler="karras"),
     "sampler_name and scheduler must be the base's"),
    (lambda g: g["15"]["inputs"].update(text="another prompt"),
     "sdrt's refiner takes the base's positive prompt"),
    (lambda g: g["8"]["inputs"].update(vae=["4", 2]),
     "node 8 (VAEDecode) must decode with the refiner's checkpoint VAE"),
])
def test_sdxl_refiner_refusals(edit, message):
    g = _refined(_small(DEFAULT), end=2)
    edit(g)
    with pytest.raises(SdrtError, match=re.escape(message)):
        comfy.read(g)


def test_cli_sdxl_refiner_workflow_switches_after_the_base_steps(sdxl_base_folder,
                                                                 sdxl_refiner_folder, tmp_path,
                                                                 capsys):
    # The base runs its end_at_step steps of the schedule, the refiner the rest: sdrt's
    # --refiner at the --refiner-start that splits the schedule there.
    from sdrt.engine.samplers import switch_after
    from sdrt.engine.samplers import SchedulerConfig, make_schedule
    base, _ = sdxl_base_folder
    refiner, _ = sdxl_refiner_folder
    cfg = SchedulerConfig.from_file(f"{base}/scheduler/scheduler_config.json")
    start = switch_after(cfg, "euler_a_normal", 3, 2)
    assert len(make_schedule(cfg, "euler_a_normal", 3, denoising_end=start).timesteps) == 2
    assert len(make_schedule(cfg, "euler_a_normal", 3, denoising_start=start).timesteps) == 1
    (tmp_path / "wf.json").write_text(json.dumps(_refined(_small(DEFAULT), end=2)))
    outs = draw({"json": ["--workflow", str(tmp_path / "wf.json")],
                 "options": [*SMALL_OPTIONS, "--refiner-start", repr(start)]},
                ["--model", base, "--refiner", refiner], tmp_path, capsys)
    assert np.array_equal(outs["json"], outs["options"])
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), "--model", base,
                         "-o", str(tmp_path / "no.png")], capsys)
    assert code == 2 and "refines with checkpoint 'sd_xl_refiner_1.0.safetensors': pass " \
                         "--refiner PATH" in err, err


@pytest.mark.parametrize("edit,message", [
    (lambda g: g["3"]["inputs"].update(model=["4", 17]),
     "workflow node 3 (KSampler): model links to output 17 of node 4 (CheckpointLoaderSimple), "
     "whose outputs are 0 MODEL, 1 CLIP, 2 VAE; model takes its MODEL"),
    (lambda g: g["3"]["inputs"].update(model=["4", 2]), "model takes its MODEL"),
    (lambda g: g["3"]["inputs"].update(model=["4", -1]), "links to output -1 of node 4"),
    (lambda g: g["8"]["inputs"].update(samples=["3", 1]),
     "workflow node 8 (VAEDecode): samples links to output 1 of node 3 (KSampler), whose "
     "outputs are 0 only"),
    (lambda g: g["3"]["inputs"].update(steps=float("nan")),
     "workflow node 3 (KSampler): steps must be an integer, got nan"),
    (lambda g: g["5"]["inputs"].update(width=float("inf")),
     "workflow node 5 (EmptyLatentImage): width must be an integer, got inf"),
    (lambda g: g["3"]["inputs"].update(cfg=float("nan")),
     "workflow node 3 (KSampler): cfg must be a number, got nan"),
])
def test_links_to_outputs_a_node_lacks_and_non_finite_numbers_are_refused(edit, message):
    g = copy.deepcopy(DEFAULT)
    edit(g)
    with pytest.raises(SdrtError, match=re.escape(message)):
        comfy.read(g)


def test_a_prompt_request_body_loads_as_its_workflow(tmp_path):
    # What ComfyUI's script examples POST to /prompt: {"prompt": graph, "client_id": ...}
    (tmp_path / "body.json").write_text(json.dumps({"prompt": DEFAULT, "client_id": "x"}))
    assert comfy.load(str(tmp_path / "body.json")) == DEFAULT
    (tmp_path / "deep.json").write_text('{"a":' * 5000 + "1" + "}" * 5000)
    with pytest.raises(SdrtError, match="deep.json nests too deeply to be an API-format graph"):
        comfy.load(str(tmp_path / "deep.json"))
