"""LDM/CompVis single-file checkpoint → diffusers names (engine/convert_ldm.py).

The referee is diffusers itself. Tiny random diffusers/transformers models are written in LDM
layout by a test-side inverse mapping (below, written independently of the engine's tables);
diffusers' own single-file converters must map that LDM dict back to the original tensors,
which validates the inverse, and then sdrt's plan must do the same: every key, every tensor
bit-for-bit, no extra key. At the real SD 1.5 / 2.1 sizes the same is checked for key names
and shapes on the meta device.

diffusers and transformers are imported inside the tests that use them (``_referee``), so the
file collects where they are not installed (the GPU machine), and those tests skip there.
"""
import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdrt.engine import configs
from sdrt.engine.convert_ldm import Recipe, detect_family, family_configs, ldm_to_diffusers
from sdrt.engine.errors import SdrtError



def _referee():
    """diffusers' model classes and single-file converters, transformers' CLIP text model."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    return SimpleNamespace(
        AutoencoderKL=AutoencoderKL, UNet2DConditionModel=UNet2DConditionModel,
        CLIPTextConfig=CLIPTextConfig, CLIPTextModel=CLIPTextModel,
        single_file=importlib.import_module("diffusers.loaders.single_file_utils"))


UNET, VAE, CLIP, OPENCLIP = ("model.diffusion_model.", "first_stage_model.",
                             "cond_stage_model.transformer.", "cond_stage_model.model.")

# ---------------------------------------------------------------------------------------------
# Test-side inverse: diffusers names/tensors → LDM names/tensors, one regex per block kind.

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key_to_ldm(key, cfg):
    n = cfg["layers_per_block"]
    module, param = key.rsplit(".", 1)
    if module in _UNET_TOP:
        return f"{UNET}{_UNET_TOP[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
        ldm = f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.0.{_UNET_RESNET[m[3]]}"
    elif m := re.fullmatch(r"down_blocks\.(\d)\.attentions\.(\d)\.(.+)", module):
        ldm = f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv", module):
        ldm = f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", module):
        ldm = f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        ldm = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
        ldm = f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.0.{_UNET_RESNET[m[3]]}"
    elif m := re.fullmatch(r"up_blocks\.(\d)\.attentions\.(\d)\.(.+)", module):
        ldm = f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv", module):
        # The upsampler comes after the attention on cross-attention levels.
        index = 2 if "CrossAttn" in cfg["up_block_types"][int(m[1])] else 1
        ldm = f"output_blocks.{int(m[1]) * (n + 1) + n}.{index}.conv"
    else:
        raise AssertionError(f"test inverse: unexpected UNet key {key}")
    return f"{UNET}{ldm}.{param}"


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def vae_to_ldm(sd, cfg):
    levels = len(cfg["block_out_channels"])
    out = {}
    for key, t in sd.items():
        module, param = key.rsplit(".", 1)
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.conv", module):
            ldm = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(\w+)", module):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.conv", module):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv"
        elif m := re.fullmatch(r"(\w+)\.mid_block\.resnets\.(\d)\.(\w+)", module):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)", module):
            ldm = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}"
            if param == "weight" and m[2] != "group_norm":
                t = t[:, :, None, None]  # LDM's attention projections are 1×1 convs
        else:
            ldm = module.replace("conv_norm_out", "norm_out")
        out[f"{VAE}{ldm.replace('conv_shortcut', 'nin_shortcut')}.{param}"] = t
    return out


def clip_to_ldm(sd, wrapper=True):
    """SD 1.x: transformers' layout under the prefix; real files also carry position_ids."""
    out = {f"{CLIP}{k if wrapper else k.removeprefix('text_model.')}": t for k, t in sd.items()}
    n = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    out[f"{CLIP}{'text_model.' if wrapper else ''}embeddings.position_ids"] = torch.arange(n)[None]
    return out


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj"}


def openclip_to_ldm(sd, num_layers):
    """SD 2.x: OpenCLIP layout; q/k/v fused along rows into in_proj."""
    p = f"{OPENCLIP}transformer.resblocks."
    out = {f"{OPENCLIP}token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           f"{OPENCLIP}positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           f"{OPENCLIP}ln_final.weight": sd["text_model.final_layer_norm.weight"],
           f"{OPENCLIP}ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    for i in range(num_layers):
        layer = f"text_model.encoder.layers.{i}."
        for param in ("weight", "bias"):
            out[f"{p}{i}.attn.in_proj_{param}"] = torch.cat(
                [sd[f"{layer}self_attn.{x}_proj.{param}"] for x in "qkv"])
            for ours, theirs in _OPENCLIP_LAYER.items():
                out[f"{p}{i}.{theirs}.{param}"] = sd[f"{layer}{ours}.{param}"]
    return out


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
TINY = {
    # SD 1.x-like: 1×1-conv proj_in/out, one head size for all levels, CLIP ViT-L-style text.
    "sd1": dict(unet=dict(_TINY_UNET, attention_head_dim=8),
                text=dict(hidden_act="quick_gelu", num_hidden_layers=2)),
    # SD 2.x-like: Linear proj_in/out, per-level head counts, OpenCLIP-style text whose file
    # holds one more layer than the model uses.
    "sd2": dict(unet=dict(_TINY_UNET, use_linear_projection=True, attention_head_dim=(2, 4)),
                text=dict(hidden_act="gelu", num_hidden_layers=3)),
}
_TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                 layers_per_block=2, sample_size=32)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, vocab_size=1000,
                  max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _randomise(model):
    """Distinct values everywhere (norm weights start as all ones): a swap cannot pass."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(-0.3 + torch.randn_like(p))
    return model


def text_state_dict(model):
    # transformers 5 dropped the `text_model.` wrapper from CLIPTextModel's own names; sdrt
    # and diffusers' converters keep it.
    return {f"text_model.{k}": t for k, t in model.state_dict().items()}


def to_ldm(family, models, cfgs):
    """The whole LDM checkpoint dict for diffusers-layout ``models``."""
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


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request):
    family, r = request.param, _referee()
    torch.manual_seed(0)
    unet = _randomise(r.UNet2DConditionModel(**TINY[family]["unet"]))
    vae = _randomise(r.AutoencoderKL(**_TINY_VAE))
    text = _randomise(r.CLIPTextModel(r.CLIPTextConfig(**_TINY_TEXT, **TINY[family]["text"])))
    cfgs = {"unet": dict(unet.config), "vae": dict(vae.config),
            "text_encoder": text.config.to_dict()}
    ldm, expected = to_ldm(family, (unet, vae, text), cfgs)
    return family, ldm, expected, cfgs, text


def assert_same_tensors(got, expected, what):
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    assert not missing and not extra, f"{what}: missing {missing[:5]}, extra {extra[:5]}"
    for k, t in expected.items():
        assert got[k].shape == t.shape, f"{what} {k}: shape {got[k].shape} != {t.shape}"
        if t.device.type != "meta":
            assert torch.equal(got[k], t), f"{what} {k}: max |diff| {(got[k] - t).abs().max()}"


def diffusers_referee(family, ldm, cfgs, text_model):
    """diffusers' own single-file converters on the LDM dict."""
    dsf = _referee().single_file
    if family == "sd1":
        text = dsf.convert_ldm_clip_checkpoint(ldm)
        # diffusers passes the position_ids buffer through; the model ignores it on load.
        text.pop("text_model.embeddings.position_ids")
    else:
        # diffusers skips exactly SD 2's 24th block and keeps text_projection (as a weight the
        # CLIPTextModel does not have), so give it the file without the unused extras.
        n = cfgs["text_encoder"]["num_hidden_layers"]
        unused = {k for k in ldm if k.startswith(f"{OPENCLIP}transformer.resblocks.{n}.")
                  or k in (f"{OPENCLIP}text_projection", f"{OPENCLIP}logit_scale")}
        text = dsf.convert_open_clip_checkpoint(
            text_model, {k: t for k, t in ldm.items() if k not in unused})
    return {"unet": dsf.convert_ldm_unet_checkpoint(ldm, cfgs["unet"]),
            "vae": dsf.convert_ldm_vae_checkpoint(ldm, cfgs["vae"]), "text_encoder": text}


def load_plan(plan, get_tensor):
    return {c: {k: r.load(get_tensor) for k, r in recipes.items()} for c, recipes in plan.items()}


# ---------------------------------------------------------------------------------------------
# Tiny models: values.

@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_diffusers_agrees_with_test_inverse(tiny, component):
    family, ldm, expected, cfgs, text_model = tiny
    got = diffusers_referee(family, ldm, cfgs, text_model)[component]
    assert_same_tensors(got, expected[component], f"diffusers {family} {component}")


def test_plan_round_trip(tiny):
    family, ldm, expected, cfgs, _ = tiny
    assert detect_family(ldm) == family
    plan = ldm_to_diffusers(ldm, family, cfgs["unet"], cfgs["vae"], cfgs["text_encoder"])
    assert plan.keys() == {"unet", "vae", "text_encoder"}
    got = load_plan(plan, ldm.__getitem__)
    for component in plan:
        assert_same_tensors(got[component], expected[component], f"sdrt {family} {component}")


def test_plan_through_safetensors_file(tiny, tmp_path):
    """The loader's lazy path: key names from the file, one get_tensor per recipe."""
    family, ldm, expected, cfgs, _ = tiny
    path = tmp_path / "model.safetensors"
    save_file({k: t.contiguous().clone() for k, t in ldm.items()}, str(path))
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        plan = ldm_to_diffusers(keys, detect_family(keys), cfgs["unet"], cfgs["vae"],
                                cfgs["text_encoder"])
        got = load_plan(plan, f.get_tensor)
    for component in plan:
        assert_same_tensors(got[component], expected[component], f"file {family} {component}")


def test_sd1_text_without_text_model_wrapper():
    """Some SD 1.x files store CLIPTextTransformer bare: cond_stage_model.transformer.encoder.*"""
    r = _referee()
    torch.manual_seed(0)
    text = _randomise(r.CLIPTextModel(r.CLIPTextConfig(**_TINY_TEXT, **TINY["sd1"]["text"])))
    expected = text_state_dict(text)
    ldm = clip_to_ldm(expected, wrapper=False)
    cfgs = family_configs("sd1")  # the UNet and VAE configs are not used: no such keys here
    plan = ldm_to_diffusers(ldm, "sd1", cfgs["unet"], cfgs["vae"], text.config.to_dict())
    assert_same_tensors(load_plan(plan, ldm.__getitem__)["text_encoder"], expected, "bare text")


@pytest.mark.parametrize("family, name, outcome", [
    # a file holding the whole CLIP model: the vision tower and projections are not used
    ("sd1", CLIP + "vision_model.encoder.layers.0.mlp.fc1.weight", None),
    ("sd1", CLIP + "text_projection.weight", None),
    ("sd1", CLIP + "logit_scale", None),
    # the position_ids buffer, with and without the text_model wrapper
    ("sd1", CLIP + "text_model.embeddings.position_ids", None),
    ("sd1", CLIP + "embeddings.position_ids", None),
    ("sd1", CLIP + "final_layer_norm.bias", "text_model.final_layer_norm.bias"),
    ("sd1", CLIP + "something_else.weight", "not part of a CLIP text model"),
    # SD 2.1's config has 23 layers: the file's 24th (index 23) is the one SD 2 skips
    ("sd2", OPENCLIP + "transformer.resblocks.23.ln_1.weight", None),
    ("sd2", OPENCLIP + "transformer.resblocks.22.ln_1.weight",
     "text_model.encoder.layers.22.layer_norm1.weight"),
    ("sd2", OPENCLIP + "text_projection", None),
    ("sd2", OPENCLIP + "visual.proj", "not part of an OpenCLIP text tower"),
])
def test_text_key(family, name, outcome):
    """One stored text-encoder key: ignored (None), renamed, or rejected (a message)."""
    cfgs = family_configs(family)
    args = ([name], family, cfgs["unet"], cfgs["vae"], cfgs["text_encoder"])
    if outcome is not None and not outcome.startswith("text_model."):
        with pytest.raises(SdrtError, match=outcome):
            ldm_to_diffusers(*args)
        return
    expected = {} if outcome is None else {outcome: Recipe(name)}
    assert ldm_to_diffusers(*args)["text_encoder"] == expected


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_layout_mismatch_raises(tiny, component):
    """A config with fewer resnets per level than the file has no place for some keys."""
    family, ldm, _, cfgs, _ = tiny
    cfgs = {**cfgs, component: {**cfgs[component], "layers_per_block": 1}}
    with pytest.raises(SdrtError, match="has no place"):
        ldm_to_diffusers(ldm, family, cfgs["unet"], cfgs["vae"], cfgs["text_encoder"])


def test_recipe_load():
    fused = torch.arange(12.0).reshape(6, 2)
    v = Recipe("w", rows=slice(4, 6)).load({"w": fused}.__getitem__)
    assert torch.equal(v, fused[4:])
    # A copy, not a view: the fused tensor is freed once q, k and v are made.
    assert v.untyped_storage().nbytes() == v.nbytes
    conv = torch.randn(3, 3, 1, 1)
    linear = Recipe("c", squeeze_1x1=True).load({"c": conv}.__getitem__)
    assert torch.equal(linear, conv[:, :, 0, 0])


# ---------------------------------------------------------------------------------------------
# Real sizes on the meta device: names and shapes.

# Keys that real SD checkpoints are known to hold (diffusers' detection keys among them).
_REAL_KEYS = {
    "sd1": ["model.diffusion_model.output_blocks.11.0.skip_connection.weight",
            "model.diffusion_model.input_blocks.3.0.op.weight",
            "model.diffusion_model.output_blocks.2.1.conv.weight",
            "model.diffusion_model.output_blocks.5.2.conv.weight",
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
            "first_stage_model.decoder.up.3.upsample.conv.weight",
            "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
    "sd2": ["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
            "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight",
            "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias",
            "cond_stage_model.model.text_projection"],
}


# SD 1.5 (CLIP ViT-L, conv projections) and SD 2.1 (OpenCLIP ViT-H with a dropped 24th
# layer, linear projections, per-level heads): the two layouts single files come in.
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_config_covers_model(family):
    cfgs, r = family_configs(family), _referee()
    with torch.device("meta"):
        unet = r.UNet2DConditionModel.from_config(cfgs["unet"])
        vae = r.AutoencoderKL.from_config(cfgs["vae"])
        text = r.CLIPTextModel(r.CLIPTextConfig(**cfgs["text_encoder"]))
    ldm, expected = to_ldm(family, (unet, vae, text), cfgs)
    assert set(_REAL_KEYS[family]) <= ldm.keys()
    assert detect_family(ldm) == family
    referee = diffusers_referee(family, ldm, cfgs, text)
    plan = ldm_to_diffusers(ldm, family, cfgs["unet"], cfgs["vae"], cfgs["text_encoder"])
    got = load_plan(plan, ldm.__getitem__)
    for component in plan:
        assert_same_tensors(referee[component], expected[component], f"diffusers {component}")
        assert_same_tensors(got[component], expected[component], f"sdrt {component}")


# ---------------------------------------------------------------------------------------------
# Family detection and configs.

_SD1 = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]


@pytest.mark.parametrize("keys, family", [
    (_SD1, "sd1"),
    # older transformers saved the text tower without the text_model wrapper
    (_SD1[:2] + ["cond_stage_model.transformer.embeddings.token_embedding.weight"], "sd1"),
    (_SD1[:2] + ["cond_stage_model.model.token_embedding.weight"], "sd2"),
])
def test_detect_family(keys, family):
    assert detect_family(iter(keys)) == family


@pytest.mark.parametrize("keys, message", [
    ([], "no tensors"),
    # a diffusers-layout UNet file (the user should point at the folder)
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "no UNet keys"),
    # SDXL: same UNet prefix, but two text encoders under conditioner.embedders
    (_SD1[:2] + ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
     "SDXL"),
    # UNet-only file (e.g. a pruned fine-tune without VAE)
    (_SD1[:1] + _SD1[2:], "no VAE keys"),
    # text encoder of an unknown kind
    (_SD1[:2] + ["cond_stage_model.embedder.weight"], "neither CLIP"),
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
])
def test_family_configs(family, prediction_type, name, expected_prediction):
    cfg = family_configs(family, prediction_type)
    base = configs.model_config(name)
    assert cfg["unet"] == base["unet"] and cfg["text_encoder"] == base["text_encoder"]
    assert cfg["scheduler"].get("prediction_type") == expected_prediction
    cfg["unet"]["block_out_channels"].append(0)  # a deep copy: the tables stay intact
    assert configs.MODELS[name]["unet"]["block_out_channels"] == [320, 640, 1280, 1280]


@pytest.mark.parametrize("call", [lambda: family_configs("sdxl"),
                                  lambda: family_configs("sd2", "sample"),
                                  lambda: ldm_to_diffusers(_SD1, "sd3", {}, {}, {})])
def test_bad_arguments(call):
    with pytest.raises(SdrtError):
        call()
