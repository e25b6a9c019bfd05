"""sdrt's UNet on SDXL-shaped configs against diffusers' UNet2DConditionModel, and the refusals.

Each tiny UNet is built by diffusers with seeded random weights (every parameter non-zero,
biases and norms included), saved with ``save_pretrained`` (its ``config.json`` then holds every
diffusers setting, most at their defaults, which sdrt must accept), and loaded by sdrt from that
folder. The noise predictions are compared for a batch of 2 whose rows have different time ids,
so a wrong order of the sinusoidal features, or a row mixed with another, shows.
"""
import json
import math
import os
from dataclasses import asdict

import pytest
import torch

from conftest import assert_close_rel
from sdrt.engine.configs import model_config
from sdrt.engine.errors import SdrtError
from sdrt.engine.loading import build, parse_config
from sdrt.engine.memory import parameter_count
from sdrt.engine.unet import UNetConfig
from sdrt.engine.weights import SafetensorsFiles, component_weights, load_parameters

REL_TOL = 1e-4  # float32, same weights, same inputs

POOLED = 24  # the pooled text embedding's width (OpenCLIP bigG's projection: 1280)

# SDXL base at a tiny size: three levels, the first without attention, 1/2/3 transformer
# layers (distinct, so the mid block's count (the last level's) and the up path's (reversed)
# are both exercised), head counts per level, linear projections, six time ids.
BASE = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 2, 3], attention_head_dim=(2, 4, 8),
    use_linear_projection=True, cross_attention_dim=64, norm_num_groups=16,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED + 6 * 8)

# The refiner's shape: four levels, attention in the middle two, one layer count for all,
# five time ids (the aesthetic score in place of the target size), text states as wide as the
# pooled embedding (both OpenCLIP bigG's).
REFINER = dict(
    block_out_channels=(32, 32, 64, 64), layers_per_block=2, sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2, attention_head_dim=(2, 4, 8, 8),
    use_linear_projection=True, cross_attention_dim=POOLED, norm_num_groups=16,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED + 5 * 8)

# diffusers' asymmetric form (distilled SDXLs): per-ResNet counts, and an up path given
# explicitly; the mid block takes the first count of the last level.
ASYMMETRIC = dict(
    BASE, transformer_layers_per_block=[1, [1, 2], [3, 1]],
    reverse_transformer_layers_per_block=[[2, 1, 3], 1, 1])

TINY = {"base": BASE, "refiner": REFINER, "asymmetric": ASYMMETRIC}

# Per row: original size (h, w), crop top-left (y, x), then the target size (h, w) for the
# base or the aesthetic score for the refiner.
TIME_IDS = {6: [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                [768.0, 1344.0, 16.0, 32.0, 896.0, 1152.0]],
            5: [[1024.0, 1024.0, 0.0, 0.0, 6.0],
                [768.0, 1344.0, 16.0, 32.0, 2.5]]}


def _randomize(module, seed):
    """Every parameter seeded and non-zero: norm weights near 1, biases and norm shifts small,
    matrices scaled by 1/sqrt(fan-in) so activations stay O(1) through the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                norm = "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight")
                p.copy_(1 + 0.2 * noise if norm else -0.05 + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name → (config dict, sdrt's UNet, diffusers' UNet) on the same weights, built once."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    built = {}

    def pair(name):
        if name not in built:
            ref = UNet2DConditionModel(**TINY[name])
            _randomize(ref, seed=sorted(TINY).index(name))
            ref.eval()
            folder = str(tmp_path_factory.mktemp(f"sdxl-unet-{name}"))
            ref.save_pretrained(folder, safe_serialization=True)
            with open(os.path.join(folder, "config.json")) as fh:
                config = json.load(fh)
            with SafetensorsFiles(component_weights(folder, "diffusion_pytorch_model")) as f:
                ours = load_parameters(build("unet", config), f.source, torch.device("cpu"),
                                       torch.float32, folder)
            built[name] = config, ours, ref
        return built[name]
    return pair


def _inputs(config, hw, seed=1):
    g = torch.Generator().manual_seed(seed)
    k = (config["projection_class_embeddings_input_dim"] - POOLED) // 8
    x = -0.3 + torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    pooled = 0.5 + torch.randn(2, POOLED, generator=g)
    return x, ctx, pooled, torch.tensor(TIME_IDS[k])


# One timestep per row (the scalar broadcast is SD's path, tested in test_models.py); the odd
# latent (6→3→2 on the way down, upsampled to the skips' sizes on the way up) once.
CASES = [("base", (8, 8)), ("base", (6, 10)), ("refiner", (8, 8)), ("asymmetric", (8, 8))]


@pytest.mark.parametrize("name,hw", CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in CASES])
def test_noise_prediction_matches_diffusers(pairs, name, hw):
    config, ours, ref = pairs(name)
    x, ctx, pooled, time_ids = _inputs(config, hw)
    t = torch.tensor([1.0, 500.5])
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled,
                                                     "time_ids": time_ids}).sample
        got = ours(x, t, ctx, text_embeds=pooled, time_ids=time_ids)
    assert_close_rel(got, expected, REL_TOL, f"{name} unet {hw} at t={t.tolist()}")


def test_time_ids_and_pooled_text_reach_the_output(pairs):
    # Otherwise the comparison above could pass with the added embedding dropped: the
    # prediction must move by far more than the tolerance when either input changes.
    config, ours, _ = pairs("base")
    x, ctx, pooled, time_ids = _inputs(config, (8, 8))
    t = torch.tensor(500)
    with torch.no_grad():
        base = ours(x, t, ctx, text_embeds=pooled, time_ids=time_ids)
        for what, kw in (("time_ids", dict(text_embeds=pooled, time_ids=time_ids.flip(0))),
                         ("text_embeds", dict(text_embeds=pooled.flip(0), time_ids=time_ids))):
            moved = ((ours(x, t, ctx, **kw) - base).norm() / base.norm()).item()
            assert moved > 100 * REL_TOL, f"swapping the rows' {what} moved the prediction " \
                                          f"by only {moved:.2e} (relative)"


@pytest.mark.parametrize("name", sorted(TINY))
def test_loaded_config_reads_as_the_contract_says(pairs, name):
    config, ours, _ = pairs(name)
    assert ours.config.addition_embed_type == "text_time"
    assert ours.config.addition_time_embed_dim == 8
    assert ours.config.projection_class_embeddings_input_dim == \
        config["projection_class_embeddings_input_dim"]
    assert not list(ours.add_time_proj.parameters()), "add_time_proj must have no parameters"


# --- the inputs: refused in one line naming the argument ---------------------------------------

@pytest.fixture(scope="module")
def base_unet():
    unet = build("unet", BASE, device="cpu")
    _randomize(unet, seed=5)
    return unet.eval()


def _call(unet, **kw):
    x, ctx, pooled, time_ids = _inputs(dict(BASE), (8, 8))
    args = dict(text_embeds=pooled, time_ids=time_ids)
    args.update(kw)
    with torch.no_grad():
        return unet(x, torch.tensor(10), ctx, **args)


@pytest.mark.parametrize("missing", ["text_embeds", "time_ids"])
def test_missing_added_input_is_refused_by_name(base_unet, missing):
    with pytest.raises(SdrtError, match=rf"^this UNet \(addition_embed_type 'text_time', "
                                        rf"SDXL\) needs {missing}: "):
        _call(base_unet, **{missing: None})


@pytest.mark.parametrize("what,kw,message", [
    # One pooled feature too many: 25 + 8 x 6 = 73, the UNet takes 72.
    ("text_embeds", dict(text_embeds=torch.ones(2, POOLED + 1)),
     r"^text_embeds width 25 \+ addition_time_embed_dim 8 x 6 time_ids = 73, but the UNet's "
     r"projection_class_embeddings_input_dim is 72$"),
    # The refiner's five time ids given to the base: 24 + 8 x 5 = 64.
    ("time_ids", dict(time_ids=torch.ones(2, 5)),
     r"^text_embeds width 24 \+ addition_time_embed_dim 8 x 5 time_ids = 64, but the UNet's "
     r"projection_class_embeddings_input_dim is 72$"),
    ("rows", dict(time_ids=torch.ones(1, 6)),
     r"^time_ids must be \(2, n\) for a sample batch of 2, got shape \(1, 6\)$"),
    ("rank", dict(text_embeds=torch.ones(2, 1, POOLED)),
     r"^text_embeds must be \(2, n\) for a sample batch of 2, got shape \(2, 1, 24\)$"),
], ids=["text-width", "time-id-count", "time-id-rows", "text-rank"])
def test_wrong_added_input_shape_is_refused_naming_both_sides(base_unet, what, kw, message):
    with pytest.raises(SdrtError, match=message):
        _call(base_unet, **kw)


@pytest.mark.parametrize("given", ["text_embeds", "time_ids"])
def test_added_input_given_to_an_sd_unet_is_refused(given):
    unet = build("unet", {**model_config("sd15")["unet"], "block_out_channels": [32, 64],
                          "attention_head_dim": 2, "cross_attention_dim": 64,
                          "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                          "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                          "norm_num_groups": 16}, device="cpu")
    x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 7, 64)
    with pytest.raises(SdrtError, match=rf"^{given} was given, but this UNet has no added "
                                        rf"text-time embedding \(config addition_embed_type "
                                        rf"is None, not 'text_time'\)$"):
        unet(x, torch.tensor(1), ctx, **{given: torch.zeros(1, 6)})


# --- the config: what sdrt does not compute is refused by name --------------------------------

def _sdxl():
    return model_config("sdxl")["unet"]


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),          # a class embedding added to the time embedding
    ("num_class_embeds", 10),                  # the same, from an nn.Embedding
    ("class_embeddings_concat", True),
    ("encoder_hid_dim", 1024),                 # a projection of the text states
    ("encoder_hid_dim_type", "text_proj"),
    ("dual_cross_attention", True),
    ("only_cross_attention", True),
    ("only_cross_attention", [False, True, False]),
    ("mid_block_only_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("resnet_skip_time_act", True),
    ("resnet_out_scale_factor", 2.0),
    ("mid_block_scale_factor", 1.414),
    ("time_embedding_type", "fourier"),
    ("time_embedding_dim", 512),
    ("time_embedding_act_fn", "silu"),
    ("timestep_post_act", "silu"),
    ("conv_in_kernel", 5),
    ("conv_out_kernel", 1),
    ("attention_type", "gated"),
    ("cross_attention_norm", "group_norm"),
    ("act_fn", "gelu"),
    ("some_future_setting", 1),                # unknown: it may change the computation
])
def test_computation_changing_setting_is_refused_by_name(key, value):
    with pytest.raises(SdrtError, match=rf"^unet config: unsupported setting {key}\b"):
        UNetConfig.from_dict({**_sdxl(), key: value})


@pytest.mark.parametrize("key,value,message", [
    ("addition_embed_type", "text", r"unsupported setting addition_embed_type='text' \(sdrt "
                                    r"implements only null or 'text_time'\)$"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn",
     r"unsupported setting mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
    ("addition_time_embed_dim", None, r"addition_time_embed_dim must be an integer"),
    ("projection_class_embeddings_input_dim", None,
     r"projection_class_embeddings_input_dim must be an integer"),
    ("transformer_layers_per_block", [1, [2, 2], 10],
     r"transformer_layers_per_block must be a list of integers unless "
     r"reverse_transformer_layers_per_block is given"),
    ("transformer_layers_per_block", [1, 2], r"transformer_layers_per_block must be an "
                                            r"integer or a list of 3 entries"),
    ("reverse_transformer_layers_per_block", [10, [2, 2], 1],
     r"reverse_transformer_layers_per_block must be one entry per ResNet of a level \(3\)"),
])
def test_unimplemented_or_malformed_sdxl_setting_is_refused_by_name(key, value, message):
    with pytest.raises(SdrtError, match=rf"^unet config: {message}"):
        UNetConfig.from_dict({**_sdxl(), key: value})


def test_added_embedding_settings_without_text_time_are_refused():
    sd15 = model_config("sd15")["unet"]
    with pytest.raises(SdrtError, match=r"^unet config: unsupported setting "
                                        r"addition_time_embed_dim=256 without "
                                        r"addition_embed_type 'text_time'$"):
        UNetConfig.from_dict({**sd15, "addition_time_embed_dim": 256})


def test_settings_that_do_not_change_the_computation_are_accepted():
    harmless = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
                "_name_or_path": "somewhere", "sample_size": 96,
                "dropout": 0.1,                      # inference runs in eval mode
                "addition_embed_type_num_heads": 7,  # used only by addition_embed_type "text"
                "only_cross_attention": [False, False, False],
                "mid_block_only_cross_attention": False, "resnet_out_scale_factor": 1.0,
                "mid_block_scale_factor": 1, "class_embed_type": None, "num_class_embeds": None,
                "encoder_hid_dim": None, "time_embedding_type": "positional",
                "attention_type": "default", "cross_attention_norm": None,
                "reverse_transformer_layers_per_block": [10, 2, 1]}
    plain = asdict(UNetConfig.from_dict(_sdxl()))
    edited = asdict(UNetConfig.from_dict({**_sdxl(), **harmless}))
    assert {k: v for k, v in edited.items() if plain[k] != v} == {
        "sample_size": 96, "reverse_transformer_layers_per_block": [10, 2, 1]}
    # reverse_transformer_layers_per_block above is the default up path spelled out.
    assert UNetConfig.from_dict({**_sdxl(), **harmless}).transformer_layers == \
        UNetConfig.from_dict(_sdxl()).transformer_layers


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sdxl-refiner", "sdxl-turbo"])
def test_real_config_round_trips_through_its_dataclass(name):
    # The ONNX export stores asdict(config) and the runtime reads it back with from_dict.
    cfg = UNetConfig.from_dict(model_config(name)["unet"])
    assert UNetConfig.from_dict(asdict(cfg)) == cfg


# --- the parameter count (memory checks) -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
def test_parameter_count_from_config_equals_the_built_module(name):
    # The real SDXL configs are counted in test_models.py; these add the per-ResNet counts.
    config = TINY[name]
    built = sum(p.numel() for p in build("unet", config).parameters())  # meta device
    assert parameter_count("unet", parse_config("unet", config)) == built


@pytest.mark.parametrize("key,value", [("made_up_setting", 1), ("latent_scale", 0.5)])
def test_vae_config_refuses_settings_that_change_the_computation(key, value):
    # (latents_mean/latents_std are implemented: tests/test_edm.py.)
    from sdrt.engine.configs import model_config
    from sdrt.engine.vae import VAEConfig
    config = model_config("sdxl")["vae"]
    VAEConfig.from_dict({**config, "_diffusers_version": "0.42.1", "latents_mean": None})
    with pytest.raises(SdrtError, match=f"vae config: unsupported setting {key}="):
        VAEConfig.from_dict({**config, key: value})
