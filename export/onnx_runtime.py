"""onnxruntime-backed stand-ins for sdrt's networks, so ``Pipeline`` runs an ONNX export.

Each stand-in has the call interface of the module it replaces:

- ``OnnxTextEncoder``: ``text_encoder(ids, clip_skip=0)`` → states (B, 77, D);
- ``OnnxUNet``: ``unet(sample, timestep, encoder_hidden_states, **extra)`` → prediction, with
  ``.config`` (UNetConfig); ``extra`` are the inputs its config adds (``unet_inputs``);
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

from sdrt.engine.clip import TextConfig
from sdrt.engine.errors import SdrtError
from sdrt.engine.loading import Components
from sdrt.engine.unet import UNetConfig
from sdrt.engine.vae import VAEConfig

from .onnx_manifest import BATCHED, FILES, NAMES, read_manifest

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
        n = next(v.shape[0] for k, v in feeds.items() if k in BATCHED)
        if self.batch is None or n == self.batch or n % self.batch:
            return self._run_once(feeds)
        parts = [self._run_once({k: v[i:i + self.batch] if k in BATCHED else v
                                 for k, v in feeds.items()}) for i in range(0, n, self.batch)]
        return [torch.cat(outs) for outs in zip(*parts)]


class OnnxTextEncoder:
    def __init__(self, model: OrtModel, config: TextConfig):
        self.model, self.config = model, config

    def __call__(self, ids, clip_skip=0):
        if clip_skip:
            raise SdrtError("the exported text encoder has no clip skip: use --runtime torch")
        states = self.model(input_ids=ids.long())[0]  # also pooler_output: unused by SD 1.x/2.x
        return states


class OnnxUNet:
    def __init__(self, model: OrtModel, config: UNetConfig):
        self.model, self.config = model, config

    def __call__(self, sample, timestep, encoder_hidden_states, **extra):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() != 1:
            if not bool((t == t[0]).all()):
                raise SdrtError("the exported UNet takes one timestep for the whole batch")
            t = t[:1]
        if not self.model.inputs["timestep"][0]:  # Optimum's UNet takes a scalar timestep
            t = t.reshape(())
        given = {k: v for k, v in extra.items() if v is not None}
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
    """{network: OrtModel} for the four networks of an export folder, and its manifest."""
    manifest = read_manifest(onnx_dir)
    models = {name: OrtModel(os.path.join(onnx_dir, FILES[name]), name, device, tf32)
              for name in NAMES}
    return models, manifest


def _tokenizer_and_scheduler(model_path, manifest):
    """From the model folder (a diffusers folder, or the export's own, which has tokenizer/
    and scheduler/ too) when it has them; otherwise (a single-file checkpoint) the export's
    config folder's tokenizer or the bundled CLIP one, and the scheduler config recorded at
    export."""
    from sdrt.engine.loading import _tokenizer
    from sdrt.engine.tokenizer import EOS
    from sdrt.engine.weights import read_json
    folder = model_path if model_path and os.path.isdir(model_path) else None
    if model_path and not os.path.exists(model_path):
        raise SdrtError(f"model path {model_path} does not exist")
    # As load() picks it: a single file takes the tokenizer of its --config folder, if any.
    tokenizer = _tokenizer(folder or manifest.get("config"), "tokenizer",
                           manifest.get("pad_token") or EOS)
    scheduler = manifest["scheduler_config"]
    path = os.path.join(folder, "scheduler", "scheduler_config.json") if folder else None
    if path and os.path.isfile(path):
        scheduler = read_json(path, "scheduler config")
        if manifest.get("prediction_type") is not None:  # the export's override, as load applies it
            scheduler = {**scheduler, "prediction_type": manifest["prediction_type"]}
    return tokenizer, scheduler


def onnx_components(onnx_dir, model_path=None, device="cpu"):
    """``Components`` whose three networks run the ONNX files of ``onnx_dir`` in onnxruntime.

    The tokenizer and scheduler config come from ``model_path`` (default: the export's own
    tokenizer/ and scheduler/). Use with ``Pipeline(components, device, dtype)``, dtype the
    export's.
    """
    onnx_dir = os.fspath(onnx_dir)
    models, manifest = load_sessions(onnx_dir, device)
    if model_path is None:
        model_path = onnx_dir
    tokenizer, scheduler = _tokenizer_and_scheduler(model_path, manifest)
    configs = manifest["configs"]
    return Components(
        OnnxTextEncoder(models["text_encoder"], TextConfig.from_dict(configs["text_encoder"])),
        OnnxUNet(models["unet"], UNetConfig.from_dict(configs["unet"])),
        OnnxVAE(models["vae_decoder"], models["vae_encoder"], VAEConfig.from_dict(configs["vae"])),
        tokenizer, scheduler, f"{onnx_dir} (ONNX of {manifest.get('source')})")
