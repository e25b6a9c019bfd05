"""DoRA (weight-decomposed LoRA) in engine/lora.py, against PEFT.

PEFT's ``use_dora`` adapter wraps the tiny SD 1.x model diffusers wrote (UNet attention,
feed-forward, proj_in/out and the resnets' 3×3 convs; the text encoder's attention and MLP)
with seeded, non-zero-mean lora_A/lora_B and magnitudes; the same tensors are written as the
file people download (kohya names, LyCORIS's ``dora_scale`` of shape (out, 1, ...), fp16).
sdrt patches its own modules loaded from the same folder; text states and UNet output must
equal PEFT's. The input-axis form (``dora_scale`` (1, in, ...), older LyCORIS and A1111) and a
strength other than 1 (A1111's and ComfyUI's blend) are checked against the formula written
out in float64.
"""
import pytest
import torch
from safetensors.torch import save_file

from sdrt.engine.errors import SdrtError
from sdrt.engine.lora import LoraManager
from test_lora import assert_parity, assert_restored, run_diffusers, run_sdrt, sdrt_models
from test_lycoris import _TEXT, _UNET, _kohya_name, against_peft

RANK, ALPHA = 4, 3.0


def _fp16(t):
    return t.half().float()


def peft_dora(pipe, seed, layout="kohya"):
    """Wrap ``pipe`` in a PEFT DoRA adapter with seeded tensors (exact in fp16); returns the
    state dict of the same adapter as a kohya/LyCORIS file (``dora_scale`` (out, 1, ...)) or
    as a diffusers/PEFT one (``lora_A``/``lora_B``, ``lora_magnitude_vector`` in PEFT's
    shapes)."""
    from peft import LoraConfig, inject_adapter_in_model
    g = torch.Generator().manual_seed(seed)
    state = {}
    for component, model, targets in (("unet", pipe.unet, _UNET),
                                      ("text_encoder", pipe.text_encoder, _TEXT)):
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, use_dora=True)
        inject_adapter_in_model(config, model, adapter_name="x")
        for name, module in model.named_modules():
            if not hasattr(module, "lora_magnitude_vector") or \
                    "x" not in module.lora_magnitude_vector:
                continue
            kohya = layout == "kohya"
            stem = _kohya_name(component, name) if kohya else f"{component}.{name}"
            a, b = module.lora_A["x"].weight, module.lora_B["x"].weight
            for p, role in ((a, "lora_down" if kohya else "lora_A"),
                            (b, "lora_up" if kohya else "lora_B")):
                fan = max(p[0].numel(), 1)
                p.data.copy_(_fp16((0.2 + torch.randn(p.shape, generator=g)) / fan ** 0.5))
                state[f"{stem}.{role}.weight"] = p.detach().half().contiguous()
            magnitude = module.lora_magnitude_vector["x"].weight
            # Around the merged weight's own norms, so the output stays in range.
            magnitude.data.copy_(_fp16(magnitude * (1 + 0.3 * torch.rand(
                magnitude.shape, generator=g))))
            weight = module.base_layer.weight
            if kohya:
                lyco = magnitude.detach().reshape(weight.shape[0], *[1] * (weight.dim() - 1))
                state[f"{stem}.dora_scale"] = lyco.half().contiguous()
            else:
                state[f"{stem}.lora_magnitude_vector"] = magnitude.detach().half().contiguous()
            state[f"{stem}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    return state


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_dora_matches_peft(tiny_sd1, tmp_path, layout):
    ours, x, before, base, ref = against_peft(tiny_sd1[0])
    state = peft_dora(ref, seed=23, layout=layout)
    assert any(t.dim() == 4 and t.shape[2:] == (1, 1) for k, t in state.items()
               if "dora_scale" in k or "magnitude" in k), "no conv layer has a DoRA magnitude"
    path = str(tmp_path / "dora.safetensors")
    save_file(state, path)
    expected = run_diffusers(ref, x)

    manager = LoraManager(ours, family="sd1")
    assert manager.load(path) == "dora"
    assert_parity(run_sdrt(ours, x), expected, base, "DoRA")
    manager.unload()
    assert_restored(ours, before, "DoRA unload")


def _dora_by_hand(w0, up, down, alpha_over_rank, magnitude, strength, axis, delta=None):
    """W0 + strength · (m · M / ‖M‖ − W0), M = W0 + (α/r) · ΔW (up @ down, or ``delta``), in
    float64; the norm per output row (axis 0) or per input channel (axis 1)."""
    w0, m = w0.double(), magnitude.double()
    if delta is None:
        delta = up.double().flatten(1) @ down.double().flatten(1)
    merged = w0 + alpha_over_rank * delta.double().reshape(w0.shape)
    dims = tuple(d for d in range(w0.dim()) if d != axis)
    norm = merged.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return w0 + strength * (m * merged / norm - w0)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("module", ["down_blocks.0.resnets.0.conv1",
                                    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"])
def test_dora_axes_and_strength(tiny_sd1_folder, axis, module):
    # LyCORIS's dora_scale says its axis by its shape; a strength between 0 and 1 blends the
    # original weight with the DoRA one (A1111, ComfyUI).
    ours = sdrt_models(tiny_sd1_folder)
    w = ours["unet"].get_submodule(module).weight
    w0 = w.detach().clone()
    g = torch.Generator().manual_seed(5 + axis)
    kernel = tuple(w.shape[2:])
    down = 0.1 + torch.randn(RANK, w.shape[1], *kernel, generator=g) / 4
    up = 0.1 + torch.randn(w.shape[0], RANK, *[1] * len(kernel), generator=g) / 4
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    magnitude = 0.5 + torch.rand(shape, generator=g)
    stem = "lora_unet_" + module.replace(".", "_")
    lora = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": torch.tensor(2.0), f"{stem}.dora_scale": magnitude}
    manager = LoraManager(ours, family="sd1")
    name = manager.load(lora, name="d")
    for strength in (1.0, 0.35):
        manager.set_scale(name, strength)
        want = _dora_by_hand(w0, up, down, 2.0 / RANK, magnitude, strength, axis)
        torch.testing.assert_close(w.double(), want, atol=2e-6, rtol=1e-5)
    assert (w - w0).abs().max() > 1e-2
    manager.unload()
    assert torch.equal(w, w0)


def test_dora_stacks_with_a_lora_from_the_original_weight(tiny_sd1_folder):
    # Each adapter's update is taken against the original weight (A1111's order-free sum).
    ours = sdrt_models(tiny_sd1_folder)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    w = ours["unet"].get_submodule(module).weight
    w0 = w.detach().clone()
    g = torch.Generator().manual_seed(9)
    stem = "lora_unet_" + module.replace(".", "_")
    down, up = torch.randn(RANK, w.shape[1], generator=g), torch.randn(w.shape[0], RANK,
                                                                       generator=g)
    magnitude = 0.5 + torch.rand(w.shape[0], 1, generator=g)
    plain = {f"{stem}.lora_down.weight": down / 5, f"{stem}.lora_up.weight": up / 5}
    dora = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
            f"{stem}.dora_scale": magnitude}
    manager = LoraManager(ours, family="sd1")
    manager.load(plain, name="plain", scale=0.5)
    manager.load(dora, name="dora")
    want = _dora_by_hand(w0, up, down, 1.0, magnitude, 1.0, 0).double() + \
        0.5 * ((up / 5) @ (down / 5)).double()
    torch.testing.assert_close(w.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("magnitude,message", [
    (torch.ones(3, 1), "DoRA magnitude .* must be a float tensor of shape"),
    (torch.ones(320, 320), "DoRA magnitude .* must be a float tensor of shape"),
    (torch.full((320, 1), float("nan")), "holds inf or NaN"),
])
def test_bad_dora_magnitudes_are_refused(tiny_sd1_folder, magnitude, message):
    ours = sdrt_models(tiny_sd1_folder)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = ours["unet"].get_submodule(module).weight
    stem = "lora_unet_" + module.replace(".", "_")
    magnitude = magnitude[:w.shape[0]] if magnitude.shape[0] == 320 and \
        magnitude.shape[1] == 1 else magnitude
    lora = {f"{stem}.lora_down.weight": torch.ones(2, w.shape[1]),
            f"{stem}.lora_up.weight": torch.ones(w.shape[0], 2), f"{stem}.dora_scale": magnitude}
    with pytest.raises(SdrtError, match=message):
        LoraManager(ours, family="sd1").load(lora)


def _lycoris_factors(kind, w, g):
    """A LyCORIS layer's tensors for weight ``w`` (LyCORIS's names) and its ΔW, written out
    independently of engine/lora.py: LoHa (w1_a @ w1_b) ⊙ (w2_a @ w2_b), LoKr w1 ⊗ (w2_a @
    w2_b), LoCon with a Tucker core Σ up[p, i] mid[i, j, k, l] down[j, q]."""
    out, inp = w.shape[0], w[0].numel()
    r = RANK

    def rand(*shape):
        return 0.1 + torch.randn(*shape, generator=g) / 3
    if kind == "LoHa":
        t = {"hada_w1_a": rand(out, r), "hada_w1_b": rand(r, inp), "hada_w2_a": rand(out, r),
             "hada_w2_b": rand(r, inp)}
        return t, (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    if kind == "LoKr":  # w1 (4, 4) whole, w2 (out/4, in/4) as a rank-r product
        t = {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(out // 4, r),
             "lokr_w2_b": rand(r, inp // 4)}
        return t, torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])
    kh, kw = w.shape[2:]
    t = {"lora_up.weight": rand(out, r, 1, 1), "lora_mid.weight": rand(r, r, kh, kw),
         "lora_down.weight": rand(r, w.shape[1], 1, 1)}
    delta = torch.einsum("pi,ijkl,jq->pqkl", t["lora_up.weight"].flatten(1),
                         t["lora_mid.weight"], t["lora_down.weight"].flatten(1))
    return t, delta


@pytest.mark.parametrize("kind,module,axis", [
    ("LoHa", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 0),
    ("LoHa", "down_blocks.0.resnets.0.conv1", 1),
    ("LoKr", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", 0),
    ("LoCon (Tucker)", "down_blocks.0.resnets.0.conv2", 0),
])
def test_dora_on_lycoris_layers(tiny_sd1_folder, kind, module, axis):
    # LyCORIS and A1111 decompose every algorithm's merged weight, as a LoRA's; the file's
    # alpha over the algorithm's rank, both axes, a 0.35 strength, against float64 by hand.
    ours = sdrt_models(tiny_sd1_folder)
    w = ours["unet"].get_submodule(module).weight
    w0 = w.detach().clone()
    g = torch.Generator().manual_seed(13 + axis)
    tensors, delta = _lycoris_factors(kind, w, g)
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    magnitude = 0.5 + torch.rand(shape, generator=g)
    stem = "lora_unet_" + module.replace(".", "_")
    lora = {f"{stem}.{role}": t for role, t in tensors.items()}
    lora.update({f"{stem}.alpha": torch.tensor(2.0), f"{stem}.dora_scale": magnitude})
    manager = LoraManager(ours, family="sd1")
    name = manager.load(lora, name="d")
    for strength in (1.0, 0.35):
        manager.set_scale(name, strength)
        want = _dora_by_hand(w0, None, None, 2.0 / RANK, magnitude, strength, axis, delta)
        torch.testing.assert_close(w.double(), want, atol=2e-6, rtol=1e-5)
    assert (w - w0).abs().max() > 1e-2
    manager.unload()
    assert torch.equal(w, w0)
