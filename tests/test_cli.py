"""The ``sdrt`` command: the happy paths, and every bad input as one line + exit status 2."""
import os
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from sdrt.engine.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli") / "tiny")
    assert main(["make-tiny", folder]) == 0
    return folder


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_builtin_tiny_model_writes_png_with_parameters(tmp_path, capsys):
    out = tmp_path / "fox.png"
    code, stdout, err = _run(["generate", "a red fox", "--steps", "4", "--seed", "3",
                              "-o", str(out)], capsys)
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == (128, 128)
        params = im.text["parameters"]
    assert params.startswith("a red fox\n") and "Steps: 4" in params and "Seed: 3" in params
    assert "denoise" in stdout and str(out) in stdout
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "PNG not created with the umask"


def test_make_tiny_refuses_a_file_and_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    for target in ("file", "full"):
        code, _, err = _run(["make-tiny", str(tmp_path / target)], capsys)
        assert code == 2 and "exists and is not an empty folder" in err
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "full" / "keep").exists()


def test_make_tiny_folder_loads_and_reproduces_builtin(tiny_dir, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = ["generate", "a red fox", "--steps", "3", "--seed", "9", "--negative", "blur"]
    assert _run(args + ["-o", str(a)], capsys)[0] == 0
    assert _run(args + ["--model", tiny_dir, "-o", str(b)], capsys)[0] == 0
    with Image.open(a) as ia, Image.open(b) as ib:
        assert list(ia.getdata()) == list(ib.getdata())


def test_batch_img2img_and_sampler(tiny_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 48), (200, 90, 30)).save(init)
    out = tmp_path / "out.png"
    code, _, err = _run(["generate", "a red fox", "--model", tiny_dir, "--steps", "4",
                         "--batch", "2", "--init-image", str(init), "--strength", "0.5",
                         "--sampler", "dpmpp_2m", "-o", str(out)], capsys)
    assert code == 0, err
    for p in (tmp_path / "out-0.png", tmp_path / "out-1.png"):
        with Image.open(p) as im:
            assert im.size == (64, 48)
            assert "Sampler: dpmpp_2m" in im.text["parameters"]


def _broken_copy(tiny_dir, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    edit(folder)
    return str(folder)


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _edit_config(path, **changes):
    import json
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


# Each case: extra CLI arguments (with {model} for a broken copy of the tiny model), a broken
# model edit or None, and a fragment the one-line message must contain.
BAD = {
    "missing model path": (["--model", "/nonexistent/model"], None, "does not exist"),
    "folder without model_index": (["--model", "{tmp}"], None, "model_index.json"),
    "pickle checkpoint": (["--model", "{tmp}/model.ckpt"], None, "convert it to .safetensors"),
    "missing component": (["--model", "{model}"],
                          lambda f: os.remove(f / "vae" / "diffusion_pytorch_model.safetensors"),
                          "vae/diffusion_pytorch_model.safetensors is missing"),
    "missing config": (["--model", "{model}"], lambda f: os.remove(f / "unet" / "config.json"),
                       "unet/config.json is missing"),
    "truncated safetensors": (["--model", "{model}"],
                              lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
                              "not a readable safetensors file"),
    "corrupt safetensors": (["--model", "{model}"],
                            lambda f: open(f / "text_encoder" / "model.safetensors", "wb").write(
                                b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}      "),
                            "not a readable safetensors file"),
    "shape does not fit config": (["--model", "{model}"],
                                  lambda f: _edit_config(f / "unet" / "config.json",
                                                         cross_attention_dim=48),
                                  "attn2.to_k.weight has shape (32, 64), the config expects (32, 48)"),
    "config value of the wrong type": (["--model", "{model}"],
                                       lambda f: _edit_config(f / "unet" / "config.json",
                                                              layers_per_block="two"),
                                       "the unet config does not describe a model"),
    "groups that do not divide channels": (["--model", "{model}"],
                                           lambda f: _edit_config(f / "vae" / "config.json",
                                                                  norm_num_groups=7),
                                           "must be divisible by num_groups (7)"),
    "clip skip past the text encoder": (["--clip-skip", "2"], None,
                                        "clip_skip must be from 0 to 1, got 2"),
    "seed past 64 bits": (["--seed", str(2 ** 64)], None, "seed must be an integer from 0"),
    "init image smaller than a latent pixel": (["--init-image", "{tmp}/dot.png"], None,
                                               "init image of 4x4 is smaller than 8 pixels"),
    "height not multiple of 8": (["--height", "100"], None, "--height must be a multiple of 8"),
    "width out of range": (["--width", "8192"], None, "--width must be a multiple of 8"),
    "zero steps": (["--steps", "0"], None, "must be at least 1"),
    "strength zero": (["--init-image", "{tmp}/init.png", "--strength", "0"], None,
                      "--strength must be in (0, 1]"),
    "strength above one": (["--init-image", "{tmp}/init.png", "--strength", "1.5"], None,
                           "--strength must be in (0, 1]"),
    "unknown sampler": (["--sampler", "lms"], None, "unknown sampler 'lms'"),
    "unreadable init image": (["--init-image", "{tmp}/notes.png"], None, "cannot read init image"),
    "missing init image": (["--init-image", "{tmp}/nope.png"], None, "cannot read init image"),
    "output not png": (["-o", "{tmp}/out.jpg"], None, "must end in .png"),
    "output folder missing": (["-o", "/nonexistent/dir/out.png"], None, "cannot write to"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tiny_dir, tmp_path, capsys):
    extra, edit, fragment = BAD[case]
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "dot.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 pickle")
    model = _broken_copy(tiny_dir, tmp_path, edit) if edit else None
    extra = [e.format(model=model, tmp=tmp_path) for e in extra]
    out = tmp_path / "out.png"
    argv = ["generate", "a red fox", "--steps", "2", "-o", str(out)] + extra
    if "-o" in extra:
        argv = ["generate", "a red fox", "--steps", "2"] + extra
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdrt: error: "), err
    assert fragment in lines[0], lines[0]
    assert not out.exists(), "a failed run left an output file"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_through_console_script(tmp_path):
    # The real installed console script: exit status 2 and one line, no traceback.
    exe = shutil.which("sdrt") or pytest.skip("sdrt console script not installed")
    r = subprocess.run([exe, "generate", "x", "--device", "cuda", "-o", str(tmp_path / "o.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "sdrt: error: device cuda was asked for, but no CUDA GPU is available"]
