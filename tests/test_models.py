"""sdrt's text encoder, UNet and VAE against diffusers / transformers on the same weights."""
import pytest
import torch

from conftest import assert_close_rel
from sdrt.engine.configs import model_config
from sdrt.engine.loading import build, load, parse_config
from sdrt.engine.memory import parameter_count

REL_TOL = 1e-4  # float32, same weights, same inputs


def _diffusers_meta(component, config):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            return AutoencoderKL.from_config(config)
        if "CLIPTextModelWithProjection" in config.get("architectures", ()):
            return CLIPTextModelWithProjection(CLIPTextConfig(**config))
        return CLIPTextModel(CLIPTextConfig(**config))


def _strip_text_prefix(name):
    # transformers >= 5 dropped the "text_model." level; checkpoints on disk still have it.
    return name[len("text_model."):] if name.startswith("text_model.") else name


# The real configs: SD 1.5 and 2.1 (all three networks); SDXL base (a first level without
# attention, 1/2/10 transformer layers, the "text_time" added embedding, OpenCLIP bigG with its
# projection) and the refiner (four levels, 4 layers everywhere, a 2560-wide added embedding).
REAL = [(m, c) for m in ("sd15", "sd21") for c in ("unet", "vae", "text_encoder")] + [
    ("sdxl", "unet"), ("sdxl", "vae"), ("sdxl", "text_encoder_2"), ("sdxl-refiner", "unet")]


@pytest.mark.parametrize("model,component", REAL, ids=[f"{m}-{c}" for m, c in REAL])
def test_parameter_names_and_shapes_equal_diffusers_at_real_config(model, component):
    config = model_config(model)[component]
    ours = {n: tuple(p.shape) for n, p in build(component, config).named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in _diffusers_meta(component, config).named_parameters()}
    if component.startswith("text_encoder"):
        ours = {_strip_text_prefix(n): s for n, s in ours.items()}
        theirs = {_strip_text_prefix(n): s for n, s in theirs.items()}
    assert sorted(set(ours) - set(theirs)) == [], "parameters diffusers does not have"
    assert sorted(set(theirs) - set(ours)) == [], "diffusers parameters we lack"
    bad = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
    assert not bad, f"shape mismatches: {bad}"


COUNTED = REAL + [("sdxl", "text_encoder"), ("sdxl-refiner", "text_encoder_2")]


@pytest.mark.parametrize("model,component", COUNTED, ids=[f"{m}-{c}" for m, c in COUNTED])
def test_parameter_count_from_config_equals_the_built_module(model, component):
    # memory.parameter_count sizes a model before building it (the memory checks); SDXL adds
    # the UNet's add_embedding and text_encoder_2's text_projection.
    config = model_config(model)[component]
    built = sum(p.numel() for p in build(component, config).parameters())  # meta device
    assert parameter_count(component, parse_config(component, config)) == built


@pytest.fixture(scope="module")
def loaded(tiny_model):
    family, folder, ref = tiny_model
    return family, load(folder, torch.device("cpu"), torch.float32), ref


def test_text_encoder_matches(loaded):
    family, ours, ref = loaded
    ids = ref.tokenizer(["a photo of a red fox, highly detailed", ""], padding="max_length",
                        max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(["a photo of a red fox, highly detailed", ""]), ids)
    with torch.no_grad():
        assert_close_rel(ours.text_encoder(ids), ref.text_encoder(ids)[0], REL_TOL,
                         f"{family} text encoder")
        # clip_skip=1: the penultimate layer through the final LayerNorm, as diffusers does it.
        hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        assert_close_rel(ours.text_encoder(ids, clip_skip=1),
                         ref.text_encoder.text_model.final_layer_norm(hidden)
                         if hasattr(ref.text_encoder, "text_model")
                         else ref.text_encoder.final_layer_norm(hidden),
                         REL_TOL, f"{family} text encoder, clip_skip=1")


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)], ids=["square", "odd-latent"])  # odd: 6→3→… up path
def test_unet_matches(loaded, hw):
    family, ours, ref = loaded
    g = torch.Generator().manual_seed(1)
    x = -0.3 + torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    for t in (torch.tensor(999), torch.tensor([1.0, 500.5])):
        with torch.no_grad():
            assert_close_rel(ours.unet(x, t, ctx), ref.unet(x, t, ctx).sample, REL_TOL,
                             f"{family} unet at t={t.tolist()}")


def test_vae_matches(loaded):
    family, ours, ref = loaded
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 6, generator=g)
    image = torch.rand(2, 3, 16, 12, generator=g) * 2 - 1
    with torch.no_grad():
        assert_close_rel(ours.vae.decode(z), ref.vae.decode(z).sample, REL_TOL,
                         f"{family} vae decode")
        mean, std = ours.vae.encode(image)
        dist = ref.vae.encode(image).latent_dist
        assert_close_rel(mean, dist.mean, REL_TOL, f"{family} vae encode mean")
        assert_close_rel(std, dist.std, REL_TOL, f"{family} vae encode std")


def test_conv_chooser_respects_torch_backend(loaded, monkeypatch):
    # With SDRT_BACKEND=torch the chooser must run the reference and time nothing, even on a
    # device it is allowed to time.
    from sdrt.engine.layers import use_conv_chooser
    from sdrt.kernels.conv_autotune import ConvPathChooser
    monkeypatch.setenv("SDRT_BACKEND", "torch")
    family, ours, _ = loaded
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(300)
    with torch.no_grad():
        before = ours.unet(x, t, ctx)
        chooser = ConvPathChooser(timer=lambda fn: pytest.fail("timed under the torch backend"),
                                  timed_devices=("cpu",))
        use_conv_chooser(ours.unet, chooser)
        try:
            after = ours.unet(x, t, ctx)
        finally:
            from sdrt import kernels
            use_conv_chooser(ours.unet, kernels.group_norm_silu_conv2d)
    assert torch.equal(before, after) and not chooser.times
