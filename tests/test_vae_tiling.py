"""VAE tiling (``pipe.enable_vae_tiling``, engine/vae.py ``tiled``) against diffusers'
AutoencoderKL with ``enable_tiling`` on the same weights, decoding and encoding, at sizes that
cut the last tiles short; the pipeline's static plan per setting; the memory estimate."""
import numpy as np
import pytest
import torch

from sdrt.engine import Pipeline
from sdrt.engine.errors import SdrtError
from sdrt.engine.loading import build
from sdrt.engine.memory import request_bytes
from sdrt.engine.tiny import tiny_components

# Three levels (scale factor 4) and a sample size of 32: tiles of 8 latent pixels, 32 image ones.
CONFIG = dict(block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=32,
              down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8)


@pytest.fixture(scope="module")
def vaes():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**CONFIG).eval()
    ours = build("vae", {"_class_name": "AutoencoderKL", **CONFIG}, device="cpu")
    ours.load_state_dict(ref.state_dict())
    return ours.eval(), ref


@pytest.mark.parametrize("h,w", [(20, 28), (8, 24), (17, 9)])
def test_tiled_decode_is_diffusers(vaes, h, w):
    ours, ref = vaes
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w))
    ours.tiling = True
    ref.enable_tiling()
    try:
        with torch.no_grad():
            got, want = ours.decode(z), ref.decode(z).sample
            ours.tiling = False
            whole = ours.decode(z)
    finally:
        ours.tiling = False
        ref.disable_tiling()
    assert got.shape == want.shape == (2, 3, 4 * h, 4 * w)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    if max(h, w) > 8:  # (tiled: each tile's GroupNorm sees only the tile)
        assert (got - whole).abs().max() > 1e-4


@pytest.mark.parametrize("h,w", [(80, 112), (36, 20)])
def test_tiled_encode_is_diffusers(vaes, h, w):
    ours, ref = vaes
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
    ours.tiling = True
    ref.enable_tiling()
    try:
        with torch.no_grad():
            mean, std = ours.encode(x)
            dist = ref.encode(x).latent_dist
    finally:
        ours.tiling = False
        ref.disable_tiling()
    assert torch.allclose(mean, dist.mean, atol=1e-5, rtol=1e-4), (mean - dist.mean).abs().max()
    assert torch.allclose(std, dist.std, atol=1e-5, rtol=1e-4)


ARGS = dict(height=512, width=384, num_inference_steps=2, sampler="ddim", seed=3,
            output_type="np")


def test_pipeline_tiling_and_its_static_plan():
    pipe = Pipeline(tiny_components(), torch.device("cpu"), torch.float32)
    assert pipe.vae.tile_latent == 16  # (the tiny VAE's sample_size 128, scale factor 8)
    whole = pipe("a fox", **ARGS)
    pipe.enable_vae_tiling()
    tiled = pipe("a fox", **ARGS)
    assert tiled.shape == whole.shape and 1e-4 < np.abs(tiled - whole).max()
    pipe.compile(height=512, width=384, num_inference_steps=2, sampler="ddim", strict=True)
    assert np.abs(pipe("a fox", **ARGS) - tiled).max() <= 1e-6
    pipe.disable_vae_tiling()  # another setting: not the plan built
    with pytest.raises(SdrtError, match="static plan"):
        pipe("a fox", **ARGS)
    pipe.runtime = None
    assert np.array_equal(pipe("a fox", **ARGS), whole)


def test_tiling_lowers_the_memory_estimate():
    c = tiny_components()
    args = (c.unet.config, c.vae.config, c.text_encoder.config, 2048, 2048, 1, True,
            torch.float16)
    whole, what = request_bytes(*args, fused_attention=True, has_image=True)
    tiled, tiled_what = request_bytes(*args, fused_attention=True, has_image=True, vae_tile=16)
    assert "VAE" in what and tiled < whole / 2, (whole, tiled, what, tiled_what)
    small = (c.unet.config, c.vae.config, c.text_encoder.config, 128, 128, 1, True,
             torch.float16)
    assert request_bytes(*small, vae_tile=16) == request_bytes(*small)  # (one tile: as it is)


def test_cli_vae_tiling(tmp_path, capsys):
    # sdrt generate --vae-tiling on the tiny model's folder: the library's tiled picture.
    from PIL import Image

    from test_cli import _run
    from sdrt.engine.cli import main
    folder = str(tmp_path / "tiny")
    assert main(["make-tiny", folder]) == 0
    out = tmp_path / "tiled.png"
    code, _, err = _run(["generate", "a fox", "--model", folder, "--width", "384", "--height",
                         "256", "--steps", "2", "--sampler", "ddim", "--seed", "3",
                         "--vae-tiling", "-o", str(out)], capsys)
    assert code == 0, err
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    pipe.enable_vae_tiling()
    want = pipe("a fox", height=256, width=384, num_inference_steps=2, sampler="ddim", seed=3)[0]
    with Image.open(out) as got:
        diff = np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max()
    assert diff <= 1, diff
