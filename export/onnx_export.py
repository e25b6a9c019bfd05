"""Export sdrt's own text encoder, UNet and VAE to ONNX: ``sdrt export onnx``.

The exporter is ``torch.onnx.export(..., dynamo=True)``: torch.export captures the modules, and
onnxscript translates the graph. The legacy TorchScript exporter (``dynamo=False``) still ships
with torch 2.13 but is deprecated, and it cannot export sdrt's UNet: the tracer records
``x.shape[-1]`` as a graph value, and its LayerNorm translation refuses a normalized shape that
is not a constant.

The modules run their plain-PyTorch ops while exporting (``SDRT_BACKEND=torch``): the Triton
kernels are not ONNX operators. Each file is written into a temporary folder beside the target,
checked with ``onnx.checker``, and the folder renamed into place only once all four files and
``sdrt_export.json`` are there.
"""
import contextlib
import logging
import os
import time
import warnings
from dataclasses import asdict

import torch
from torch import nn

from sdrt.engine.atomic import check_new_folder, write_folder
from sdrt.engine.errors import SdrtError

from .onnx_manifest import DTYPES, FILES, MODELS, NAMES, sdrt_version, write_manifest

# The dynamo exporter implements its operators at opset 18; asking for less runs onnx's version
# converter, which wrote invalid models (Split with num_outputs at opset 17) in our tests.
# torch 2.13's exporter knows no operator set past 23.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18
# A protobuf message cannot pass 2 GiB: past this many bytes of weights (SD 1.5's fp32 UNet has
# 3.4 GB) the weights go to ``<name>.onnx.data`` beside the graph.
EXTERNAL_DATA_BYTES = int(1.8e9)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):  # (B, 77) int64 → (B, 77, D)
        return self.text_encoder(input_ids)


class _UNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):  # timestep: (1,) float32
        return self.unet(sample, timestep, encoder_hidden_states)


class _VAEDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):  # unscaled latents (B, 4, h, w) → image (B, 3, H, W)
        return self.vae.decode(latent)


class _VAEEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):  # image (B, 3, H, W) in [-1, 1] → (mean, std), each (B, 4, h, w)
        return self.vae.encode(image)


def _check_args(model_path, out_dir, height, width, batch, dtype, opset, prediction_type):
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise SdrtError(f"unsupported opset {opset}: the exporter writes opsets "
                        f"{MIN_OPSET} to {MAX_OPSET}")
    if dtype not in DTYPES:
        raise SdrtError(f"unsupported dtype {dtype}: use {' or '.join(DTYPES)}")
    if not isinstance(batch, int) or batch < 1:
        raise SdrtError(f"batch must be a positive integer, got {batch}")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (not isinstance(v, int) or v % 8 or not 8 <= v <= 4096):
            raise SdrtError(f"{name} must be a multiple of 8 between 8 and 4096, got {v}")
    if not os.path.exists(model_path):
        raise SdrtError(f"model path {model_path} does not exist")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise SdrtError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
    check_new_folder(out_dir)
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise SdrtError(f"ONNX export needs the {module} package: pip install 'sdrt[onnx]'")


@contextlib.contextmanager
def _exporting():
    """Plain-PyTorch ops, and the exporter's INFO/WARNING chatter (missing torchvision ops,
    progress lines) kept off the user's terminal; both restored afterwards."""
    old_backend = os.environ.get("SDRT_BACKEND")
    log = logging.getLogger("torch.onnx")
    old_level = log.level
    os.environ["SDRT_BACKEND"] = "torch"
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch.export's own deprecation notices and dynamic-axis renaming remarks.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
            yield
    finally:
        log.setLevel(old_level)
        if old_backend is None:
            del os.environ["SDRT_BACKEND"]
        else:
            os.environ["SDRT_BACKEND"] = old_backend


def _specs(c, height, width, batch, dtype, dynamic):
    """For each network: (wrapper module, example inputs, dynamic_shapes or None)."""
    from torch.export import Dim
    f = c.vae.config.scale_factor
    h, w = height // f, width // f
    # torch.export specialises an axis whose example size is 1: dynamic examples use batch ≥ 2.
    n = max(batch, 2) if dynamic else batch
    g = torch.Generator().manual_seed(0)
    seq, vocab = c.text_encoder.config.max_position_embeddings, c.text_encoder.config.vocab_size
    # The pipeline encodes each prompt and each init image once, then repeats the result per
    # image: static exports take one at a time (the runtime splits larger batches into calls).
    one = n if dynamic else 1
    ids = torch.randint(0, vocab, (one, seq), generator=g)
    states = torch.randn(2 * n, seq, c.unet.config.cross_attention_dim, generator=g).to(dtype)
    sample = torch.randn(2 * n, c.unet.config.in_channels, h, w, generator=g).to(dtype)
    timestep = torch.tensor([999.0])
    latent = torch.randn(n, c.vae.config.latent_channels, h, w, generator=g).to(dtype)
    image = torch.rand(one, c.vae.config.in_channels, height, width, generator=g).to(dtype) * 2 - 1
    specs = {
        "text_encoder": (_TextEncoder(c.text_encoder), (ids,)),
        "unet": (_UNet(c.unet), (sample, timestep, states)),
        "vae_decoder": (_VAEDecoder(c.vae), (latent,)),
        "vae_encoder": (_VAEEncoder(c.vae), (image,)),
    }
    if not dynamic:
        return {m: (module, args, None) for m, (module, args) in specs.items()}
    batch_dim = Dim("batch", min=1, max=1024)
    lh, lw = Dim("latent_height", min=1, max=4096 // f), Dim("latent_width", min=1, max=4096 // f)
    shapes = {
        "text_encoder": {"input_ids": {0: batch_dim}},
        "unet": {"sample": {0: batch_dim, 2: lh, 3: lw}, "timestep": None,
                 "encoder_hidden_states": {0: batch_dim}},
        "vae_decoder": {"latent": {0: batch_dim, 2: lh, 3: lw}},
        "vae_encoder": {"image": {0: batch_dim, 2: f * lh, 3: f * lw}},
    }
    return {m: (module, args, shapes[m]) for m, (module, args) in specs.items()}


def _value_info(values):
    """{name: {"shape": [...], "dtype": ...}} of ONNX graph inputs or outputs; symbolic axes
    are their names."""
    import onnx
    out = {}
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        out[v.name] = {"shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
            t.elem_type).name}
    return out


def _export_one(name, module, args, dynamic_shapes, folder, opset, external_data_bytes):
    import onnx
    inputs, outputs = NAMES[name]
    program = torch.onnx.export(module, args, input_names=list(inputs),
                                output_names=list(outputs), opset_version=opset, dynamo=True,
                                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    # The weights the graph kept: the VAE's decoder export holds none of its encoder's.
    n_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                  if v.const_value is not None)
    external = n_bytes > external_data_bytes
    path = os.path.join(folder, FILES[name])
    # ONNXProgram.save streams initializers to ``<file>.data`` when asked: going through
    # onnx.save would first build the whole ModelProto in memory, twice the weights' size.
    program.save(path, external_data=external)
    # The path form reads external data from beside the file, and has no 2 GiB limit.
    onnx.checker.check_model(path)
    graph = onnx.load(path, load_external_data=False).graph
    side = sorted(f for f in os.listdir(folder) if f.startswith(FILES[name] + "."))
    return {"file": FILES[name], "external_data": side[0] if side else None,
            "weight_bytes": n_bytes, "inputs": _value_info(graph.input),
            "outputs": _value_info(graph.output)}


def export_onnx(model_path, out_dir, height=None, width=None, batch=1, dtype="fp32",
                opset=DEFAULT_OPSET, dynamic=False, external_data_bytes=EXTERNAL_DATA_BYTES,
                config=None, prediction_type=None):
    """Export a model's text encoder, UNet, VAE decoder and VAE encoder to ``out_dir``.

    ``height``/``width`` (pixels, default: the UNet's native size) and ``batch`` (images) fix
    the shapes of a static export, and are the example shapes of a ``dynamic`` one, whose
    batch, height and width axes are free. ``external_data_bytes``: networks with more bytes
    of weights than this keep them in a ``.onnx.data`` file. ``config`` (a diffusers folder
    whose configs a single-file checkpoint takes) and ``prediction_type`` are passed to
    ``sdrt.engine.loading.load``, as ``sdrt generate`` passes them. Returns the manifest
    written to ``sdrt_export.json``.
    """
    model_path, out_dir = os.fspath(model_path), os.fspath(out_dir)
    _check_args(model_path, out_dir, height, width, batch, dtype, opset, prediction_type)
    return write_folder(out_dir, lambda tmp: _export_all(
        model_path, tmp, height, width, batch, dtype, opset, dynamic, external_data_bytes,
        config, prediction_type))


def _export_all(model_path, folder, height, width, batch, dtype, opset, dynamic,
                external_data_bytes, config, prediction_type):
    """Write the four networks and the manifest into ``folder``; returns the manifest."""
    from sdrt.engine.loading import load
    t0 = time.perf_counter()
    torch_dtype = TORCH_DTYPES[dtype]
    # Exported on the CPU whatever the target: the graph does not depend on the device.
    c = load(model_path, "cpu", torch_dtype, config=config, prediction_type=prediction_type)
    f = c.vae.config.scale_factor
    native = c.unet.config.sample_size * f
    height, width = height or native, width or native
    for name, v in (("height", height), ("width", width)):
        if v % f:
            raise SdrtError(f"{name} {v} is not a multiple of the VAE's scale factor {f}")
    models = {}
    with _exporting(), torch.no_grad():
        for name, (module, args, shapes) in _specs(c, height, width, batch, torch_dtype,
                                                    dynamic).items():
            models[name] = _export_one(name, module.eval(), args, shapes, folder, opset,
                                       external_data_bytes)
    manifest = {
        "sdrt_version": sdrt_version(),
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=True)",
        "source": os.path.abspath(model_path),
        # What load() was given besides the path; check-onnx and the runtime load alike.
        "config": config and os.path.abspath(config),
        "prediction_type": prediction_type,
        "dtype": dtype,
        "opset": opset,
        "dynamic": bool(dynamic),
        # Static: the shapes of every file (each network's own batch is in its "inputs").
        # Dynamic: the example shapes it was traced at.
        "height": height,
        "width": width,
        "batch": batch,
        "export_seconds": round(time.perf_counter() - t0, 2),
        "configs": {"unet": asdict(c.unet.config), "vae": asdict(c.vae.config),
                    "text_encoder": asdict(c.text_encoder.config)},
        "scheduler_config": c.scheduler_config,
        "pad_token": getattr(c.tokenizer, "pad_token", None),
        "models": models,
    }
    write_manifest(folder, manifest)
    return manifest

__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_BYTES", "MAX_OPSET", "MIN_OPSET", "MODELS",
           "export_onnx"]
