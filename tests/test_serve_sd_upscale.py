"""A1111's "SD upscale" img2img script on ``sdrt serve`` over real HTTP on 127.0.0.1: the
pictures equal sdrt's pieces run by hand (the Extras upscale, ``engine/sd_upscale.py``'s tiles,
the library's image-to-image of each tile with A1111's seeds, the tiles blended back) within
1/255, with A1111's PNG info; upscalers by name (any case) and by index into GET
/sdapi/v1/upscalers, "None" meaning no upscale; and every bad input a 400 naming its field.
Tiny pictures (32-pixel tiles) on the built-in model, 2 steps."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.engine.extras import Extras  # noqa: E402
from sdrt.engine.sd_upscale import combine, split, tile_seeds  # noqa: E402
from sdrt.engine.upscaler import load_upscaler  # noqa: E402
from sdrt.serve.local import LocalServer  # noqa: E402
from test_serve import (TIMEOUT, assert_same_image, b64_png, config, png,  # noqa: E402,F401
                        ref_pipe)
from upscaler_files import compact_tensors, esrgan_tensors, write  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
I2I, T2I = "/sdapi/v1/img2img", "/sdapi/v1/txt2img"
# The request's settings besides the script's: 32×32 tiles, 2 steps, strength 0.5.
BASE = {"prompt": "a fox", "steps": 2, "cfg_scale": 7, "width": 32, "height": 32,
        "denoising_strength": 0.5}


def _picture(seed, width, height):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """--upscaler-dir: a ×4 ESRGAN, a ×2 compact Real-ESRGAN and a file that is no
    upscaler; GET /sdapi/v1/upscalers lists None, Lanczos, Nearest, 4x-Tiny (index 3), broken,
    compact-x2."""
    root = tmp_path_factory.mktemp("upscalers")
    write(root / "4x-Tiny.safetensors", esrgan_tensors(nf=8, gc=4, blocks=1))
    write(root / "compact-x2.safetensors", compact_tensors(nf=8, convs=1, scale=2))
    write(root / "broken.safetensors", {"conv.weight": compact_tensors()["body.0.weight"]})
    return root


@pytest.fixture(scope="module")
def served(folder):
    with LocalServer(config(upscaler_dir=str(folder))) as url:
        yield url


def _post(url, body):
    r = httpx.post(f"{url}{I2I}", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def _expected(pipe, upscaled, overlap, seed, batch_size=1, n_iter=1):
    """The script's pictures from sdrt's pieces: ``upscaled`` cut into BASE's tiles, each
    redrawn by the library's image to image with its A1111 seed, blended back."""
    grid = split(upscaled, 32, 32, overlap)
    tiles = grid.tiles()
    out = []
    for seeds in tile_seeds(seed, len(tiles), batch_size, n_iter):
        redrawn = pipe(["a fox"] * len(tiles), height=32, width=32, num_inference_steps=2,
                       guidance_scale=7.0, image=tiles, strength=0.5,
                       generator=[torch.Generator().manual_seed(s) for s in seeds])
        out.append(combine(grid.replace(redrawn)))
    return out


def test_lanczos_and_a_model_upscale_give_the_pieces_pictures(served, folder, ref_pipe):
    # A 48×40 picture ×2 is 96×80: 4 × 3 tiles of 32×32 overlapping by 8. Lanczos by name in
    # another case (the PNG names it as listed), the ESRGAN by its index in the list.
    init = _picture(1, 48, 40)
    model = load_upscaler(folder / "4x-Tiny.safetensors")
    for upscaler, name, batch_size in (("lanczos", "Lanczos", 1), (3, "4x-Tiny", 2)):
        out = _post(served, {**BASE, "init_images": [b64_png(init)], "seed": 11,
                             "batch_size": batch_size, "script_name": "SD upscale",
                             "script_args": ["", 8, upscaler, 2]})
        upscaled = Extras(name, scale=2).apply(lambda n, f: model, [init])[0][0]
        assert upscaled.size == (96, 80)
        want = _expected(ref_pipe, upscaled, 8, 11, batch_size)[0]
        assert len(out["images"]) == 1
        got = png(out["images"][0], (96, 80))
        assert_same_image(got, want, f"SD upscale with {name}, batch size {batch_size}")
        text = got.info["parameters"]
        for pair in ("Seed: 11", "Size: 32x32", "Denoising strength: 0.5",
                     f"SD upscale overlap: 8, SD upscale upscaler: {name}"):
            assert pair in text, text
        info = json.loads(out["info"])
        assert info["infotexts"] == [text]
        assert (info["seed"], info["all_seeds"], info["width"], info["height"]) == \
            (11, [11], 32, 32)
        assert info["extra_generation_params"] == {"SD upscale overlap": 8,
                                                   "SD upscale upscaler": name}
        assert out["parameters"]["script_args"] == ["", 8, upscaler, 2]


def test_n_iter_gives_a_picture_per_start_seed(served, ref_pipe):
    # 32×32 ×1.5 (Nearest, by index) is 48×48: 2 × 2 tiles overlapping by 16. Two pictures
    # from seeds 5 and 6, tiles in batches of 2 (seeds 5, 6, 6, 7 and 6, 7, 7, 8); every PNG
    # carries the first tile's info, as A1111's script returns them.
    init = _picture(2, 32, 32)
    out = _post(served, {**BASE, "init_images": [b64_png(init)], "seed": 5, "n_iter": 2,
                         "batch_size": 2, "script_name": "sd UPSCALE",
                         "script_args": [None, 16, 2, 1.5]})
    upscaled = Extras("Nearest", scale=1.5).apply(None, [init])[0][0]
    want = _expected(ref_pipe, upscaled, 16, 5, batch_size=2, n_iter=2)
    assert len(out["images"]) == 2
    got = [png(b64, (48, 48)) for b64 in out["images"]]
    for i in range(2):
        assert_same_image(got[i], want[i], f"picture {i}")
    assert np.abs(np.asarray(got[0], dtype=int) - np.asarray(got[1])).max() > 8
    info = json.loads(out["info"])
    assert (info["seed"], info["all_seeds"]) == (5, [5, 6])
    assert [g.info["parameters"] for g in got] == info["infotexts"] == [info["infotexts"][0]] * 2
    assert "Seed: 5," in info["infotexts"][0]
    assert "SD upscale upscaler: Nearest" in info["infotexts"][0]


def test_upscaler_none_tiles_the_image_as_it_is(served, ref_pipe):
    # "None" does not upscale (A1111's script ignores the scale then): a 40×40 picture is cut
    # as it is into 2 × 2 tiles; its transparent pixels are redrawn from white.
    rgb = _picture(3, 40, 40)
    alpha = np.where(_picture(4, 40, 40).convert("L").point(lambda v: v > 128), 255, 0)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    over_white = np.where(alpha[..., None] == 255, np.asarray(rgb), 255).astype(np.uint8)
    out = _post(served, {**BASE, "init_images": [b64_png(rgba)], "seed": 9,
                         "script_name": "SD upscale", "script_args": ["", 8, "None", 4]})
    want = _expected(ref_pipe, Image.fromarray(over_white), 8, 9)[0]
    got = png(out["images"][0], (40, 40))
    assert_same_image(got, want, "SD upscale without an upscale")
    assert "SD upscale upscaler: None" in got.info["parameters"]


_SMALL = b64_png(_picture(5, 24, 24))
_IMAGE = b64_png(_picture(6, 32, 32))
_LARGE = b64_png(Image.new("RGB", (1100, 40), (90, 120, 30)))
_SD = {**BASE, "init_images": [_IMAGE], "script_name": "SD upscale"}
BAD = [
    (I2I, {**_SD, "script_name": "Loopback"}, "script_name"),
    (T2I, {**BASE, "script_name": "SD upscale", "script_args": ["", 8, "Lanczos", 2]},
     "script_name"),
    (I2I, {**_SD, "mask": _IMAGE, "script_args": ["", 8, "Lanczos", 2]}, "script_name"),
    (I2I, {**_SD, "script_args": ["", 8, "Lanczos", 2],
           "alwayson_scripts": {"controlnet": {"args": [{"model": "x"}]}}},
     "alwayson_scripts"),
    (I2I, _SD, "script_args"),
    (I2I, {**_SD, "script_args": ["", 8, "Lanczos"]}, "script_args"),
    (I2I, {**_SD, "script_args": ["", -1, "Lanczos", 2]}, "script_args[1]"),
    (I2I, {**_SD, "script_args": ["", 8.5, "Lanczos", 2]}, "script_args[1]"),
    (I2I, {**_SD, "script_args": ["", "8", "Lanczos", 2]}, "script_args[1]"),
    (I2I, {**_SD, "script_args": ["", 32, "Lanczos", 2]}, "script_args[1]"),  # ≥ the tile
    (I2I, {**_SD, "script_args": ["", 8, "SwinIR 4x", 2]}, "script_args[2]"),
    (I2I, {**_SD, "script_args": ["", 8, 6, 2]}, "script_args[2]"),  # past the list
    (I2I, {**_SD, "script_args": ["", 8, -1, 2]}, "script_args[2]"),
    (I2I, {**_SD, "script_args": ["", 8, True, 2]}, "script_args[2]"),
    (I2I, {**_SD, "script_args": ["", 8, "broken", 2]}, "script_args[2]"),  # no upscaler
    (I2I, {**_SD, "init_images": [_SMALL], "script_args": ["", 8, "None", 2]},
     "script_args[2]"),  # 24×24 as it is: smaller than the tile
    (I2I, {**_SD, "script_args": ["", 8, "Lanczos", 0.5]}, "script_args[3]"),
    (I2I, {**_SD, "script_args": ["", 8, "Lanczos", 9]}, "script_args[3]"),
    (I2I, {**_SD, "script_args": ["", 8, "Lanczos", "2"]}, "script_args[3]"),
    (I2I, {**_SD, "script_args": ["", 8, "Lanczos", None]}, "script_args[3]"),
    (I2I, {**_SD, "init_images": [_SMALL], "script_args": ["", 8, "Lanczos", 1.2]},
     "script_args[3]"),  # 24×24 ×1.2 is 24×24 (multiples of 8): smaller than the tile
    (I2I, {**_SD, "init_images": [_LARGE], "script_args": ["", 8, "Lanczos", 4]},
     "script_args[3]"),  # 4400 pixels wide: past SDRT_MAX_SIDE
    # 8×8 tiles: 64 × 64 of them over 64×64 ×8 (4096, past 16 × SDRT_MAX_IMAGES = 1024), and
    # 32 × 32 over 32×32 ×8 (1024), twice.
    (I2I, {**_SD, "width": 8, "height": 8, "script_args": ["", 0, "Nearest", 8],
           "init_images": [b64_png(_picture(7, 64, 64))]}, "script_args[3]"),
    (I2I, {**_SD, "width": 8, "height": 8, "n_iter": 2, "script_args": ["", 0, "Nearest", 8]},
     "n_iter"),
    (I2I, {**_SD, "script_args": ["", 8, "Lanczos", 2], "tiling": True}, "tiling"),
]


@pytest.mark.parametrize("path, body, field", BAD, ids=[f"{b[2]}-{i}" for i, b in
                                                        enumerate(BAD)])
def test_bad_inputs_are_400_naming_the_field(served, path, body, field):
    r = httpx.post(f"{served}{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in r.text


def test_script_args_without_a_script_change_nothing(served):
    # A1111's clients send script_args: [] with no script; the request is a plain img2img.
    r = httpx.post(f"{served}{I2I}", timeout=TIMEOUT, json={
        **BASE, "init_images": [_IMAGE], "seed": 1, "script_args": []})
    assert r.status_code == 200, r.text
    png(r.json()["images"][0], (32, 32))
