"""LoRA adapters (engine/lora.py) against diffusers' own LoRA loading.

The same random LoRA is written as real ``.safetensors`` files in the layouts people download
(kohya/A1111 with fp16 tensors and alphas; diffusers/PEFT with diffusers' adapter metadata),
covering attention q/k/v/out, the feed-forward, proj_in/out, conv LoRA (LoCon) on the resnets'
3×3 and 1×1 convolutions and the text encoder's attention and MLP. diffusers loads each file
into the tiny model it wrote (``load_lora_weights`` + ``fuse_lora``, or unfused PEFT layers for
two adapters), sdrt's ``LoraManager`` patches sdrt's modules loaded from the same folder, and
the text states and the UNet's output must agree, while the LoRA moves both by far more than
the tolerance. The rest checks the in-place contract on sdrt's own tiny model (no diffusers
needed): storage kept, originals restored bit for bit, ``set_scale`` and ``replace`` equal to
a fresh load, one rounding into the weight's dtype, and the refusals.
"""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.engine.errors import SdrtError
from sdrt.engine.loading import load
from sdrt.engine.lora import LoraManager
from conftest import assert_close_abs

ATOL = 2e-3  # float32 max abs difference, text states and UNet output
MOVED = 50 * ATOL  # the LoRA must change each compared output by at least this much

_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                 "proj_out", "conv1", "conv2", "conv_shortcut")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# --- the LoRA and its files ----------------------------------------------------------------

def random_lora(models, seed, alpha=None):
    """``[(component, module, down, up, alpha)]`` over every target layer of sdrt's modules,
    with non-zero-mean down and up weights (values exact in fp16, so every file holds the
    same numbers), ranks 2-4, and ``alpha`` for every layer or, when None, alphas that differ
    per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for component, targets in (("unet", _UNET_TARGETS), ("text_encoder", _TEXT_TARGETS)):
        for name, m in models[component].named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or \
                    not name.endswith(targets):
                continue
            w = m.weight
            rank = 2 + len(layers) % 3
            fan_in = w[0].numel()
            down = (0.3 + torch.randn(rank, *w.shape[1:], generator=g)) / fan_in ** 0.5
            up = (-0.2 + torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []),
                                     generator=g)) / rank ** 0.5
            a = float(rank) * (0.5 + (len(layers) % 4) * 0.5) if alpha is None else alpha
            layers.append((component, name, down.half().float(), up.half().float(), a))
    assert any(d.dim() == 4 and d.shape[-1] == 3 for _, _, d, _, _ in layers), "no 3×3 LoCon"
    assert any(c == "text_encoder" for c, *_ in layers)
    return layers


def kohya_name(component, name, ldm_cfg=None):
    if component == "text_encoder":
        return "lora_te_" + name.replace(".", "_")
    if ldm_cfg is not None:  # the original LDM UNet's module names, as some trainers write
        from test_convert_ldm import UNET, unet_key_to_ldm
        name = unet_key_to_ldm(name + ".weight", ldm_cfg)[len(UNET):-len(".weight")]
    return "lora_unet_" + name.replace(".", "_")


def write_kohya(layers, path, ldm_cfg=None):
    """kohya-ss / A1111 layout, saved in fp16 as kohya saves by default."""
    state = {}
    for component, name, down, up, alpha in layers:
        stem = kohya_name(component, name, ldm_cfg)
        state[f"{stem}.lora_down.weight"] = down.half().contiguous()
        state[f"{stem}.lora_up.weight"] = up.half().contiguous()
        state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(state, str(path))
    return str(path)


def write_peft(layers, path, text_prefix="text_model."):
    """diffusers/PEFT layout with diffusers' ``lora_adapter_metadata`` (ranks and alphas per
    module, as ``save_lora_weights`` writes them). ``text_prefix=""`` names the text encoder as
    transformers >= 5 does."""
    state, meta = {}, {}
    for component, name, down, up, alpha in layers:
        if component == "text_encoder":
            name = text_prefix + name[len("text_model."):]
        state[f"{component}.{name}.lora_A.weight"] = down.contiguous()
        state[f"{component}.{name}.lora_B.weight"] = up.contiguous()
        meta.setdefault(f"{component}.r", 4)
        meta.setdefault(f"{component}.lora_alpha", 4.0)
        meta.setdefault(f"{component}.rank_pattern", {})[name] = down.shape[0]
        meta.setdefault(f"{component}.alpha_pattern", {})[name] = alpha
        meta.setdefault(f"{component}.target_modules", []).append(name)
    save_file(state, str(path), metadata={"format": "pt",
                                          "lora_adapter_metadata": json.dumps(meta)})
    return str(path)


# --- the two sides -------------------------------------------------------------------------

def sdrt_models(folder, dtype=torch.float32):
    c = load(folder, "cpu", dtype)
    return {"unet": c.unet, "text_encoder": c.text_encoder}


def diffusers_pipe(folder):
    pytest.importorskip("peft")  # diffusers loads LoRAs through peft (the test extra has it)
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)


def make_inputs(models, seed=3):
    g = torch.Generator().manual_seed(seed)
    unet, text = models["unet"], models["text_encoder"]
    cfg = unet.config
    return dict(
        ids=torch.randint(0, text.config.vocab_size, (2, 77), generator=g),
        sample=-0.3 + torch.randn(2, cfg.in_channels, 8, 8, generator=g),
        timestep=torch.tensor(417),
        context=0.2 + torch.randn(2, 77, cfg.cross_attention_dim, generator=g))


@torch.no_grad()
def run_sdrt(models, x):
    states = models["text_encoder"](x["ids"])
    return states, models["unet"](x["sample"], x["timestep"], x["context"])


@torch.no_grad()
def run_diffusers(pipe, x):
    states = pipe.text_encoder(x["ids"])[0]
    return states, pipe.unet(x["sample"], x["timestep"], x["context"]).sample


def assert_parity(ours, ref, base, what):
    for o, r, b, part in zip(ours, ref, base, ("text states", "UNet output")):
        moved = (r - b).abs().max().item()
        assert moved > MOVED, f"{what}: the LoRA moves the {part} by only {moved:.2e}"
        assert_close_abs(o, r, ATOL, f"{what}: {part}")


def snapshot(models):
    return {(c, n): (p.detach().clone(), p.data_ptr())
            for c, m in models.items() for n, p in m.named_parameters()}


def assert_restored(models, before, what):
    for (c, n), (value, ptr) in before.items():
        p = dict(models[c].named_parameters())[n]
        assert p.data_ptr() == ptr, f"{what}: {c} {n} moved to new storage"
        assert torch.equal(p, value), f"{what}: {c} {n} not restored bit for bit"


# --- parity with diffusers ------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_matches_diffusers(tiny_model, tmp_path, layout):
    family, folder, _ = tiny_model
    ours = sdrt_models(folder)
    x = make_inputs(ours)
    before = snapshot(ours)
    base = run_sdrt(ours, x)
    # diffusers applies a kohya file's alphas correctly only when they are all equal (its
    # alpha_pattern keys for kohya files match no module; PEFT warns and uses the most common
    # alpha), so the kohya file has one alpha; per-layer alphas: test_kohya_alpha_per_layer.
    lora = random_lora(ours, seed=11, alpha=3.0 if layout == "kohya" else None)
    path = (write_kohya(lora, tmp_path / "style.safetensors") if layout == "kohya" else
            write_peft(lora, tmp_path / "style.safetensors", text_prefix=""))
    scale = 0.7

    ref = diffusers_pipe(folder)
    assert_close_abs(run_diffusers(ref, x)[1], base[1], ATOL, f"{family}: UNet without LoRA")
    ref.load_lora_weights(path, adapter_name="style")
    ref.fuse_lora(lora_scale=scale)
    expected = run_diffusers(ref, x)

    manager = LoraManager(ours, family=family)
    assert manager.load(path, scale=scale) == "style"
    assert manager.adapters == {"style": scale}
    assert sorted(manager.layers("style")) == sorted((c, n) for c, n, *_ in lora)
    assert_parity(run_sdrt(ours, x), expected, base, f"{family} {layout}")
    for (c, n), (_, ptr) in before.items():
        assert dict(ours[c].named_parameters())[n].data_ptr() == ptr, f"{c} {n} reallocated"

    manager.unload()
    assert manager.adapters == {}
    assert_restored(ours, before, f"{family} {layout} unload")


def test_two_adapters_match_diffusers(tiny_sd1, tmp_path):
    folder, _ = tiny_sd1
    ours = sdrt_models(folder)
    x = make_inputs(ours, seed=5)
    base = run_sdrt(ours, x)
    # One kohya file and one PEFT file, with overlapping layers; the second covers only part
    # of the attention layers and of the text encoder's MLP.
    a = random_lora(ours, seed=21, alpha=2.0)
    b = [layer for layer in random_lora(ours, seed=22)
         if layer[1].endswith(("to_q", "to_v", "to_out.0", "q_proj", "out_proj", "fc2"))]
    path_a = write_kohya(a, tmp_path / "a.safetensors")
    path_b = write_peft(b, tmp_path / "b.safetensors", text_prefix="")
    scales = {"a": 0.6, "b": -1.3}

    ref = diffusers_pipe(folder)
    ref.load_lora_weights(path_a, adapter_name="a")
    ref.load_lora_weights(path_b, adapter_name="b")
    ref.set_adapters(list(scales), list(scales.values()))
    expected = run_diffusers(ref, x)  # unfused PEFT layers: W0 x + Σ s·(α/r)·B A x

    manager = LoraManager(ours, family="sd1")
    for name, scale in scales.items():
        manager.load(tmp_path / f"{name}.safetensors", scale=scale)
    assert manager.adapters == scales
    assert_parity(run_sdrt(ours, x), expected, base, "two adapters")

    # Unloading one leaves exactly the other: the same weights as loading it alone.
    manager.unload("a")
    only_b = snapshot(ours)
    manager.unload()
    manager.load(path_b, scale=scales["b"])
    assert_restored(ours, only_b, "b alone")


def test_kohya_alpha_per_layer(tiny_sd1_folder, tmp_path):
    # kohya files carry one alpha per layer (LoCon files: conv_alpha ≠ network alpha). The
    # same LoRA as a PEFT file with those alphas in diffusers' metadata (checked against
    # diffusers above) must patch the same weights, bit for bit.
    ours = sdrt_models(tiny_sd1_folder)
    lora = random_lora(ours, seed=25)
    assert len({alpha / down.shape[0] for _, _, down, _, alpha in lora}) > 3
    manager = LoraManager(ours)
    manager.load(write_peft(lora, tmp_path / "peft.safetensors"), scale=1.1)
    patched = snapshot(ours)
    manager.unload()
    manager.load(write_kohya(lora, tmp_path / "kohya.safetensors"), scale=1.1)
    assert_restored(ours, patched, "kohya alphas per layer")


def test_ldm_named_kohya_file_equals_diffusers_named(tiny_model, tmp_path):
    # Some trainers name the UNet's modules as the original LDM UNet does
    # (lora_unet_input_blocks_1_1_proj_in, ..._in_layers_2, ..._skip_connection).
    family, folder, ref = tiny_model
    ours = sdrt_models(folder)
    lora = random_lora(ours, seed=31)
    manager = LoraManager(ours)
    manager.load(write_kohya(lora, tmp_path / "diffusers_names.safetensors"), scale=0.9)
    patched = snapshot(ours)
    manager.unload()
    ldm_path = write_kohya(lora, tmp_path / "ldm_names.safetensors", dict(ref.unet.config))
    manager.load(ldm_path, scale=0.9)
    assert_restored(ours, patched, f"{family} LDM-named kohya")


def test_older_diffusers_layouts(tiny_sd1_folder, tmp_path):
    # diffusers < 0.22 files: attention processors' to_q_lora.down / .lora_linear_layer. /
    # LoRACompatible .lora.down; no alphas (α = r).
    folder = tiny_sd1_folder
    ours = sdrt_models(folder)
    lora = [(c, n, d, u, float(d.shape[0])) for c, n, d, u, _ in random_lora(ours, seed=41)]
    manager = LoraManager(ours)
    manager.load(write_peft(lora, tmp_path / "new.safetensors"))
    patched = snapshot(ours)
    manager.unload()
    old = {}
    for component, name, down, up, _ in lora:
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            module, proj = name.rsplit(".", 1) if not name.endswith("to_out.0") else \
                (name[:-len(".to_out.0")], "to_out")
            stem = f"unet.{module}.processor.{proj}_lora"
        elif name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            module, proj = name.rsplit(".", 1)
            stem = f"text_encoder.{module}.to_{proj[:-len('_proj')]}_lora"
        elif component == "text_encoder":
            stem = f"text_encoder.{name}.lora_linear_layer"
        else:
            stem = f"unet.{name}.lora"
        old[f"{stem}.down.weight"], old[f"{stem}.up.weight"] = down, up
    assert any(".processor.to_out_lora." in k for k in old)
    assert any(".self_attn.to_q_lora." in k for k in old)
    manager.load(old, name="old")
    assert_restored(ours, patched, "older diffusers layout")


# --- the in-place contract -----------------------------------------------------------------

def test_set_scale_equals_fresh_load_and_unload_restores(tiny_sd1_folder, tmp_path):
    folder = tiny_sd1_folder
    ours = sdrt_models(folder)
    before = snapshot(ours)
    path_a = write_kohya(random_lora(ours, seed=51), tmp_path / "a.safetensors")
    path_b = write_peft(random_lora(ours, seed=52), tmp_path / "b.safetensors")
    manager = LoraManager(ours)
    manager.load(path_a, scale=0.2)
    manager.load(path_b, scale=1.0)
    manager.set_scale("a", 1.5)
    manager.set_scale("b", -0.4)
    switched = snapshot(ours)
    assert any(not torch.equal(p, before[k][0]) for k, (p, _) in switched.items())

    manager.unload()
    assert_restored(ours, before, "unload all")
    manager.load(path_a, scale=1.5)
    manager.load(path_b, scale=-0.4)
    assert_restored(ours, switched, "set_scale vs fresh load")

    manager.set_scale("a", 0.0)
    manager.set_scale("b", 0.0)
    assert_restored(ours, before, "scale 0")
    manager.unload("b")
    manager.unload("a")
    assert_restored(ours, before, "unload one by one")


def test_unet_and_text_encoder_scales_of_their_own(tiny_sd1_folder, tmp_path):
    # A (UNet's, text encoders') pair: each component's weights are those of a load at its
    # scale, bit for bit (A1111's <lora:name:te:unet>, ComfyUI's two LoraLoader strengths);
    # a text-encoder scale of 0 leaves the text encoder as it was (LoraLoaderModelOnly).
    ours = sdrt_models(tiny_sd1_folder)
    before = snapshot(ours)
    path = write_kohya(random_lora(ours, seed=53), tmp_path / "a.safetensors")
    manager = LoraManager(ours)
    at = {}
    for scale in (0.7, -0.3):
        manager.load(path, scale=scale)
        at[scale] = snapshot(ours)
        manager.unload()
    manager.load(path, scale=(0.7, -0.3))
    assert manager.adapters == {"a": (0.7, -0.3)}
    for (c, n), (value, _) in snapshot(ours).items():
        want = at[0.7 if c == "unet" else -0.3][(c, n)][0]
        assert torch.equal(value, want), f"{c} {n}"
    manager.set_scale("a", (0.7, 0.0))
    for (c, n), (value, _) in snapshot(ours).items():
        want = (at[0.7] if c == "unet" else before)[(c, n)][0]
        assert torch.equal(value, want), f"{c} {n} at (0.7, 0)"
    manager.set_scale("a", [0.5, 0.5])  # one number where the two agree
    assert manager.adapters == {"a": 0.5}
    with pytest.raises(SdrtError, match="LoRA scale must be a number from -100 to 100 or a"):
        manager.set_scale("a", (0.5, math.nan))
    manager.unload()
    assert_restored(ours, before, "unload")


def test_switch_with_replace_equals_unload_then_load(tiny_sd1_folder, tmp_path):
    # load(B, replace=A) recomputes the weights both patch once; the weights only A patched
    # get their originals back. The result must be exactly that of unload(A) + load(B).
    folder = tiny_sd1_folder
    ours = sdrt_models(folder)
    before = snapshot(ours)
    a = write_kohya(random_lora(ours, seed=55), tmp_path / "a.safetensors")
    b = {k: v for k, v in dict(
        (f"{c}.{n}.lora_{ab}.weight", t) for c, n, d, u, _ in random_lora(ours, seed=56)
        for ab, t in (("A", d), ("B", u))).items() if ".attn2." in k or ".fc1." in k}
    manager = LoraManager(ours)
    manager.load(b, scale=0.8, name="b")
    only_b = snapshot(ours)
    manager.unload()
    assert_restored(ours, before, "unload b")

    manager.load(a, scale=1.2)
    bad = dict(b, **{"unet.down_blocks.5.attentions.0.proj_in.lora_A.weight": torch.ones(2, 32),
                     "unet.down_blocks.5.attentions.0.proj_in.lora_B.weight": torch.ones(32, 2)})
    patched_a = snapshot(ours)
    with pytest.raises(SdrtError, match="match nothing"):
        manager.load(bad, scale=0.8, name="b", replace="a")
    assert manager.adapters == {"a": 1.2}
    assert_restored(ours, patched_a, "a after a refused switch")
    manager.load(b, scale=0.8, name="b", replace="a")
    assert manager.adapters == {"b": 0.8}
    assert_restored(ours, only_b, "load(b, replace=a) vs b alone")
    manager.unload()
    assert_restored(ours, before, "unload after a switch")


def test_channels_last_conv_weights_keep_their_layout(tiny_sd1_folder, tmp_path):
    # On a GPU the conv weights are channels_last (layers.channels_last_conv_weights): the
    # patch goes through the float32 accumulator and must land in the same strided storage.
    from sdrt.engine.layers import channels_last_conv_weights
    ours = sdrt_models(tiny_sd1_folder)
    path = write_kohya(random_lora(ours, seed=57), tmp_path / "a.safetensors")
    manager = LoraManager(ours)
    manager.load(path, scale=0.9)
    contiguous = snapshot(ours)
    manager.unload()
    channels_last_conv_weights(ours["unet"])
    before = snapshot(ours)
    convs = {n: m.weight.stride() for n, m in ours["unet"].named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    manager.load(path, scale=0.9)
    for (c, n), (value, ptr) in contiguous.items():
        p = dict(ours[c].named_parameters())[n]
        assert p.data_ptr() == before[(c, n)][1], f"{c} {n} moved to new storage"
        assert_close_abs(p, value, 1e-6, f"channels_last {c} {n}")
    for n, stride in convs.items():
        assert ours["unet"].get_submodule(n).weight.stride() == stride, n
    manager.unload()
    assert_restored(ours, before, "channels_last unload")


def test_fp16_weights_rounded_once(tiny_sd1_folder):
    # Two adapters that each move a weight by 0.3 ulp of fp16: summed in float32 and rounded
    # once they move it by one ulp; rounded after each adapter they would not move it at all.
    folder = tiny_sd1_folder
    ours = sdrt_models(folder, torch.float16)
    name = "text_model.encoder.layers.0.self_attn.q_proj"
    weight = ours["text_encoder"].get_submodule(name).weight
    g = torch.Generator().manual_seed(61)
    weight.copy_(1 + torch.rand(weight.shape, generator=g))  # in [1, 2): ulp 2⁻¹⁰
    w0 = weight.clone()
    ulp = 2.0 ** -10
    lora = {f"lora_te_{name.replace('.', '_')}.lora_down.weight": torch.ones(1, weight.shape[1]),
            f"lora_te_{name.replace('.', '_')}.lora_up.weight":
                torch.full((weight.shape[0], 1), 0.3 * ulp)}
    manager = LoraManager(ours)
    manager.load(lora, name="a")
    assert torch.equal(weight, w0), "0.3 ulp must round back to W0"
    manager.load(lora, name="b")
    assert torch.equal(weight.float() - w0.float(), torch.full(weight.shape, ulp)), \
        "W0 + 0.6 ulp (one rounding) must be W0 + 1 ulp"
    manager.set_scale("b", 0.5)
    assert torch.equal(weight, w0), "W0 + 0.45 ulp must round to W0"
    manager.unload()
    assert torch.equal(weight, w0)


# --- refusals ------------------------------------------------------------------------------

def test_unmatched_keys_are_named(tiny_sd1_folder, tmp_path):
    folder = tiny_sd1_folder
    ours = sdrt_models(folder)
    before = snapshot(ours)
    lora = random_lora(ours, seed=71)
    path = write_kohya(lora, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file
    state = load_file(path)
    bad = dict(state)
    bad["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.ones(2, 32)
    bad["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 2)
    bad["lora_te_text_model_encoder_layers_0_mlp_fc9.lora_down.weight"] = torch.ones(2, 32)
    bad["lora_te_text_model_encoder_layers_0_mlp_fc9.lora_up.weight"] = torch.ones(32, 2)
    manager = LoraManager(ours, family="sd1")
    with pytest.raises(SdrtError, match=r"2 LoRA weight\(s\) match nothing in this sd1 model: "
                       r"lora_unet_down_blocks_7_attentions_0_proj_in\.lora_down\.weight, "
                       r"lora_te_text_model_encoder_layers_0_mlp_fc9\.lora_down\.weight"):
        manager.load(bad)
    half = {k: v for k, v in state.items() if not k.endswith("lora_up.weight") or "fc1" not in k}
    with pytest.raises(SdrtError, match=r"mlp_fc1\.lora_down\.weight \(no up weight\)"):
        manager.load(half)
    assert manager.adapters == {}
    assert_restored(ours, before, "after refused loads")  # nothing was touched

    # A stray non-weight key (an alpha with no weights) is only a warning.
    stray = dict(state, **{"lora_unet_mid_block_attentions_9_proj_in.alpha": torch.tensor(4.0)})
    with pytest.warns(UserWarning, match=r"lora_unet_mid_block_attentions_9_proj_in\.alpha"):
        manager.load(stray)
    assert list(manager.adapters) == ["lora"]


def test_wrong_family_is_refused(tiny_model, tmp_path):
    # The other tiny family with its own text width, as SD 1.x (768) and SD 2.x (1024) differ:
    # the cross-attention and text-encoder shapes no longer fit.
    family, folder, _ = tiny_model
    other = "sd2" if family == "sd1" else "sd1"
    from tiny_models import sdrt_config
    from sdrt.engine.tiny import write_model
    config = sdrt_config(other)
    config["text_encoder"].update(hidden_size=48)
    config["unet"].update(cross_attention_dim=48)
    other_folder = str(tmp_path / other)
    write_model(other_folder, config)
    path = write_kohya(random_lora(sdrt_models(other_folder), seed=81),
                       tmp_path / f"{other}.safetensors")
    ours = sdrt_models(folder)
    before = snapshot(ours)
    manager = LoraManager(ours, family=family)
    with pytest.raises(SdrtError, match=f"does not fit this {family} model: .* cannot update "
                       r".* \(a LoRA for another model family\?\)"):
        manager.load(path)
    assert_restored(ours, before, "after a refused LoRA")


@pytest.mark.parametrize("key, message", [
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "SDXL LoRA"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "SDXL LoRA"),
    ("lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks", "OFT adapters are not supported"),
    ("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale", "no down weight and up weight"),
])
def test_other_adapter_kinds_are_refused(tiny_sd1_folder, key, message):
    ours = sdrt_models(tiny_sd1_folder)
    with pytest.raises(SdrtError, match=message):
        LoraManager(ours).load({key: torch.ones(2, 2)})


def test_bad_sources_are_refused(tiny_sd1_folder, tmp_path):
    ours = sdrt_models(tiny_sd1_folder)
    manager = LoraManager(ours)
    (tmp_path / "style.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(SdrtError, match="convert it to .safetensors"):
        manager.load(tmp_path / "style.ckpt")
    with pytest.raises(SdrtError, match="does not exist"):
        manager.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SdrtError, match="not a readable safetensors file"):
        manager.load(tmp_path / "junk.safetensors")
    with pytest.raises(SdrtError, match="no LoRA weights found"):
        manager.load({})
    with pytest.raises(SdrtError, match=r"match nothing in this model: something\.weight"):
        manager.load({"something.weight": torch.ones(3, 3)})

    name = "text_model.encoder.layers.0.mlp.fc1"
    w = ours["text_encoder"].get_submodule(name).weight
    stem = "lora_te_" + name.replace(".", "_")
    lora = {f"{stem}.lora_down.weight": torch.ones(2, w.shape[1]),
            f"{stem}.lora_up.weight": torch.ones(w.shape[0], 2)}
    with pytest.raises(SdrtError, match="no sdrt text_encoder to patch"):
        LoraManager({"unet": ours["unet"]}).load(lora)
    for scale in (float("nan"), "1", True, 1e300, -100.5):
        with pytest.raises(SdrtError, match="LoRA scale must be a number from -100 to 100"):
            manager.load(lora, scale=scale)
    with pytest.raises(SdrtError, match="no LoRA named 'nope' is loaded"):
        manager.set_scale("nope", 1.0)
    assert manager.load(lora, name="x") == "x"
    with pytest.raises(SdrtError, match="a LoRA named 'x' is loaded already"):
        manager.load(lora, name="x")
    assert manager.load(lora) == "lora" and manager.load(lora) == "lora-2"
    nan = lora[f"{stem}.lora_up.weight"].clone()
    nan[3, 1] = float("nan")
    with pytest.raises(SdrtError, match="inf or NaN"):
        manager.load({**lora, f"{stem}.lora_up.weight": nan})
    assert list(manager.adapters) == ["x", "lora", "lora-2"]


# --- through the pipeline and the CLI ------------------------------------------------------

def test_lora_after_compile_changes_the_replay_without_a_new_plan(tiny_sd1_folder, tmp_path):
    # Patched in place, into the storage the plan captured: the same plan serves the LoRA'd
    # model, no new build, and its image equals the eager one; unloading gives back the
    # original image.
    from sdrt.engine import Pipeline
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    args = dict(height=64, width=64, num_inference_steps=2, sampler="ddim", seed=4,
                output_type="np")
    before = pipe("a red fox", **args)
    plan = pipe.compile(height=64, width=64, batch_size=1, num_inference_steps=2,
                        sampler="ddim", strict=True)
    lora = write_kohya(random_lora(sdrt_models(tiny_sd1_folder), seed=5, alpha=2.0),
                       tmp_path / "style.safetensors")
    assert pipe.load_lora(lora, scale=0.8) == "style" and pipe.loras == {"style": 0.8}
    static = pipe("a red fox", **args)
    assert list(pipe.runtime.plans.values()) == [plan], "the LoRA made a new plan"
    moved = np.abs(static - before).max()
    assert moved > 1e-2, f"the LoRA changed the replayed image by only {moved:.2e}"
    pipe.runtime = None
    eager = pipe("a red fox", **args)
    assert np.abs(static - eager).max() <= 1e-5
    pipe.unload_lora()
    assert np.array_equal(pipe("a red fox", **args), before)


def test_cli_lora_option(tiny_sd1_folder, tmp_path):
    from PIL import Image

    from sdrt.engine.cli import main
    lora = write_kohya(random_lora(sdrt_models(tiny_sd1_folder), seed=6, alpha=2.0),
                       tmp_path / "style.safetensors")
    base = ["generate", "a red fox", "--model", tiny_sd1_folder, "--steps", "1", "--seed", "2",
            "--height", "64", "--width", "64"]
    assert main(base + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(base + ["--lora", f"{lora}:0.7", "-o", str(tmp_path / "lora.png")]) == 0
    pixels = [np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16)
              for n in ("plain", "lora")]
    assert np.abs(pixels[0] - pixels[1]).max() > 2, "--lora changed nothing"
    assert main(base + ["--lora", str(tmp_path / "missing.safetensors"),
                        "-o", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
