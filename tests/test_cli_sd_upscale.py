"""``sdrt generate --sd-upscale`` (A1111's SD upscale script): the picture equals the one put
together here from sdrt's pieces (the init image flattened onto white and upscaled, cut by
``split``, each tile drawn by the library's image to image from its ``tile_seeds`` seed, put
back by ``combine``), whatever the --batch; the upscaler is Lanczos, an upscale model file, a
name in --upscaler-dir or None; the PNG records A1111's pairs and --from-png reads them back;
the refusals that need a model or a setting are one line (those before torch are in
test_cli.py's REFUSED_EARLY)."""
import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline
from sdrt.engine.infotext import parse
from sdrt.engine.sd_upscale import combine, split, tile_seeds
from test_cli import _assert_one_error_line, _parameters, _pixels, _run, \
    _static_equals_eager, _warnings, tiny_dir  # noqa: F401  (the fixture)
from upscaler_files import esrgan_tensors, write

TILE, OVERLAP, SEED, STEPS, STRENGTH = 32, 8, 7, 4, 0.75  # 3 steps a tile


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 24×24 RGBA init image, partly transparent over black (which A1111's flatten turns
    white); the same made opaque as A1111 flattens it; a 40×40 RGB one; a tiny ×4 ESRGAN
    model in a folder of its own."""
    root = tmp_path_factory.mktemp("cli-sd-upscale")
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[4:12, 6:18] = (0, 0, 0, 0)  # binary alpha: flattening onto white is exact
    Image.fromarray(rgba, "RGBA").save(root / "init.png")
    flat = np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]).astype(np.uint8)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "big.png")
    (root / "models").mkdir()
    model = write(root / "models" / "4x_tiny.safetensors", esrgan_tensors())
    return dict(init=str(root / "init.png"), flat=Image.fromarray(flat),
                big=str(root / "big.png"), model=model, models=str(root / "models"))


@pytest.fixture(scope="module")
def tiles(tiny_dir):
    """Tile → the library's image to image of it from a seed (cached: the runs share tiles)."""
    pipe = Pipeline.from_pretrained(tiny_dir, "cpu", torch.float32)
    done = {}

    def draw(tile, seed):
        key = (tile.tobytes(), seed)
        if key not in done:
            done[key] = pipe("a red fox", image=tile, height=TILE, width=TILE,
                             strength=STRENGTH, num_inference_steps=STEPS,
                             generator=torch.Generator().manual_seed(seed))[0]
        return done[key]
    return draw


def _expected(tiles, upscaled, batch):
    """The picture A1111's script makes of the ``upscaled`` image with ``batch`` tiles a call,
    one picture (n_iter 1), each tile drawn alone here."""
    grid = split(upscaled, TILE, TILE, OVERLAP)
    seeds = tile_seeds(SEED, len(grid.tiles()), batch, 1)[0]
    return np.asarray(combine(grid.replace([tiles(t, s) for t, s in zip(grid.tiles(), seeds)])))


def _sd_upscale(tiny_dir, init, out, capsys, *extra):
    code, stdout, err = _run(["generate", "a red fox", "--model", tiny_dir, "--device", "cpu",
                              "--init-image", init, "--sd-upscale", "2", "--width", str(TILE),
                              "--height", str(TILE), "--sd-upscale-overlap", str(OVERLAP),
                              "--steps", str(STEPS), "--strength", str(STRENGTH), "--seed",
                              str(SEED), "-o", str(out), *extra], capsys)
    assert code == 0, err
    return stdout, err


def _close(got, want, what):
    # One call of several tiles and several calls of one may round a last bit apart.
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff = np.abs(got.astype(int) - want.astype(int))
    where = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= 1, f"{what}: off by {diff.max()} / 255 at {where}"


@pytest.mark.parametrize("batch", [
    1,  # one tile a call: the same calls as the pieces'
    2,  # A1111's seeds change with the batch: seed, +1, +1, +2 for 4 tiles
    3,  # a last call of fewer tiles (4 = 3 + 1)
])
def test_picture_is_a1111s_script_of_sdrt_pieces(tiny_dir, assets, tiles, tmp_path, capsys,
                                                 batch):
    out = tmp_path / "up.png"
    _, err = _sd_upscale(tiny_dir, assets["init"], out, capsys, "--sd-upscale-upscaler",
                         "Lanczos", "--batch", str(batch))
    assert _warnings(err) == []
    # Lanczos ×2 of 24×24 is one resize to 48×48 (A1111's Upscaler.upscale): 2×2 tiles.
    upscaled = assets["flat"].resize((48, 48), Image.LANCZOS)
    _close(_pixels(out), _expected(tiles, upscaled, batch), f"batch {batch}")
    text = _parameters(out)
    assert "Size: 32x32, Model hash: " in text
    assert text.endswith(f"Denoising strength: {STRENGTH}, SD upscale overlap: 8, "
                         "SD upscale upscaler: Lanczos")
    assert parse(text)[2]["Seed"] == str(SEED)  # the first tile's, A1111's first batch's


def test_upscale_model_by_file_and_by_name(tiny_dir, assets, tiles, tmp_path, capsys):
    from sdrt.engine.upscaler import load_upscaler
    by_file = tmp_path / "file.png"
    _sd_upscale(tiny_dir, assets["init"], by_file, capsys, "--sd-upscale-upscaler",
                assets["model"])
    upscaled = load_upscaler(assets["model"]).upscale([assets["flat"]], 2)[0]
    _close(_pixels(by_file), _expected(tiles, upscaled, 1), "4x_tiny by file")
    by_name = tmp_path / "name.png"
    _, err = _sd_upscale(tiny_dir, assets["init"], by_name, capsys, "--sd-upscale-upscaler",
                         "4x_tiny", "--upscaler-dir", assets["models"])
    assert _warnings(err) == []
    assert np.array_equal(_pixels(by_name), _pixels(by_file))
    for path in (by_file, by_name):
        assert parse(_parameters(path))[2]["SD upscale upscaler"] == "4x_tiny"


def test_upscaler_none_redraws_the_image_as_it_is(tiny_dir, assets, tiles, tmp_path,
                                                  capsys):
    # A1111's default upscaler: the 40×40 image is cut as it is (2×2 tiles); --resize-mode
    # does nothing, the tiles being cut at their size.
    out = tmp_path / "none.png"
    _, err = _sd_upscale(tiny_dir, assets["big"], out, capsys, "--resize-mode", "crop")
    assert _warnings(err) == ["--resize-mode does nothing here: --sd-upscale cuts tiles of the "
                              "size out of the upscaled image"]
    with Image.open(assets["big"]) as im:
        _close(_pixels(out), _expected(tiles, im.convert("RGB"), 1), "None")
    assert _parameters(out).endswith("SD upscale overlap: 8, SD upscale upscaler: None")


def test_from_png_reads_the_pairs_back(tiny_dir, assets, tmp_path, capsys):
    out = tmp_path / "up.png"
    _sd_upscale(tiny_dir, assets["init"], out, capsys, "--sd-upscale-upscaler", "Nearest",
                "--sd-upscale-overlap", "4")
    # Overlap, upscaler, tile size, strength, seed and steps come from the PNG; the scale
    # A1111 does not record.
    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--from-png", str(out), "--model", tiny_dir, "--device",
                         "cpu", "--init-image", assets["init"], "--sd-upscale", "2", "-o",
                         str(again)], capsys)
    assert code == 0, err
    assert _warnings(err) == []
    assert np.array_equal(_pixels(again), _pixels(out))
    assert _parameters(again) == _parameters(out)
    plain = tmp_path / "plain.png"
    code, _, err = _run(["generate", "--from-png", str(out), "--model", tiny_dir, "--device",
                         "cpu", "--init-image", assets["init"], "-o", str(plain)], capsys)
    assert code == 0, err
    assert [w for w in _warnings(err) if "was an SD upscale" in w] == [
        f"--from-png {out} was an SD upscale of an init image (SD upscale upscaler Nearest), "
        "whose scale A1111 does not record: pass --init-image and --sd-upscale F, or this is "
        "not one"]
    assert _pixels(plain).shape == (32, 32, 3)  # image to image at the PNG's tile size


def test_options_without_sd_upscale_warn(tiny_dir, assets, tmp_path, capsys):
    code, _, err = _run(["generate", "x", "--model", tiny_dir, "--device", "cpu", "--steps",
                         "1", "--width", "32", "--height", "32", "--sd-upscale-overlap", "8",
                         "--sd-upscale-upscaler", "Lanczos", "--upscaler-dir",
                         assets["models"], "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    assert _warnings(err) == [
        "--sd-upscale-overlap does nothing here: it applies to --sd-upscale",
        "--sd-upscale-upscaler does nothing here: it applies to --sd-upscale",
        "--upscaler-dir does nothing here: it applies to the hires fix, --sd-upscale and a "
        "workflow's upscale models"]


@pytest.mark.parametrize("extra, env, fragment", [
    # the tiles' size against the model's VAE, once it is loaded
    (["--height", "36", "--sd-upscale-upscaler", "Lanczos"], {},
     "--height must be a multiple of 8 (the VAE's scale factor), got 36"),
    # the upscaled size against SDRT_MAX_SIDE, from the image's size before torch
    (["--sd-upscale-upscaler", "Lanczos"], {"SDRT_MAX_SIDE": "40"},
     "upscaled by 2 with Lanczos is 48x48; each side must be at most 40 (SDRT_MAX_SIDE)"),
])
def test_refused(tiny_dir, assets, tmp_path, capsys, monkeypatch, extra, env, fragment):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = _run(["generate", "x", "--model", tiny_dir, "--device", "cpu",
                         "--init-image", assets["init"], "--sd-upscale", "2", "--width", "32",
                         "--height", "32", "--sd-upscale-overlap", "8", *extra, "-o",
                         str(tmp_path / "o.png")], capsys)
    assert code == 2
    _assert_one_error_line(err, fragment)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.gpu
def test_cuda_builds_the_plans_of_both_batch_sizes(assets, tmp_path, capsys):
    # 4 tiles, 3 a call: the plans of 3 and of 1 tile built up front (none on demand, which
    # would warn), and the replays give the eager run's picture.
    _static_equals_eager(["generate", "a red fox", "--steps", "4", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a", "--init-image",
                          assets["init"], "--sd-upscale", "2", "--sd-upscale-upscaler",
                          "Lanczos", "--width", "32", "--height", "32", "--sd-upscale-overlap",
                          "8", "--batch", "3", "--strength", "0.6"],
                         tmp_path, capsys, plans="static plans")
