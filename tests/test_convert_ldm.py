"""Original single-file checkpoints → diffusers names (engine/convert_ldm.py): SD 1.x/2.x
files in the LDM/CompVis layout, SDXL base and refiner files in the SGM layout.

The referee is diffusers itself. Tiny random diffusers/transformers models are written in the
original layout by a test-side inverse mapping (tests/sgm_checkpoints.py, written
independently of the engine's tables); diffusers' own single-file converters must map that
dict back to the original tensors, which validates the inverse, and then sdrt's plan must do
the same: every key, every tensor bit-for-bit, no extra key, and no stored weight left unused.
At the real SD 1.5 / 2.1 / SDXL base / SDXL refiner sizes the same is checked for key names
and shapes on the meta device.

diffusers and transformers are imported inside the tests that use them (``_referee``), so the
file collects where they are not installed (the GPU machine), and those tests skip there.
"""
import copy
import importlib
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdrt.engine import configs
from sdrt.engine.convert_ldm import Recipe, detect_family, family_configs, ldm_to_diffusers
from sdrt.engine.errors import SdrtError

# The inverse mappings (diffusers → LDM/SGM names) live in sgm_checkpoints; test_loading and
# test_lora import UNET, unet_key_to_ldm and to_ldm from here.
from sgm_checkpoints import UNET  # noqa: F401
from sgm_checkpoints import (CLIP, OPENCLIP, SGM_CLIP, SGM_OPENCLIP, SGM_REFINER_OPENCLIP,
                             clip_to_ldm, openclip_to_ldm, sgm_state_dict, text_state_dict,
                             unet_key_to_ldm, vae_to_ldm, write_sgm)

SGM_FAMILIES = ("sdxl", "sdxl-refiner")
FAMILIES = ("sd1", "sd2") + SGM_FAMILIES


def _referee():
    """diffusers' model classes and single-file converters, transformers' CLIP text models."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    return SimpleNamespace(
        AutoencoderKL=AutoencoderKL, UNet2DConditionModel=UNet2DConditionModel,
        CLIPTextConfig=CLIPTextConfig, CLIPTextModel=CLIPTextModel,
        CLIPTextModelWithProjection=CLIPTextModelWithProjection,
        single_file=importlib.import_module("diffusers.loaders.single_file_utils"))


def openclip_unused(sd, num_layers):
    """What a real SD 2 file holds beyond the diffusers model: the last resblock (SD 2 uses
    the penultimate layer) and CLIP's contrastive head. Random: the plan must skip them."""
    last = f"resblocks.{num_layers - 1}."
    out = {k.replace(last, f"resblocks.{num_layers}."): torch.randn_like(t)
           for k, t in openclip_to_ldm(sd, num_layers).items() if last in k}
    ln = sd["text_model.final_layer_norm.weight"]
    out[f"{OPENCLIP}text_projection"] = torch.randn(ln.shape[0], ln.shape[0], device=ln.device)
    out[f"{OPENCLIP}logit_scale"] = torch.full((), 4.6, device=ln.device)
    return out


# Keys every real checkpoint holds outside the three models.
_EXTRAS = {"alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000),
           "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}

# ---------------------------------------------------------------------------------------------
# Tiny models.

_TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, sample_size=16)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, vocab_size=1000,
                  max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# bigG-like: its own width (48), and a projection to a different width (24), so that a
# transposed text_projection or a q/k/v split at the wrong width cannot pass.
_TINY_BIGG = dict(_TINY_TEXT, hidden_size=48, hidden_act="gelu", num_hidden_layers=3,
                  projection_dim=24, architectures=["CLIPTextModelWithProjection"])
# SDXL-like UNets: no attention on the first level (DownBlock2D first), several transformer
# layers per level, Linear proj_in/out, the "text_time" added embedding of the pooled text
# (24) and the micro-conditioning numbers (6 base, 5 refiner, 8 sinusoid channels each).
_TINY_SDXL_UNET = dict(_TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                       use_linear_projection=True, attention_head_dim=(2, 4),
                       addition_embed_type="text_time", addition_time_embed_dim=8)
TINY = {
    # SD 1.x-like: 1×1-conv proj_in/out, one head size for all levels, CLIP ViT-L-style text.
    "sd1": dict(unet=dict(_TINY_UNET, attention_head_dim=8),
                text_encoder=dict(_TINY_TEXT, hidden_act="quick_gelu", num_hidden_layers=2)),
    # SD 2.x-like: Linear proj_in/out, per-level head counts, OpenCLIP-style text whose file
    # holds one more layer than the model uses.
    "sd2": dict(unet=dict(_TINY_UNET, use_linear_projection=True, attention_head_dim=(2, 4)),
                text_encoder=dict(_TINY_TEXT, hidden_act="gelu", num_hidden_layers=3)),
    # SDXL base: cross-attention on both encoders' states side by side (32 + 48).
    "sdxl": dict(unet=dict(_TINY_SDXL_UNET, transformer_layers_per_block=(1, 2),
                           cross_attention_dim=80, projection_class_embeddings_input_dim=24 + 48),
                 text_encoder=dict(_TINY_TEXT, hidden_act="quick_gelu", num_hidden_layers=2),
                 text_encoder_2=_TINY_BIGG),
    # SDXL refiner: bigG only; three levels, the last without attention as in the real one,
    # one transformer-layer count for all levels.
    "sdxl-refiner": dict(unet=dict(_TINY_SDXL_UNET, block_out_channels=(32, 32, 64),
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                     "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                                                   "UpBlock2D"),
                                   attention_head_dim=(2, 2, 4),
                                   transformer_layers_per_block=2, cross_attention_dim=48,
                                   projection_class_embeddings_input_dim=24 + 40),
                         text_encoder_2=_TINY_BIGG),
}
_TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                 layers_per_block=2, sample_size=32)
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def _randomise(model):
    """Distinct values everywhere (norm weights start as all ones): a swap cannot pass."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(-0.3 + torch.randn_like(p))
    return model


def to_ldm(family, models, cfgs):
    """The whole LDM checkpoint dict (SD 1.x/2.x) for diffusers-layout ``models``
    (unet, vae, text encoder), and the expected tensors by component."""
    unet, vae, text = models[0].state_dict(), models[1].state_dict(), text_state_dict(models[2])
    ldm = {unet_key_to_ldm(k, cfgs["unet"]): t for k, t in unet.items()}
    ldm.update(vae_to_ldm(vae, cfgs["vae"]))
    n = cfgs["text_encoder"]["num_hidden_layers"]
    if family == "sd1":
        ldm.update(clip_to_ldm(text))
    else:
        ldm.update(openclip_to_ldm(text, n))
        ldm.update(openclip_unused(text, n))
    return {**ldm, **_EXTRAS}, {"unet": unet, "vae": vae, "text_encoder": text}


def build(family, cfgs, r):
    """The diffusers/transformers modules of ``family`` for the config dicts ``cfgs``."""
    models = {"unet": r.UNet2DConditionModel.from_config(cfgs["unet"]),
              "vae": r.AutoencoderKL.from_config(cfgs["vae"])}
    if "text_encoder" in cfgs:
        models["text_encoder"] = r.CLIPTextModel(r.CLIPTextConfig(**cfgs["text_encoder"]))
    if "text_encoder_2" in cfgs:
        models["text_encoder_2"] = r.CLIPTextModelWithProjection(
            r.CLIPTextConfig(**cfgs["text_encoder_2"]))
    return models


def original_file(family, models, cfgs):
    """(the single-file dict, the expected tensors by component, the stored keys that are no
    weight of the model: the plan must leave exactly these unused)."""
    if family in SGM_FAMILIES:
        ldm = sgm_state_dict(family, models["unet"], models["vae"], models.get("text_encoder"),
                             models["text_encoder_2"])
        expected = {c: (text_state_dict(m) if c in TEXT_COMPONENTS else m.state_dict())
                    for c, m in models.items()}
    else:
        ldm, expected = to_ldm(family, (models["unet"], models["vae"], models["text_encoder"]),
                               cfgs)
    stored = {t for c in expected for t in _to_original(family, c, expected[c], cfgs)}
    return ldm, expected, set(ldm) - stored


def _to_original(family, component, sd, cfgs):
    """The stored keys holding ``component``'s tensors ``sd``."""
    if component == "unet":
        return [unet_key_to_ldm(k, cfgs["unet"]) for k in sd]
    if component == "vae":
        return list(vae_to_ldm(sd, cfgs["vae"]))
    n = cfgs[component]["num_hidden_layers"]
    prefix = {("sd1", "text_encoder"): CLIP, ("sd2", "text_encoder"): OPENCLIP,
              ("sdxl", "text_encoder"): SGM_CLIP, ("sdxl", "text_encoder_2"): SGM_OPENCLIP,
              ("sdxl-refiner", "text_encoder_2"): SGM_REFINER_OPENCLIP}[family, component]
    if prefix.endswith(".transformer."):
        return [prefix + k for k in sd]
    return list(openclip_to_ldm(sd, n, prefix))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    family, r = request.param, _referee()
    torch.manual_seed(0)
    tiny_cfgs = {**TINY[family], "vae": _TINY_VAE}
    models = {c: _randomise(m) for c, m in build(family, tiny_cfgs, r).items()}
    cfgs = {c: (m.config.to_dict() if c in TEXT_COMPONENTS else dict(m.config))
            for c, m in models.items()}
    ldm, expected, unused = original_file(family, models, cfgs)
    return SimpleNamespace(family=family, ldm=ldm, expected=expected, unused=unused, cfgs=cfgs,
                           models=models)


def assert_same_tensors(got, expected, what):
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    assert not missing and not extra, f"{what}: missing {missing[:5]}, extra {extra[:5]}"
    for k, t in expected.items():
        assert got[k].shape == t.shape, f"{what} {k}: shape {got[k].shape} != {t.shape}"
        if t.device.type != "meta":
            assert torch.equal(got[k], t), f"{what} {k}: max |diff| {(got[k] - t).abs().max()}"


def diffusers_referee(family, ldm, cfgs, models):
    """diffusers' own single-file converters on the original dict."""
    dsf = _referee().single_file
    out = {"unet": dsf.convert_ldm_unet_checkpoint(ldm, cfgs["unet"]),
           "vae": dsf.convert_ldm_vae_checkpoint(ldm, cfgs["vae"])}
    if family in ("sd1", "sdxl"):
        # Both CLIP prefixes (cond_stage_model.transformer., conditioner.embedders.0.
        # transformer.) are diffusers' LDM_CLIP_PREFIX_TO_REMOVE.
        out["text_encoder"] = dsf.convert_ldm_clip_checkpoint(ldm)
        # diffusers passes the position_ids buffer through; the model ignores it on load.
        out["text_encoder"].pop("text_model.embeddings.position_ids")
    if family == "sd2":
        # diffusers skips exactly SD 2's 24th block and keeps text_projection (as a weight the
        # CLIPTextModel does not have), so give it the file without the unused extras.
        n = cfgs["text_encoder"]["num_hidden_layers"]
        unused = {k for k in ldm if k.startswith(f"{OPENCLIP}transformer.resblocks.{n}.")
                  or k in (f"{OPENCLIP}text_projection", f"{OPENCLIP}logit_scale")}
        out["text_encoder"] = dsf.convert_open_clip_checkpoint(
            models["text_encoder"], {k: t for k, t in ldm.items() if k not in unused})
    if family in SGM_FAMILIES:
        prefix = SGM_OPENCLIP if family == "sdxl" else SGM_REFINER_OPENCLIP
        out["text_encoder_2"] = dsf.convert_open_clip_checkpoint(models["text_encoder_2"], ldm,
                                                                 prefix=prefix)
    return out


def load_plan(plan, get_tensor):
    return {c: {k: r.load(get_tensor) for k, r in recipes.items()} for c, recipes in plan.items()}


def assert_plan_matches(plan, ldm, expected, unused, what):
    assert plan.keys() == expected.keys(), what
    got = load_plan(plan, ldm.__getitem__)
    for component in plan:
        assert_same_tensors(got[component], expected[component], f"{what} {component}")
    used = {r.ldm_key for recipes in plan.values() for r in recipes.values()}
    assert set(ldm) - used == unused, f"{what}: stored keys used wrongly: " \
        f"{sorted((set(ldm) - used) ^ unused)[:5]}"


# ---------------------------------------------------------------------------------------------
# Tiny models: values.

def test_diffusers_agrees_with_test_inverse(tiny):
    got = diffusers_referee(tiny.family, tiny.ldm, tiny.cfgs, tiny.models)
    assert got.keys() == tiny.expected.keys()
    for component, tensors in got.items():
        assert_same_tensors(tensors, tiny.expected[component],
                            f"diffusers {tiny.family} {component}")


def test_plan_round_trip(tiny):
    assert detect_family(tiny.ldm) == tiny.family
    plan = ldm_to_diffusers(tiny.ldm, tiny.family, tiny.cfgs)
    assert_plan_matches(plan, tiny.ldm, tiny.expected, tiny.unused, f"sdrt {tiny.family}")


def test_plan_through_safetensors_file(tiny, tmp_path):
    """The loader's lazy path: key names from the file, one get_tensor per recipe. SGM files
    are written by write_sgm, the writer end-to-end tests use."""
    path = tmp_path / "model.safetensors"
    if tiny.family in SGM_FAMILIES:
        m = tiny.models
        write_sgm(path, tiny.family, m["unet"], m["vae"], m.get("text_encoder"),
                  m["text_encoder_2"])
    else:
        save_file({k: t.contiguous().clone() for k, t in tiny.ldm.items()}, str(path))
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        assert set(keys) == set(tiny.ldm)
        plan = ldm_to_diffusers(keys, detect_family(keys), tiny.cfgs)
        got = load_plan(plan, f.get_tensor)
    for component in plan:
        assert_same_tensors(got[component], tiny.expected[component],
                            f"file {tiny.family} {component}")


@pytest.mark.parametrize("family, prefix", [("sd1", CLIP), ("sdxl", SGM_CLIP)])
def test_clip_text_without_text_model_wrapper(family, prefix):
    """Some files store CLIPTextTransformer bare: <prefix>encoder.* without text_model."""
    r = _referee()
    torch.manual_seed(0)
    text = _randomise(r.CLIPTextModel(r.CLIPTextConfig(**TINY[family]["text_encoder"])))
    expected = text_state_dict(text)
    ldm = clip_to_ldm(expected, wrapper=False, prefix=prefix)
    # The other configs are not used: there are no such keys here.
    cfgs = {**family_configs(family), "text_encoder": text.config.to_dict()}
    plan = ldm_to_diffusers(ldm, family, cfgs)
    assert_same_tensors(load_plan(plan, ldm.__getitem__)["text_encoder"], expected, "bare text")


_BIGG_IN_PROJ = SGM_OPENCLIP + "transformer.resblocks.31.attn.in_proj_weight"


@pytest.mark.parametrize("family, name, component, outcome", [
    # a file holding the whole CLIP model: the vision tower and projections are not used
    ("sd1", CLIP + "vision_model.encoder.layers.0.mlp.fc1.weight", "text_encoder", None),
    ("sd1", CLIP + "text_projection.weight", "text_encoder", None),
    ("sd1", CLIP + "logit_scale", "text_encoder", None),
    # the position_ids buffer, with and without the text_model wrapper
    ("sd1", CLIP + "text_model.embeddings.position_ids", "text_encoder", None),
    ("sd1", CLIP + "embeddings.position_ids", "text_encoder", None),
    ("sd1", CLIP + "final_layer_norm.bias", "text_encoder",
     {"text_model.final_layer_norm.bias": Recipe(CLIP + "final_layer_norm.bias")}),
    ("sd1", CLIP + "something_else.weight", "text_encoder", "not part of a CLIP text model"),
    # SD 2.1's config has 23 layers: the file's 24th (index 23) is the one SD 2 skips
    ("sd2", OPENCLIP + "transformer.resblocks.23.ln_1.weight", "text_encoder", None),
    ("sd2", OPENCLIP + "transformer.resblocks.22.ln_1.weight", "text_encoder",
     {"text_model.encoder.layers.22.layer_norm1.weight":
      Recipe(OPENCLIP + "transformer.resblocks.22.ln_1.weight")}),
    # SD 2's text encoder has no projection
    ("sd2", OPENCLIP + "text_projection", "text_encoder", None),
    ("sd2", OPENCLIP + "visual.proj", "text_encoder", "not part of an OpenCLIP text tower"),
    # SDXL's first encoder: SD 1's CLIP under the SGM prefix
    ("sdxl", SGM_CLIP + "text_model.embeddings.position_ids", "text_encoder", None),
    ("sdxl", SGM_CLIP + "text_model.encoder.layers.11.mlp.fc2.bias", "text_encoder",
     {"text_model.encoder.layers.11.mlp.fc2.bias":
      Recipe(SGM_CLIP + "text_model.encoder.layers.11.mlp.fc2.bias")}),
    # bigG: stored (D, P), transposed into the Linear's (P, D) weight
    ("sdxl", SGM_OPENCLIP + "text_projection", "text_encoder_2",
     {"text_projection.weight": Recipe(SGM_OPENCLIP + "text_projection", transpose=True)}),
    ("sdxl", SGM_OPENCLIP + "logit_scale", "text_encoder_2", None),
    # all 32 layers are used (SDXL takes the penultimate states but also the pooled output),
    # q/k/v split at bigG's width
    ("sdxl", _BIGG_IN_PROJ, "text_encoder_2",
     {f"text_model.encoder.layers.31.self_attn.{x}_proj.weight":
      Recipe(_BIGG_IN_PROJ, rows=slice(i * 1280, (i + 1) * 1280)) for i, x in enumerate("qkv")}),
    ("sdxl", SGM_OPENCLIP + "transformer.resblocks.32.ln_1.weight", "text_encoder_2",
     "has no place in the text_encoder_2 config"),
    ("sdxl-refiner", SGM_REFINER_OPENCLIP + "ln_final.weight", "text_encoder_2",
     {"text_model.final_layer_norm.weight": Recipe(SGM_REFINER_OPENCLIP + "ln_final.weight")}),
    ("sdxl-refiner", SGM_REFINER_OPENCLIP + "text_projection", "text_encoder_2",
     {"text_projection.weight": Recipe(SGM_REFINER_OPENCLIP + "text_projection",
                                       transpose=True)}),
])
def test_text_key(family, name, component, outcome):
    """One stored text-encoder key: ignored (None), mapped ({name: Recipe}), or rejected."""
    args = ([name], family, family_configs(family))
    if isinstance(outcome, str):
        with pytest.raises(SdrtError, match=outcome):
            ldm_to_diffusers(*args)
        return
    plan = ldm_to_diffusers(*args)
    assert plan[component] == (outcome or {})
    assert not any(plan[c] for c in plan if c != component)


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_layout_mismatch_raises(tiny, component):
    """A config with fewer resnets per level than the file has no place for some keys."""
    cfgs = {**tiny.cfgs, component: {**tiny.cfgs[component], "layers_per_block": 1}}
    with pytest.raises(SdrtError, match="has no place"):
        ldm_to_diffusers(tiny.ldm, tiny.family, cfgs)


@pytest.mark.parametrize("tiny, component, outcome", [
    # SD 2: the resblocks past the config's depth are the ones SD 2 does not use
    ("sd2", "text_encoder", None),
    # SDXL: every bigG layer is used, so a shallower config does not fit the file
    ("sdxl", "text_encoder_2", "has no place in the text_encoder_2 config"),
    ("sdxl-refiner", "text_encoder_2", "has no place in the text_encoder_2 config"),
], indirect=["tiny"])
def test_openclip_depth(tiny, component, outcome):
    """A text config one layer shallower than the file."""
    n = tiny.cfgs[component]["num_hidden_layers"] - 1
    cfgs = {**tiny.cfgs, component: {**tiny.cfgs[component], "num_hidden_layers": n}}
    if outcome is not None:
        with pytest.raises(SdrtError, match=outcome):
            ldm_to_diffusers(tiny.ldm, tiny.family, cfgs)
        return
    plan = ldm_to_diffusers(tiny.ldm, tiny.family, cfgs)[component]
    assert f"text_model.encoder.layers.{n - 1}.layer_norm1.weight" in plan
    assert not any(k.startswith(f"text_model.encoder.layers.{n}.") for k in plan)


def test_recipe_load():
    fused = torch.arange(12.0).reshape(6, 2)
    v = Recipe("w", rows=slice(4, 6)).load({"w": fused}.__getitem__)
    assert torch.equal(v, fused[4:])
    # A copy, not a view: the fused tensor is freed once q, k and v are made.
    assert v.untyped_storage().nbytes() == v.nbytes
    conv = torch.randn(3, 3, 1, 1)
    linear = Recipe("c", squeeze_1x1=True).load({"c": conv}.__getitem__)
    assert torch.equal(linear, conv[:, :, 0, 0])
    projection = torch.randn(4, 3)  # (D, P)
    weight = Recipe("p", transpose=True).load({"p": projection}.__getitem__)
    assert torch.equal(weight, projection.T) and weight.is_contiguous()


# ---------------------------------------------------------------------------------------------
# Real sizes on the meta device: names and shapes.

# Keys, with their shapes, that real checkpoints are known to hold (diffusers' detection keys
# among them).
_REAL_KEYS = {
    "sd1": {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
            "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
            "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
    "sd2": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
            (320, 1024),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias": (1024,),
            "cond_stage_model.model.text_projection": (1024, 1024)},
    "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
             # the first level has no attention: input_blocks.1 and .2 are resnets only
             "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),  # Linear
             "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight":
             (1280, 2048),
             "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight":
             (1280, 5120),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
             "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding."
             "weight": (77, 768),
             "conditioner.embedders.1.model.positional_embedding": (77, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight":
             (3840, 1280),
             "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
    "sdxl-refiner": {
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight":
        (768, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight":
        (1536, 1536),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1536, 1536, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1536, 1536, 3, 3),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
}


# SD 1.5 (CLIP ViT-L, conv projections), SD 2.1 (OpenCLIP ViT-H with a dropped 24th layer,
# linear projections, per-level heads), SDXL base (two encoders, bigG with its projection,
# 1/2/10 transformer layers, no attention on the first level) and refiner: every parameter
# of the real models gets exactly one stored key, and every stored weight is used.
@pytest.mark.parametrize("family", FAMILIES)
def test_real_config_covers_model(family):
    cfgs, r = family_configs(family), _referee()
    with torch.device("meta"):
        models = build(family, cfgs, r)
    ldm, expected, unused = original_file(family, models, cfgs)
    shapes = {k: tuple(ldm[k].shape) for k in _REAL_KEYS[family] if k in ldm}
    assert shapes == _REAL_KEYS[family]
    assert detect_family(ldm) == family
    referee = diffusers_referee(family, ldm, cfgs, models)
    for component in expected:
        assert_same_tensors(referee[component], expected[component], f"diffusers {component}")
    plan = ldm_to_diffusers(ldm, family, cfgs)
    assert_plan_matches(plan, ldm, expected, unused, f"sdrt {family}")


# ---------------------------------------------------------------------------------------------
# Family detection and configs.

_SD1 = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
_BASE = _SD1[:2] + [SGM_CLIP + "text_model.embeddings.token_embedding.weight",
                    SGM_OPENCLIP + "token_embedding.weight"]


@pytest.mark.parametrize("keys, family", [
    (_SD1, "sd1"),
    # older transformers saved the text tower without the text_model wrapper
    (_SD1[:2] + ["cond_stage_model.transformer.embeddings.token_embedding.weight"], "sd1"),
    (_SD1[:2] + ["cond_stage_model.model.token_embedding.weight"], "sd2"),
    (_BASE, "sdxl"),
    (_SD1[:2] + [SGM_CLIP + "embeddings.token_embedding.weight",  # bare CLIP
                 SGM_OPENCLIP + "token_embedding.weight"], "sdxl"),
    (_SD1[:2] + [SGM_REFINER_OPENCLIP + "token_embedding.weight"], "sdxl-refiner"),
])
def test_detect_family(keys, family):
    assert detect_family(iter(keys)) == family


@pytest.mark.parametrize("keys, message", [
    ([], "no tensors"),
    # a diffusers-layout UNet file (the user should point at the folder)
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"],
     r"no UNet keys \(model.diffusion_model.\*; found conv_in.\*, down_blocks.\*\)"),
    # UNet-only file (e.g. a pruned fine-tune without VAE)
    (_SD1[:1] + _SD1[2:], "no VAE keys"),
    # text encoder of an unknown kind
    (_SD1[:2] + ["cond_stage_model.embedder.weight"],
     r"unknown text encoders in the checkpoint: cond_stage_model.embedder.\*; expected SD 1.x"),
    (_SD1[:2], "unknown text encoders in the checkpoint: none"),
    # SGM with only SDXL's first encoder (a base file missing bigG)
    (_BASE[:3], r"unknown text encoders in the checkpoint: conditioner.embedders.0.transformer"
                r".\*; expected .* SDXL: conditioner.embedders.0.transformer.\* \+ "
                r"conditioner.embedders.1.model.\*"),
    # base and refiner encoders mixed
    (_BASE + [SGM_REFINER_OPENCLIP + "token_embedding.weight"], "unknown text encoders"),
    # an SGM model with other embedders (e.g. Stable Video Diffusion's image encoder)
    (_SD1[:2] + ["conditioner.embedders.0.open_clip.model.visual.proj"],
     r"conditioner.embedders.0.open_clip.\*"),
    # SD 3 (MMDiT, text_encoders.*) and Flux (bare or under model.diffusion_model.)
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
      "first_stage_model.encoder.conv_in.weight",
      "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"],
     "Stable Diffusion 3 checkpoint"),
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
     "Flux checkpoint"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "Flux checkpoint"),
])
def test_detect_family_errors(keys, message):
    with pytest.raises(SdrtError, match=message) as err:
        detect_family(keys)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family, prediction_type, name, expected_prediction", [
    ("sd1", None, "sd15", None),
    ("sd2", None, "sd21", "v_prediction"),  # the SD 2.1 768-v default
    ("sd2", "epsilon", "sd21-base", "epsilon"),  # a 512-base checkpoint
    ("sd1", "v_prediction", "sd15", "v_prediction"),  # a v-prediction SD 1.5 fine-tune
    ("sdxl", None, "sdxl", "epsilon"),
    ("sdxl", "epsilon", "sdxl", "epsilon"),
    ("sdxl", "v_prediction", "sdxl", "v_prediction"),  # a v-prediction SDXL fine-tune
    ("sdxl-refiner", None, "sdxl-refiner", "epsilon"),
])
def test_family_configs(family, prediction_type, name, expected_prediction):
    before = copy.deepcopy(configs.MODELS[name])
    cfg = family_configs(family, prediction_type)
    assert cfg["scheduler"].get("prediction_type") == expected_prediction
    assert {**cfg, "scheduler": None} == {**before, "scheduler": None}
    cfg["unet"]["block_out_channels"].append(0)  # a deep copy: the tables stay intact
    assert configs.MODELS[name] == before


def test_sdxl_configs_name_every_component():
    """The SDXL configs carry what a plan and the loader need: both text encoders' configs
    (bigG with its projection), and the refiner has no first encoder."""
    base, refiner = family_configs("sdxl"), family_configs("sdxl-refiner")
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "model_index",
            "pad_token_2"} <= base.keys()
    assert "text_encoder" not in refiner and "text_encoder_2" in refiner
    assert base["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]
    assert ldm_to_diffusers([], "sdxl-refiner", refiner).keys() == {"unet", "vae",
                                                                     "text_encoder_2"}


@pytest.mark.parametrize("call, message", [
    (lambda: family_configs("sd3"), "unknown model family 'sd3'"),
    (lambda: family_configs("sd2", "sample"), "unknown prediction type"),
    (lambda: ldm_to_diffusers(_SD1, "sd3", {}), "unknown model family"),
    # an SDXL plan needs the configs of both text encoders
    (lambda: ldm_to_diffusers(_BASE, "sdxl", family_configs("sd1")),
     "needs a text_encoder_2 config"),
])
def test_bad_arguments(call, message):
    with pytest.raises(SdrtError, match=message):
        call()
