"""onnxruntime-backed stand-ins for sdrt's networks, so ``Pipeline`` runs an ONNX export.

Each stand-in has the call interface of the module it replaces:

- ``OnnxTextEncoder``: ``text_encoder(ids, clip_skip=0, final_norm=True)`` → states
  (B, 77, D) and ``.encode(...)`` → (states, pooled), from the exported outputs: an SD export
  has the final states only; an SDXL one every layer's (``hidden_states.k``), so any
  ``clip_skip`` without the final LayerNorm, as SDXL reads them;
- ``OnnxUNet``: ``unet(sample, timestep, encoder_hidden_states, **extra)`` → prediction, with
  ``.config`` (UNetConfig); ``extra`` are the inputs its config adds (``unet_inputs``) and, for
  an export with ControlNets, their images and scales (``onnx_controlnet``);
- ``OnnxVAE``: ``vae.encode(image)`` → (mean, std) and ``vae.decode(z)`` → image, with
  ``.config`` (VAEConfig). The encoder file gives the latent Gaussian's parameters (Optimum's
  ``latent_parameters``); mean and std are taken from them as sdrt's VAE does.

Tensors go in and come out as torch tensors on the pipeline's device; they pass through numpy
on the CPU, so on a GPU each call copies its inputs and outputs across once.
"""
import os
import warnings

import numpy as np
import torch

from sdrt.engine.clip import TextConfig, kept_layers
from sdrt.engine.errors import SdrtError
from sdrt.engine.loading import Components
from sdrt.engine.unet import UNetConfig
from sdrt.engine.vae import VAEConfig

from .onnx_controlnet import KINDS, fused_controlnets
from .onnx_manifest import BATCH_AXIS, BATCHED, FILES, manifest_family, models_of, read_manifest

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def providers(device, tf32=True):
    """CUDA when the device is a GPU and this onnxruntime build has the CUDA provider; else CPU.

    ``tf32=False`` keeps float32 matmuls and convolutions in full precision on Ampere and
    later, as a cross-check against sdrt's float32 needs."""
    import onnxruntime as ort
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"use_tf32": int(tf32)}), "CPUExecutionProvider"]
        warnings.warn("this onnxruntime has no CUDAExecutionProvider: the ONNX networks run on "
                      "the CPU (pip install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


class OrtModel:
    """One exported network in an onnxruntime session, called with torch tensors by name."""

    def __init__(self, path, name, device, tf32=True):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        try:
            self.session = ort.InferenceSession(path, options, providers=providers(device, tf32))
        except Exception as e:  # onnxruntime raises its own types for a bad or missing file
            raise SdrtError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}")
        self.name, self.path, self.device = name, path, torch.device(device)
        self.inputs = {i.name: (i.shape, _NUMPY[i.type]) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The exported batch of a static network; None when the batch axis is symbolic.
        first = self.session.get_inputs()[0].shape[0]
        self.batch = first if isinstance(first, int) else None

    def _feed(self, name, t):
        shape, np_dtype = self.inputs[name]
        want = tuple(d if isinstance(d, int) else None for d in shape)
        if len(want) != t.dim() or any(w is not None and w != s for w, s in zip(want, t.shape)):
            exported = tuple(d if isinstance(d, int) else "?" for d in shape)
            raise SdrtError(f"the {self.name} file was exported for {name} of shape "
                            f"{exported}, got {tuple(t.shape)}: export again at this size, "
                            "or with --dynamic")
        return t.detach().to("cpu").numpy().astype(np_dtype, copy=False)

    def _run_once(self, feeds):
        outs = self.session.run(self.output_names,
                                {k: self._feed(k, v) for k, v in feeds.items()})
        return [torch.from_numpy(o).to(self.device) for o in outs]

    def __call__(self, **feeds):
        """Outputs in the order the export named them. A batch that is a multiple of a static
        network's batch runs as several exported-size calls."""
        n = next(v.shape[BATCH_AXIS.get(k, 0)] for k, v in feeds.items() if k in BATCHED)
        if self.batch is None or n == self.batch or n % self.batch:
            return self._run_once(feeds)
        parts = [self._run_once({k: v.narrow(BATCH_AXIS.get(k, 0), i, self.batch)
                                 if k in BATCHED else v for k, v in feeds.items()})
                 for i in range(0, n, self.batch)]
        return [torch.cat(outs) for outs in zip(*parts)]


class OnnxTextEncoder:
    def __init__(self, model: OrtModel, config: TextConfig):
        self.model, self.config = model, config
        names = model.output_names
        self.layer_states = any(name.startswith("hidden_states.") for name in names)
        # Optimum's pooled output: CLIPTextModel's pooler_output, or the projected text_embeds.
        self.pooled_name = "text_embeds" if "text_embeds" in names else "pooler_output"

    def _outputs(self, ids):
        return dict(zip(self.model.output_names, self.model(input_ids=ids.long())))

    def _states(self, outputs, clip_skip, final_norm):
        if final_norm and not clip_skip:
            return outputs["last_hidden_state"]
        if final_norm or not self.layer_states:
            raise SdrtError("the exported text encoder gives the final layer's states only: "
                            "no clip skip; use --runtime torch")
        return outputs[f"hidden_states.{kept_layers(clip_skip, self.config.num_hidden_layers)}"]

    def __call__(self, ids, clip_skip=0, final_norm=True):
        return self._states(self._outputs(ids), clip_skip, final_norm)

    def encode(self, ids, clip_skip=0, final_norm=True):
        """(states, pooled): the pooled output is the exported one (SDXL's second encoder:
        projected), whatever layer the states are read at."""
        outputs = self._outputs(ids)
        return self._states(outputs, clip_skip, final_norm), outputs[self.pooled_name]


class OnnxUNet:
    """``controlnets``: {name: FusedControlNet} of the ControlNets and T2I-Adapters the file
    runs (its manifest's), whose images and scales a call passes as ``controlnet_images`` and
    ``controlnet_scales`` (``adapter_images``, ``adapter_scales``); a call without those of
    a kind runs its nets at scale 0. ``scale_factor``: the VAE's, from the latents' size to
    the control images'."""

    def __init__(self, model: OrtModel, config: UNetConfig, controlnets=None, scale_factor=8):
        self.model, self.config = model, config
        self.controlnets, self.scale_factor = controlnets or {}, scale_factor
        self._zeros = {}  # (shape, dtype, device) → the zero images and scales of unused nets

    def _unused(self, n, sample):
        """Zero images and scales for ``n`` nets of a call without them, kept per shape: the
        same tensors for every call of a run (onnxruntime only reads them)."""
        f = self.scale_factor
        shape = (n, sample.shape[0], 3, sample.shape[2] * f, sample.shape[3] * f)
        key = (shape, sample.dtype, sample.device)
        if key not in self._zeros:
            if len(self._zeros) >= 4:  # (a few sizes at most: forget the oldest)
                self._zeros.pop(next(iter(self._zeros)))
            self._zeros[key] = (sample.new_zeros(shape), sample.new_zeros(n))
        return self._zeros[key]

    def __call__(self, sample, timestep, encoder_hidden_states, **extra):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() != 1:
            if not bool((t == t[0]).all()):
                raise SdrtError("the exported UNet takes one timestep for the whole batch")
            t = t[:1]
        if not self.model.inputs["timestep"][0]:  # Optimum's UNet takes a scalar timestep
            t = t.reshape(())
        given = {k: v for k, v in extra.items() if v is not None}
        for kind, (_, (images, scales)) in KINDS.items():
            n = sum(net.kind == kind for net in self.controlnets.values())
            if n and images not in given:
                given[images], given[scales] = self._unused(n, sample)
        unknown = sorted(set(given) - set(self.model.inputs))
        if unknown:
            raise SdrtError(f"the exported UNet has no input {', '.join(unknown)}: export the "
                            "model again")
        (out,) = self.model(sample=sample, timestep=t,
                            encoder_hidden_states=encoder_hidden_states, **given)
        return out


class OnnxVAE:
    def __init__(self, decoder: OrtModel, encoder: OrtModel, config: VAEConfig):
        self.decoder, self.encoder, self.config = decoder, encoder, config

    def decode(self, z):
        (image,) = self.decoder(latent_sample=z)
        return image

    def encode(self, image):
        (moments,) = self.encoder(sample=image)
        mean, logvar = moments.float().chunk(2, dim=1)
        # As AutoencoderKL.encode: std of the clamped log-variance.
        return mean.to(moments.dtype), torch.exp(0.5 * logvar.clamp(-30.0, 20.0)).to(moments.dtype)


def load_sessions(onnx_dir, device, tf32=True):
    """{network: OrtModel} for the networks of an export folder, and its manifest."""
    manifest = read_manifest(onnx_dir)
    models = {name: OrtModel(os.path.join(onnx_dir, FILES[name]), name, device, tf32)
              for name in models_of(manifest_family(manifest))}
    return models, manifest


def _tokenizers_and_scheduler(model_path, manifest, family=None):
    """From the model folder (a diffusers folder, or the export's own, which has the tokenizer
    folders and scheduler/ too) when it has them; otherwise (a single-file checkpoint) the
    export's config folder's tokenizers or the bundled CLIP one, and the scheduler config
    recorded at export."""
    from sdrt.engine.loading import family_tokenizers
    from sdrt.engine.weights import read_json
    family = family or manifest_family(manifest)
    folder = model_path if model_path and os.path.isdir(model_path) else None
    if model_path and not os.path.exists(model_path):
        raise SdrtError(f"model path {model_path} does not exist")
    # As load() picks them: a single file takes the tokenizers of its --config folder, if any.
    tokenizers = family_tokenizers(folder or manifest.get("config"), family, {
        "tokenizer": manifest.get("pad_token"), "tokenizer_2": manifest.get("pad_token_2")})
    scheduler = manifest["scheduler_config"]
    path = os.path.join(folder, "scheduler", "scheduler_config.json") if folder else None
    if path and os.path.isfile(path):
        scheduler = read_json(path, "scheduler config")
        if manifest.get("prediction_type") is not None:  # the export's override, as load applies it
            scheduler = {**scheduler, "prediction_type": manifest["prediction_type"]}
    return tokenizers, scheduler


def _with_embeddings(tokenizers, entries, vocab_size):
    """The export's embedding tokens (the manifest's ``entries``) in each tokenizer, with the
    ids of their rows in the exported text encoders (``vocab_size`` rows, the last of them
    the embeddings'): added to a tokenizer without them (the source model's), checked in one
    that has them (the export's own folders)."""
    from sdrt.engine.embeddings import token_names
    next_id = vocab_size - sum(e["vectors"] for e in entries)
    for e in entries:
        names = token_names(e["token"], e["vectors"])
        ids = list(range(next_id, next_id + len(names)))
        next_id += len(names)
        for name, tokenizer in tokenizers.items():
            if not any(n in tokenizer.embedding_tokens for n in names):
                if tokenizer.vocab_size != ids[0]:
                    raise SdrtError(f"the export's embedding {e['token']!r} has the token ids "
                                    f"from {ids[0]}, but {name} has {tokenizer.vocab_size} "
                                    f"tokens before it: use the export's own tokenizers")
                tokenizer.add_embedding_tokens(names)
            elif [tokenizer.embedding_tokens.get(n) for n in names] != ids:
                raise SdrtError(f"{name} holds the export's embedding {e['token']!r} under other "
                                f"token ids than its text encoder's rows {ids[0]}..{ids[-1]}")


def onnx_components(onnx_dir, model_path=None, device="cpu"):
    """``Components`` whose networks run the ONNX files of ``onnx_dir`` in onnxruntime.

    The tokenizers and scheduler config come from ``model_path`` (default: the export's own
    tokenizer folders and scheduler/). Use with ``Pipeline(components, device, dtype)``, dtype
    the export's.
    """
    onnx_dir = os.fspath(onnx_dir)
    models, manifest = load_sessions(onnx_dir, device)
    family = manifest_family(manifest)
    if model_path is None:
        model_path = onnx_dir
    tokenizers, scheduler = _tokenizers_and_scheduler(model_path, manifest, family)
    configs = manifest["configs"]
    _with_embeddings(tokenizers, manifest.get("embeddings") or [],
                     configs[family.text_encoders[0]]["vocab_size"])
    texts = {name: OnnxTextEncoder(models[name], TextConfig.from_dict(configs[name]))
             for name in family.text_encoders}
    return Components(
        texts.get("text_encoder"),
        OnnxUNet(models["unet"], UNetConfig.from_dict(configs["unet"]),
                 fused_controlnets(manifest),
                 VAEConfig.from_dict(configs["vae"]).scale_factor),
        OnnxVAE(models["vae_decoder"], models["vae_encoder"], VAEConfig.from_dict(configs["vae"])),
        tokenizers.get("tokenizer"), scheduler, f"{onnx_dir} (ONNX of {manifest.get('source')})",
        texts.get("text_encoder_2"), tokenizers.get("tokenizer_2"), family,
        manifest.get("model_index") or {})
