"""LyCORIS adapters (LoHa, LoKr, LoCon with a Tucker core) in engine/lora.py, against PEFT.

PEFT implements LoHa and LoKr after LyCORIS, with the same tensors. Here PEFT wraps the tiny
SD 1.x model diffusers wrote (UNet attention, feed-forward, proj_in/out and the resnets' 3×3
convs; the text encoder's attention and MLP) in an adapter whose tensors are set to seeded,
non-zero-mean values, and those tensors are written as a LyCORIS file in the kohya layout
people download (``lora_unet_<module>.hada_w1_a``, ``.lokr_w2_b``, ``.alpha``, fp16). sdrt's
``LoraManager`` patches sdrt's modules loaded from the same folder with that file; the text
states and the UNet output must equal PEFT's, while the adapter moves both by far more than
the tolerance. LoCon's Tucker form (``lora_mid``), which PEFT does not have, and LoKr with two
whole factors (scale 1 whatever the alpha, as LyCORIS, A1111 and ComfyUI apply it; PEFT
would scale it by α / r) are checked against ΔW written out element by element.
"""
import pytest
import torch
from safetensors.torch import save_file

from sdrt.engine.errors import SdrtError
from sdrt.engine.lora import LoraManager
from test_lora import (assert_parity, assert_restored, diffusers_pipe, make_inputs, run_diffusers,
                       run_sdrt, sdrt_models, snapshot)

_UNET = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out", "conv1",
         "conv2"]
_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
          "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ALPHA = 3.0


def _peft_config(kind, targets):
    from peft import LoHaConfig, LoKrConfig
    if kind.startswith("loha"):
        return LoHaConfig(r=4, alpha=ALPHA, target_modules=targets,
                          use_effective_conv2d=kind == "loha-tucker")
    return LoKrConfig(r=2, alpha=ALPHA, target_modules=targets,
                      use_effective_conv2d=kind == "lokr-tucker",
                      decompose_both=kind == "lokr-both")


def _kohya_name(component, name):
    if component == "text_encoder":
        return "lora_te_" + ("" if name.startswith("text_model.") else "text_model_") + \
            name.replace(".", "_")
    return "lora_unet_" + name.replace(".", "_")


def peft_adapter(pipe, kind, seed):
    """Wrap ``pipe``'s UNet and text encoder in a PEFT ``kind`` adapter with seeded tensors
    (values exact in fp16); returns the LyCORIS file's state dict for the same adapter."""
    from peft import inject_adapter_in_model
    g = torch.Generator().manual_seed(seed)
    state = {}
    for component, model, targets in (("unet", pipe.unet, _UNET),
                                      ("text_encoder", pipe.text_encoder, _TEXT)):
        inject_adapter_in_model(_peft_config(kind, targets), model, adapter_name="x")
        for name, module in model.named_modules():
            tensors = {r: getattr(module, r)["x"] for r in _ROLES
                       if hasattr(module, r) and "x" in getattr(module, r)}
            if not tensors:
                continue
            stem = _kohya_name(component, name)
            for role, p in tensors.items():
                fan = max(p[0].numel(), 1)
                value = (0.2 + torch.randn(p.shape, generator=g)) / fan ** 0.5
                p.data.copy_(value.half().float())
                state[f"{stem}.{role}"] = p.detach().half().contiguous()
            state[f"{stem}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    return state


def against_peft(folder):
    """(sdrt's modules, inputs, their weights, their outputs, diffusers' pipeline) for a
    comparison with a PEFT adapter on the model in ``folder``."""
    pytest.importorskip("peft")
    ours = sdrt_models(folder)
    x = make_inputs(ours, seed=7)
    return ours, x, snapshot(ours), run_sdrt(ours, x), diffusers_pipe(folder)


@pytest.mark.parametrize("kind", ["loha", "loha-tucker", "lokr", "lokr-tucker", "lokr-both"])
def test_lycoris_matches_peft(tiny_sd1, tmp_path, kind):
    ours, x, before, base, ref = against_peft(tiny_sd1[0])
    state = peft_adapter(ref, kind, seed=21)
    roles = {k.rsplit(".", 1)[1] for k in state}
    if kind.endswith("tucker"):  # the 3×3 convs carry a Tucker core
        assert {"hada_t1", "lokr_t2"} & roles, roles
    if kind.startswith("lokr"):
        # Every LoKr layer has a factor made of two (so α / r applies, in PEFT as in LyCORIS).
        stems = {k.rsplit(".", 1)[0] for k in state}
        assert all(f"{s}.lokr_w1_a" in state or f"{s}.lokr_w2_a" in state for s in stems)
        assert ("lokr_w1_a" in roles) == (kind == "lokr-both")
    path = str(tmp_path / f"{kind}.safetensors")
    save_file(state, path)
    expected = run_diffusers(ref, x)

    manager = LoraManager(ours, family="sd1")
    assert manager.load(path) == kind
    assert len(manager.layers(kind)) == len({k.rsplit(".", 1)[0] for k in state})
    assert_parity(run_sdrt(ours, x), expected, base, kind)

    # The user's scale multiplies ΔW: at 0.4 each weight moves 0.4 of the way.
    full = {n: p.detach().clone() for n, p in ours["unet"].named_parameters()}
    manager.set_scale(kind, 0.4)
    for n, p in ours["unet"].named_parameters():
        w0 = before[("unet", n)][0]
        torch.testing.assert_close(p - w0, 0.4 * (full[n] - w0), atol=2e-6, rtol=1e-5)
    manager.unload()
    assert_restored(ours, before, f"{kind} unload")


def _conv(ours):
    return next((n, m) for n, m in ours["unet"].named_modules()
                if n.endswith("resnets.0.conv1"))


def test_locon_tucker_and_whole_lokr_factors(tiny_sd1_folder):
    ours = sdrt_models(tiny_sd1_folder)
    name, conv = _conv(ours)
    w0 = conv.weight.detach().clone()
    cout, cin, kh, kw = w0.shape
    g = torch.Generator().manual_seed(5)
    stem = "lora_unet_" + name.replace(".", "_")

    # LoCon with a Tucker core: 1×1 down (r, in), r × r × 3 × 3 mid, 1×1 up (out, r); α / r.
    r = 3
    down, mid, up = (torch.randn(r, cin, 1, 1, generator=g), torch.randn(r, r, kh, kw, generator=g),
                     torch.randn(cout, r, 1, 1, generator=g))
    delta = torch.zeros_like(w0)
    for p in range(cout):
        for q in range(cin):
            for i in range(r):
                for j in range(r):
                    delta[p, q] += up[p, i, 0, 0] * mid[i, j] * down[j, q, 0, 0]
    manager = LoraManager(ours)
    manager.load({f"{stem}.lora_down.weight": down, f"{stem}.lora_mid.weight": mid,
                  f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.5)},
                 scale=0.5, name="tucker")
    torch.testing.assert_close(conv.weight, w0 + 0.5 * 1.5 / r * delta, atol=1e-5, rtol=1e-5)
    manager.unload()
    assert torch.equal(conv.weight, w0)

    # LoKr with both factors whole: ΔW = w1 ⊗ w2, the kernel in w2, scale 1 (alpha ignored).
    a, b = 4, 2
    w1 = torch.randn(a, b, generator=g)
    w2 = torch.randn(cout // a, cin // b, kh, kw, generator=g)
    delta = torch.zeros_like(w0)
    for i in range(a):
        for j in range(b):
            delta[i * (cout // a):(i + 1) * (cout // a), j * (cin // b):(j + 1) * (cin // b)] = \
                w1[i, j] * w2
    manager.load({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2,
                  f"{stem}.alpha": torch.tensor(7.0)}, name="kron")
    torch.testing.assert_close(conv.weight, w0 + delta, atol=1e-5, rtol=1e-5)
    manager.unload()

    # Both factors products of ranks 3 (w1) and 2 (w2): α over w2's rank, as LyCORIS's
    # loaders take it (w2's dimension is the one its trainer sets).
    w1_a, w1_b = torch.randn(a, 3, generator=g), torch.randn(3, b, generator=g)
    w2_a, w2_b = (torch.randn(cout // a, 2, generator=g),
                  torch.randn(2, cin // b * kh * kw, generator=g))
    manager.load({f"{stem}.lokr_w1_a": w1_a, f"{stem}.lokr_w1_b": w1_b,
                  f"{stem}.lokr_w2_a": w2_a, f"{stem}.lokr_w2_b": w2_b,
                  f"{stem}.alpha": torch.tensor(4.0)}, name="kron2")
    delta = torch.kron(w1_a @ w1_b, w2_a @ w2_b).reshape(w0.shape)
    torch.testing.assert_close(conv.weight, w0 + 4.0 / 2 * delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("state, message", [
    ({"hada_w1_a": (32, 4), "hada_w1_b": (4, 288), "hada_w2_a": (32, 4)},
     r"match nothing .*hada_w1_a \(no hada_w2_b\)"),
    ({"lokr_w1": (4, 2), "lokr_w2_a": (8, 2)}, r"\(no lokr_w2_b\)"),
    ({"hada_w1_a": (32, 4), "hada_w1_b": (4, 288), "hada_w2_a": (32, 4), "hada_w2_b": (4, 288),
      "lora_up.weight": (32, 4)}, "mixes LoHa and LoRA tensors"),
    # A LoHa for a 16-channel conv, on a 32-channel one.
    ({"hada_w1_a": (16, 4), "hada_w1_b": (4, 144), "hada_w2_a": (16, 4), "hada_w2_b": (4, 144)},
     r"LoHa .* does not fit this model: .*cannot update unet .*conv1.weight \(32, 32, 3, 3\)"),
    # A Tucker core with a 1×1 kernel times 9 channels has the 3×3 conv's numbers, not its kernel.
    ({"hada_w1_a": (4, 32), "hada_w1_b": (4, 288), "hada_t1": (4, 4, 1, 1), "hada_w2_a": (4, 32),
      "hada_w2_b": (4, 288), "hada_t2": (4, 4, 1, 1)}, "does not fit"),
    ({"lokr_w1": (4, 2), "lokr_w2": (8, 16, 3, 3), "lokr_t2": (2, 2, 3, 3)}, None),
    ({"lokr_w1": (4, 3), "lokr_w2": (8, 16, 3, 3)}, "LoKr .* does not fit"),
    ({"oft_blocks": (4, 8, 8)}, "OFT adapters are not supported"),
])
def test_bad_lycoris_files_are_refused(tiny_sd1_folder, state, message):
    ours = sdrt_models(tiny_sd1_folder)
    name, conv = _conv(ours)
    assert tuple(conv.weight.shape) == (32, 32, 3, 3)
    stem = "lora_unet_" + name.replace(".", "_")
    g = torch.Generator().manual_seed(9)
    lora = {f"{stem}.{role}": torch.randn(shape, generator=g) for role, shape in state.items()}
    before = snapshot(ours)
    manager = LoraManager(ours)
    if message is None:  # a whole lokr_w2 wins over a stray Tucker core: it loads
        manager.load(lora)
        return
    with pytest.raises(SdrtError, match=message):
        manager.load(lora)
    assert_restored(ours, before, "after a refused LyCORIS file")


def test_lycoris_values_are_checked(tiny_sd1_folder):
    ours = sdrt_models(tiny_sd1_folder)
    name, _ = _conv(ours)
    stem = "lora_unet_" + name.replace(".", "_")
    lora = {f"{stem}.hada_w1_a": torch.ones(32, 4), f"{stem}.hada_w1_b": torch.ones(4, 288),
            f"{stem}.hada_w2_a": torch.ones(32, 4), f"{stem}.hada_w2_b": torch.ones(4, 288)}
    lora[f"{stem}.hada_w2_b"][0, 0] = float("nan")
    with pytest.raises(SdrtError, match="hada_w2_b holds inf or NaN"):
        LoraManager(ours).load(lora)
    lora[f"{stem}.hada_w2_b"] = torch.ones(4, 288, dtype=torch.int32)
    with pytest.raises(SdrtError, match="must be a non-empty 2-d or 4-d float tensor"):
        LoraManager(ours).load(lora)
