"""Cross-check an ONNX export against sdrt: ``sdrt check-onnx DIR --model PATH``.

Each network runs in onnxruntime and in sdrt (float32, the reference) on two sets of inputs:

- ``random``: fresh Gaussian inputs with non-zero means, so a dropped bias or a wrong offset
  cannot hide behind zero-mean data;
- ``generation``: what each network saw in a short text-to-image run of sdrt's pipeline
  (its token ids, the last UNet call, the final latents, and the decoded image for the
  encoder).

The model is the export's with its LoRAs merged (``--lora``) and its embeddings added
(``--embedding``; the random token ids read their rows), the manifest's files; a UNet
that runs ControlNets or T2I-Adapters (``--controlnet``) is compared with sdrt's UNet and those
nets, loaded from their files, on random control images and scales in both input sets.

An SDXL text encoder is compared output by output: every layer's states (``hidden_states.k``
against sdrt's ``encoder(ids, clip_skip=L - k, final_norm=False)``), the final states and the
pooled (projected) output against ``encode``: the calls the pipeline makes.

The error of each output is ‖onnx − sdrt‖ / ‖sdrt‖ (and its max abs difference).
Tolerances: float32 exports 1e-4 (reordered float32 arithmetic is good to ~1e-6 per op; a
wrong op is off by ≥ 1e-2); float16 exports 1e-2 (fp16 rounding, 2⁻¹¹ per op, compounded
over the depth; the tiny models measure ~1e-3).
"""
import math
import os
from dataclasses import dataclass

import torch

from sdrt.engine.errors import SdrtError

from .onnx_controlnet import (KINDS, ControlledUNet, control_examples, input_names,
                              load_controlnets)
from .onnx_export import add_embeddings, merge_loras, vae_moments
from .onnx_manifest import manifest_family, models_of, unet_inputs
from .onnx_runtime import load_sessions

TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class CheckRow:
    model: str  # network, and output when it has several: "vae_encoder.latent_std"
    inputs: str  # "random" or "generation"
    max_abs: float
    rel: float
    tol: float

    @property
    def passed(self):
        return math.isfinite(self.rel) and self.rel <= self.tol


def compare(model, inputs, ours, ref, tol):
    """A CheckRow for one output; NaN or Inf anywhere fails it."""
    ours, ref = ours.detach().cpu().double(), ref.detach().cpu().double()
    if ours.shape != ref.shape:
        raise SdrtError(f"{model}: onnxruntime gave shape {tuple(ours.shape)}, sdrt "
                        f"{tuple(ref.shape)}")
    diff = (ours - ref).abs()
    max_abs = diff.max().item() if torch.isfinite(ours).all() else math.inf
    rel = ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return CheckRow(model, inputs, max_abs, rel if math.isfinite(max_abs) else math.inf, tol)


class _Recorder:
    """Calls a module and keeps its last inputs, by the names ``names`` of its positional
    arguments and its keyword arguments."""

    def __init__(self, module, names):
        self.module, self.config, self.names = module, module.config, names
        self.last = None

    def __call__(self, *args, **kwargs):
        self.last = {**dict(zip(self.names, args)),
                     **{k: v for k, v in kwargs.items() if v is not None}}
        return self.module(*args, **kwargs)


class _TextRecorder(_Recorder):
    """A text encoder's last token ids, through ``forward`` or ``encode``."""

    def __init__(self, module):
        super().__init__(module, ("input_ids",))

    def encode(self, ids, *args, **kwargs):
        self.last = {"input_ids": ids}
        return self.module.encode(ids, *args, **kwargs)


class _VAERecorder:
    def __init__(self, vae):
        self.vae, self.config = vae, vae.config
        self.last_decode = None

    def decode(self, z):
        image = self.vae.decode(z)
        self.last_decode = ((z,), image)
        return image

    def encode(self, image):
        return self.vae.encode(image)


def _control_feeds(nets, rows, height, width, device, g):
    """The UNet's ControlNet and adapter inputs (``nets``: the two lists): a random image
    per net and row, and scales from 0.5 to 1.5."""
    feeds = {}
    for of_kind, names in zip(nets, (inputs for _, inputs in KINDS.values())):
        if of_kind:
            examples = control_examples(of_kind, rows, height, width, torch.float32, g)
            feeds.update({k: v.to(device) for k, v in zip(names, examples)})
    return feeds


def _random_inputs(manifest, configs, unet_names, device, g, family, nets=()):
    """Fresh inputs at the export's shapes: (B images, guidance doubles the UNet's batch)."""
    n, f = manifest["batch"], configs["vae"].scale_factor
    h, w = manifest["height"] // f, manifest["width"] // f
    unet, vae = configs["unet"], configs["vae"]
    texts = {name: configs[name] for name in configs if name.startswith("text_encoder")}
    seq = next(iter(texts.values())).max_position_embeddings

    def randn(*shape, mean=0.0, std=1.0):
        return (mean + std * torch.randn(shape, generator=g)).to(device)

    unet_feeds = {"sample": randn(2 * n, unet.in_channels, h, w, mean=-0.3),
                  "timestep": torch.tensor(float(torch.randint(1, 999, (1,), generator=g)) + 0.5,
                                           device=device),
                  "encoder_hidden_states": randn(2 * n, seq, unet.cross_attention_dim, mean=0.1)}
    if "timestep_cond" in unet_names:
        unet_feeds["timestep_cond"] = randn(2 * n, unet.time_cond_proj_dim, mean=0.2)
    if "text_embeds" in unet_names:
        (width,) = unet_inputs(unet, family.num_time_ids)["text_embeds"]
        unet_feeds["text_embeds"] = randn(2 * n, width, mean=0.1)
        # Sizes and a crop corner in pixels, and the refiner's aesthetic score.
        values = {"original_size": (h * f, w * f), "crops_coords_top_left": (16, 8),
                  "target_size": (h * f, w * f), "aesthetic_score": 6.0}
        unet_feeds["time_ids"] = torch.tensor([family.time_ids_of(values)] * (2 * n),
                                              dtype=torch.float32, device=device)
    if any(nets):
        unet_feeds.update(_control_feeds(nets, 2 * n, h * f, w * f, device, g))
    ids = {name: torch.randint(0, text.vocab_size, (2, seq), generator=g)
           for name, text in texts.items()}
    # The embeddings' rows, the last of each table, read by the prompt's first tokens too.
    added = sum(e["vectors"] for e in manifest.get("embeddings") or [])
    for name, text in texts.items():
        ids[name][0, 1:1 + added] = torch.arange(text.vocab_size - added, text.vocab_size)
    return {
        # One prompt and its negative, as a guided generation encodes them.
        **{name: {"input_ids": ids[name].to(device)} for name in texts},
        "unet": unet_feeds,
        # Unscaled latents, as the decoder sees them: ~N(0, 1) / 0.18215 for SD.
        "vae_decoder": {"latent_sample": randn(n, vae.latent_channels, h, w, mean=0.5,
                                               std=3.0)},
        "vae_encoder": {"sample": randn(n, vae.in_channels, h * f, w * f, mean=-0.1,
                                        std=0.5).clamp(-1, 1)},
    }


def _generation_inputs(c, manifest, device, nets=(), g=None):
    """The inputs each network saw in a 2-step guided generation at the export's shapes
    (the UNet's ControlNets and adapters, which that generation does not run, get random
    images)."""
    from sdrt.engine.loading import Components
    from sdrt.engine.pipeline import Pipeline
    texts = {name: _TextRecorder(getattr(c, name)) for name in c.family.text_encoders}
    unet = _Recorder(c.unet, ("sample", "timestep", "encoder_hidden_states"))
    vae = _VAERecorder(c.vae)
    pipe = Pipeline(Components(texts.get("text_encoder"), unet, vae, c.tokenizer,
                               c.scheduler_config, c.source, texts.get("text_encoder_2"),
                               c.tokenizer_2, c.family, c.model_index),
                    device, torch.float32)
    pipe(PROMPT, height=manifest["height"], width=manifest["width"], num_inference_steps=2,
         guidance_scale=7.5, seed=0, num_images_per_prompt=manifest["batch"], output_type="np")
    (z,), image = vae.last_decode
    unet_feeds = dict(unet.last)
    unet_feeds["timestep"] = unet_feeds["timestep"].reshape(-1)[0].float()
    if any(nets):
        unet_feeds.update(_control_feeds(nets, image.shape[0] * 2, *image.shape[2:], device, g))
    return {**{name: {"input_ids": text.last["input_ids"]} for name, text in texts.items()},
            "unet": unet_feeds,
            "vae_decoder": {"latent_sample": z},
            "vae_encoder": {"sample": image.clamp(-1, 1)}}


def _layer_states(encoder, ids):
    """sdrt's outputs for an SDXL text encoder, in Optimum's order (``output_names``), through
    the calls the pipeline makes: ``encode`` for the final states and the pooled output, and
    ``encoder(ids, clip_skip=L - k, final_norm=False)`` for the states after layer k."""
    layers = encoder.config.num_hidden_layers
    last, pooled = encoder.encode(ids)
    states = [encoder.text_model.embeddings(ids)]  # hidden_states.0: before the first layer
    states += [encoder(ids, clip_skip=layers - k, final_norm=False) for k in range(1, layers)]
    states.append(encoder.encode(ids, final_norm=False)[0])  # after the last layer, no norm
    head = (pooled, last) if encoder.config.with_projection else (last, pooled)
    return (*head, *states)


def reference(c, name, feeds, nets=((), ())):
    """sdrt's outputs for one network, as a tuple in the export's output order; ``nets``:
    the ControlNets and the T2I-Adapters the UNet runs."""
    if name.startswith("text_encoder"):
        ids = feeds["input_ids"]
        encoder = getattr(c, name)
        if c.family.penultimate:
            return _layer_states(encoder, ids)
        states = encoder(ids)
        return states, states[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
    if name == "unet":
        control = input_names(*nets)
        extra = {k: v for k, v in feeds.items()
                 if k not in ("sample", "timestep", "encoder_hidden_states", *control)}
        args = (feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])
        if control:
            unet = ControlledUNet(c.unet, nets[0], tuple(extra), nets[1])
            return (unet(*args, *extra.values(), *(feeds[k] for k in control)),)
        return (c.unet(*args, **extra),)
    if name == "vae_decoder":
        return (c.vae.decode(feeds["latent_sample"]),)
    return (vae_moments(c.vae, feeds["sample"]),)


def _sources(manifest, field, what):
    """The manifest's ``field`` entries (LoRAs merged, embeddings added, ControlNets run),
    each of whose ``source`` the comparison needs."""
    entries = manifest.get(field) or []
    for e in entries:
        if not os.path.exists(e["source"]):
            raise SdrtError(f"the export holds {what} {e.get('name', e.get('token'))!r}, made "
                            f"from {e['source']}, which is gone: check-onnx compares with it")
    return entries


def _controlnets(manifest, c, device):
    """The ControlNets and the T2I-Adapters the exported UNet runs (two lists), loaded from
    their sources for the model ``c``."""
    paths = [e["source"] for field, what in (("controlnets", "ControlNet"),
                                             ("adapters", "T2I-Adapter"))
             for e in _sources(manifest, field, what)]
    nets, adapters, _ = load_controlnets(paths, c.unet, torch.float32, c.vae.config.scale_factor)
    return [n.to(device) for n in nets], [a.to(device) for a in adapters]


class _NoTF32:
    """Full-precision float32 on the GPU while the reference runs (TF32 would be off by 1e-3)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


@torch.no_grad()
def check_onnx(onnx_dir, model_path=None, device=None, seed=0):
    """Run every exported network in onnxruntime and in sdrt; a list of CheckRow, one per
    (network output, input set). ``model_path`` defaults to the model the export came from."""
    from sdrt.engine.loading import load
    from sdrt.engine.pipeline import resolve_device
    device, _ = resolve_device(device, torch.float32)
    sessions, manifest = load_sessions(onnx_dir, device, tf32=False)
    model_path = model_path or manifest.get("source")
    if not model_path:
        raise SdrtError("no model to compare with: pass --model")
    c = load(model_path, device, torch.float32, config=manifest.get("config"),
             prediction_type=manifest.get("prediction_type"))
    if c.family != manifest_family(manifest):
        raise SdrtError(f"{model_path} is an {c.family.label} model; the export is of an "
                        f"{manifest_family(manifest).label} one")
    merge_loras(c, [(e["source"], e["scale"]) for e in _sources(manifest, "loras", "LoRA")])
    add_embeddings(c, [e["source"] for e in _sources(manifest, "embeddings", "embedding")])
    configs = {name: getattr(c, name).config for name in ("unet", "vae", *c.family.text_encoders)}
    nets = _controlnets(manifest, c, device)
    tol = TOLERANCES[manifest["dtype"]]
    g = torch.Generator().manual_seed(seed)
    rows = []
    with _NoTF32():
        input_sets = {"random": _random_inputs(manifest, configs, sessions["unet"].inputs,
                                               device, g, c.family, nets),
                      "generation": _generation_inputs(c, manifest, device, nets, g)}
        for name in models_of(c.family):
            for kind, inputs in input_sets.items():
                feeds = inputs[name]
                ours = sessions[name](**feeds)
                ref = reference(c, name, feeds, nets)
                outputs = sessions[name].output_names
                for out_name, o, r in zip(outputs, ours, ref):
                    label = name if len(outputs) == 1 else f"{name}.{out_name}"
                    rows.append(compare(label, kind, o, r, tol))
    return rows


def format_table(rows):
    """A plain-text table: model, inputs, max abs error, relative error, tolerance, result."""
    header = ("model", "inputs", "max abs error", "relative error", "tolerance", "result")
    lines = [(r.model, r.inputs, f"{r.max_abs:.3e}", f"{r.rel:.3e}", f"{r.tol:.0e}",
              "pass" if r.passed else "FAIL") for r in rows]
    widths = [max(len(x[i]) for x in [header] + lines) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])
