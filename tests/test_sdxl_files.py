"""SDXL as people get it: single-file SGM checkpoints (base and refiner) and the command line.

A single file written in the real SGM key layout (``sgm_checkpoints.write_sgm``, with the
extra keys real files carry) must load to the very outputs of the diffusers folder it was
made from. ``sdrt generate`` with ``--prompt-2``, the micro-conditioning options and
``--refiner`` must write the image the API makes from the same settings, and record the
refiner in the PNG info as A1111 does.
"""
import numpy as np
import torch
import pytest
from PIL import Image

from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

H, W, STEPS = 32, 48, 3
SAME = 1e-6  # the same weights through another loader: the same float32 numbers


def _single_file(tmp_path, family, ref):
    from sgm_checkpoints import write_sgm
    path = tmp_path / f"{family}.safetensors"
    write_sgm(path, family, ref.unet, ref.vae, getattr(ref, "text_encoder", None),
              ref.text_encoder_2)
    return str(path)


def test_base_single_file_equals_folder(sdxl_base_folder, tmp_path):
    folder, ref = sdxl_base_folder
    path = _single_file(tmp_path, "sdxl", ref)
    from_folder = Pipeline.from_pretrained(folder, device="cpu")
    from_file = Pipeline.from_pretrained(path, device="cpu", config=folder)
    assert from_file.family.name == "sdxl" and from_file.force_zeros_for_empty_prompt
    kw = dict(prompt="a red fox", prompt_2="watercolor", height=H, width=W,
              num_inference_steps=STEPS, guidance_scale=5.0, seed=4, output_type="np",
              original_size=(64, 96), crops_coords_top_left=(4, 8))
    a, b = from_folder(**kw), from_file(**kw)
    assert a.std() > 0.02, "a flat image proves nothing"
    assert np.abs(a - b).max() <= SAME, np.abs(a - b).max()


def test_v_pred_marked_single_file_runs_zero_snr_v_prediction(sdxl_base_folder, tmp_path):
    # NoobAI-XL V-Pred's kind: the markers ComfyUI and A1111 read, over --config's scheduler.
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdrt.engine.request import ZERO_SNR
    folder, ref = sdxl_base_folder
    path = _single_file(tmp_path, "sdxl", ref)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    marked = str(tmp_path / "vpred.safetensors")
    save_file({**tensors, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, marked)
    from_file = Pipeline.from_pretrained(marked, device="cpu", config=folder)
    cfg = from_file.scheduler_config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    from_folder = Pipeline.from_pretrained(folder, device="cpu")
    from_folder.set_scheduler_config(prediction_type="v_prediction", **ZERO_SNR)
    kw = dict(prompt="a red fox", height=H, width=W, num_inference_steps=STEPS,
              guidance_scale=5.0, seed=4, output_type="np", sampler="euler")
    a, b = from_folder(**kw), from_file(**kw)
    assert a.std() > 0.02, "a flat image proves nothing"
    assert np.abs(a - b).max() <= SAME, np.abs(a - b).max()
    plain = Pipeline.from_pretrained(folder, device="cpu")(**kw)
    assert np.abs(plain - b).max() > 0.02
    eps = Pipeline.from_pretrained(marked, device="cpu", config=folder, prediction_type="epsilon")
    assert eps.scheduler_config.prediction_type == "epsilon"


def test_refiner_single_file_equals_folder(sdxl_refiner_folder, tmp_path):
    folder, ref = sdxl_refiner_folder
    path = _single_file(tmp_path, "sdxl-refiner", ref)
    from_folder = Pipeline.from_pretrained(folder, device="cpu")
    from_file = Pipeline.from_pretrained(path, device="cpu", config=folder)
    assert from_file.family.name == "sdxl-refiner" and from_file.text_encoder is None
    image = np.random.default_rng(0).random((H, W, 3), dtype=np.float32)
    kw = dict(prompt="a red fox", image=image, strength=0.6, num_inference_steps=STEPS,
              guidance_scale=5.0, seed=4, output_type="np", aesthetic_score=7.0)
    a, b = from_folder(**kw), from_file(**kw)
    assert np.abs(a - b).max() <= SAME, np.abs(a - b).max()


def _parameters(path):
    return Image.open(path).info["parameters"]


def test_cli_base_and_refiner_match_the_api(sdxl_base_folder, sdxl_refiner_folder, tmp_path,
                                            capsys):
    base_dir, _ = sdxl_base_folder
    refiner_dir, _ = sdxl_refiner_folder
    out = tmp_path / "fox.png"
    argv = ["generate", "a red fox", "--model", base_dir, "--prompt-2", "watercolor",
            "--negative", "blurry", "--refiner", refiner_dir, "--refiner-start", "0.7",
            "--original-size", "96x64", "--crop", "8,4", "--aesthetic-score", "7",
            "--steps", str(STEPS), "--height", str(H), "--width", str(W), "--seed", "9",
            "--guidance", "5", "--batch", "2", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    paths = [tmp_path / "fox-0.png", tmp_path / "fox-1.png"]
    info = _parameters(paths[1])
    assert "Seed: 10" in info and "Refiner switch at: 0.7" in info, info
    assert "Refiner: model [" in info, info  # the folder's name and short hash

    import torch
    base = Pipeline.from_pretrained(base_dir, device="cpu")
    refiner = Pipeline.from_pretrained(refiner_dir, device="cpu")
    generators = [torch.Generator().manual_seed(s) for s in (9, 10)]
    call = dict(negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
                generator=generators, num_images_per_prompt=2)
    latents = base("a red fox", prompt_2="watercolor", height=H, width=W, denoising_end=0.7,
                   output_type="latent", original_size=(64, 96), crops_coords_top_left=(4, 8),
                   **call)
    images = refiner("a red fox", image=latents, denoising_start=0.7, aesthetic_score=7.0,
                     original_size=(64, 96), crops_coords_top_left=(4, 8), **call)
    for path, image in zip(paths, images):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image)), path


def test_cli_refuses_what_the_family_does_not_take(tiny_sd1_folder, sdxl_base_folder,
                                                   tmp_path, capsys):
    base_dir, _ = sdxl_base_folder
    out = str(tmp_path / "x.png")
    cases = [
        (["--model", tiny_sd1_folder, "--prompt-2", "x"], "--prompt-2 is not used by SD 1.x"),
        (["--model", base_dir, "--aesthetic-score", "6"],
         "--aesthetic-score is not used by SDXL"),
        (["--model", tiny_sd1_folder, "--refiner", base_dir], "--refiner continues an SDXL"),
        (["--model", base_dir, "--original-size", "64"], "expected WIDTHxHEIGHT"),
    ]
    for extra, message in cases:
        argv = ["generate", "a fox", "--steps", "1", "--height", str(H), "--width", str(W),
                "-o", out, *extra]
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusal
            code = e.code
        err = capsys.readouterr().err
        assert code != 0 and message in err, (extra, err)
        assert "Traceback" not in err


def test_api_refuses_a_split_past_the_schedule(sdxl_base_folder):
    pipe = Pipeline.from_pretrained(sdxl_base_folder[0], device="cpu")
    with pytest.raises(SdrtError, match="leaves no denoising step"):
        pipe("a fox", height=H, width=W, num_inference_steps=2, denoising_end=0.01)
    with pytest.raises(SdrtError, match="denoising_start must be None without an image"):
        pipe("a fox", height=H, width=W, num_inference_steps=2, denoising_start=0.5)


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_sdrt_writer_folders_load_in_diffusers_to_the_same_image(family, tmp_path):
    # The GPU machine has no diffusers: its SDXL tests run on folders sdrt writes. Here
    # diffusers loads such a folder and must draw what sdrt draws from it.
    diffusers = pytest.importorskip("diffusers")
    from sdrt.engine.tiny import tiny_config, write_model
    folder = str(tmp_path / family)
    write_model(folder, tiny_config(family))
    ours = Pipeline.from_pretrained(folder, device="cpu")
    assert ours.family.name == family
    kw = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=STEPS,
              guidance_scale=5.0, output_type="np")
    import torch
    if family == "sdxl":
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
        latents = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
        kw.update(height=H, width=W, latents=latents)
    else:
        ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
        image = np.random.default_rng(1).random((H, W, 3), dtype=np.float32)
        kw.update(image=image, strength=0.6)
    ref.set_progress_bar_config(disable=True)
    expected = ref(generator=torch.Generator().manual_seed(2), **kw).images
    got = ours(generator=torch.Generator().manual_seed(2), sampler="euler",
               prompt_syntax="plain", **kw)
    assert got.std() > 0.02, "a flat image proves nothing"
    assert np.abs(got - expected).max() <= 2e-3, np.abs(got - expected).max()


def test_server_serves_an_sdxl_model_with_the_librarys_images(sdxl_base_folder):
    # Real HTTP on 127.0.0.1 with the openai SDK, the model an SDXL diffusers folder.
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from sdrt.serve.config import ServeConfig
    from sdrt.serve.local import LocalServer, free_port
    folder, _ = sdxl_base_folder
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    config = ServeConfig(model=folder, port=free_port(), max_batch=2, batch_window_ms=50,
                         default_steps=2)
    with LocalServer(config) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        res = client.images.generate(prompt="a red fox", n=1, size="48x32",
                                     response_format="b64_json",
                                     extra_body={"steps": 2, "seed": 5})
    import base64
    import io
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).convert("RGB"),
                     dtype=np.int16)
    # The server batches rows of many requests: an absent negative prompt is the empty prompt,
    # encoded, as A1111 does it (not SDXL's zeros of diffusers' force_zeros_for_empty_prompt).
    want = np.asarray(pipe("a red fox", negative_prompt="", height=32, width=48,
                           num_inference_steps=2, seed=5)[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()


@pytest.mark.parametrize("edit,message", [
    (("unet", "projection_class_embeddings_input_dim", 70),
     r"unet config projection_class_embeddings_input_dim must equal text_encoder_2 config "
     r"projection_dim \(32\) \+ 6 time ids × unet config addition_time_embed_dim \(8\) = 80, "
     r"got 70$"),
    (("unet", "cross_attention_dim", 32),
     r"unet config cross_attention_dim must equal text_encoder config hidden_size \(32\) \+ "
     r"text_encoder_2 config hidden_size \(32\) = 64, got 32$"),
    (("text_encoder_2", "architectures", ["CLIPTextModel"]),
     r"text_encoder_2 must be a CLIPTextModelWithProjection"),
])
def test_sdxl_components_that_do_not_fit_together(tmp_path, edit, message):
    import json
    import os
    from sdrt.engine.tiny import tiny_config, write_model
    folder = str(tmp_path / "sdxl")
    write_model(folder, tiny_config("sdxl"))
    component, key, value = edit
    path = os.path.join(folder, component, "config.json")
    config = json.load(open(path))
    config[key] = value
    json.dump(config, open(path, "w"))
    with pytest.raises(SdrtError, match=message):
        Pipeline.from_pretrained(folder, device="cpu")


def test_cli_sdxl_lora_tag_and_embedding_match_the_api(sdxl_base_folder, tmp_path, capsys):
    # A kohya SDXL LoRA named by a <lora:...> tag and an SDXL embedding, through the CLI: the
    # image of the API with the same files, and both recorded in the PNG info.
    from test_lora_sdxl import random_lora, write_embedding, write_kohya

    import torch
    folder, ref = sdxl_base_folder
    api = Pipeline.from_pretrained(folder, device="cpu")
    lora = write_kohya(random_lora(api, seed=3), tmp_path / "xlstyle.safetensors",
                       dict(ref.unet.config))
    embedding = write_embedding(tmp_path / "xltoken.safetensors", 2, seed=4)
    out = tmp_path / "fox.png"
    argv = ["generate", "a red fox, xltoken <lora:xlstyle:0.6>", "--model", folder,
            "--lora", str(lora), "--embedding", str(embedding), "--steps", str(STEPS),
            "--height", str(H), "--width", str(W), "--seed", "2", "--guidance", "5",
            "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    info = _parameters(out)
    assert "Lora hashes: \"xlstyle: " in info and "TI hashes: \"xltoken: " in info, info

    api.load_lora(lora, scale=0.6)
    api.load_textual_inversion(str(embedding))
    want = api("a red fox, xltoken", num_inference_steps=STEPS, height=H, width=W,
               guidance_scale=5.0, generator=[torch.Generator().manual_seed(2)])[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
