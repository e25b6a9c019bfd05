"""The scheduler config changed after loading (``set_scheduler_config``): a zero-terminal-SNR
v-prediction schedule against diffusers' schedulers made ``from_config`` with the same fields;
``--zero-snr``, a workflow's ModelSamplingDiscrete node, and what is refused."""
import json

import numpy as np
import pytest
import torch

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.request import ZERO_SNR
from test_pipeline import IMAGE_ATOL, PROMPTS, _assert_lively

ZSNR_V = {"prediction_type": "v_prediction", **ZERO_SNR}


@pytest.fixture(scope="module")
def pipes(tiny_sd1):
    folder, ref = tiny_sd1
    return Pipeline.from_pretrained(folder, device="cpu"), ref


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_zero_snr_v_prediction_matches_diffusers(pipes, sampler):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    ours, ref = pipes
    cls = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler}[sampler]
    scheduler = ref.scheduler
    ref.scheduler = cls.from_config(scheduler.config, **ZSNR_V)
    own = ours.scheduler_config
    try:
        latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(2))
        kw = dict(height=16, width=24, num_inference_steps=5, guidance_scale=6.0,
                  latents=latents, output_type="np")
        expected = ref(PROMPTS, negative_prompt=["blurry"] * 2, guidance_rescale=0.7,
                       **kw).images
        _assert_lively(expected, f"zero-SNR {sampler}")
        ours.set_scheduler_config(**ZSNR_V)
        got = ours(PROMPTS, negative_prompt="blurry", sampler=sampler, guidance_rescale=0.7,
                   **kw)
        assert_close_abs(got, expected, IMAGE_ATOL, f"zero-SNR v-prediction {sampler}")
        ours.scheduler_config = own
        assert np.abs(ours(PROMPTS, negative_prompt="blurry", sampler=sampler,
                           guidance_rescale=0.7, **kw) - got).max() > 5 * IMAGE_ATOL
    finally:
        ref.scheduler = scheduler
        ours.scheduler_config = own


def test_set_scheduler_config_refusals(pipes):
    ours, _ = pipes
    own = ours.scheduler_config
    with pytest.raises(SdrtError, match="set_scheduler_config: zero_snr is not a scheduler "
                                        "config field sdrt reads"):
        ours.set_scheduler_config(zero_snr=True)
    with pytest.raises(SdrtError, match="scheduler config: timestep_spacing='even' is not one "
                                        "of leading, trailing, linspace"):
        ours.set_scheduler_config(timestep_spacing="even")
    assert ours.scheduler_config is own


def test_cli_and_workflow_node(tmp_path, capsys):
    from sdrt.engine import comfy
    from sdrt.engine.cli import main
    from test_cli import _run
    from test_comfy import DEFAULT, _pixels, _small
    folder = str(tmp_path / "tiny")
    assert main(["make-tiny", folder]) == 0
    graph = _small(DEFAULT, sampler="euler")
    graph["20"] = {"class_type": "ModelSamplingDiscrete",
                   "inputs": {"model": ["4", 0], "sampling": "v_prediction", "zsnr": True}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    options = ["beautiful scenery nature glass bottle", "--negative", "text, watermark", "--seed",
               "4", "--steps", "3", "--guidance", "6.5", "--sampler", "euler_normal",
               "--width", "32", "--height", "24", "--model", folder]
    outs = {}
    for name, args in (("workflow", ["--workflow", str(tmp_path / "wf.json"), "--model",
                                     folder]),
                       ("options", options + ["--prediction-type", "v_prediction",
                                              "--zero-snr"]),
                       ("plain", options)):
        code, _, err = _run(["generate", *args, "-o", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
        outs[name] = _pixels(tmp_path / f"{name}.png").astype(int)
    assert np.array_equal(outs["workflow"], outs["options"])
    assert np.abs(outs["options"] - outs["plain"]).max() > 2
    pipe = Pipeline.from_pretrained(folder, device="cpu", prediction_type="v_prediction")
    pipe.set_scheduler_config(**ZERO_SNR)
    want = pipe("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                seed=4, num_inference_steps=3, guidance_scale=6.5, sampler="euler_normal",
                width=32, height=24)[0]
    assert np.abs(np.asarray(want, dtype=int) - outs["options"]).max() <= 1
    assert comfy.read(graph).sampling == ("v_prediction", True)
    assert comfy.scheduler_fields(("v_prediction", True)) == tuple(ZSNR_V.items())
    for inputs, message in (
            ({"sampling": "x0"}, "sdrt runs sampling eps, v_prediction, lcm, got 'x0'"),
            ({"sampling": "eps", "zsnr": "yes"}, "zsnr must be true or false, got 'yes'"),
            ({"sampling": "lcm"}, "a model sampled as lcm \\(ModelSamplingDiscrete\\) runs "
                                  "sdrt's lcm sampler only \\(sampler_name lcm\\), got euler")):
        graph["20"]["inputs"] = {"model": ["4", 0], **inputs}
        with pytest.raises(SdrtError, match=message):
            comfy.read(graph)
    graph["3"]["inputs"].update(sampler_name="lcm", scheduler="sgm_uniform")
    flow = comfy.read(graph)
    assert flow.sampling == ("lcm", False) and flow.sampler == "lcm"
    assert comfy.scheduler_fields(flow.sampling) == ()


def test_server_prediction_type_and_zero_snr(tiny_sd1_folder):
    # sdrt serve --prediction-type v_prediction --zero-snr: the library's image so set up.
    pytest.importorskip("fastapi")
    import base64
    import io

    import httpx
    from PIL import Image

    from sdrt.serve.config import ServeConfig
    from sdrt.serve.local import LocalServer, free_port
    config = ServeConfig(model=tiny_sd1_folder, port=free_port(), max_batch=1,
                         prediction_type="v_prediction", zero_snr=True)
    body = dict(prompt="a fox", steps=3, width=32, height=32, seed=5, cfg_scale=6,
                sampler_name="Euler")
    with LocalServer(config) as url:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))),
                     dtype=np.int16)
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, device="cpu", prediction_type="v_prediction")
    pipe.set_scheduler_config(**ZERO_SNR)
    want = pipe("a fox", negative_prompt="", num_inference_steps=3, width=32, height=32, seed=5,
                guidance_scale=6.0, sampler="euler")[0]
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1
    plain = Pipeline.from_pretrained(tiny_sd1_folder, device="cpu")(
        "a fox", negative_prompt="", num_inference_steps=3, width=32, height=32, seed=5,
        guidance_scale=6.0, sampler="euler")[0]
    assert np.abs(got - np.asarray(plain, dtype=np.int16)).max() > 2
