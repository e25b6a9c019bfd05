"""A1111's hires fix (engine/hires.py): sizes and step counts as A1111 computes them, and the
two passes as the library's own calls (the same generators going on from the first pass into
the second), on sdrt's tiny model (no diffusers needed)."""
import math

import numpy as np
import pytest
import torch

from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.hires import Hires, generate
from sdrt.engine.samplers import SchedulerConfig, make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = dict(max_side=4096, max_steps=1000)


@pytest.mark.parametrize("hires,first,expected", [
    (Hires(scale=2), (512, 512), (1024, 1024, 0, 0)),
    (Hires(scale=1.5), (512, 768), (768, 1152, 0, 0)),
    (Hires(scale=1.3), (512, 512), (664, 664, 0, 0)),  # 665.6 → 665 → a multiple of 8
    (Hires(resize_x=1024), (512, 768), (1024, 1536, 0, 0)),  # the other side keeps the ratio
    (Hires(resize_y=1000), (512, 512), (1000, 1000, 0, 0)),
    # Both sides, another ratio: cover them at the first pass's ratio, then crop (truncate).
    (Hires(resize_x=1024, resize_y=768), (512, 512), (1024, 768, 0, 32)),
    (Hires(resize_x=768, resize_y=1024), (512, 512), (768, 1024, 32, 0)),
])
def test_target_size(hires, first, expected):
    assert hires.target(*first) == expected


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("strength", [0.2, 0.3, 0.45, 0.5, 0.7, 0.75, 0.9, 1.0])
def test_second_pass_runs_the_steps_asked_for(sampler, strength):
    # A1111 runs exactly hr_second_pass_steps (or steps) UNet calls, whatever the strength.
    cfg = SchedulerConfig.from_dict({"_class_name": "EulerDiscreteScheduler",
                                     "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                     "beta_end": 0.012, "steps_offset": 1})
    for calls in (1, 2, 7, 10, 20, 33):
        total, asked = Hires(steps=calls, strength=strength).schedule_steps(25)
        schedule = make_schedule(cfg, sampler, total, strength=strength)
        assert len(schedule.timesteps) == asked == calls, (calls, strength, total)
    assert Hires(strength=strength).schedule_steps(12)[1] == 12  # 0: the first pass's


@pytest.mark.parametrize("field,value,message", [
    ("scale", 0.5, "hr scale must be a number from 1 to 8"),
    ("scale", float("nan"), "hr scale must be a number from 1 to 8"),
    ("upscaler", "R-ESRGAN 4x+", "an upscale model such as ESRGAN needs its file"),
    ("steps", -1, "hr steps must be an integer from 0"),
    ("strength", 0, "hr strength must be a number in (0, 1]"),
    ("resize_x", 99999, "hr resize_x must be an integer from 0"),
    ("sampler", "dpm_adaptive", "hr sampler must be one of ddim"),
    ("prompt", None, "hr prompt must be a string"),
])
def test_bad_settings_name_the_field(field, value, message):
    names = {f: f"hr {f}" for f in ("scale", "upscaler", "steps", "strength", "resize_x",
                                    "resize_y", "sampler", "prompt", "negative_prompt")}
    with pytest.raises(SdrtError, match=None) as e:
        Hires(**{field: value}).check(names, **LIMITS)
    assert message in str(e.value)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return Pipeline.from_pretrained(tiny_sd1_folder, device="cpu")


PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
def test_two_passes_are_the_librarys_calls(pipe, upscaler):
    hires = Hires(scale=1.5, upscaler=upscaler, steps=3, strength=0.6)
    common = dict(guidance_scale=6.0, negative_prompt="blurry", sampler="euler_a")
    got = generate(pipe, hires, PROMPTS, common["negative_prompt"], 32, 48, 4, "euler_a",
                   _generators([5, 6]), guidance_scale=6.0)
    # By hand: the first pass, the upscale, then image to image over a schedule of
    # ceil(3 / 0.6) = 5 steps running its last 3, the generators going on.
    g = _generators([5, 6])
    first = pipe(PROMPTS, height=32, width=48, num_inference_steps=4, generator=g,
                 output_type="latent" if upscaler != "Lanczos" else "pil", **common)
    if upscaler == "Lanczos":
        from PIL import Image
        image = [im.resize((72, 48), Image.LANCZOS) for im in first]
    else:
        f = pipe.vae_scale_factor
        mode, antialias = ("bilinear", False) if upscaler == "Latent" else ("bicubic", True)
        image = torch.nn.functional.interpolate(first, size=(48 // f, 72 // f), mode=mode,
                                                antialias=antialias)
    want = pipe(PROMPTS, image=image, strength=0.6, num_inference_steps=5, generator=g,
                output_type="pil", **common)
    assert pipe.num_timesteps == 3
    assert [im.size for im in got] == [(72, 48)] * 2
    for a, b in zip(got, want):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_an_image_does_not_depend_on_its_batch(pipe):
    hires = Hires(scale=2, steps=2, strength=0.5)
    both = generate(pipe, hires, PROMPTS, None, 32, 32, 3, "euler_a", _generators([1, 2]),
                    guidance_scale=[5.0, 7.0])
    alone = generate(pipe, hires, PROMPTS[1:], None, 32, 32, 3, "euler_a", _generators([2]),
                     guidance_scale=7.0)
    diff = np.abs(np.asarray(both[1], dtype=int) - np.asarray(alone[0], dtype=int)).max()
    assert diff <= 1, f"the second image changed by {diff} levels in a batch"
    assert not np.array_equal(np.asarray(both[0]), np.asarray(both[1]))


def test_timings_add_up_both_passes(pipe):
    generate(pipe, Hires(scale=1.5, steps=2), PROMPTS[0], None, 32, 32, 3, "euler",
             _generators([0]))
    assert pipe.timings["unet_calls"] == 3 + 2
    assert math.isfinite(pipe.timings["denoise"])


def test_images_per_prompt(pipe):
    # One prompt, two images (the CLI's --batch): each image's second pass is its own row.
    hires = Hires(scale=1.5, steps=2, strength=0.5)
    got = generate(pipe, hires, PROMPTS[0], "blurry", 32, 32, 3, "euler", _generators([3, 4]),
                   num_images_per_prompt=2, guidance_scale=6.0)
    alone = generate(pipe, hires, PROMPTS[0], "blurry", 32, 32, 3, "euler", _generators([4]),
                     guidance_scale=6.0)
    assert len(got) == 2
    diff = np.abs(np.asarray(got[1], dtype=int) - np.asarray(alone[0], dtype=int)).max()
    assert diff <= 1, f"the second image changed by {diff} levels in a batch"


def test_pass_controls_divides_the_controlnets():
    from sdrt.engine.hires import pass_controls
    control = dict(control_image=["A", ["B1", "B2"]], controlnet=["a", "b"],
                   controlnet_conditioning_scale=[0.5, 1.5], control_guidance_start=0.0,
                   control_guidance_end=[1.0, 0.6], control_mode=["controlnet", "balanced"],
                   guess_mode=False)
    # "a" in the first pass only (A1111's "Low res only"); "b" in both, softened in the second
    # (a canny unit): its balanced mode becomes "prompt" there.
    first, second = pass_controls(control, [(True, False, False), (True, True, True)])
    assert first == {**control, "control_guidance_start": [0.0, 0.0]}
    assert second == dict(control_image=["B1", "B2"], controlnet=["b"],
                          controlnet_conditioning_scale=[1.5], control_guidance_start=[0.0],
                          control_guidance_end=[0.6], control_mode=["prompt"], guess_mode=False)
    first, second = pass_controls({**control, "guess_mode": True, "control_mode": "balanced"},
                                  [(False, True, True), (False, True, True)])
    assert first == {}
    assert second["control_mode"] == ["balanced", "balanced"]  # guess mode: not softened
    assert pass_controls({}, []) == ({}, {})


def test_controlnets_per_pass_are_the_librarys_calls(pipe, tiny_sd1_folder, tmp_path):
    # A ControlNet in the first pass only, and one softened in the second: by hand, the
    # first pass with it, then the second without it or with control mode "prompt".
    import json

    from PIL import Image

    from sdrt.engine.tiny import controlnet_config, write_controlnet
    with open(f"{tiny_sd1_folder}/unet/config.json") as f:
        unet = json.load(f)
    net = write_controlnet(str(tmp_path / "net"), controlnet_config(unet, pipe.vae_scale_factor),
                           9)
    pipe.load_controlnet(net, name="a")
    try:
        rng = np.random.default_rng(3)
        hint = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
        hires = Hires(scale=1.5, steps=2, strength=0.7)
        control = dict(control_image=hint, controlnet=["a"], controlnet_conditioning_scale=[2.0])
        for units, second in (([(True, False, False)], {}),
                              ([(True, True, True)], dict(control, control_mode=["prompt"]))):
            got = generate(pipe, hires, PROMPTS[0], None, 32, 32, 3, "euler", _generators([7]),
                           control_units=units, **control)
            g = _generators([7])
            first = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=3, generator=g,
                         sampler="euler", output_type="latent", **control)
            f = pipe.vae_scale_factor
            image = torch.nn.functional.interpolate(first, size=(48 // f, 48 // f),
                                                    mode="bilinear")
            want = pipe(PROMPTS[0], image=image, strength=0.7, num_inference_steps=3,
                        generator=g, sampler="euler", output_type="pil", **second)
            assert np.array_equal(np.asarray(got[0]), np.asarray(want[0])), units
        both = generate(pipe, hires, PROMPTS[0], None, 32, 32, 3, "euler", _generators([7]),
                        **control)
        assert np.abs(np.asarray(both[0], dtype=int) - np.asarray(got[0], dtype=int)).max() > 3
    finally:
        pipe.unload_controlnet()
