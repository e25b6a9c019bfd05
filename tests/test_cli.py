"""The ``sdrt`` command: the happy paths, and every bad input as one line + exit status 2.

In-process calls of ``main`` where the exit status and the captured output are enough; child
processes where what matters is the process itself: its exit status and stderr as a user sees
them, whether torch was imported, how long a refusal took, what Ctrl-C prints.
"""
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine.cli import _parser, main

SMALL = ["--steps", "1", "--height", "64", "--width", "64"]  # a fast run of the built-in model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli") / "tiny")
    assert main(["make-tiny", folder]) == 0
    return folder


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _stderr_lines(err):
    """stderr as lines a terminal shows, without the progress bar's redraws."""
    return [line for line in re.split(r"[\r\n]", err)
            if line.strip() and not line.startswith("denoising")]


def _assert_one_error_line(err, fragment):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdrt: error: "), err
    assert fragment in lines[0], lines[0]
    assert not re.search(r"\b\w+(Error|Exception)\b", lines[0][len("sdrt: error: "):]), \
        f"a Python class name in {lines[0]!r}"


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _parameters(path):
    with Image.open(path) as im:
        return im.text["parameters"]


def assert_png_round_trip(base, option, recorded, tmp_path, capsys, from_png=()):
    """``sdrt generate`` with ``base`` + ``option`` records ``recorded`` in its PNG info,
    ``--from-png`` of it (+ ``from_png``, the files PNG info cannot carry) draws the same
    picture, and ``base`` alone neither records it nor draws that picture. Returns the PNG's
    path."""
    out, again, plain = (tmp_path / f"{name}.png" for name in ("option", "again", "plain"))
    for argv, path in (([*base, *option], out), (["generate", "--from-png", str(out),
                                                   *from_png], again), (base, plain)):
        code, _, err = _run([*argv, "-o", str(path)], capsys)
        assert code == 0, err
    assert recorded in _parameters(out), _parameters(out)
    assert np.array_equal(_pixels(again), _pixels(out))
    key = recorded.strip(", ").split(":")[0]
    assert key not in _parameters(plain)
    assert np.abs(_pixels(plain).astype(int) - _pixels(out)).max() > 2
    return out


# -- child processes ---------------------------------------------------------------------------

# Runs main() with the given arguments and reports, as its last stdout line, whether torch was
# imported and how long the import of the CLI plus the call took.
CHILD = """import sys, time
start = time.perf_counter()
from sdrt.engine.cli import main
status = main(sys.argv[1:])
print(f"torch imported: {'torch' in sys.modules}; {time.perf_counter() - start:.3f} s")
sys.exit(status)
"""


def _child(argv, cwd, timeout=120):
    """(exit status, the CLI's stdout, stderr, torch imported, seconds)."""
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=cwd, capture_output=True,
                       timeout=timeout)
    out, err = r.stdout.decode(), r.stderr.decode(errors="backslashreplace")
    *lines, report = out.splitlines()
    m = re.fullmatch(r"torch imported: (True|False); ([0-9.]+) s", report)
    assert m, out
    return r.returncode, "\n".join(lines), err, m.group(1) == "True", float(m.group(2))


def _bad_files(folder):
    Image.new("RGB", (32, 32), (90, 120, 30)).save(folder / "init.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "a-folder").mkdir()
    (folder / "file.txt").write_text("x")


# Refused before torch is imported: (arguments, fragment of the one-line message). Relative
# paths are in the test's folder, which holds init.png, notes.png (text), a-folder/, file.txt.
REFUSED_EARLY = {
    "invalid UTF-8 prompt": (["generate", b"\xff\xfe red fox"],
                             "prompt must be valid Unicode text, got '\\udcff' at position 0"),
    "invalid UTF-8 negative": (["generate", "fox", "--negative", b"ok \xff"],
                               "--negative must be valid Unicode text, got '\\udcff' at "
                               "position 3"),
    "guidance inf": (["generate", "x", "--guidance", "inf"], "--guidance must be a finite number"),
    "guidance nan": (["generate", "x", "--guidance", "nan"], "--guidance must be a finite number"),
    "guidance 1e308": (["generate", "x", "--guidance", "1e308"],
                       "--guidance must be a finite number from 0 to 100"),
    "guidance not a number": (["generate", "x", "--guidance", "high"],
                              "argument --guidance: expected a number, got 'high'"),
    "batch 10000": (["generate", "x", "--batch", "10000"], "--batch must be an integer from 1 to"),
    "zero steps": (["generate", "x", "--steps", "0"], "--steps must be an integer from 1 to"),
    "steps not an integer": (["generate", "x", "--steps", "2.5"],
                             "argument --steps: expected an integer, got '2.5'"),
    "side past the limit": (["generate", "x", "--height", "8192"],
                            "--height must be an integer from 1 to 4096"),
    "seed below -1": (["generate", "x", "--seed", "-2"], "--seed must be -1 (random) or"),
    "seed past 64 bits": (["generate", "x", "--seed", str(2 ** 64)], "--seed must be -1 (random)"),
    "negative clip skip": (["generate", "x", "--clip-skip", "-1"], "--clip-skip must be"),
    "unknown sampler": (["generate", "x", "--sampler", "dpm_adaptive"],
                        "--sampler must be one of ddim"),
    "strength zero": (["generate", "x", "--init-image", "init.png", "--strength", "0"],
                      "--strength must be a number in (0, 1]"),
    "strength above one": (["generate", "x", "--init-image", "init.png", "--strength", "1.5"],
                           "--strength must be a number in (0, 1]"),
    "init image is a folder": (["generate", "x", "--init-image", "a-folder"],
                               "cannot read init image a-folder: is a folder"),
    "init image is text": (["generate", "x", "--init-image", "notes.png"],
                           "cannot read init image notes.png: not an image file"),
    "init image missing": (["generate", "x", "--init-image", "nope.png"],
                           "cannot read init image nope.png: no such file"),
    "mask without init image": (["generate", "x", "--mask", "mask.png"],
                                "--mask needs --init-image, the image to inpaint"),
    "hires with a model upscaler": (["generate", "x", "--hr-scale", "2", "--hr-upscaler",
                                     "R-ESRGAN 4x+"], "--hr-upscaler must be one of Latent"),
    "hires scale below 1": (["generate", "x", "--hr-scale", "0.5"],
                            "--hr-scale must be a number from 1 to 8"),
    "hires past the side limit": (["generate", "x", "--width", "4096", "--height", "512",
                                   "--hr-scale", "2"],
                                  "the hires fix's width must be at most 4096"),
    "hires of an init image": (["generate", "x", "--hr-scale", "2", "--init-image", "i.png"],
                               "it cannot be combined with --init-image"),
    "output not png": (["generate", "x", "-o", "out.jpg"], "-o out.jpg must end in .png"),
    "output folder missing": (["generate", "x", "-o", "no/such/dir/out.png"], "cannot write to"),
    "outdir is a file": (["generate", "x", "--outdir", "file.txt"],
                         "--outdir file.txt is a file, not a folder"),
    "absolute -o with outdir": (["generate", "x", "--outdir", "new", "-o", "/tmp/o.png"],
                                "-o /tmp/o.png is an absolute path"),
    "model missing": (["generate", "x", "--model", "no-model"],
                      "model path no-model does not exist"),
    "onnx dir is a file": (["generate", "x", "--runtime", "onnx", "--onnx-dir", "file.txt"],
                           "--onnx-dir file.txt is a file, not a folder"),
    "onnx runtime without dir": (["generate", "x", "--runtime", "onnx"],
                                 "--runtime onnx needs --onnx-dir"),
    "onnx runtime in bf16": (["generate", "x", "--runtime", "onnx", "--onnx-dir", "a-folder",
                              "--dtype", "bf16"], "not --dtype bf16"),
    "onnx runtime with a VAE dtype": (["generate", "x", "--runtime", "onnx", "--onnx-dir",
                                       "a-folder", "--vae-dtype", "bf16"],
                                      "--vae-dtype applies to sdrt's own VAE"),
    "unknown VAE dtype": (["generate", "x", "--vae-dtype", "fp8"],
                          "argument --vae-dtype: invalid choice: 'fp8'"),
    "onnx dir without onnx runtime": (["generate", "x", "--onnx-dir", "a-folder"],
                                      "--onnx-dir is only used with --runtime onnx"),
    "prompt missing": (["generate"], "a prompt is needed (or --from-png IMAGE.png to take it from a PNG)"),
    "unknown option": (["generate", "x", "--cfg", "3"], "unrecognized arguments: --cfg 3"),
    "unknown command": (["paint", "x"], "invalid choice: 'paint'"),
    "check-onnx on a file": (["check-onnx", "file.txt"],
                             "ONNX folder file.txt is a file, not a folder"),
    "check-onnx on nothing": (["check-onnx", "nope"], "ONNX folder nope does not exist"),
    "make-tiny over a file": (["make-tiny", "file.txt"], "exists and is not an empty folder"),
    "export of a missing model": (["export", "onnx", "--model", "nope", "--out", "o"],
                                  "model path nope does not exist"),
    # sdrt upscale: every setting, image and size before torch
    "upscale scale past 8": (["upscale", "init.png", "--scale", "9"],
                             "--scale must be from 1 to 8, got 9"),
    "upscale unknown upscaler": (["upscale", "init.png", "--upscaler", "R-ESRGAN 4x+"],
                                 "--upscaler must be a .safetensors upscale model, None, "
                                 "Lanczos, Nearest (or give --upscaler-dir); got 'R-ESRGAN 4x+'"),
    "upscale with a pickle": (["upscale", "init.png", "--upscaler", "4x.pth"],
                              "4x.pth: pickle checkpoints are not loaded"),
    "upscale with a text file": (["upscale", "init.png", "--upscaler-2", "file.txt"],
                                 "--upscaler-2 must be a .safetensors upscale model, None, "
                                 "Lanczos, Nearest (or give --upscaler-dir); got 'file.txt'"),
    "upscale a text file": (["upscale", "notes.png"], "cannot read image notes.png: not an "
                                                      "image file"),
    "upscale past the side limit": (["upscale", "init.png", "--scale", "8", "--resize", "9x9"],
                                    "not allowed with argument"),
    "upscale to a huge size": (["upscale", "init.png", "--resize", "5000x10"],
                               "--resize sides must be from 1 to 4096"),
    "upscale visibility": (["upscale", "init.png", "--upscaler-2", "Nearest",
                            "--upscaler-2-visibility", "1.5"],
                           "--upscaler-2-visibility must be from 0 to 1, got 1.5"),
    "upscale no-crop without resize": (["upscale", "init.png", "--no-crop"],
                                       "--no-crop applies to --resize"),
    "upscale to a jpeg": (["upscale", "init.png", "-o", "x.jpg"], "-o x.jpg must end in .png"),
    # sdrt generate --sd-upscale: the options, what it cannot be combined with, and the
    # upscaled size (from the init image's) against the tiles
    "sd upscale without init image": (["generate", "x", "--sd-upscale", "2"],
                                      "--sd-upscale upscales and redraws --init-image: pass it"),
    "sd upscale past 8": (["generate", "x", "--init-image", "init.png", "--sd-upscale", "9"],
                          "--sd-upscale must be a number from 1 to 8, got 9"),
    "sd upscale nan": (["generate", "x", "--init-image", "init.png", "--sd-upscale", "nan"],
                       "--sd-upscale must be a number from 1 to 8, got nan"),
    "sd upscale with a mask": (["generate", "x", "--init-image", "init.png", "--sd-upscale", "2",
                                "--mask", "init.png"],
                               "--sd-upscale (A1111's SD upscale) redraws tiles of --init-image "
                               "by plain image to image; it cannot be combined with --mask"),
    "sd upscale with the hires fix": (["generate", "x", "--init-image", "init.png",
                                       "--sd-upscale", "2", "--hr-resize", "64x64"],
                                      "it cannot be combined with --hr-resize"),
    "sd upscale with a refiner": (["generate", "x", "--init-image", "init.png", "--sd-upscale",
                                   "2", "--refiner", "a-folder"],
                                  "it cannot be combined with --refiner"),
    "sd upscale with a ControlNet": (["generate", "x", "--init-image", "init.png",
                                      "--sd-upscale", "2", "--controlnet", "a-folder",
                                      "--control-image", "init.png"],
                                     "it cannot be combined with --controlnet"),
    "sd upscale with an IP-Adapter": (["generate", "x", "--init-image", "init.png",
                                       "--sd-upscale", "2", "--ip-adapter", "a-folder",
                                       "--ip-adapter-image", "init.png"],
                                      "it cannot be combined with --ip-adapter"),
    "sd upscale overlap of a tile": (["generate", "x", "--init-image", "init.png",
                                      "--sd-upscale", "2", "--width", "64", "--height", "32",
                                      "--sd-upscale-overlap", "32"],
                                     "--sd-upscale-overlap must be an integer from 0 to 31 "
                                     "(below the tiles' sides, 64x32), got 32"),
    "sd upscale overlap negative": (["generate", "x", "--init-image", "init.png",
                                     "--sd-upscale", "2", "--sd-upscale-overlap", "-1"],
                                    "--sd-upscale-overlap must be an integer from 0 to 256 "
                                    "(below the tiles' sides, 512x512), got -1"),
    "sd upscale bad tile size": (["generate", "x", "--init-image", "init.png", "--sd-upscale",
                                  "2", "--width", "0"],
                                 "--width must be an integer from 1 to 4096"),
    "sd upscale unknown upscaler": (["generate", "x", "--init-image", "init.png",
                                     "--sd-upscale", "2", "--sd-upscale-upscaler",
                                     "R-ESRGAN 4x+"],
                                    "--sd-upscale-upscaler must be a .safetensors upscale model, "
                                    "None, Lanczos, Nearest (or give --upscaler-dir); got "
                                    "'R-ESRGAN 4x+'"),
    "sd upscale with a pickle": (["generate", "x", "--init-image", "init.png", "--sd-upscale",
                                  "2", "--sd-upscale-upscaler", "4x.pth"],
                                 "4x.pth: pickle checkpoints are not loaded"),
    "sd upscale smaller than a tile": (["generate", "x", "--init-image", "init.png",
                                        "--sd-upscale", "2", "--sd-upscale-upscaler",
                                        "Lanczos"],
                                       "--init-image init.png (32x32) upscaled by 2 with "
                                       "Lanczos is 64x64, smaller than the SD upscale tile "
                                       "512x512"),
    "sd upscale of the image as it is": (["generate", "x", "--init-image", "init.png",
                                          "--sd-upscale", "4", "--width", "64", "--height",
                                          "64", "--sd-upscale-overlap", "16"],
                                         "--init-image init.png (--sd-upscale-upscaler None: not "
                                         "upscaled) is 32x32, smaller than the SD upscale tile "
                                         "64x64"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_EARLY))
def test_refused_before_torch_is_imported(case, tmp_path):
    argv, fragment = REFUSED_EARLY[case]
    _bad_files(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, out, err, torch_imported, seconds = _child(argv, tmp_path)
    assert code == 2, err
    _assert_one_error_line(err, fragment)
    assert out == ""
    assert not torch_imported, "torch was imported before the arguments were checked"
    assert seconds < 1.0, f"a refusal took {seconds:.2f} s"
    assert sorted(os.listdir(tmp_path)) == before, "a refused call left a file or folder"


def test_sdrt_alone_prints_usage_to_stderr(tmp_path):
    code, out, err, torch_imported, _ = _child([], tmp_path)
    assert code == 2 and out == ""
    assert err.startswith("usage: sdrt ") and "generate" in err and "check-onnx" in err
    assert not torch_imported


def test_version(tmp_path):
    code, out, err, torch_imported, _ = _child(["--version"], tmp_path)
    assert code == 0, err
    assert out == f"sdrt {version('sdrt')}"
    assert not torch_imported


def test_bench_help_and_bad_option_return_a_status(capsys):
    # bench_pipeline.py parses its own options; main() returns its exit status, not raises.
    code, out, _ = _run(["bench", "--help"], capsys)
    assert code == 0 and "--repeats" in out
    code, _, err = _run(["bench", "--no-such-option"], capsys)
    assert code == 2 and "--no-such-option" in err


def test_package_imports_torch_only_for_the_pipeline():
    script = ("import sys\n"
              "from sdrt.engine import SdrtError\n"
              "print('torch' in sys.modules)\n"
              "from sdrt.engine import Pipeline\n"
              "print('torch' in sys.modules, Pipeline.__module__)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "sdrt.engine.pipeline"]


def test_every_option_explains_itself(capsys):
    """Every option of every subcommand has help text; the number options show a default."""
    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action.choices, dict):  # subcommands
                for sub, p in action.choices.items():
                    if sub != "bench":  # bench_pipeline.py's own options
                        yield from walk(p, f"{name} {sub}")
            elif action.help is None or not action.help.strip():
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"
    assert list(walk(_parser(), "sdrt")) == []
    code, out, _ = _run(["generate", "--help"], capsys)
    assert code == 0
    # Each option's block of the help: from its "  --name" line to the next option's.
    blocks = {b.split()[0].rstrip(","): " ".join(b.split())
              for b in re.split(r"\n  (?=-)", out.split("options:", 1)[1]) if b.strip()}
    for option, default in (("--steps", "50"), ("--guidance", "7.5"), ("--seed", "-1"),
                            ("--strength", "0.8"), ("--clip-skip", "0"), ("--batch", "1"),
                            ("-o", "sdrt.png")):
        assert blocks[option].endswith(f"(default: {default})"), blocks[option]
    for option in ("--height", "--width", "--device", "--dtype", "--sampler", "--model"):
        assert "default: " in blocks[option], blocks[option]
    text = " ".join(out.split())
    assert "On the CPU every request runs eagerly" in text


def test_interrupt_prints_on_its_own_line(tmp_path):
    argv = ["generate", "a red fox", "--steps", "400", "--height", "64", "--width", "64",
            "--guidance", "1", "-o", str(tmp_path / "o.png")]
    # Ctrl-C as at a terminal: a shell without job control starts background commands with
    # SIGINT ignored, and Python then keeps ignoring it, so the child restores the default.
    child = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + CHILD
    p = subprocess.Popen([sys.executable, "-c", child, *argv], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = b""
    deadline = time.monotonic() + 120
    try:
        while b"denoising" not in err:  # the bar is drawn: the loop is running
            assert time.monotonic() < deadline, err
            chunk = os.read(p.stderr.fileno(), 4096)
            assert chunk, f"the run ended before the bar was drawn: {err!r}"
            err += chunk
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        err += p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
    err = err.decode()
    assert p.returncode == 130, err
    assert err.endswith("\nsdrt: interrupted\n"), repr(err[-300:])
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "o.png")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


# -- generation --------------------------------------------------------------------------------

def test_generate_builtin_model_writes_png_with_parameters(tmp_path, capsys):
    out = tmp_path / "fox.png"
    code, stdout, err = _run(["generate", "a red fox", "--steps", "2", "--seed", "3",
                              "-o", str(out)], capsys)
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == (32, 32)  # the built-in demo model's size
        params = im.text["parameters"]
    assert params.startswith("a red fox\n") and "Steps: 2" in params and "Seed: 3" in params
    assert "denoise" in stdout and str(out) in stdout
    assert "build" not in stdout, "a CPU run built a static plan"
    assert _stderr_lines(err) == [], err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "PNG not created with the umask"


def test_random_seed_is_recorded(tmp_path, capsys):
    out = tmp_path / "r.png"
    code, stdout, err = _run(["generate", "a red fox", *SMALL, "--seed", "-1", "-o", str(out)],
                             capsys)
    assert code == 0, err
    seed = int(re.search(r"seed (\d+)", stdout).group(1))
    assert 0 <= seed < 2 ** 64
    assert f"Seed: {seed}," in _parameters(out)
    # The recorded seed gives the same image again.
    again = tmp_path / "again.png"
    assert _run(["generate", "a red fox", *SMALL, "--seed", str(seed), "-o", str(again)],
                capsys)[0] == 0
    assert np.array_equal(_pixels(out), _pixels(again))


def test_make_tiny_refuses_a_file_and_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    for target in ("file", "full"):
        code, _, err = _run(["make-tiny", str(tmp_path / target)], capsys)
        assert code == 2 and "exists and is not an empty folder" in err
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "full" / "keep").exists()


def test_make_demo_folder_loads_and_reproduces_builtin(tmp_path, capsys):
    demo_dir = str(tmp_path / "demo")
    assert _run(["make-demo", demo_dir], capsys)[0] == 0
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = ["generate", "a red fox", "--steps", "2", "--seed", "9", "--negative", "blur",
            "--guidance", "6", "--sampler", "euler"]
    assert _run(args + ["-o", str(a)], capsys)[0] == 0
    assert _run(args + ["--model", demo_dir, "-o", str(b)], capsys)[0] == 0
    assert np.array_equal(_pixels(a), _pixels(b))


def test_builtin_model_runs_at_its_own_defaults(tmp_path, capsys):
    """Without --model, the options not given take the demo model's demo_defaults (not 50
    steps and guidance 7.5); options given, and --from-png's settings, still win."""
    from sdrt.engine.demo.model import demo_config
    from sdrt.engine.infotext import SAMPLER_LABELS, number, parse
    d = demo_config()["demo_defaults"]
    out = tmp_path / "d.png"
    assert _run(["generate", "a red circle", "--seed", "1", "-o", str(out)], capsys)[0] == 0
    _, _, pairs = parse(_parameters(out))
    assert (pairs["Steps"], pairs["CFG scale"], pairs["Sampler"], pairs["Size"]) == (
        str(d["num_inference_steps"]), number(d["guidance_scale"]), SAMPLER_LABELS[d["sampler"]],
        f"{d['width']}x{d['height']}")
    given = tmp_path / "g.png"
    assert _run(["generate", "a red circle", "--seed", "1", "--steps", "3", "--guidance", "2",
                 "--sampler", "euler", "-o", str(given)], capsys)[0] == 0
    _, _, pairs = parse(_parameters(given))
    assert (pairs["Steps"], pairs["CFG scale"], pairs["Sampler"]) == ("3", "2", "Euler")
    again = tmp_path / "again.png"
    assert _run(["generate", "--from-png", str(given), "-o", str(again)], capsys)[0] == 0
    assert np.array_equal(_pixels(given), _pixels(again))


def test_batch_img2img_and_sampler(tiny_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 48), (200, 90, 30)).save(init)
    out = tmp_path / "out.png"
    code, _, err = _run(["generate", "a red fox", "--model", tiny_dir, "--steps", "2",
                         "--batch", "2", "--init-image", str(init), "--strength", "0.5",
                         "--sampler", "dpmpp_2m", "-o", str(out)], capsys)
    assert code == 0, err
    for p in (tmp_path / "out-0.png", tmp_path / "out-1.png"):
        with Image.open(p) as im:
            assert im.size == (64, 48)
            assert "Sampler: DPM++ 2M," in im.text["parameters"]  # A1111's label


def test_inpaint_with_a_mask(tiny_dir, tmp_path, capsys):
    # The same mask as white-on-black, as A1111's transparent PNG (opaque = repaint), and as
    # its inverse with --invert-mask gives the same image; without the mask, another.
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    white = np.zeros((48, 64), dtype=np.uint8)
    white[8:40, 16:48] = 255
    Image.fromarray(white).save(tmp_path / "m.png")
    Image.fromarray(255 - white).save(tmp_path / "inverse.png")
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., 3] = white  # colour left black: only the alpha may decide
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    outs = {}
    for name, extra in (("m", ["--mask", "m.png"]), ("alpha", ["--mask", "alpha.png"]),
                        ("inverse", ["--mask", "inverse.png", "--invert-mask"]), ("none", [])):
        out = tmp_path / f"out-{name}.png"
        extra = [str(tmp_path / e) if e.endswith(".png") else e for e in extra]
        code, _, err = _run(["generate", "a red fox", "--model", tiny_dir, "--steps", "2",
                             "--init-image", str(tmp_path / "i.png"), "--strength", "1",
                             "--seed", "3", "-o", str(out), *extra], capsys)
        assert code == 0, err
        outs[name] = _pixels(out)
    assert outs["m"].shape == (48, 64, 3)
    assert np.array_equal(outs["m"], outs["alpha"])
    assert np.array_equal(outs["m"], outs["inverse"])
    assert np.abs(outs["m"].astype(int) - outs["none"]).max() > 8
    from sdrt.engine.infotext import parse
    assert parse(_parameters(tmp_path / "out-m.png"))[2]["Mask blur"] == "4"
    # A1111's overlay: away from the mask (and its blur) every pixel is the init image's.
    init = np.asarray(Image.open(tmp_path / "i.png"))
    assert np.array_equal(outs["m"][:, :4], init[:, :4])
    assert not np.array_equal(outs["none"][:, :4], init[:, :4])

    # Only the masked area: cut out with 8 pixels of padding, drawn at 32x32, pasted back.
    out = tmp_path / "only.png"
    code, _, err = _run(["generate", "a red fox", "--model", tiny_dir, "--steps", "2",
                         "--init-image", str(tmp_path / "i.png"), "--mask",
                         str(tmp_path / "m.png"), "--inpaint-area", "masked",
                         "--masked-padding", "8", "--width", "32", "--height", "32",
                         "--strength", "1", "--seed", "3", "-o", str(out)], capsys)
    assert code == 0, err
    only = _pixels(out)
    assert only.shape == (48, 64, 3)
    assert np.array_equal(only[:, :4], init[:, :4])
    assert np.abs(only[16:32, 24:40].astype(int) - init[16:32, 24:40]).max() > 8
    pairs = parse(_parameters(out))[2]
    assert (pairs["Inpaint area"], pairs["Masked area padding"], pairs["Size"]) == \
        ("Only masked", "8", "32x32")
    assert "Masked content" not in pairs
    filled = tmp_path / "filled.png"
    code, _, err = _run(["generate", "a red fox", "--model", tiny_dir, "--steps", "2",
                         "--init-image", str(tmp_path / "i.png"), "--mask",
                         str(tmp_path / "m.png"), "--masked-content", "fill", "--strength",
                         "0.5", "--seed", "3", "-o", str(filled)], capsys)
    assert code == 0, err
    assert parse(_parameters(filled))[2]["Masked content"] == "fill"


def test_resize_modes_frame_the_init_image(tiny_dir, tmp_path, capsys):
    # --resize-mode crop/fill frames the 64x48 init image into 32x32 before anything else:
    # the same picture as the framed image given as it is. latent draws from the image's own
    # size, resized in the latents: 32x32 too, another picture.
    from sdrt.engine.images import fit_image
    init = Image.fromarray(np.random.default_rng(7).integers(0, 256, (48, 64, 3),
                                                             dtype=np.uint8))
    init.save(tmp_path / "i.png")
    common = ["generate", "a red fox", "--model", tiny_dir, "--steps", "2", "--strength",
              "0.6", "--seed", "5", "--width", "32", "--height", "32"]
    outs = {}
    for mode in ("resize", "crop", "fill", "latent"):
        out = tmp_path / f"{mode}.png"
        code, _, err = _run([*common, "--init-image", str(tmp_path / "i.png"), "--resize-mode",
                             mode, "-o", str(out)], capsys)
        assert code == 0, err
        assert _warnings(err) == [], err
        outs[mode] = _pixels(out)
        assert outs[mode].shape == (32, 32, 3)
        if mode != "latent":
            fit_image(init, 32, 32, mode).save(tmp_path / f"framed-{mode}.png")
            out = tmp_path / f"framed-{mode}-out.png"
            assert _run([*common, "--init-image", str(tmp_path / f"framed-{mode}.png"), "-o",
                         str(out)], capsys)[0] == 0
            assert np.array_equal(outs[mode], _pixels(out)), mode
    for a, b in itertools.combinations(outs, 2):
        assert np.abs(outs[a].astype(int) - outs[b]).max() > 8, (a, b)


def test_hires_fix_and_its_png_info(tiny_dir, tmp_path, capsys):
    # A1111's hires fix: 32x32, then 2x by the latent upscaler with 2 steps at strength 0.6;
    # the PNG says so as A1111 writes it, and --from-png draws the same picture again.
    from sdrt.engine.infotext import parse
    out = tmp_path / "hr.png"
    code, _, err = _run(["generate", "a red fox", "--model", tiny_dir, "--steps", "3",
                         "--width", "32", "--height", "32", "--hr-scale", "2", "--hr-steps",
                         "2", "--strength", "0.6", "--seed", "4", "-o", str(out)], capsys)
    assert code == 0, err
    assert _pixels(out).shape == (64, 64, 3)
    pairs = parse(_parameters(out))[2]
    assert {k: pairs[k] for k in ("Size", "Denoising strength", "Hires upscale", "Hires steps",
                                  "Hires upscaler")} == \
        {"Size": "32x32", "Denoising strength": "0.6", "Hires upscale": "2",
         "Hires steps": "2", "Hires upscaler": "Latent"}
    again = tmp_path / "again.png"
    assert _run(["generate", "--from-png", str(out), "--model", tiny_dir, "-o", str(again)],
                capsys)[0] == 0
    assert np.array_equal(_pixels(out), _pixels(again))
    plain = tmp_path / "plain.png"
    assert _run(["generate", "a red fox", "--model", tiny_dir, "--steps", "3", "--width", "64",
                 "--height", "64", "--seed", "4", "-o", str(plain)], capsys)[0] == 0
    assert not np.array_equal(_pixels(out), _pixels(plain))


def test_each_image_of_a_batch_records_its_own_seed_and_regenerates(tmp_path, capsys):
    # As in A1111: image i of a batch is seeded seed + i, its PNG says so, and that seed
    # alone gives that image again.
    out = tmp_path / "b.png"
    code, _, err = _run(["generate", "a red fox", *SMALL, "--batch", "2", "--seed", "5",
                         "--clip-skip", "1", "-o", str(out)], capsys)
    assert code == 0, err
    first, second = tmp_path / "b-0.png", tmp_path / "b-1.png"
    assert "Seed: 5," in _parameters(first) and "Seed: 6," in _parameters(second)
    assert not np.array_equal(_pixels(first), _pixels(second))
    again = tmp_path / "again.png"
    assert _run(["generate", "a red fox", *SMALL, "--seed", "6", "--clip-skip", "1",
                 "-o", str(again)], capsys)[0] == 0
    # Within one level: a batch of 2 and a batch of 1 run different CPU matmul shapes
    # (~1e-6 apart), which can round a pixel the other way (test_serve's assert_same_image).
    diff = np.abs(_pixels(second).astype(np.int16) - _pixels(again).astype(np.int16))
    assert diff.max() <= 1, f"seed 6 alone differs from image 1 of the batch by {diff.max()}"
    params = _parameters(second)
    assert params.endswith("Model: sdrt-demo, Clip skip: 2"), params
    assert re.search(r"Model hash: [0-9a-f]{10}, ", params), params


def test_png_info_reads_back_with_sd_parsers(tmp_path, capsys):
    sd_parsers = pytest.importorskip("sd_parsers")
    out = tmp_path / "p.png"
    prompt, negative = "a fox, in snow: at dusk", "blurry, \"low\" quality"
    code, _, err = _run(["generate", prompt, *SMALL, "--negative", negative, "--seed", "8",
                         "--guidance", "6.5", "--sampler", "euler_a", "-o", str(out)], capsys)
    assert code == 0, err
    with Image.open(out) as im:
        info = sd_parsers.ParserManager().parse(im)
    assert info is not None, _parameters(out)
    assert info.generator.name == "AUTOMATIC1111"
    assert info.full_prompt == prompt and info.full_negative_prompt == negative
    sampler = info.samplers[0]
    assert sampler.name == "Euler a"
    assert sampler.parameters["seed"] == "8" and sampler.parameters["cfg_scale"] == "6.5"
    assert sampler.model.name == "sdrt-demo"


def test_from_png_regenerates_the_same_image(tmp_path, capsys):
    out = tmp_path / "first.png"
    prompt, negative = "a fox, (in snow:1.2)\nat dusk", "blurry, \"low\": quality"
    code, _, err = _run(["generate", prompt, "--negative", negative, "--steps", "2",
                         "--height", "64", "--width", "48", "--guidance", "6.5", "--seed", "77",
                         "--sampler", "euler_a", "--clip-skip", "1", "-o", str(out)], capsys)
    assert code == 0, err
    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--from-png", str(out), "-o", str(again)], capsys)
    assert code == 0, err
    assert _warnings(err) == [], err
    assert np.array_equal(_pixels(out), _pixels(again))
    assert _parameters(again) == _parameters(out)
    # An option given as well overrides the PNG's.
    other = tmp_path / "other.png"
    code, _, err = _run(["generate", "--from-png", str(out), "--seed", "78", "-o", str(other)],
                        capsys)
    assert code == 0, err
    assert "Seed: 78," in _parameters(other) and "Sampler: Euler a," in _parameters(other)
    assert not np.array_equal(_pixels(out), _pixels(other))


def test_from_png_reads_a1111_schedule_type(tmp_path, capsys):
    # A1111 1.9 on writes the sampler and its schedule type apart; sdrt writes its pair back
    # as the one label older A1111 wrote ("DPM++ 2M SDE Karras"), which newer ones split.
    from PIL.PngImagePlugin import PngInfo

    def made_by_a1111(schedule_type, extra=""):
        meta = PngInfo()
        meta.add_text("parameters", "a fox\nSteps: 2, Sampler: DPM++ 2M SDE, Schedule type: "
                      f"{schedule_type}, CFG scale: 5, Seed: 3, Size: 64x48{extra}")
        path = tmp_path / f"{schedule_type}{len(extra)}.png"
        Image.new("RGB", (64, 48)).save(path, pnginfo=meta)
        return path

    out = tmp_path / "o.png"
    code, _, err = _run(["generate", "--from-png", str(made_by_a1111("Karras")), "-o",
                         str(out)], capsys)
    assert code == 0, err
    assert "Sampler: DPM++ 2M SDE Karras," in _parameters(out), _parameters(out)
    for schedule_type, label in (("Exponential", "DPM++ 2M SDE Exponential,"),
                                 ("Automatic", "DPM++ 2M SDE Exponential,"),  # A1111's default
                                 ("Uniform", "DPM++ 2M SDE, Schedule type: Uniform,"),
                                 ("Beta", "DPM++ 2M SDE, Schedule type: Beta,")):
        again = tmp_path / f"{schedule_type}-again.png"
        code, _, err = _run(["generate", "--from-png", str(made_by_a1111(schedule_type)), "-o",
                             str(again)], capsys)
        assert code == 0, err
        assert f"Sampler: {label}" in _parameters(again), _parameters(again)
    # A1111 writes its Beta schedule's shape beside it: sdrt's, or refused by name
    beta = ", Beta schedule alpha: 0.6, Beta schedule beta: 0.6"
    code, _, err = _run(["generate", "--from-png", str(made_by_a1111("Beta", beta)), "-o",
                         str(tmp_path / "beta.png")], capsys)
    assert code == 0, err
    assert "Schedule type: Beta" + beta in _parameters(tmp_path / "beta.png")
    code, _, err = _run(["generate", "--from-png",
                         str(made_by_a1111("Beta", beta.replace("beta: 0.6", "beta: 0.5"))),
                         "-o", str(tmp_path / "beta2.png")], capsys)
    assert code == 2 and "Beta schedule beta '0.5' is not sdrt's" in err, err
    # A1111 writes an eta other than its default beside the sampler: refused where the
    # sampler reads it (DPM++ 2M SDE runs at eta 1)
    code, _, err = _run(["generate", "--from-png", str(made_by_a1111("Karras", ", Eta: 0.5")),
                         "-o", str(tmp_path / "eta.png")], capsys)
    assert code == 2 and len(_stderr_lines(err)) == 1, err
    assert "Eta '0.5' is not sdrt's: it runs DPM++ 2M SDE Karras at A1111's default eta, 1" \
        in err, err
    code, _, err = _run(["generate", "--from-png", str(made_by_a1111("Karras Exponential")),
                         "-o", str(tmp_path / "e.png")], capsys)
    assert code == 2 and len(_stderr_lines(err)) == 1, err
    assert "Sampler 'DPM++ 2M SDE' with Schedule type 'Karras Exponential' is not a value " \
           "--sampler takes" in err, err


def test_from_png_refuses_an_image_without_png_info(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    for args, fragment in (([], "has no PNG info"), (["--model", str(plain)], "has no PNG info")):
        code, _, err = _run(["generate", "--from-png", str(plain), *args,
                             "-o", str(tmp_path / "o.png")], capsys)
        assert code == 2 and fragment in err and len(_stderr_lines(err)) == 1, err
    code, _, err = _run(["generate", "-o", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "a prompt is needed" in err, err
    assert not (tmp_path / "o.png").exists()


def test_16_bit_init_image_is_scaled_like_its_8_bit_twin(tmp_path, capsys):
    # v / 255 == (257 v) / 65535: the same picture, so the same output image. Clipped to
    # 8 bits instead, the 16-bit file would be almost white and the outputs would differ.
    grey = np.random.default_rng(1).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    outs = {}
    for name in ("g8", "g16"):
        outs[name] = tmp_path / f"out-{name}.png"
        code, _, err = _run(["generate", "a red fox", "--steps", "4", "--seed", "4",
                             "--init-image", str(tmp_path / f"{name}.png"), "--strength", "0.3",
                             "-o", str(outs[name])], capsys)
        assert code == 0, err
    assert np.array_equal(_pixels(outs["g8"]), _pixels(outs["g16"]))


def test_exif_orientation_of_init_image_is_applied(tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90° clockwise to display
    Image.new("RGB", (64, 48), (30, 60, 200)).save(tmp_path / "phone.jpg", exif=exif)
    out = tmp_path / "o.png"
    code, _, err = _run(["generate", "x", "--steps", "2", "--init-image",
                         str(tmp_path / "phone.jpg"), "-o", str(out)], capsys)
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == (48, 64), "the init image's EXIF orientation was ignored"


# -- output names ------------------------------------------------------------------------------

def test_existing_output_is_kept_and_the_next_free_name_used(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}
    for run, expected in enumerate(("sdrt.png", "sdrt-1.png", "sdrt-2.png")):
        code, stdout, err = _run(["generate", "x", *SMALL, "--seed", str(run)], capsys)
        assert code == 0, err
        assert stdout.rstrip().split(" → ")[1].startswith(expected), stdout
        if run:
            assert "sdrt.png" in stdout.split(" → ")[1] and "--overwrite" in stdout, stdout
        seen[expected] = (tmp_path / expected).read_bytes()
        for name, data in seen.items():  # nothing written before was touched
            assert (tmp_path / name).read_bytes() == data, f"{name} was overwritten"
    assert sorted(os.listdir(tmp_path)) == ["sdrt-1.png", "sdrt-2.png", "sdrt.png"]
    assert "Seed: 2," in _parameters(tmp_path / "sdrt-2.png")


def test_a_file_that_appears_during_the_write_is_kept(tmp_path):
    # Another process takes the name while the PNG is being written: the no-replace rename
    # fails, the other file stays whole, and no temporary file is left behind.
    from sdrt.engine.atomic import write_file
    target = tmp_path / "o.png"

    def write(fh):
        fh.write(b"ours")
        target.write_bytes(b"theirs")

    with pytest.raises(FileExistsError):
        write_file(str(target), write)
    assert target.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["o.png"]
    write_file(str(target), lambda fh: fh.write(b"ours"), overwrite=True)
    assert target.read_bytes() == b"ours" and os.listdir(tmp_path) == ["o.png"]


def test_output_name_that_is_not_utf8(tmp_path):
    # A file name is bytes: one that is not UTF-8 is written as given and printed escaped.
    code, out, err, _, _ = _child(["generate", "x", *SMALL, "-o", b"fox-\xff.png"], tmp_path)
    assert code == 0, err
    assert os.listdir(os.fsencode(tmp_path)) == [b"fox-\xff.png"]
    assert out.endswith("→ fox-\\xff.png"), out


def test_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert _run(["generate", "x", *SMALL, "--seed", "1", "-o", str(out)], capsys)[0] == 0
    code, stdout, err = _run(["generate", "x", *SMALL, "--seed", "2", "-o", str(out),
                              "--overwrite"], capsys)
    assert code == 0, err
    assert stdout.rstrip().endswith(f"→ {out}"), stdout
    assert "Seed: 2," in _parameters(out)
    assert sorted(os.listdir(tmp_path)) == ["o.png"]


def test_batch_takes_free_names_too(tmp_path, capsys):
    (tmp_path / "b-0.png").write_bytes(b"keep me")
    (tmp_path / "b-2.png").write_bytes(b"and me")
    code, stdout, err = _run(["generate", "x", *SMALL, "--batch", "3", "-o",
                              str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "b-0.png").read_bytes() == b"keep me"
    assert (tmp_path / "b-2.png").read_bytes() == b"and me"
    assert sorted(os.listdir(tmp_path)) == [f"b-{i}.png" for i in range(5)]
    for i in (1, 3, 4):
        assert _pixels(tmp_path / f"b-{i}.png").shape == (64, 64, 3)
    assert "b-0.png, " in stdout and "b-2.png exist" in stdout, stdout
    code, _, err = _run(["generate", "x", *SMALL, "--batch", "2", "--overwrite", "-o",
                         str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert _pixels(tmp_path / "b-0.png").shape == (64, 64, 3)
    assert (tmp_path / "b-2.png").read_bytes() == b"and me"


def test_outdir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = _run(["generate", "x", *SMALL, "--outdir", "runs/today"], capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "runs" / "today") == ["sdrt.png"]
    assert os.path.join("runs", "today", "sdrt.png") in stdout
    code, _, err = _run(["generate", "x", *SMALL, "--outdir", "runs/today", "-o", "fox.png"],
                        capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "runs" / "today")) == ["fox.png", "sdrt.png"]
    # A refused call creates no folder.
    code, _, err = _run(["generate", "x", *SMALL, "--guidance", "nan", "--outdir", "later"],
                        capsys)
    assert code == 2 and not os.path.exists(tmp_path / "later")


# -- warnings ----------------------------------------------------------------------------------

def _warnings(err):
    lines = _stderr_lines(err)
    assert all(line.startswith("sdrt: warning: ") for line in lines), err
    return [line[len("sdrt: warning: "):] for line in lines]


def test_options_that_do_nothing_warn_once_each(tiny_dir, tmp_path, capsys):
    code, _, err = _run(["generate", "x", *SMALL, "--strength", "0.5", "--negative", "blur",
                         "--guidance", "1", "--config", tiny_dir, "--variant", "fp16",
                         "--no-compile", "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    warned = _warnings(err)
    for option in ("--strength", "--negative", "--config", "--variant", "--no-compile"):
        assert len([w for w in warned if w.startswith(option + " ")]) == 1, (option, warned)
    assert len(warned) == 5, warned
    code, _, err = _run(["generate", "x", *SMALL, "--resize-mode", "crop", "-o",
                         str(tmp_path / "c.png")], capsys)
    assert code == 0, err
    assert _warnings(err) == ["--resize-mode does nothing here: it applies to --init-image"]

    code, _, err = _run(["generate", "x", *SMALL, "--model", tiny_dir, "--variant", "fp16",
                         "--config", tiny_dir, "-o", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    warned = _warnings(err)
    assert len(warned) == 2, warned
    assert any(w.startswith("--variant fp16 does nothing here:") and "no *.fp16.safetensors"
               in w for w in warned), warned
    assert any(w.startswith("--config does nothing here:") and "diffusers folder" in w
               for w in warned), warned


def test_variant_missing_in_some_components(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors",
                folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    code, _, err = _run(["generate", "x", *SMALL, "--model", str(folder), "--variant", "fp16",
                         "-o", str(tmp_path / "o.png")], capsys)
    assert code == 0, err
    assert _warnings(err) == [
        f"--variant fp16: text_encoder, vae in {folder} have no *.fp16.safetensors file; the "
        "default weights are loaded there"]


def test_used_options_do_not_warn(tiny_dir, tmp_path, capsys):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "init.png")
    code, _, err = _run(["generate", "x", "--steps", "2", "--model", tiny_dir, "--strength",
                         "0.5", "--init-image", str(tmp_path / "init.png"), "--negative", "blur",
                         "--guidance", "3", "-o", str(tmp_path / "o.png")], capsys)
    assert code == 0, err
    assert _warnings(err) == []


def test_library_warning_is_one_short_line(tmp_path, capsys):
    long_prompt = " ".join(f"word{i}" for i in range(100))  # past CLIP's 77 tokens
    code, _, err = _run(["generate", long_prompt, *SMALL, "--prompt-syntax", "plain",
                         "-o", str(tmp_path / "o.png")], capsys)
    assert code == 0, err
    warned = _warnings(err)
    assert len(warned) == 1 and "tokens" in warned[0], err
    assert "Warning" not in err and ".py:" not in err, err


# -- bad input found with the model ------------------------------------------------------------

def _broken_copy(tiny_dir, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    edit(folder)
    return str(folder)


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _edit_config(path, **changes):
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


# Each case: extra CLI arguments (with {model} for the tiny model, or its broken copy), a broken
# model edit or None, and a fragment the one-line message must contain.
BAD = {
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
    "configs that do not fit together": (["--model", "{model}"],
                                         lambda f: _edit_config(f / "unet" / "config.json",
                                                                cross_attention_dim=48),
                                         "unet config cross_attention_dim must equal "
                                         "text_encoder config hidden_size (64), got 48"),
    "shape does not fit config": (["--model", "{model}"],
                                  lambda f: _edit_config(f / "text_encoder" / "config.json",
                                                         intermediate_size=96),
                                  "has shape (128, 64), the config expects (96, 64)"),
    "config value of the wrong type": (["--model", "{model}"],
                                       lambda f: _edit_config(f / "unet" / "config.json",
                                                              layers_per_block="two"),
                                       "unet config: layers_per_block must be an integer "
                                       "from 1 to 256, got 'two'"),
    "groups that do not divide channels": (["--model", "{model}"],
                                           lambda f: _edit_config(f / "vae" / "config.json",
                                                                  norm_num_groups=7),
                                           "vae config: norm_num_groups must be a divisor of "
                                           "every block_out_channels entry"),
    "clip skip past the text encoder": (["--clip-skip", "2"], None,
                                        "--clip-skip must be from 0 to 1 (the text encoder has "
                                        "2 layers), got 2"),
    "init image smaller than a latent pixel": (["--init-image", "{tmp}/dot.png",
                                                "--model", "{model}"], None,
                                               "image must be at least 8 pixels high and "
                                               "wide (the VAE's scale factor), got 4x4"),
    "height not multiple of 8": (["--height", "100", "--model", "{model}"], None,
                                 "--height must be a multiple of 8"),
    "truncated init image": (["--init-image", "{tmp}/cut.png"], None,
                             "cannot read init image {tmp}/cut.png: the file is damaged or "
                             "truncated"),
    "mask missing": (["--init-image", "{tmp}/dot.png", "--mask", "{tmp}/nope.png"], None,
                     "cannot read mask {tmp}/nope.png: no such file"),
    "empty mask, only masked": (["--init-image", "{tmp}/dot.png", "--mask", "{tmp}/dot.png",
                                 "--inpaint-area", "masked"], None,
                                "mask must mark something to inpaint"),
    "masked padding past 256": (["--init-image", "{tmp}/dot.png", "--mask", "{tmp}/dot.png",
                                 "--masked-padding", "300"], None,
                                "--masked-padding must be an integer from 0 to 256, got 300"),
    "latent resize mode over a whole inpainted picture": (
        ["--init-image", "{tmp}/dot.png", "--mask", "{tmp}/dot.png", "--resize-mode", "latent"],
        None, "--resize-mode latent (A1111's latent upscale) cannot inpaint the whole picture"),
    "unknown resize mode": (["--init-image", "{tmp}/dot.png", "--resize-mode", "pad"], None,
                            "argument --resize-mode: invalid choice: 'pad'"),
    "negative mask blur": (["--init-image", "{tmp}/dot.png", "--mask", "{tmp}/dot.png",
                            "--mask-blur", "-1"], None,
                           "--mask-blur must be an integer from 0 to 64, got -1"),
    "brackets nested past 100": (["--negative", "[" * 300 + "x" + "]" * 300], None,
                                 "--negative must nest brackets at most 100 deep, got 300"),
    "hires scale and resize": (["--hr-scale", "2", "--hr-resize", "64x64"], None,
                               "--hr-scale and --hr-resize cannot both be given"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tiny_dir, tmp_path, capsys):
    extra, edit, fragment = BAD[case]
    Image.new("RGB", (4, 4)).save(tmp_path / "dot.png")
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")
    _truncate(tmp_path / "cut.png")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 pickle")
    model = _broken_copy(tiny_dir, tmp_path, edit) if edit else tiny_dir
    extra = [e.format(model=model, tmp=tmp_path) for e in extra]
    out = tmp_path / "out.png"
    code, _, err = _run(["generate", "a red fox", "--steps", "2", "-o", str(out)] + extra,
                        capsys)
    assert code == 2, err
    _assert_one_error_line(err, fragment.format(tmp=tmp_path))
    assert not out.exists(), "a failed run left an output file"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_request_too_large_for_memory_is_refused_up_front(tmp_path):
    # 4096 × 4096 on the tiny model: its attention alone would need far more than this
    # machine has. Refused before the first step, in one line, not after minutes of swapping.
    code, _, err, _, seconds = _child(["generate", "x", "--steps", "1", "--height", "4096",
                                       "--width", "4096", "--device", "cpu"], tmp_path,
                                      timeout=120)
    assert code == 2, err
    _assert_one_error_line(err, "memory")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_through_console_script(tmp_path):
    # The real installed console script: exit status 2 and one line, no traceback.
    exe = shutil.which("sdrt") or pytest.skip("sdrt console script not installed")
    r = subprocess.run([exe, "generate", "x", "--device", "cuda", "-o", str(tmp_path / "o.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "sdrt: error: device cuda was asked for, but no CUDA GPU is available"]


@pytest.mark.gpu
def test_cuda_text_to_image_builds_a_static_plan(tmp_path, capsys):
    _static_equals_eager(["generate", "a red fox", "--steps", "4", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a"], tmp_path, capsys)


def _static_equals_eager(args, tmp_path, capsys, plans="static plan"):
    """``args`` run twice: first building its static plans up front (the summary says so,
    and no plan is built on demand, which would warn), then with --no-compile; the replayed
    graphs and the eager loop give the same image (fp32; the convolution algorithms cuDNN
    picks may differ between the two, hence one level of 255)."""
    code, stdout, err = _run(args + ["-o", str(tmp_path / "static.png")], capsys)
    assert code == 0, err
    assert re.match(rf"build \d+\.\d\d s \({plans}\) · text ", stdout), stdout
    assert _warnings(err) == [], err
    code, stdout, err = _run(args + ["--no-compile", "-o", str(tmp_path / "eager.png")], capsys)
    assert code == 0, err
    assert not stdout.startswith("build") and _warnings(err) == []  # (tmp paths say "build")
    diff = np.abs(_pixels(tmp_path / "static.png").astype(int) -
                  _pixels(tmp_path / "eager.png").astype(int))
    assert diff.max() <= 1, f"static and eager images differ by up to {diff.max()} / 255"


@pytest.mark.gpu
def test_cuda_hires_fix_builds_both_plans(tmp_path, capsys):
    # Both passes replay static plans built up front, and give the eager run's picture.
    _static_equals_eager(["generate", "a red fox", "--steps", "3", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a", "--width", "64",
                          "--height", "64", "--hr-scale", "1.5", "--hr-steps", "2"],
                         tmp_path, capsys, plans="static plans")


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [
    ["--strength", "0.6"],
    ["--strength", "0.6", "--resize-mode", "latent"],
    ["--strength", "0.75", "--mask", "MASK", "--inpaint-area", "masked"],
    ["--strength", "1.0", "--mask", "MASK", "--sampler", "heun"],
])
def test_cuda_image_to_image_builds_its_static_plan(tmp_path, capsys, extra):
    # Image to image and inpainting replay a plan built up front for the framed init image.
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    mask = np.zeros((48, 80), dtype=np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    extra = [str(tmp_path / "m.png") if e == "MASK" else e for e in extra]
    _static_equals_eager(["generate", "a red fox", "--steps", "4", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a", "--init-image",
                          str(tmp_path / "i.png"), "--width", "64", "--height", "64", *extra],
                         tmp_path, capsys)


def test_embedding_option(tmp_path, capsys):
    # An A1111 embedding for the built-in model (hidden size 64), named by its file.
    from safetensors.torch import save_file
    vectors = -0.5 + torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    emb = tmp_path / "sdrtstyle.safetensors"
    save_file({"emb_params": vectors.contiguous()}, str(emb))
    base = ["generate", "a photo in sdrtstyle", *SMALL, "--seed", "4"]
    assert _run(base + ["-o", str(tmp_path / "plain.png")], capsys)[0] == 0
    code, _, err = _run(base + ["--embedding", str(emb), "-o", str(tmp_path / "emb.png")],
                        capsys)
    assert code == 0, err
    diff = np.abs(_pixels(tmp_path / "plain.png").astype(int) -
                  _pixels(tmp_path / "emb.png").astype(int)).max()
    # The tiny random model's text moves its image by a few levels at most: any change shows
    # the embedding was read (without it, the two runs are the same call).
    assert diff > 0, "--embedding changed nothing"
    code, _, err = _run(base + ["--embedding", str(tmp_path / "none.safetensors"),
                                "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--embedding" in err and "does not exist" in err, err
