"""Code written for diffusers' pipelines runs on sdrt's: ``from_pretrained(torch_dtype=...)``,
``pipe.to(...)`` where the pipeline is, ``pipe(...).images[0]``, ``return_dict=False`` and
``callback_on_step_end``; and what does not fit is refused by name."""
import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline, SdrtError

KW = dict(num_inference_steps=3, height=32, width=32, seed=5, sampler="euler")


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return Pipeline.from_pretrained(tiny_sd1_folder, device="cpu", torch_dtype=torch.float32)


def test_a_diffusers_script_runs_unchanged(tiny_sd1_folder):
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, torch_dtype=torch.float32)
    pipe = pipe.to("cpu")
    image = pipe("a red fox in the snow", num_inference_steps=3, height=32, width=32).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    with pytest.raises(SdrtError, match="dtype and torch_dtype cannot both be given"):
        Pipeline.from_pretrained(tiny_sd1_folder, dtype="fp32", torch_dtype=torch.float32)


def test_outputs_are_also_diffusers_outputs(pipe):
    images = pipe("a fox", **KW)
    assert images.images is images and images.nsfw_content_detected is None
    assert isinstance(images, list) and isinstance(images[0], Image.Image)
    array = pipe("a fox", output_type="np", **KW)
    assert array.images is array and array.shape == (1, 32, 32, 3)
    assert np.array_equal(np.asarray(images[0]), (array[0] * 255).round().astype(np.uint8))
    # what is computed from it is a plain array or number
    assert type(array - array) is np.ndarray and type(array.max()) is np.float32
    tensor = pipe("a fox", output_type="pt", **KW)  # diffusers' torch output
    assert tensor.shape == (1, 3, 32, 32) and tensor.dtype == torch.float32
    assert np.array_equal(tensor.permute(0, 2, 3, 1).numpy(), array)
    pair = pipe("a fox", output_type="np", return_dict=False, **KW)
    assert isinstance(pair, tuple) and pair[1] is None and np.array_equal(pair[0], array)
    latents, nsfw = pipe("a fox", output_type="latent", return_dict=False, **KW)
    assert isinstance(latents, torch.Tensor) and latents.shape[0] == 1 and nsfw is None
    with pytest.raises(SdrtError, match="return_dict must be True or False, got 'yes'"):
        pipe("a fox", return_dict="yes", **KW)


def test_callback_on_step_end_is_callback(pipe):
    def halve(p, i, t, kwargs):
        seen.append((i, p.num_timesteps))
        return {"latents": kwargs["latents"] * 0.9}
    seen = []
    a = pipe("a fox", output_type="np", callback_on_step_end=halve,
             callback_on_step_end_tensor_inputs=["latents"], **KW)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    seen = []
    b = pipe("a fox", output_type="np", callback=halve, **KW)
    assert np.array_equal(a, b) and len(seen) == 3
    assert np.abs(a - pipe("a fox", output_type="np", **KW)).max() > 0.01
    with pytest.raises(SdrtError, match="callback and callback_on_step_end cannot both be"):
        pipe("a fox", callback=halve, callback_on_step_end=halve, **KW)
    with pytest.raises(SdrtError, match="callback_on_step_end_tensor_inputs: sdrt passes the "
                                        "latents only \\(\\['latents'\\]\\), got "
                                        "\\['latents', 'prompt_embeds'\\]"):
        pipe("a fox", callback_on_step_end=halve,
             callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **KW)


def test_to_is_where_the_pipeline_is(pipe):
    assert pipe.to("cpu") is pipe and pipe.to(torch.device("cpu")) is pipe
    assert pipe.to(torch.float32) is pipe and pipe.to("cpu", torch_dtype=torch.float32) is pipe
    assert pipe.to("cpu", "fp32") is pipe
    with pytest.raises(SdrtError, match="Pipeline.to: this pipeline was loaded on cpu in "
                                        "torch.float32; .* from_pretrained\\(..., "
                                        "device='cuda', dtype=torch.float32\\)"):
        pipe.to("cuda")
    with pytest.raises(SdrtError, match="dtype=torch.float16\\)"):
        pipe.to(torch.float16)
    with pytest.raises(SdrtError, match="Pipeline.to: device must be .*, got 'tpu:x'"):
        pipe.to("tpu:x")


def test_eta_as_diffusers_reads_it(pipe):
    # Only diffusers' DDIM reads eta; the other samplers draw the same image whatever it is.
    plain = pipe("a fox", output_type="np", **KW)
    assert np.array_equal(pipe("a fox", output_type="np", eta=0.7, **KW), plain)
    ddim = {**KW, "sampler": "ddim"}
    assert np.array_equal(pipe("a fox", output_type="np", eta=0.0, **ddim),
                          pipe("a fox", output_type="np", **ddim))
    with pytest.raises(SdrtError, match="eta above 0 is not supported with cfgpp_ddim"):
        pipe("a fox", eta=0.5, **{**ddim, "sampler": "cfgpp_ddim"})
    with pytest.raises(SdrtError, match="eta must be a number from 0 to 1, got -1"):
        pipe("a fox", eta=-1, **KW)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(tiny_sd1, eta):
    # DDIM with fresh noise, drawn from the images' generators as diffusers' step draws it.
    from diffusers import DDIMScheduler
    folder, ref = tiny_sd1
    ours = Pipeline.from_pretrained(folder, device="cpu")
    scheduler = ref.scheduler
    ref.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        kw = dict(height=16, width=24, num_inference_steps=5, guidance_scale=6.0,
                  output_type="np")
        prompts = ["a red fox in the snow", "a lighthouse at dusk"]
        expected = ref(prompts, eta=eta, generator=[torch.Generator().manual_seed(s)
                                                    for s in (3, 4)], **kw).images
        got = ours(prompts, eta=eta, sampler="ddim", generator=[
            torch.Generator().manual_seed(s) for s in (3, 4)], **kw)
        assert np.abs(got - expected).max() <= 2e-3, np.abs(got - expected).max()
        plain = ours(prompts, sampler="ddim", generator=[
            torch.Generator().manual_seed(s) for s in (3, 4)], **kw)
        assert np.abs(plain - got).max() > 1e-2, "eta changed nothing"
    finally:
        ref.scheduler = scheduler


def test_ddim_eta_static_plan_is_the_eager_run():
    # The plan's step noise is drawn before the replay, as the eager DDIM draws it step by
    # step: one generator for the batch, and one per image; a plan per eta.
    from conftest import run_eagerly
    from sdrt.engine.tiny import tiny_components
    pipe = Pipeline(tiny_components(), torch.device("cpu"), torch.float32)
    kw = dict(height=64, width=64, num_inference_steps=4, sampler="ddim", output_type="np",
              num_images_per_prompt=2)
    pipe.compile(height=64, width=64, batch_size=2, num_inference_steps=4, sampler="ddim",
                 eta=0.8, strict=True)
    for generator in (lambda: dict(seed=5),
                      lambda: dict(generator=[torch.Generator().manual_seed(s) for s in (5, 6)])):
        got = pipe("a fox", eta=0.8, **generator(), **kw)
        want = run_eagerly(pipe, prompt="a fox", eta=0.8, **generator(), **kw)
        assert np.abs(got - want).max() <= 1e-5
        plain = run_eagerly(pipe, prompt="a fox", **generator(), **kw)
        assert np.abs(got - plain).max() > 1e-2
    with pytest.raises(SdrtError, match="static plan"):  # (another eta: another plan)
        pipe("a fox", eta=0.3, seed=5, **kw)
    with pytest.raises(SdrtError, match="eta must be a number from 0 to 1"):
        pipe.compile(height=64, width=64, sampler="ddim", eta=2)


@pytest.mark.gpu
def test_ddim_eta_replays_as_cuda_graphs_equal_to_eager():
    from conftest import run_eagerly
    from test_runtime import _tiny_cuda_pipe
    pipe = _tiny_cuda_pipe()
    pipe.compile(height=64, width=64, batch_size=2, num_inference_steps=4, sampler="ddim",
                 eta=0.8, strict=True)
    kw = dict(prompt="a fox", height=64, width=64, num_inference_steps=4, sampler="ddim",
              output_type="np", num_images_per_prompt=2, eta=0.8, seed=5)
    assert np.abs(pipe(**kw) - run_eagerly(pipe, **kw)).max() <= 2e-3


def test_cli_eta_and_its_png_info(tiny_sd1_folder, tmp_path, capsys):
    # --eta for DDIM: the library's image, written to the PNG as A1111 writes it ("Eta DDIM"),
    # which --from-png reads back.
    from sdrt.engine.cli import main
    out = tmp_path / "eta.png"
    argv = ["generate", "a red fox", "--model", tiny_sd1_folder, "--sampler", "ddim", "--eta",
            "0.6", "--steps", "3", "--width", "32", "--height", "32", "--seed", "7", "-o",
            str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    with Image.open(out) as im:
        info, got = im.info["parameters"], np.asarray(im.convert("RGB"), dtype=np.int16)
    assert "Eta DDIM: 0.6" in info, info
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, device="cpu")
    want = pipe("a red fox", sampler="ddim", eta=0.6, num_inference_steps=3, width=32,
                height=32, seed=7)[0]
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", tiny_sd1_folder, "-o",
                 str(again)]) == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB"), dtype=np.int16), got)
    assert main(argv[:-2] + ["--eta", "2", "-o", str(tmp_path / "bad.png")]) == 2
    assert "--eta must be a number from 0 to 1, got 2" in capsys.readouterr().err
