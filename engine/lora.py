"""LoRA adapters, applied by patching sdrt's weights in place.

A LoRA adds a low-rank update to a Linear or Conv2d weight:

    W = W0 + Σ_i  s_i · (α_i / r_i) · up_i @ down_i        up (out, r), down (r, in·kh·kw)

``s_i`` is the adapter's scale (the user's weight, A1111's ``<lora:name:s>``), ``α_i`` the
file's alpha and ``r_i`` its rank. A scale is one number for every component, or a pair
(UNet's, text encoders') as A1111's ``<lora:name:te:unet>`` and ComfyUI's LoraLoader
(strength_model, strength_clip) give them. The sum is formed in float32 from the saved original
``W0`` and rounded once into the weight's dtype, then written into the weight's own storage
(``copy_``): the static runtime's buffers and CUDA graphs, which captured that storage, stay
valid with no recapture. Each load, scale change or unload recomputes only the weights that
adapter touches; ``unload`` restores ``W0`` bit for bit. The original of a touched weight is
kept on the CPU (pinned when the weight is on a GPU, for the copy back), only while some
adapter touches it.

File layouts, told apart by their keys:

    kohya / A1111     lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha
                      lora_te_<module>...            ("." in module names written as "_";
                                                      UNet modules in diffusers' or in the
                                                      original LDM/SGM naming, which kohya
                                                      uses for SDXL: input_blocks_4_1_...)
                      SDXL: lora_te1_ (text_encoder), lora_te2_ (text_encoder_2)
                      conv LoRA (LoCon): down (r, Cin, kh, kw), up (Cout, r, 1, 1)
    diffusers / PEFT  unet.<module>.lora_A.weight / .lora_B.weight, text_encoder.<module>...,
                      text_encoder_2.<module>...
                      alpha from ``<module>.alpha`` keys or the file's
                      ``lora_adapter_metadata`` (diffusers' LoraConfig per component);
                      without either, α = r (PEFT's default scale 1)
    older diffusers   <module>.lora.down.weight / .lora.up.weight, .lora_linear_layer.*,
                      attention processors' ``processor.to_q_lora.down.weight``

    LyCORIS (kohya)   lora_unet_<module>.hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b
                      [/ hada_t1 / hada_t2] / .alpha                                  LoHa
                      lora_unet_<module>.lokr_w1 | lokr_w1_a + lokr_w1_b,
                      lokr_w2 | lokr_w2_a + lokr_w2_b [+ lokr_t2] / .alpha            LoKr
                      lora_unet_<module>.lora_down / lora_mid / lora_up       LoCon (Tucker)

LoHa, LoKr and LoCon with a Tucker core update a weight by something other than one up @ down
(``RebuiltLayer``: a Hadamard or Kronecker product of factors, Tucker cores on convs); their ΔW
is formed from the factors at each patch and added like a LoRA's, with α / r (r: LoHa's and
LoCon's rank; LoKr's decomposed factor's rank, w2's first, and no scaling when both factors
are whole, as LyCORIS, A1111 and ComfyUI apply them).

DoRA (any layer with a magnitude: kohya/LyCORIS ``<module>.dora_scale``, PEFT's
``<module>.lora_magnitude_vector``) is not a sum: the merged W0 + (α / r) · ΔW (up @ down,
or a LyCORIS layer's rebuilt ΔW) is rescaled to the magnitude's norms (``LoraLayer``), and its
term in W is s · (that − W0), W0 the original weight whatever other adapters add.

A text encoder's modules are found with or without transformers' ``text_model.`` prefix. An
SDXL LoRA given to an SD 1.x/2.x model, weights for a text encoder the model does not have (a
base LoRA's text_encoder weights on the refiner), OFT, LoRA with biases and
pickled files are refused with an ``SdrtError`` saying so. A LoRA weight with no place in the model is
an error naming the first unmatched keys; a LoRA whose shapes do not fit is refused naming the
key and both shapes (a LoRA for another model family). Everything is checked before any weight
is touched.
"""
import json
import math
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import SdrtError
from .weights import SafetensorsFiles, refuse_pickle

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_TEXT = ("text_encoder", "text_encoder_2")
# kohya numbers SDXL's text encoders (te1: CLIP ViT-L, te2: OpenCLIP bigG); "lora_te_" is the
# one text encoder of SD 1.x/2.x, which diffusers, too, loads into text_encoder.
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder",
                   "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# Keys only an SDXL LoRA has: refused, as such, by an SD 1.x/2.x model.
_SDXL_MARKS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_label_emb",
               "unet.add_embedding.")
# LyCORIS algorithms sdrt does not apply.
_UNSUPPORTED = {"oft_": "OFT", "boft_": "BOFT", "lora_B.bias": "LoRA with bias (lora_bias)"}
# LyCORIS's tensors (kohya layout), each its own role: LoHa's two Hadamard factors (with
# Tucker cores t1, t2 on convs), LoKr's two Kronecker factors (each whole or a product of
# two, w2 with a Tucker core t2).
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# The part of a key after the layer's name, and what it holds.
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up",
                   "lora_mid.weight": "mid", "alpha": "alpha", "dora_scale": "dora",
                   **{name: name for name in _LOHA + _LOKR}}
_DIFFUSERS_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"),
                       (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                       (".lora_linear_layer.down.weight", "down"),
                       (".lora_linear_layer.up.weight", "up"),
                       ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
                       (".lora_magnitude_vector.weight", "dora"),
                       (".lora_magnitude_vector", "dora"), (".alpha", "alpha"))
# Older diffusers files name the attention processor's LoRA (``attn1.processor.to_q_lora``,
# ``self_attn.to_out_lora``), not the linear layer it patches.
_OLD_TEXT = ((re.compile(r"\.self_attn\.to_(q|k|v)$"), r".self_attn.\1_proj"),
             (re.compile(r"\.self_attn\.to_out$"), ".self_attn.out_proj"))
_OLD_DIFFUSERS = {
    "unet": ((re.compile(r"\.processor\.to_(q|k|v)$"), r".to_\1"),
             (re.compile(r"\.processor\.to_out$"), ".to_out.0")),
    "text_encoder": _OLD_TEXT,
    "text_encoder_2": _OLD_TEXT,
}
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per component, as JSON
_SHOWN = 5  # unmatched keys named in an error


@dataclass
class LoraLayer:
    """The update of one weight: ΔW = scale · factor · up @ down, reshaped to the weight.

    DoRA (a ``magnitude``, kohya's ``dora_scale`` / PEFT's ``lora_magnitude_vector``): the
    merged weight W0 + factor · up @ down is scaled to the magnitude's norms, along the
    output axis (a magnitude of shape (out, 1, ...): each output row's norm, as PEFT and
    LyCORIS do by default) or the input axis ((1, in, ...): each input channel's, as older
    LyCORIS files and A1111 do), and the update is scale · (that − W0): at scale 1 the DoRA
    weight, in between a blend, as A1111 and ComfyUI apply a DoRA's strength."""
    up: torch.Tensor      # (out, r) float32, on the weight's device
    down: torch.Tensor    # (r, in·kh·kw) float32, on the weight's device
    factor: float         # α / r
    magnitude: torch.Tensor = None  # DoRA: (out, 1) or (1, in) float32
    kernel: int = 1       # kh·kw: how the input axis is laid out in a row

    def add_to(self, flat, scale, base=None):
        """flat (out, in·kh·kw) += scale · factor · up @ down; DoRA: += scale · (the DoRA
        weight − base), ``base`` the original weight (float32, flat)."""
        if self.magnitude is None:
            flat.addmm_(self.up, self.down, alpha=scale * self.factor)
            return
        merged = torch.addmm(base, self.up, self.down, alpha=self.factor)
        _add_dora(flat, merged, base, self.magnitude, self.kernel, scale)


def _add_dora(flat, merged, base, magnitude, kernel, scale):
    """flat += scale · (DoRA − base): the ``merged`` weight (float32, flat) scaled to the
    ``magnitude``'s norms, per output row ((out, 1)) or per input channel ((1, in): over the
    output rows and the kernel's ``kernel`` taps)."""
    if magnitude.shape[0] == merged.shape[0]:  # per output row
        norm = merged.norm(dim=1, keepdim=True)
    else:
        rows = merged.view(merged.shape[0], -1, kernel)
        norm = rows.square().sum(dim=(0, 2)).sqrt().repeat_interleave(kernel)[None]
        magnitude = magnitude.repeat_interleave(kernel, dim=1)
    dora = merged * magnitude / norm.clamp_min(torch.finfo(torch.float32).eps)
    flat.add_(dora - base, alpha=scale)


@dataclass
class RebuiltLayer:
    """A LyCORIS update that is not one product up @ down, rebuilt from its factors at each
    patch (float32, on the weight's device; nothing weight-sized is kept):

        LoHa   ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), with Tucker cores on convs:
               ΔW = T(t1, w1_a, w1_b) ⊙ T(t2, w2_a, w2_b),
               T(t, a, b)[p, q] = Σ t[i, j] a[i, p] b[j, q]
        LoKr   ΔW = w1 ⊗ w2 (Kronecker), w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2, w2_a @ w2_b
               or T(t2, w2_a, w2_b); a conv's kernel is in w2
        LoCon with a Tucker core (lora_mid): ΔW[p, q] = Σ up[p, i] mid[i, j] down[j, q]

    (t, mid: r × r × kh × kw; products over the kernel are per tap). With a DoRA
    ``magnitude`` the merged W0 + factor · ΔW is rescaled as a LoRA layer's (``LoraLayer``),
    as LyCORIS and A1111 apply DoRA to every algorithm."""
    kind: str             # "LoHa", "LoKr" or "LoCon (Tucker)"
    tensors: dict         # role → float32 tensor
    factor: float         # α / r (LoKr with no decomposed factor: 1)
    shape: tuple          # the weight's
    magnitude: torch.Tensor = None  # DoRA: (out, 1) or (1, in) float32

    @property
    def kernel(self):
        """kh·kw: how the input axis is laid out in a row (as ``LoraLayer.kernel``)."""
        return math.prod(self.shape[2:])

    def delta(self):
        """ΔW as (out, in·kh·kw), float32."""
        t = self.tensors
        if self.kind == "LoHa":
            return _hadamard_factor(t, 1) * _hadamard_factor(t, 2)
        if self.kind == "LoKr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            return torch.kron(w1, w2.reshape(w2.shape[0], -1))
        mid = t["mid"]  # LoCon with a Tucker core: up (out, r), mid (r, r, kh, kw), down (r, in)
        return torch.einsum("ijkl,pi,jq->pqkl", mid, t["up"], t["down"]).reshape(
            self.shape[0], -1)

    def add_to(self, flat, scale, base=None):
        if self.magnitude is None:
            flat.add_(self.delta(), alpha=scale * self.factor)
            return
        merged = torch.add(base, self.delta(), alpha=self.factor)
        _add_dora(flat, merged, base, self.magnitude, self.kernel, scale)


def _tucker(core, a, b):
    """T(core, a, b)[p, q, k, l] = Σ_ij core[i, j, k, l] a[i, p] b[j, q]: a (r, out), b (r, in)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


def _hadamard_factor(t, i):
    """LoHa's factor i (1 or 2) as (out, in·kh·kw)."""
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    if f"hada_t{i}" in t:
        w = _tucker(t[f"hada_t{i}"], a, b)
        return w.reshape(w.shape[0], -1)
    return a @ b


@dataclass
class Adapter:
    name: str
    scale: float | tuple  # one for every component, or (UNet's, text encoders')
    layers: dict = field(default_factory=dict)  # (component, module name) → LoraLayer

    def scale_of(self, component):
        """The scale of ``component``'s weights."""
        return scale_of(self.scale, component)


def scale_of(scale, component):
    """A LoRA scale (one number, or (UNet's, text encoders')) for ``component``."""
    if isinstance(scale, tuple):
        return scale[0] if component == "unet" else scale[1]
    return scale


class LoraManager:
    """The LoRA adapters applied to a set of modules (``{"unet": unet, "text_encoder": te}``;
    SDXL adds ``"text_encoder_2"``, the refiner has only that one).

    ``load`` / ``set_scale`` / ``unload`` patch the weights in place (see the module
    docstring); ``adapters`` is ``{name: scale}`` in load order. ``family`` ("sd1", "sdxl",
    ...) only names the model in messages. The methods hold a lock, so two threads never patch
    at once; a generation running while a weight is patched sees a mix of old and new weights,
    so callers switch adapters between requests.
    """

    def __init__(self, modules: dict, family: str | None = None):
        unknown = set(modules) - set(COMPONENTS)
        if unknown:
            raise SdrtError(f"LoRA: unknown component {sorted(unknown)[0]!r}, expected "
                            f"{' or '.join(COMPONENTS)}")
        self.modules = {c: m for c, m in modules.items() if m is not None}
        self.family = family
        self._adapters: dict[str, Adapter] = {}
        self._originals: dict[tuple, torch.Tensor] = {}  # (component, module) → W0 on the CPU
        self._targets = {}  # component → {module name: nn.Linear | nn.Conv2d}
        self._kohya = {}  # component → {kohya name: module name}
        self._lock = threading.Lock()

    @property
    def adapters(self) -> dict:
        """``{name: scale}`` of the loaded adapters, in load order."""
        return {a.name: a.scale for a in self._adapters.values()}

    def layers(self, name) -> list:
        """The ``(component, module name)`` of every weight adapter ``name`` patches."""
        return list(self._adapter(name).layers)

    def load(self, source, scale=1.0, name=None, replace=None) -> str:
        """Load a LoRA (a ``.safetensors`` path or a ``{key: tensor}`` dict) at ``scale`` and
        patch it in. Returns its name: ``name``, or the file's stem (``"lora"`` for a dict),
        made unique with ``-2``, ``-3``, ... .

        ``replace`` names a loaded adapter to remove in the same pass (switching adapters):
        the weights both patch are recomputed once, without restoring their originals first.
        The new LoRA is read and checked before anything changes: if it is refused, the
        weights and the adapters stay as they were."""
        scale = check_scale(scale)
        if name is not None and (not isinstance(name, str) or not name):
            raise SdrtError(f"LoRA name must be a non-empty string, got {name!r}")
        state, metadata, where = _read(source)
        with self._lock:
            old = self._adapter(replace) if replace is not None else None
            if name in self._adapters and name != replace:
                raise SdrtError(f"a LoRA named {name!r} is loaded already: unload it first, or "
                                "change its scale with set_scale")
            layers = self._parse(state, metadata, where)
            touched = dict(layers)
            if old is not None:
                touched.update(self._adapters.pop(old.name).layers)
            name = name or self._unique(_default_name(source))
            self._adapters[name] = Adapter(name, scale, layers)
            self._apply(touched)
        return name

    def set_scale(self, name, scale):
        """Change adapter ``name``'s scale; its weights are recomputed from the originals."""
        scale = check_scale(scale)
        with self._lock:
            adapter = self._adapter(name)
            adapter.scale = scale
            self._apply(adapter.layers)

    def unload(self, name=None):
        """Remove adapter ``name`` (every adapter when None); weights no adapter touches any
        more get their original values back, bit for bit."""
        with self._lock:
            names = list(self._adapters) if name is None else [self._adapter(name).name]
            touched = {}
            for n in names:
                touched.update(self._adapters.pop(n).layers)
            self._apply(touched)

    # -- patching --------------------------------------------------------------------------

    def _adapter(self, name):
        if not isinstance(name, str) or name not in self._adapters:
            loaded = ", ".join(map(repr, self._adapters)) or "none"
            raise SdrtError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return self._adapters[name]

    def _unique(self, stem):
        name, i = stem, 1
        while name in self._adapters:
            i += 1
            name = f"{stem}-{i}"
        return name

    @torch.no_grad()
    def _apply(self, keys):
        """Recompute the weights ``keys`` (``(component, module)`` pairs) from their originals
        and every adapter that touches them, in load order."""
        scratch = {}  # device → one float32 accumulator, reused for every weight
        for key in keys:
            weight = self._targets[key[0]][key[1]].weight
            touching = [a for a in self._adapters.values() if key in a.layers]
            if not touching:
                original = self._originals.pop(key, None)
                if original is not None:
                    weight.copy_(original)
                continue
            if key not in self._originals:
                self._originals[key] = _cpu_copy(weight)
            original = self._originals[key]
            updates = [(a.scale_of(key[0]), a.layers[key]) for a in touching
                       if a.scale_of(key[0])]
            rows = weight.shape[0]
            # DoRA scales the merged weight by its norms: it needs W0 itself, in float32.
            dora = any(getattr(layer, "magnitude", None) is not None for _, layer in updates)
            if not updates:
                weight.copy_(original)
            elif weight.dtype == torch.float32 and weight.is_contiguous() and \
                    original.device == weight.device and not dora:
                # float32 on the CPU: W0 + ΔW straight into the weight, nothing to round:
                # 16 B per element (W0 copied in, then addmm reads and writes it).
                out = weight.view(rows, -1)
                (scale, first), rest = updates[0], updates[1:]
                if isinstance(first, LoraLayer):
                    torch.addmm(original.view(rows, -1), first.up, first.down,
                                alpha=scale * first.factor, out=out)
                else:
                    out.copy_(original.view(rows, -1))
                    first.add_to(out, scale)
                for scale, layer in rest:
                    layer.add_to(out, scale)
            else:
                # A float32 accumulator: W0, then one addmm per adapter, then one rounding
                # into the weight's dtype (and layout: channels_last convs) as it is copied.
                acc = _scratch(scratch, weight)
                acc.copy_(original)
                flat = acc.view(rows, -1)
                base = flat.clone() if dora else None
                for scale, layer in updates:
                    layer.add_to(flat, scale, base)
                weight.copy_(acc)

    # -- reading a file --------------------------------------------------------------------

    def _parse(self, state, metadata, where):
        """``{(component, module): LoraLayer}`` for a state dict, every key and shape checked."""
        _refuse_unsupported(state, where)
        if not self._sdxl():
            sdxl = next((k for k in state if k.startswith(_SDXL_MARKS)), None)
            if sdxl is not None:
                raise SdrtError(f"{where}: this is an SDXL LoRA ({sdxl}); this "
                                f"{self._model()} is not SDXL")
        groups, unknown, notes = {}, [], []
        for key in state:
            parsed = _split_key(key)
            if parsed is None:
                (notes if _is_scalar(state[key]) else unknown).append(key)
                continue
            component, module, role, layout = parsed
            groups.setdefault((component, module, layout), {})[role] = key
        # Weights for a network the model lacks (a base LoRA's text_encoder on the refiner)
        # first: they say more than the shapes or names that would not fit.
        absent = {}
        for (component, _, _), roles in groups.items():
            if component not in self.modules:
                absent.setdefault(component, []).append(_any_key(roles))
        for component, keys in absent.items():
            has = ", ".join(c for c in _TEXT if c in self.modules) or "none"
            raise SdrtError(f"{where}: {len(keys)} LoRA layer(s) are for {component} "
                            f"({', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''})"
                            f", but this {self._model()} has no sdrt {component} to patch (its "
                            f"text encoders: {has})")
        layers, unmatched = {}, []
        for (component, module, layout), roles in groups.items():
            if set(roles) == {"alpha"}:
                notes.append(roles["alpha"])
                continue
            missing = _missing(roles, where)
            if missing:
                unmatched.append(f"{_any_key(roles)} (no {missing})")
                continue
            target = self._resolve(component, module, layout)
            if target is None:
                unmatched.append(_any_key(roles))
                continue
            if (component, target) in layers:
                raise SdrtError(f"{where}: LoRA patches {component} {target} twice (again in "
                                f"{_any_key(roles)})")
            layers[(component, target)] = self._layer(state, roles, component, module, target,
                                                      metadata, where)
        unmatched += unknown
        if unmatched:
            raise SdrtError(f"{where}: {len(unmatched)} LoRA weight(s) match nothing in this "
                            f"{self._model()}: {', '.join(unmatched[:_SHOWN])}"
                            f"{', ...' if len(unmatched) > _SHOWN else ''} (a LoRA for another "
                            "model?)")
        if not layers:
            raise SdrtError(f"{where}: no LoRA weights found (expected kohya "
                            "lora_unet_*/lora_te*_* .lora_down/.lora_up or diffusers "
                            "unet.*/text_encoder*.* .lora_A/.lora_B keys)")
        if notes:
            warnings.warn(f"{where}: {len(notes)} LoRA key(s) ignored (no LoRA weight of "
                          f"theirs): {', '.join(notes[:_SHOWN])}"
                          f"{', ...' if len(notes) > _SHOWN else ''}", stacklevel=3)
        return layers

    def _model(self):
        return f"{self.family} model" if self.family else "model"

    def _sdxl(self):
        """Whether the model is SDXL: a second text encoder, or the UNet's pooled-text and
        micro-conditioning embedding."""
        unet = self.modules.get("unet")
        return "text_encoder_2" in self.modules or getattr(
            getattr(unet, "config", None), "addition_embed_type", None) == "text_time"

    def _tables(self, component):
        if component not in self._targets:
            module = self.modules[component]
            targets = {n: m for n, m in module.named_modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d))}
            kohya = {}
            for n in targets:
                kohya[n.replace(".", "_")] = n
                if component in _TEXT and n.startswith("text_model."):
                    kohya[n[len("text_model."):].replace(".", "_")] = n
            if component == "unet":
                for ldm, n in _ldm_names(module.config, targets).items():
                    kohya.setdefault(ldm.replace(".", "_"), n)
            self._targets[component], self._kohya[component] = targets, kohya
        return self._targets[component], self._kohya[component]

    def _resolve(self, component, module, layout):
        """sdrt's module name for a LoRA's module name, or None."""
        targets, kohya = self._tables(component)
        if layout == "kohya":
            return kohya.get(module)
        for pattern, repl in _OLD_DIFFUSERS[component]:
            module = pattern.sub(repl, module)
        if module in targets:
            return module
        if component in _TEXT and "text_model." + module in targets:
            return "text_model." + module  # transformers >= 5 names CLIP without text_model.
        return None

    def _layer(self, state, roles, component, module, target, metadata, where):
        if _kind(roles) != "LoRA" or "mid" in roles:
            return self._rebuilt_layer(state, roles, component, module, target, metadata,
                                       where)
        weight = self._targets[component][target].weight
        down, up = state[roles["down"]], state[roles["up"]]
        for key, t in ((roles["down"], down), (roles["up"], up)):
            if not t.is_floating_point() or t.dim() not in (2, 4) or not t.numel():
                raise SdrtError(f"{where}: LoRA weight {key} must be a non-empty 2-d or 4-d "
                                f"float tensor, got {_describe(t)}")
        rank = down.shape[0]
        shape = tuple(weight.shape)
        fits = (up.shape[0] == shape[0] and up.shape[1] == rank and
                all(s == 1 for s in up.shape[2:]) and down.shape[1] == shape[1] and
                _kernel(down.shape) == _kernel(shape))
        if not fits:
            raise SdrtError(
                f"{where}: LoRA {roles['down'].rsplit('.', 2)[0]} does not fit this "
                f"{self._model()}: down {tuple(down.shape)} and up {tuple(up.shape)} cannot "
                f"update {component} {target}.weight {shape} (a LoRA for another model family?)")
        down = down.to(weight.device, torch.float32).reshape(rank, -1)
        up = up.to(weight.device, torch.float32).reshape(shape[0], rank)
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise SdrtError(f"{where}: LoRA {roles['down']} holds inf or NaN values")
        factor = _alpha_over_rank(state, roles, component, module, rank, metadata, where)
        magnitude = (_magnitude(state[roles["dora"]], roles["dora"], weight, where)
                     if "dora" in roles else None)
        return LoraLayer(up.contiguous(), down.contiguous(), factor, magnitude,
                         weight[0, 0].numel() if weight.dim() == 4 else 1)

    def _rebuilt_layer(self, state, roles, component, module, target, metadata, where):
        """A ``RebuiltLayer`` (LoHa, LoKr, LoCon with lora_mid), its tensors checked and its
        ΔW formed once to check that it fits the weight."""
        weight = self._targets[component][target].weight
        kind = _kind(roles)
        tensors = {}
        for role, key in roles.items():
            if role in ("alpha", "dora"):
                continue
            t = state[key]
            if not t.is_floating_point() or t.dim() not in (2, 4) or not t.numel():
                raise SdrtError(f"{where}: {kind} weight {key} must be a non-empty 2-d or 4-d "
                                f"float tensor, got {_describe(t)}")
            t = t.to(weight.device, torch.float32)
            if not torch.isfinite(t).all():
                raise SdrtError(f"{where}: {kind} weight {key} holds inf or NaN values")
            tensors[role] = t
        if kind == "LoRA":  # a Tucker core: up (out, r, 1, 1) and down (r, in, 1, 1) as 2-d
            kind = "LoCon (Tucker)"
            tensors["up"] = tensors["up"].reshape(tensors["up"].shape[0], -1)
            tensors["down"] = tensors["down"].reshape(tensors["down"].shape[0], -1)
            rank = tensors["down"].shape[0]
        elif kind == "LoHa":
            rank = tensors["hada_w1_b"].shape[0]
        else:  # LoKr: α / r only when a factor is a product (w2's rank wins, as in LyCORIS)
            rank = next((tensors[f"lokr_w{i}_b"].shape[0] for i in (2, 1)
                         if f"lokr_w{i}" not in tensors and f"lokr_w{i}_b" in tensors), None)
        layer = RebuiltLayer(kind, tensors, 1.0, tuple(weight.shape))
        rows, cols = weight.shape[0], weight[0].numel()
        try:
            got = tuple(layer.delta().shape)
        except RuntimeError:  # factors whose inner sizes do not chain
            got = None
        # A 4-d factor or Tucker core carries the conv's kernel: the weight's own, or it does
        # not fit (ΔW's numbers could still match, a 1×1 core on in·kh·kw channels).
        kernels = {_kernel(t.shape) for t in tensors.values() if t.dim() == 4}
        if got != (rows, cols) or kernels - {_kernel(weight.shape)}:
            shapes = ", ".join(f"{r} {tuple(t.shape)}" for r, t in tensors.items())
            raise SdrtError(f"{where}: {kind} {_any_key(roles).rsplit('.', 1)[0]} does not fit "
                            f"this {self._model()}: {shapes} cannot update {component} {target}"
                            f".weight {tuple(weight.shape)} (a LoRA for another model family?)")
        if rank is not None:
            layer.factor = _alpha_over_rank(state, roles, component, module, rank, metadata,
                                            where)
        if "dora" in roles:
            layer.magnitude = _magnitude(state[roles["dora"]], roles["dora"], weight, where)
        return layer


def _role_kind(role):
    """"LoRA" (LoCon), "LoHa" or "LoKr": the algorithm a tensor's role belongs to."""
    return "LoHa" if role in _LOHA else "LoKr" if role in _LOKR else "LoRA"


def _kind(roles):
    """The algorithm of a layer's tensors (one, as ``_missing`` has checked)."""
    return _role_kind(next(r for r in roles if r not in ("alpha", "dora")))


def _missing(roles, where):
    """What a layer's tensors lack to make its update (None when complete): "up weight",
    "hada_w2_b", ...; tensors of two algorithms in one layer are refused."""
    kinds = {_role_kind(r) for r in roles if r not in ("alpha", "dora")}
    if len(kinds) > 1:
        raise SdrtError(f"{where}: {_any_key(roles).rsplit('.', 1)[0]} mixes "
                        f"{' and '.join(sorted(kinds))} tensors")
    if not kinds:
        return "down weight and up weight"  # a DoRA magnitude alone
    (kind,) = kinds
    if kind == "LoRA":
        need = [f"{r} weight" for r in ("down", "up") if r not in roles]
    elif kind == "LoHa":
        need = [r for r in _LOHA[:4] if r not in roles]
        if ("hada_t1" in roles) != ("hada_t2" in roles):
            need.append("hada_t2" if "hada_t1" in roles else "hada_t1")
    else:
        need = []
        for i in (1, 2):
            if f"lokr_w{i}" not in roles:
                need += [r for r in (f"lokr_w{i}_a", f"lokr_w{i}_b") if r not in roles]
    return " and ".join(need) or None


def _any_key(roles):
    """A layer's first weight key (its alpha's when it has nothing else), for messages."""
    return next((k for r, k in roles.items() if r != "alpha"), roles.get("alpha"))


def _magnitude(t, key, weight, where):
    """A DoRA magnitude as ``LoraLayer`` takes it: (out, 1) for the output axis, (1, in) for
    the input axis, float32 on the weight's device. kohya/LyCORIS ``dora_scale`` says its axis
    by its shape ((out, 1, ...) or (1, in, ...)); PEFT's ``lora_magnitude_vector`` is always
    per output row ((out,), or (1, out, 1, 1) for a conv)."""
    out, inp = weight.shape[0], weight.shape[1]
    ok = t.is_floating_point() and t.numel() > 0
    if ok and key.endswith("dora_scale") and t.dim() == weight.dim():
        if t.shape[0] == out and t[0].numel() == 1:
            m = t.reshape(out, 1)
        elif t.shape[1] == inp and t.numel() == inp:
            m = t.reshape(1, inp)
        else:
            ok = False
    elif ok and not key.endswith("dora_scale") and t.numel() == out:
        m = t.reshape(out, 1)
    else:
        ok = False
    if not ok:
        raise SdrtError(f"{where}: DoRA magnitude {key} must be a float tensor of shape "
                        f"(out, 1, ...) or (1, in, ...) for {tuple(weight.shape)}, got "
                        f"{_describe(t)}")
    m = m.to(weight.device, torch.float32)
    if not torch.isfinite(m).all():
        raise SdrtError(f"{where}: DoRA magnitude {key} holds inf or NaN values")
    return m


def check_scale(scale):
    """A scale as the manager keeps it: a float, or a (UNet's, text encoders') pair of floats
    where the two differ."""
    if isinstance(scale, (tuple, list)) and len(scale) == 2:
        unet, te = (check_scale(s) for s in scale)
        return unet if unet == te else (unet, te)
    from .request import MAX_LORA_SCALE, short_repr
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
            not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        raise SdrtError(f"LoRA scale must be a number from {-MAX_LORA_SCALE:g} to "
                        f"{MAX_LORA_SCALE:g} or a (UNet, text encoder) pair of them, got "
                        f"{short_repr(scale)}")
    return float(scale)


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {tuple(t.shape)}"
    return type(t).__name__


def _kernel(shape):
    """A conv kernel's (kh, kw), () for a Linear or a 1×1 conv (either updates the other)."""
    k = tuple(shape[2:])
    return () if all(s == 1 for s in k) else k


def _is_scalar(t):
    return isinstance(t, torch.Tensor) and t.numel() == 1


def _scratch(buffers, weight):
    """A float32 tensor shaped like ``weight`` (contiguous), from one buffer per device that
    grows to the largest weight: no allocation (and page faults) per weight."""
    buf = buffers.get(weight.device)
    if buf is None or buf.numel() < weight.numel():
        buf = buffers[weight.device] = torch.empty(weight.numel(), dtype=torch.float32,
                                                   device=weight.device)
    return buf[: weight.numel()].view(weight.shape)


def _cpu_copy(weight):
    if weight.device.type == "cpu":
        return weight.detach().clone()
    # Pinned, so restoring the original is a plain DMA; same strides (channels_last convs).
    return torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device="cpu",
                               pin_memory=True).copy_(weight)


def _split_key(key):
    """``(component, module, role, layout)`` of a LoRA key, or None if it is none of ours."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            module, _, suffix = key[len(prefix):].partition(".")
            role = _KOHYA_SUFFIXES.get(suffix)
            return (component, module, role, "kohya") if role else None
    component = next((c for c in COMPONENTS if key.startswith(c + ".")), None)
    if component is None:
        return None
    rest = key[len(component) + 1:]
    for suffix, role in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix):
            return component, rest[: -len(suffix)], role, "diffusers"
    return None


def _refuse_unsupported(state, where):
    keys = list(state)
    for mark, what in _UNSUPPORTED.items():
        hit = next((k for k in keys if mark in k), None)
        if hit is not None:
            raise SdrtError(f"{where}: {what} adapters are not supported ({hit}); sdrt loads "
                            "LoRA and LoCon (up @ down) adapters")


def _alpha_over_rank(state, roles, component, module, rank, metadata, where):
    """α / r: the file's alpha key, else the diffusers metadata's, else 1 (α = r)."""
    if "alpha" in roles:
        t = state[roles["alpha"]]
        if not _is_scalar(t) or not torch.isfinite(t.float()).all():
            raise SdrtError(f"{where}: LoRA alpha {roles['alpha']} must be one finite number, "
                            f"got {_describe(t)}")
        return float(t.float()) / rank
    config = metadata.get(component) if metadata else None
    if not config:
        return 1.0
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        # PEFT's rule (re.match(rf"(.*\.)?({pattern})$")), taken literally, not as a regex.
        if module == pattern or module.endswith("." + pattern):
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SdrtError(f"{where}: {_METADATA_KEY}: lora_alpha of {component} {module} must be "
                        f"a number, got {alpha!r}")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _ldm_names(config, targets):
    """``{LDM module name: sdrt module name}`` for the UNet's ``targets``, from the
    single-file converter's table (``input_blocks.1.1.proj_in`` → ``down_blocks.0...``,
    SDXL's ``label_emb.0.0`` → ``add_embedding.linear_1``)."""
    from .convert_ldm import _unet_modules
    table = _unet_modules(asdict(config))
    names = {}
    for ldm, (target, renames) in table.items():
        for n in targets:
            if n != target and not n.startswith(target + "."):
                continue
            rest = n[len(target) + 1:] + "."
            for old, new in renames:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            names[f"{ldm}.{rest}".rstrip(".")] = n
    return names


def _read(source):
    """(state dict, diffusers metadata by component, description) of a path or a dict."""
    if isinstance(source, dict):
        bad = next((k for k, v in source.items()
                    if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise SdrtError(f"a LoRA state dict maps names to tensors; {bad!r} maps to "
                            f"{type(source[bad]).__name__}")
        return source, {}, "LoRA state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise SdrtError(f"a LoRA is a .safetensors path or a state dict, got "
                        f"{type(source).__name__}")
    path = os.fsdecode(os.fspath(source))
    refuse_pickle(path)
    if not path.endswith(".safetensors"):
        raise SdrtError(f"{path}: a LoRA must be a .safetensors file")
    if not os.path.isfile(path):
        raise SdrtError(f"LoRA file {path} does not exist")
    with SafetensorsFiles([path]) as f:
        state = {k: read() for k, read in f.source.items()}
    return state, _metadata(path), path


def _metadata(path):
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as e:
        raise SdrtError(f"{path}: unreadable {_METADATA_KEY} ({e})") from None
    if not isinstance(flat, dict):
        raise SdrtError(f"{path}: {_METADATA_KEY} must be a JSON object")
    by_component = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        if component in COMPONENTS and field_name:
            by_component.setdefault(component, {})[field_name] = value
    for component, config in by_component.items():
        if not isinstance(config.get("alpha_pattern") or {}, dict):
            raise SdrtError(f"{path}: {_METADATA_KEY}: {component}.alpha_pattern must be an "
                            "object")
    return by_component


def _default_name(source):
    if isinstance(source, dict):
        return "lora"
    base = os.path.basename(os.fsdecode(os.fspath(source)))
    return base[: -len(".safetensors")] or "lora"

