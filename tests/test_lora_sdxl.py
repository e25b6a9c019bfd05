"""SDXL LoRAs and textual-inversion embeddings against diffusers.

The tiny SDXL base and refiner (``sdxl_models.py``, session fixtures) with a random LoRA written
as real ``.safetensors`` files in the layouts people download: kohya/sd-scripts (the UNet in
SGM/LDM names, ``input_blocks_4_1_...``, text encoders ``lora_te1_``/``lora_te2_``, fp16, an
alpha ≠ rank) and diffusers/PEFT (``unet.``/``text_encoder.``/``text_encoder_2.`` with
diffusers' adapter metadata, alphas per layer). It targets the UNet's attention, feed-forward,
proj_in/out (Linears in SDXL), ResNet convs (LoCon), time and added-conditioning embeddings,
and both text encoders' attention and MLP. diffusers loads each file into copies of the
session's reference pipeline (PEFT layers, ``set_adapters`` scales), sdrt patches its own
modules loaded from the same folder: text states, pooled embeddings and whole images must
agree (sdrt with ``prompt_syntax="plain"``, diffusers' tokenisation), while the LoRA moves
each by far more than the tolerance. SDXL embeddings (``clip_l`` + ``clip_g``) are checked
against diffusers' ``load_textual_inversion`` called once per text encoder, as its docs show.
The other layouts (kohya with diffusers' UNet names, diffusers' older names) must patch the
same weights bit for bit; a static plan keeps serving the patched model; unloading restores
every weight bit for bit; refusals are one line, naming what does not fit.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from sgm_checkpoints import UNET, unet_key_to_ldm
from test_lora import assert_restored, snapshot, write_peft

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 2e-3  # float32 max abs difference: text states, pooled embeddings, images in [0, 1]
MOVED = 25 * ATOL  # the LoRA (the embedding) must move each compared output by at least this
H, W = 16, 24  # latents 8 × 12; not square
STEPS = 2
PROMPT, NEGATIVE = "a red fox in the snow, 35mm photo", "blurry, low quality"

_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                 "proj_out", "conv1", "conv2", "time_emb_proj", "add_embedding.linear_1")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_KOHYA_TEXT = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


# --- the LoRA and its files ----------------------------------------------------------------

def random_lora(pipe, seed, alpha=None):
    """``[(component, module, down, up, alpha)]`` over every target layer of sdrt's UNet and
    text encoders, non-zero-mean weights exact in fp16, ranks 2-4; ``alpha`` for every layer
    or, when None, alphas that differ per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    modules = {"unet": pipe.unet, **pipe.text_encoders}
    for component, module in modules.items():
        targets = _UNET_TARGETS if component == "unet" else _TEXT_TARGETS
        for name, m in module.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or \
                    not name.endswith(targets):
                continue
            w = m.weight
            rank = 2 + len(layers) % 3
            down = (0.3 + torch.randn(rank, *w.shape[1:], generator=g)) / w[0].numel() ** 0.5
            up = (-0.2 + torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []),
                                     generator=g)) / rank ** 0.5
            a = float(rank) * (0.5 + (len(layers) % 4) * 0.5) if alpha is None else alpha
            layers.append((component, name, down.half().float(), up.half().float(), a))
    kinds = {(c, n.rsplit(".", 1)[-1]) for c, n, *_ in layers}
    assert {("unet", "proj_in"), ("unet", "linear_1"), ("unet", "conv1"),
            ("text_encoder_2", "fc1")} <= kinds
    return layers


def write_kohya(layers, path, unet_config):
    """sd-scripts' SDXL layout: the UNet in SGM names (diffusers' when ``unet_config`` is
    None, as some trainers write), fp16, an alpha per layer."""
    state = {}
    for component, name, down, up, alpha in layers:
        if component == "unet":
            if unet_config is not None:
                name = unet_key_to_ldm(name + ".weight", unet_config)[len(UNET):-len(".weight")]
            stem = "lora_unet_" + name.replace(".", "_")
        else:
            stem = _KOHYA_TEXT[component] + name.replace(".", "_")
        state[f"{stem}.lora_down.weight"] = down.half().contiguous()
        state[f"{stem}.lora_up.weight"] = up.half().contiguous()
        state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(state, str(path))
    return str(path)


def write_lora(layout, layers, path, unet_config):
    if layout == "kohya":
        return write_kohya(layers, path, unet_config)
    # text_encoder named as transformers >= 5 names CLIP (no text_model.), text_encoder_2
    # with it, as older files do: both are found.
    return write_peft(layers, path, text_prefix="")


# --- the two sides -------------------------------------------------------------------------

def ours(folder):
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def reference(ref, *copied):
    """A pipeline of the session reference's class sharing its modules but for deep copies of
    ``copied`` (which a LoRA or an embedding then changes), and a fresh scheduler."""
    components = dict(ref.components, **{c: copy.deepcopy(getattr(ref, c)) for c in copied})
    components["scheduler"] = type(ref.scheduler).from_config(ref.original_scheduler_config)
    pipe = type(ref)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def diffusers_text(pipe, prompt):
    states, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return states, pooled


def sdrt_text(pipe, prompt, syntax="plain"):
    got = pipe.encode_prompt(prompt, prompt_syntax=syntax)
    return got.states, got.text_embeds


def latents(seed):
    return torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


IMAGE = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
             output_type="np")


@torch.no_grad()
def diffusers_image(pipe, prompt, seed):
    return pipe(prompt, negative_prompt=NEGATIVE, latents=latents(seed), **IMAGE).images


def sdrt_image(pipe, prompt, seed):
    return pipe(prompt, negative_prompt=NEGATIVE, latents=latents(seed), sampler="euler",
                prompt_syntax="plain", **IMAGE)


def assert_parity(got, expected, base, what):
    """``got`` equals ``expected`` within ATOL, where ``expected`` differs from ``base`` (the
    output without the LoRA or the embedding) by more than MOVED."""
    moved = (torch.as_tensor(expected) - torch.as_tensor(base)).abs().max().item()
    assert moved > MOVED, f"{what}: moved by only {moved:.2e}"
    assert_close_abs(got, expected, ATOL, what)


# --- LoRA parity with diffusers ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_base_lora_matches_diffusers(sdxl_base_folder, tmp_path, layout):
    folder, ref = sdxl_base_folder
    pipe = ours(folder)
    modules = {"unet": pipe.unet, **pipe.text_encoders}
    before = snapshot(modules)
    base_text = sdrt_text(pipe, PROMPT)
    base_image = sdrt_image(pipe, PROMPT, seed=3)
    # diffusers applies a kohya file's alphas right only when they are all equal (see
    # test_lora.py), so the kohya file has one alpha (≠ every rank); the PEFT file per layer.
    lora = random_lora(pipe, seed=11, alpha=3.0 if layout == "kohya" else None)
    path = write_lora(layout, lora, tmp_path / "style.safetensors", dict(ref.unet.config))

    theirs = reference(ref, "unet", "text_encoder", "text_encoder_2")
    theirs.load_lora_weights(path, adapter_name="style")
    assert pipe.load_lora(path, scale=0.7) == "style" and pipe.loras == {"style": 0.7}
    assert sorted(pipe._loras.layers("style")) == sorted((c, n) for c, n, *_ in lora)
    for scale in (0.7, -0.6):
        theirs.set_adapters(["style"], [scale])
        pipe.set_lora_scale("style", scale)
        what = f"{layout} at scale {scale}"
        expected, got = diffusers_text(theirs, PROMPT), sdrt_text(pipe, PROMPT)
        assert_parity(got[0][..., :32], expected[0][..., :32], base_text[0][..., :32],
                      f"{what}: text encoder 1 states")
        assert_parity(got[0][..., 32:], expected[0][..., 32:], base_text[0][..., 32:],
                      f"{what}: text encoder 2 states")
        assert_parity(got[1], expected[1], base_text[1], f"{what}: pooled text embeddings")
    # The image at the last scale: the UNet's LoRA layers (and the text encoders') at work.
    assert_parity(sdrt_image(pipe, PROMPT, seed=3), diffusers_image(theirs, PROMPT, seed=3),
                  base_image, f"{layout}: image")

    pipe.unload_lora()
    assert pipe.loras == {}
    assert_restored(modules, before, f"{layout} unload")


def test_refiner_lora_matches_diffusers(sdxl_refiner_folder, tmp_path):
    # The refiner has text_encoder_2 only: a kohya file with lora_te2_ and the refiner's UNet.
    folder, ref = sdxl_refiner_folder
    pipe = ours(folder)
    modules = {"unet": pipe.unet, "text_encoder_2": pipe.text_encoder_2}
    before = snapshot(modules)
    base_text = sdrt_text(pipe, PROMPT)
    lora = random_lora(pipe, seed=12, alpha=2.5)
    assert {c for c, *_ in lora} == {"unet", "text_encoder_2"}
    path = write_kohya(lora, tmp_path / "refine.safetensors", dict(ref.unet.config))
    theirs = reference(ref, "unet", "text_encoder_2")
    theirs.load_lora_weights(path, adapter_name="refine")
    theirs.set_adapters(["refine"], [0.8])
    pipe.load_lora(path, scale=0.8)

    expected, got = diffusers_text(theirs, PROMPT), sdrt_text(pipe, PROMPT)
    assert_parity(got[0], expected[0], base_text[0], "refiner text states")
    assert_parity(got[1], expected[1], base_text[1], "refiner pooled text embeddings")
    g = torch.Generator().manual_seed(5)
    x = -0.3 + torch.randn(1, 4, 6, 10, generator=g)
    t = torch.tensor(700)
    time_ids = torch.tensor([[H, W, 0, 0, 6.0]])
    with torch.no_grad():
        ref_out = theirs.unet(x, t, expected[0], added_cond_kwargs={
            "text_embeds": expected[1], "time_ids": time_ids}).sample
        base_out = ref.unet(x, t, expected[0], added_cond_kwargs={
            "text_embeds": expected[1], "time_ids": time_ids}).sample
        out = pipe.unet(x, t, expected[0], text_embeds=expected[1], time_ids=time_ids)
    assert_parity(out, ref_out, base_out, "refiner UNet output")
    pipe.unload_lora()
    assert_restored(modules, before, "refiner unload")


def _old_diffusers_state(layers):
    """The same layers in diffusers < 0.22's names (attention processors' ``to_q_lora``,
    ``lora_linear_layer``, LoRACompatible ``.lora``); no alphas: α = r."""
    state = {}
    for component, name, down, up, _ in layers:
        module, proj = name.rsplit(".", 1)
        if name.endswith((".to_q", ".to_k", ".to_v")):
            stem = f"unet.{module}.processor.{proj}_lora"
        elif name.endswith(".to_out.0"):
            stem = f"unet.{name[:-len('.to_out.0')]}.processor.to_out_lora"
        elif name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            stem = f"{component}.{module}.to_{proj[:-len('_proj')]}_lora"
        elif component != "unet":
            stem = f"{component}.{name}.lora_linear_layer"
        else:
            stem = f"unet.{name}.lora"
        state[f"{stem}.down.weight"], state[f"{stem}.up.weight"] = down, up
    return state


def test_layouts_patch_the_same_weights(sdxl_base_folder, tmp_path):
    # One LoRA with an alpha per layer, as kohya with the UNet in SGM names (checked against
    # diffusers above), kohya with diffusers' UNet names, and PEFT with diffusers' metadata
    # (text_model. kept): the same weights, bit for bit. Then, with α = r, diffusers' older
    # names against PEFT.
    folder, ref = sdxl_base_folder
    pipe = ours(folder)
    modules = {"unet": pipe.unet, **pipe.text_encoders}
    lora = random_lora(pipe, seed=31)
    assert len({alpha / down.shape[0] for _, _, down, _, alpha in lora}) > 3
    pipe.load_lora(write_kohya(lora, tmp_path / "sgm.safetensors", dict(ref.unet.config)),
                   scale=1.1)
    patched = snapshot(modules)
    for name, path in (("kohya, diffusers names", write_kohya(lora, tmp_path / "d.safetensors",
                                                               None)),
                       ("peft", write_peft(lora, tmp_path / "peft.safetensors"))):
        pipe.unload_lora()
        pipe.load_lora(path, scale=1.1)
        assert_restored(modules, patched, name)

    plain = [(c, n, d, u, float(d.shape[0])) for c, n, d, u, _ in lora]
    pipe.unload_lora()
    pipe.load_lora(write_peft(plain, tmp_path / "plain.safetensors"), scale=1.1)
    patched = snapshot(modules)
    pipe.unload_lora()
    old = _old_diffusers_state(plain)
    assert any(".processor.to_out_lora." in k for k in old)
    assert any(k.startswith("text_encoder_2.") and ".self_attn.to_q_lora." in k for k in old)
    pipe.load_lora(old, scale=1.1, name="old")
    assert_restored(modules, patched, "older diffusers layout")


def test_lora_after_compile_changes_the_replay_without_a_new_plan(sdxl_base_folder, tmp_path):
    # Patched in place, into the storage the static plan captured: the same plan serves the
    # LoRA'd model and equals the eager path; unloading gives back the original image.
    folder, ref = sdxl_base_folder
    pipe = ours(folder)
    args = dict(negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=STEPS,
                sampler="euler", seed=4, output_type="np")
    before = pipe(PROMPT, **args)
    plan = pipe.compile(height=H, width=W, batch_size=1, num_inference_steps=STEPS,
                        sampler="euler", strict=True)
    path = write_kohya(random_lora(pipe, seed=5, alpha=2.0), tmp_path / "style.safetensors",
                       dict(ref.unet.config))
    pipe.load_lora(path, scale=0.8)
    static = pipe(PROMPT, **args)
    assert list(pipe.runtime.plans.values()) == [plan], "the LoRA made a new plan"
    assert np.abs(static - before).max() > MOVED, "the LoRA did not change the replayed image"
    pipe.runtime = None
    assert np.abs(static - pipe(PROMPT, **args)).max() <= 1e-5, "static vs eager"
    pipe.unload_lora()
    assert np.array_equal(pipe(PROMPT, **args), before)


# --- LoRA refusals -------------------------------------------------------------------------

def _refused(match, load, *args, **kw):
    with pytest.raises(SdrtError, match=match) as e:
        load(*args, **kw)
    assert "\n" not in str(e.value)


def test_lora_refusals(sdxl_base_folder, sdxl_refiner_folder, tiny_sd1_folder, tmp_path):
    folder, ref = sdxl_base_folder
    base = ours(folder)
    base_lora = write_kohya(random_lora(base, seed=21, alpha=2.0), tmp_path / "base.safetensors",
                            dict(ref.unet.config))

    # A base LoRA on the refiner: its text_encoder weights have nowhere to go; named, nothing
    # touched.
    refiner = ours(sdxl_refiner_folder[0])
    modules = {"unet": refiner.unet, "text_encoder_2": refiner.text_encoder_2}
    before = snapshot(modules)
    _refused(r"18 LoRA layer\(s\) are for text_encoder \(lora_te1_text_model_encoder_layers_"
             r"\d_\w+\.lora_down\.weight, .*no sdrt text_encoder to patch \(its text "
             r"encoders: text_encoder_2\)", refiner.load_lora, base_lora)
    assert refiner.loras == {}
    assert_restored(modules, before, "refiner after a refused LoRA")

    # An SDXL LoRA on an SD 1.x model, either layout.
    sd1 = ours(tiny_sd1_folder)
    _refused(r"this is an SDXL LoRA \(lora_te1_.*this sd1 model is not SDXL", sd1.load_lora,
             base_lora)
    key = "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"
    _refused(r"this is an SDXL LoRA \(text_encoder_2\.", sd1.load_lora, {key: torch.ones(2, 2)})

    # An SD 1.x-style LoRA (lora_te_ + SD 1.x UNet blocks) on SDXL: unmatched keys named.
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd1_style = {f"{stem}.lora_down.weight": torch.ones(2, 32),
                 f"{stem}.lora_up.weight": torch.ones(32, 2)}
    _refused(r"1 LoRA weight\(s\) match nothing in this sdxl model: "
             rf"{stem}\.lora_down\.weight", base.load_lora, sd1_style)
    # Shapes of another model: refused naming both.
    stem = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    _refused(r"does not fit this sdxl model: down \(2, 48\) and up \(37, 2\) cannot update "
             r"text_encoder_2 text_model\.encoder\.layers\.0\.mlp\.fc1\.weight \(41, 32\)",
             base.load_lora, {f"{stem}.lora_down.weight": torch.ones(2, 48),
                              f"{stem}.lora_up.weight": torch.ones(37, 2)})
    assert base.loras == {}


# --- embeddings ----------------------------------------------------------------------------

def write_embedding(path, n, seed, keys=("clip_l", "clip_g"), width=32):
    """An A1111/civitai SDXL embedding: (n, D) rows for each text encoder, non-zero mean and a
    scale well above the token table's, different for each encoder."""
    g = torch.Generator().manual_seed(seed)
    save_file({k: (-0.3 + 0.8 * i + torch.randn(n, width, generator=g)).contiguous()
               for i, k in enumerate(keys)}, str(path))
    return path


def reference_with_embedding(ref, path, token):
    """diffusers' way for an SDXL file: load_textual_inversion once per text encoder."""
    from safetensors.torch import load_file
    state = load_file(str(path))
    encoders = [(e, t, k) for e, t, k in (("text_encoder", "tokenizer", "clip_l"),
                                          ("text_encoder_2", "tokenizer_2", "clip_g"))
                if getattr(ref, e) is not None]
    theirs = reference(ref, *(name for e in encoders for name in e[:2]))
    for encoder, tokenizer, key in encoders:
        theirs.load_textual_inversion(state[key], token=token,
                                      text_encoder=getattr(theirs, encoder),
                                      tokenizer=getattr(theirs, tokenizer))
    return theirs


@pytest.mark.parametrize("n", [1, 3])
def test_base_embedding_matches_diffusers(sdxl_base_folder, tmp_path, n):
    folder, ref = sdxl_base_folder
    token = "sdrtxl"
    path = write_embedding(tmp_path / f"{token}.safetensors", n, seed=n)
    pipe = ours(folder)
    prompt = f"a photo of {token}, in the snow"
    base = sdrt_text(pipe, prompt)
    assert pipe.load_textual_inversion(path) == token  # the file's stem
    assert pipe.embeddings == {token: n}
    ids = [pipe.tokenizer.vocab_size, pipe.tokenizer_2.vocab_size,
           pipe.text_encoder.config.vocab_size, pipe.text_encoder_2.config.vocab_size]
    assert ids == [49408 + n] * 4
    theirs = reference_with_embedding(ref, path, token)
    expected = diffusers_text(theirs, prompt)
    for syntax in ("plain", "a1111"):
        got = sdrt_text(pipe, prompt, syntax)
        assert_parity(got[0][..., :32], expected[0][..., :32], base[0][..., :32],
                      f"n={n} {syntax}: text encoder 1 states")
        assert_parity(got[0][..., 32:], expected[0][..., 32:], base[0][..., 32:],
                      f"n={n} {syntax}: text encoder 2 states")
        assert_close_abs(got[1], expected[1], ATOL, f"n={n} {syntax}: pooled")
    if n == 3:
        assert_parity(sdrt_image(pipe, prompt, seed=4), diffusers_image(theirs, prompt, seed=4),
                      sdrt_image(ours(folder), prompt, seed=4), "image with an embedding")


def test_refiner_embedding_uses_clip_g(sdxl_refiner_folder, tmp_path):
    folder, ref = sdxl_refiner_folder
    path = write_embedding(tmp_path / "sdrtxl.safetensors", 2, seed=7)
    pipe = ours(folder)
    prompt = "sdrtxl, a lighthouse at dusk"
    base = sdrt_text(pipe, prompt)
    pipe.load_textual_inversion(path)
    expected = diffusers_text(reference_with_embedding(ref, path, "sdrtxl"), prompt)
    for syntax in ("plain", "a1111"):
        got = sdrt_text(pipe, prompt, syntax)
        assert_parity(got[0], expected[0], base[0], f"refiner {syntax}: states")
        assert_close_abs(got[1], expected[1], ATOL, f"refiner {syntax}: pooled")


def test_embedding_refusals_and_plans_dropped(sdxl_base_folder, tiny_sd1_folder, tmp_path):
    pipe = ours(sdxl_base_folder[0])
    sd1_file = tmp_path / "sd1style.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(sd1_file))
    _refused(r"not an SDXL embedding \(expected clip_l and clip_g vectors; keys: emb_params\): "
             r"an SD 1\.x/2\.x embedding does not fit SDXL", pipe.load_textual_inversion, sd1_file)
    _refused(r"has no clip_g vectors, which SDXL needs", pipe.load_textual_inversion,
             write_embedding(tmp_path / "half.safetensors", 2, 1, keys=("clip_l",)))
    _refused(r"clip_l and clip_g must hold as many vectors", pipe.load_textual_inversion,
             {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 32)}, token="x")
    _refused(r"clip_g vectors have dimension 1280, but text_encoder_2's hidden size is 32",
             pipe.load_textual_inversion,
             {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 1280)}, token="x")
    _refused(r"has no file name to call it by; pass token=", pipe.load_textual_inversion,
             {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)})
    sd1 = ours(tiny_sd1_folder)
    _refused(r"an SDXL embedding \(clip_l/clip_g vectors\), for SDXL models, not SD 1\.x",
             sd1.load_textual_inversion, write_embedding(tmp_path / "xl.safetensors", 1, 2))
    assert pipe.embeddings == {} and pipe.tokenizer.vocab_size == pipe.tokenizer_2.vocab_size \
        == 49408

    # Same vectors again: nothing to do; other vectors under the same token: refused.
    path = write_embedding(tmp_path / "sdrtxl.safetensors", 2, seed=3)
    pipe.compile(height=H, width=W, num_inference_steps=STEPS, sampler="euler")
    assert pipe.runtime is not None
    pipe.load_textual_inversion(path)
    assert pipe.runtime is None, "the static plans were kept"
    pipe.load_textual_inversion(path)
    _refused("already loaded with other vectors", pipe.load_textual_inversion,
             write_embedding(tmp_path / "other.safetensors", 2, seed=4), token="sdrtxl")
    assert pipe.tokenizer.vocab_size == pipe.tokenizer_2.vocab_size == 49410
    assert pipe.text_encoder.config.vocab_size == pipe.text_encoder_2.config.vocab_size == 49410
    assert np.array_equal(pipe.tokenizer("sdrtxl")[0][:4], pipe.tokenizer_2("sdrtxl")[0][:4])
