"""What people bring from AUTOMATIC1111, together through the CLI: a single-file checkpoint, a
kohya LoRA (named in the prompt by A1111's <lora:NAME:SCALE> tag), an A1111 embedding, and a
weighted prompt longer than 75 tokens; the PNG it writes regenerates the same image with
--from-png. The tiny SD 1-like model, written as a diffusers folder and as an LDM file."""
import re

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from sdrt.engine.cli import main
from test_loading import _write_ldm_file
from test_lora import random_lora, sdrt_models, write_kohya

WORDS = ", ".join(f"word{i}" for i in range(30))  # with the rest, past 75 tokens


def _parameters(path):
    with Image.open(path) as im:
        return im.text["parameters"]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_checkpoint_lora_embedding_and_long_weighted_prompt_regenerate(tiny_sd1, tmp_path,
                                                                        capsys):
    folder, _ = tiny_sd1
    checkpoint = _write_ldm_file(("sd1", folder, tiny_sd1[1]), tmp_path)
    lora = write_kohya(random_lora(sdrt_models(folder), seed=8, alpha=2.0),
                       tmp_path / "style.safetensors")
    embedding = tmp_path / "sdrtstyle.safetensors"
    vectors = -0.4 + torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    save_file({"emb_params": vectors.contiguous()}, str(embedding))
    prompt = f"a (red:1.3) fox in sdrtstyle, [blurry] {WORDS} <lora:style:0.7>"
    assets = ["--model", checkpoint, "--config", folder, "--lora", lora,
              "--embedding", str(embedding)]
    first = tmp_path / "first.png"
    assert main(["generate", prompt, *assets, "--steps", "2", "--height", "32", "--width", "32",
                 "--seed", "5", "--negative", "ugly, (bad:1.2)", "-o", str(first)]) == 0
    params = _parameters(first)
    assert params.startswith(prompt + "\n"), params
    assert re.search(r'Lora hashes: "style: [0-9a-f]{12}"', params), params
    assert re.search(r'TI hashes: "sdrtstyle: [0-9a-f]{12}"', params), params
    assert re.search(r"Model: model, ", params), params

    # Each asset changes the image: without them the same settings give another picture.
    bare = tmp_path / "bare.png"
    assert main(["generate", prompt.replace(" <lora:style:0.7>", ""), "--model", checkpoint,
                 "--config", folder, "--steps", "2", "--height", "32", "--width", "32",
                 "--seed", "5", "--negative", "ugly, (bad:1.2)", "-o", str(bare)]) == 0
    assert not np.array_equal(_pixels(first), _pixels(bare))

    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), *assets, "-o", str(again)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert np.array_equal(_pixels(first), _pixels(again))
    assert _parameters(again) == params

    # The PNG names its LoRA: regenerating without the file is refused, naming it.
    assert main(["generate", "--from-png", str(first), "--model", checkpoint, "--config", folder,
                 "--embedding", str(embedding), "-o", str(tmp_path / "x.png")]) == 2
    assert "<lora:style>" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
