"""Export sdrt's own text encoders, UNet and VAE to ONNX: ``sdrt export onnx``.

The folder is Optimum's Stable Diffusion (SDXL) layout (``onnx_manifest``), so Optimum's
``ORTStableDiffusionPipeline`` (``ORTStableDiffusionXLPipeline``, ``...XLImg2ImgPipeline``) and
ONNX Runtime's Stable Diffusion optimizer read it as they read ``optimum-cli``'s export. After
the exporter, ``onnx_ort_patterns.rewrite_for_ort`` rewrites GroupNorm, GEGLU and attention
into the node forms ORT's optimizer fuses; with ``optimize="ort"`` that optimizer then runs
(``onnx_optimize``). ControlNets and T2I-Adapters can run inside the UNet
(``onnx_controlnet``), and LoRAs can be merged into the weights (``merge_loras``).

The exporter is ``torch.onnx.export(..., dynamo=True)``: torch.export captures the modules, and
onnxscript translates the graph. The legacy TorchScript exporter (``dynamo=False``) still ships
with torch 2.13 but is deprecated, and it cannot export sdrt's UNet: the tracer records
``x.shape[-1]`` as a graph value, and its LayerNorm translation refuses a normalized shape that
is not a constant.

The modules run their plain-PyTorch ops while exporting (``SDRT_BACKEND=torch``): the Triton
kernels are not ONNX operators. Each file is written into a temporary folder beside the target,
checked with ``onnx.checker``, and the folder renamed into place only once every file and
``sdrt_export.json`` are there.
"""
import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict

import torch
from torch import nn

from sdrt.engine.atomic import check_new_folder, write_folder
from sdrt.engine.errors import SdrtError, check_file
from sdrt.engine.lora import check_scale
from sdrt.engine.weights import read_json

from .onnx_controlnet import (ControlledUNet, check_paths, control_examples, input_names,
                              load_controlnets)
from .onnx_manifest import (DTYPES, FILES, MODELS, NAMES, output_names, sdrt_version,
                            unet_inputs, write_manifest)

# The dynamo exporter implements its operators at opset 18; asking for less runs onnx's version
# converter, which wrote invalid models (Split with num_outputs at opset 17) in our tests.
# torch 2.13's exporter knows no operator set past 23.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18
# A protobuf message cannot pass 2 GiB: past this many bytes of weights (SD 1.5's fp32 UNet has
# 3.4 GB) the weights go to ``model.onnx.data`` beside the graph.
EXTERNAL_DATA_BYTES = int(1.8e9)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
OPTIMIZERS = (None, "ort")


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):  # (B, 77) int64 → (B, 77, D), (B, D)
        states = self.text_encoder(input_ids)
        # CLIP's pooled output: the final state at the end-of-text token, the largest id of
        # CLIP's vocabulary (transformers' rule for these configs; argmax takes the first).
        rows = torch.arange(states.shape[0], device=states.device)
        return states, states[rows, input_ids.argmax(dim=-1)]


class _LayerStates(nn.Module):
    """An SDXL text encoder with Optimum's outputs: CLIPTextModel's (last_hidden_state,
    pooler_output) or CLIPTextModelWithProjection's (text_embeds, last_hidden_state), then
    ``hidden_states.0`` (the embeddings) to ``hidden_states.{L}`` (after layer L, before the
    final LayerNorm), transformers' ``output_hidden_states``. The pooled row is at
    ``eos_positions``, as sdrt's ``encode`` takes it."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):  # (B, 77) int64 → (B, 77, D) ×2, (B, D or P), (B, 77, D) × L+1
        te = self.text_encoder
        tm = te.text_model
        x = tm.embeddings(input_ids)
        states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            states.append(x)
        last = tm.final_layer_norm(x)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = last[rows, te.eos_positions(input_ids)]
        if te.config.with_projection:
            return (te.text_projection(pooled), last, *states)
        return (last, pooled, *states)


class _UNet(nn.Module):
    """The UNet with its inputs in ``unet_inputs(config)`` order, passed by name."""

    def __init__(self, unet, names):
        super().__init__()
        self.unet, self.extra = unet, names[3:]

    def forward(self, sample, timestep, encoder_hidden_states, *extra):  # timestep: () float32
        return self.unet(sample, timestep, encoder_hidden_states, **dict(zip(self.extra, extra)))


class _VAEDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):  # unscaled latents (B, 4, h, w) → image (B, 3, H, W)
        return self.vae.decode(latent_sample)


def vae_moments(vae, sample):
    """Image (B, 3, H, W) → the latent Gaussian's parameters (B, 2·latent_channels, h, w), mean
    then log-variance: diffusers' encoder output, which Optimum's pipeline takes."""
    moments = vae.encoder(sample)
    return moments if vae.quant_conv is None else vae.quant_conv(moments)


class _VAEEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):  # image (B, 3, H, W) in [-1, 1] → (B, 8, h, w)
        return vae_moments(self.vae, sample)


def merge_loras(c, loras):
    """Patch the LoRAs ``loras`` ((path, scale) pairs, a scale one number or (UNet's, text
    encoders')) into the text encoders and UNet of the ``Components`` ``c``, as the pipeline
    does; the manifest's entries for them (a pair as a list)."""
    if not loras:
        return []
    from sdrt.engine.lora import LoraManager
    manager = LoraManager({"unet": c.unet, **{t: getattr(c, t) for t in c.family.text_encoders}},
                          family=c.family.name)
    entries = []
    for path, scale in loras:
        name = manager.load(path, scale)
        scale = manager.adapters[name]  # one number, or (UNet's, text encoders')
        entries.append({"name": name, "source": path,
                        "scale": list(scale) if isinstance(scale, tuple) else scale})
    return entries


def add_embeddings(c, paths):
    """Add the textual-inversion embeddings in ``paths`` to the tokenizers and text encoders
    of the ``Components`` ``c``, as the pipeline does; the manifest's entries for them."""
    from sdrt.engine.embeddings import add_embedding
    loaded = {}
    tokenizers = {t: getattr(c, t) for t in c.family.tokenizers}
    encoders = {t: getattr(c, t) for t in c.family.text_encoders}
    entries = []
    for path in paths:
        token = add_embedding(tokenizers, encoders, c.family, path, None, loaded)
        vectors = len(next(iter(loaded[token].values())))
        entries.append({"token": token, "vectors": vectors, "source": path})
    return entries


def _check_args(model_path, out_dir, height, width, batch, dtype, opset, prediction_type,
                optimize, target, controlnets, loras, embeddings=()):
    if optimize not in OPTIMIZERS:
        raise SdrtError(f"unknown optimizer {optimize!r}: use ort")
    if optimize is not None:
        from .onnx_optimize import check_optimize_args
        check_optimize_args(target)
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
    check_paths(controlnets)
    if isinstance(loras, (str, os.PathLike)) or not isinstance(loras, (list, tuple)):
        raise SdrtError("loras must be a list of (.safetensors file, scale) pairs")
    for entry in loras:
        path = entry[0] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if not isinstance(path, (str, os.PathLike)):
            raise SdrtError(f"loras must hold (.safetensors file, scale) pairs, got {entry!r}")
        check_file(path, "LoRA")
        check_scale(entry[1])
    if isinstance(embeddings, (str, os.PathLike)) or not isinstance(embeddings, (list, tuple)):
        raise SdrtError("embeddings must be a list of .safetensors files")
    for path in embeddings:
        check_file(path, "embedding")
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


def _specs(c, height, width, batch, dtype, dynamic, nets=(), adapters=()):
    """For each network: (wrapper module, example inputs, dynamic_shapes or None, input names,
    output names). ``nets``, ``adapters``: the ControlNets and T2I-Adapters the UNet runs
    (``onnx_controlnet``)."""
    from torch.export import Dim
    f = c.vae.config.scale_factor
    h, w = height // f, width // f
    # torch.export specialises an axis whose example size is 1: dynamic examples use batch ≥ 2.
    n = max(batch, 2) if dynamic else batch
    g = torch.Generator().manual_seed(0)
    family = c.family
    texts = {name: getattr(c, name) for name in family.text_encoders}
    seq = next(iter(texts.values())).config.max_position_embeddings
    # The pipeline encodes each prompt and each init image once, then repeats the result per
    # image: static exports take one at a time (the runtime splits larger batches into calls).
    one = n if dynamic else 1
    unet_spec = unet_inputs(c.unet.config, family.num_time_ids)
    unet_names = tuple(unet_spec)
    unet_args = []
    for name, shape in unet_spec.items():
        if name == "timestep":
            unet_args.append(torch.tensor(999.0))
        else:
            shape = {"sample": (c.unet.config.in_channels, h, w),
                     "encoder_hidden_states": (seq, c.unet.config.cross_attention_dim)}.get(
                         name, shape)
            unet_args.append(torch.randn(2 * n, *shape, generator=g).to(dtype))
    unet_module = _UNet(c.unet, unet_names)
    if nets or adapters:
        unet_module = ControlledUNet(c.unet, nets, unet_names[3:], adapters)
        for of_kind in (nets, adapters):
            if of_kind:
                unet_args += control_examples(of_kind, 2 * n, height, width, dtype, g)
        unet_names += input_names(nets, adapters)
    latent = torch.randn(n, c.vae.config.latent_channels, h, w, generator=g).to(dtype)
    image = torch.rand(one, c.vae.config.in_channels, height, width, generator=g).to(dtype) * 2 - 1
    specs = {}
    for name, encoder in texts.items():
        ids = torch.randint(0, encoder.config.vocab_size, (one, seq), generator=g)
        wrapper = _LayerStates(encoder) if family.penultimate else _TextEncoder(encoder)
        specs[name] = (wrapper, (ids,), NAMES[name][0])
    specs.update({
        "unet": (unet_module, tuple(unet_args), unet_names),
        "vae_decoder": (_VAEDecoder(c.vae), (latent,), NAMES["vae_decoder"][0]),
        "vae_encoder": (_VAEEncoder(c.vae), (image,), NAMES["vae_encoder"][0]),
    })
    outputs = {m: output_names(m, family, getattr(texts.get(m), "config", None)) for m in specs}
    if not dynamic:
        return {m: (module, args, None, names, outputs[m])
                for m, (module, args, names) in specs.items()}
    batch_dim = Dim("batch", min=1, max=1024)
    lh, lw = Dim("latent_height", min=1, max=4096 // f), Dim("latent_width", min=1, max=4096 // f)
    unet_shapes = {name: None if name in ("timestep", "controlnet_scales", "adapter_scales")
                   else {0: batch_dim} for name in unet_names}
    unet_shapes["sample"] = {0: batch_dim, 2: lh, 3: lw}
    # The ControlNets' and adapters' images: (N, batch, 3, H, W), the net axis fixed.
    for name in ("controlnet_images", "adapter_images"):
        unet_shapes[name] = {1: batch_dim, 3: f * lh, 4: f * lw}
    shapes = {
        **{name: {"input_ids": {0: batch_dim}} for name in texts},
        # By _UNet's arguments: the inputs past the third, where there are some, are its
        # *extra, one tuple.
        "unet": tuple(unet_shapes[name] for name in unet_names[:3]) + (
            (tuple(unet_shapes[name] for name in unet_names[3:]),) if unet_names[3:] else ()),
        "vae_decoder": {"latent_sample": {0: batch_dim, 2: lh, 3: lw}},
        "vae_encoder": {"sample": {0: batch_dim, 2: f * lh, 3: f * lw}},
    }
    return {m: (module, args, shapes[m], names, outputs[m])
            for m, (module, args, names) in specs.items()}


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


def _export_one(name, module, args, dynamic_shapes, input_names, folder, opset,
                external_data_bytes, outputs=None):
    import onnx

    from .onnx_ort_patterns import rewrite_for_ort
    outputs = outputs or NAMES[name][1]
    program = torch.onnx.export(module, args, input_names=list(input_names),
                                output_names=list(outputs), opset_version=opset, dynamo=True,
                                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    # The weights the graph kept: the VAE's decoder export holds none of its encoder's.
    n_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                  if v.const_value is not None)
    external = n_bytes > external_data_bytes
    path = os.path.join(folder, FILES[name])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # ONNXProgram.save streams initializers to ``model.onnx.data`` when asked: going through
    # onnx.save would first build the whole ModelProto in memory, twice the weights' size.
    program.save(path, external_data=external)
    del program
    # The graph alone (external weights stay where they are) through the ORT-form rewrite.
    model = onnx.load(path, load_external_data=False)
    rewritten = rewrite_for_ort(model)
    onnx.save(model, path)
    # The path form reads external data from beside the file, and has no 2 GiB limit.
    onnx.checker.check_model(path)
    side = sorted(f for f in os.listdir(os.path.dirname(path)) if f.startswith("model.onnx."))
    return {"file": FILES[name], "external_data": side[0] if side else None,
            "weight_bytes": _initializer_bytes(model.graph), "ort_forms": rewritten,
            "inputs": _value_info(model.graph.input), "outputs": _value_info(model.graph.output)}


def _initializer_bytes(graph):
    """Bytes of every initializer, from its shape and type (its data may be external)."""
    import numpy as np
    import onnx
    return sum(int(np.prod(t.dims, dtype=np.int64)) *
               onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in graph.initializer)


def export_onnx(model_path, out_dir, height=None, width=None, batch=1, dtype="fp32",
                opset=DEFAULT_OPSET, dynamic=False, external_data_bytes=EXTERNAL_DATA_BYTES,
                config=None, prediction_type=None, optimize=None, target="cuda",
                controlnets=(), loras=(), embeddings=()):
    """Export a model's text encoder(s), UNet, VAE decoder and VAE encoder to ``out_dir``, in
    Optimum's Stable Diffusion (or SDXL) layout.

    ``height``/``width`` (pixels, default: the UNet's native size) and ``batch`` (images) fix
    the shapes of a static export, and are the example shapes of a ``dynamic`` one, whose
    batch, height and width axes are free. ``external_data_bytes``: networks with more bytes
    of weights than this keep them in a ``model.onnx.data`` file. ``config`` (a diffusers
    folder whose configs a single-file checkpoint takes) and ``prediction_type`` are passed to
    ``sdrt.engine.loading.load``, as ``sdrt generate`` passes them.

    ``optimize="ort"`` runs ONNX Runtime's Stable Diffusion optimizer on every network for the
    execution provider ``target`` ("cuda": ORT's full set of fusions, whose operators only the
    CUDA provider runs; "cpu": those the CPU provider runs), converting to float16 when
    ``dtype="fp16"`` (the export itself is then float32, as ORT's pipeline wants), and checks
    the result against sdrt where ``target`` can run here.

    ``controlnets``: ControlNets and T2I-Adapters (diffusers folders or ``.safetensors``
    files, as ``Pipeline.load_controlnet`` takes them) that the exported UNet runs on every
    call; it then takes their images and scales as more inputs (``onnx_controlnet``). ``loras``:
    (``.safetensors`` file, scale) pairs merged into the text encoders' and the UNet's
    weights before the export, as ``Pipeline.load_lora`` patches them. ``embeddings``:
    textual-inversion ``.safetensors`` files (each named by its stem, as ``generate
    --embedding`` names them) added as ``Pipeline.load_textual_inversion`` adds them: rows of
    the exported text encoders' token tables, and tokens of the exported tokenizer folders
    (``tokenizer.write_embedding_tokens``). Returns the manifest written to
    ``sdrt_export.json``.
    """
    model_path, out_dir = os.fspath(model_path), os.fspath(out_dir)
    _check_args(model_path, out_dir, height, width, batch, dtype, opset, prediction_type,
                optimize, target, controlnets, loras, embeddings)
    return write_folder(out_dir, lambda tmp: _export_all(
        model_path, tmp, height, width, batch, dtype, opset, dynamic, external_data_bytes,
        config, prediction_type, optimize, target, [os.fspath(p) for p in controlnets],
        [(os.path.abspath(p), scale) for p, scale in loras],
        [os.path.abspath(p) for p in embeddings]))


def _source_file(model_path, config, *parts):
    """``parts`` inside the model folder, or the --config folder of a single file; None when
    neither has it."""
    for folder in (model_path if os.path.isdir(model_path) else None, config):
        if folder and os.path.isfile(os.path.join(folder, *parts)):
            return os.path.join(folder, *parts)
    return None


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


# model_index.json's class of each component, as diffusers' repositories name them.
_INDEX_CLASSES = {"text_encoder": ["transformers", "CLIPTextModel"],
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer": ["transformers", "CLIPTokenizer"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"],
                  "unet": ["diffusers", "UNet2DConditionModel"],
                  "vae": ["diffusers", "AutoencoderKL"]}
_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
              "sdxl": "StableDiffusionXLPipeline",
              "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
# A UNet that takes a mask and masked-image latents: diffusers' (and Optimum's) inpainting
# pipelines.
_INPAINT_PIPELINES = {"sd1": "StableDiffusionInpaintPipeline",
                      "sd2": "StableDiffusionInpaintPipeline",
                      "sdxl": "StableDiffusionXLInpaintPipeline"}
_CONTROLNET_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLInpaintPipeline": "StableDiffusionXLControlNetInpaintPipeline"}
# A UNet with T2I-Adapters only, where diffusers has a pipeline for them.
_ADAPTER_PIPELINES = {"StableDiffusionPipeline": "StableDiffusionAdapterPipeline",
                      "StableDiffusionXLPipeline": "StableDiffusionXLAdapterPipeline"}


def _model_index(c, controlled=None):
    """model_index.json: the pipeline class Optimum maps to its ORT pipeline, the components
    (one the family lacks, the refiner's text_encoder, is [null, null] as diffusers writes
    it), and SDXL's options, the source's where it has them (the pipeline reads them too).
    A UNet with ControlNets (``controlled`` "controlnet") names diffusers' ControlNet
    pipeline, one with T2I-Adapters only ("adapter") its adapter pipeline: Optimum has ORT
    pipelines for neither, and its ``ORTDiffusionPipeline`` refuses the folder rather than
    call that UNet without its control inputs."""
    family = c.family
    present = {"unet", "vae", *family.text_encoders, *family.tokenizers}
    wanted = ("text_encoder", "tokenizer") + (
        ("text_encoder_2", "tokenizer_2") if family.pooled else ())
    unet = c.unet.config
    pipelines = _INPAINT_PIPELINES if unet.in_channels != unet.out_channels else _PIPELINES
    name = pipelines.get(family.name, _PIPELINES[family.name])
    if controlled == "adapter":
        name = _ADAPTER_PIPELINES.get(name, _CONTROLNET_PIPELINES[name])
    elif controlled:
        name = _CONTROLNET_PIPELINES[name]
    index = {"_class_name": name,
             **{k: _INDEX_CLASSES[k] if k in present else [None, None] for k in wanted},
             "unet": _INDEX_CLASSES["unet"], "vae": _INDEX_CLASSES["vae"],
             "scheduler": ["diffusers", c.scheduler_config.get("_class_name", "PNDMScheduler")]}
    if family.pooled is None:
        return {**index, "safety_checker": [None, None], "feature_extractor": [None, None],
                "requires_safety_checker": False}
    source = c.model_index or {}
    return {**index,
            "force_zeros_for_empty_prompt": bool(source.get("force_zeros_for_empty_prompt",
                                                            True)),
            "requires_aesthetics_score": bool(source.get("requires_aesthetics_score",
                                                         "aesthetic_score" in family.time_ids))}


def _write_pipeline_files(c, folder, model_path, config, controlled=None):
    """model_index.json, each network's config.json, the tokenizers and scheduler/: what
    Optimum's pipeline reads beside the ONNX files. Configs are the source model's own files
    where it has them (a diffusers folder, or the --config folder of a single file), else
    sdrt's."""
    from sdrt.engine.tokenizer import write_clip_tokenizer, write_embedding_tokens
    family = c.family
    _write_json(os.path.join(folder, "model_index.json"), _model_index(c, controlled))
    networks = [(t, t) for t in family.text_encoders] + [
        ("unet", "unet"), ("vae_decoder", "vae"), ("vae_encoder", "vae")]
    for name, component in networks:
        source = _source_file(model_path, config, component, "config.json")
        target = os.path.join(folder, name, "config.json")
        if source:
            if component.startswith("text_encoder"):  # its table grows with embeddings
                settings = read_json(source, f"{component} config")
                vocab_size = getattr(c, component).config.vocab_size
                if settings.get("vocab_size") != vocab_size:
                    _write_json(target, {**settings, "vocab_size": vocab_size})
                    continue
            shutil.copyfile(source, target)
            continue
        # transformers names a model class its own way; diffusers by _class_name.
        naming = ({"architectures": [_INDEX_CLASSES[component][1]],
                   "model_type": "clip_text_model"}
                  if component.startswith("text_encoder") else
                  {"_class_name": _INDEX_CLASSES[component][1]})
        _write_json(target, {**asdict(getattr(c, component).config), **naming})
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), c.scheduler_config)
    # The source's tokenizer where it has the vocab.json/merges.txt pair that transformers'
    # CLIPTokenizer of any version reads (transformers 5 saves only tokenizer.json); else
    # CLIP's vocabulary, which every SD and SDXL tokenizer is, with the model's pad token.
    for name in family.tokenizers:
        tokenizer = _source_file(model_path, config, name, "vocab.json")
        if tokenizer and os.path.isfile(os.path.join(os.path.dirname(tokenizer), "merges.txt")):
            shutil.copytree(os.path.dirname(tokenizer), os.path.join(folder, name))
        else:
            write_clip_tokenizer(os.path.join(folder, name),
                                 pad_token=getattr(getattr(c, name), "pad_token", None)
                                 or "<|endoftext|>")
        if getattr(c, name).embedding_tokens:
            # (the added tokens live in tokenizer_config.json: a copied tokenizer.json, which
            # transformers' fast tokenizer would read instead, would lack them)
            json_file = os.path.join(folder, name, "tokenizer.json")
            if os.path.exists(json_file):
                os.remove(json_file)
            write_embedding_tokens(os.path.join(folder, name), getattr(c, name))


def _export_all(model_path, folder, height, width, batch, dtype, opset, dynamic,
                external_data_bytes, config, prediction_type, optimize=None, target="cuda",
                controlnets=(), loras=(), embeddings=()):
    """Write the networks, the pipeline files and the manifest into ``folder``; returns the
    manifest."""
    from sdrt.engine.loading import load
    t0 = time.perf_counter()
    # ORT optimizes float32 graphs and converts the result to float16 itself.
    export_dtype = "fp32" if optimize else dtype
    torch_dtype = TORCH_DTYPES[export_dtype]
    # Exported on the CPU whatever the target: the graph does not depend on the device.
    c = load(model_path, "cpu", torch_dtype, config=config, prediction_type=prediction_type)
    lora_entries = merge_loras(c, loras)
    embedding_entries = add_embeddings(c, embeddings)
    nets, adapters, control_entries = load_controlnets(controlnets, c.unet, torch_dtype,
                                                       c.vae.config.scale_factor)
    f = c.vae.config.scale_factor
    native = c.unet.config.sample_size * f
    height, width = height or native, width or native
    for name, v in (("height", height), ("width", width)):
        if v % f:
            raise SdrtError(f"{name} {v} is not a multiple of the VAE's scale factor {f}")
    models = {}
    with _exporting(), torch.no_grad():
        for name, (module, args, shapes, names, outputs) in _specs(
                c, height, width, batch, torch_dtype, dynamic, nets, adapters).items():
            models[name] = _export_one(name, module.eval(), args, shapes, names, folder, opset,
                                       external_data_bytes, outputs)
    controlled = "controlnet" if nets else "adapter" if adapters else None
    _write_pipeline_files(c, folder, model_path, config, controlled)
    manifest = {
        "sdrt_version": sdrt_version(),
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=True)",
        "layout": "optimum",
        "source": os.path.abspath(model_path),
        # What load() was given besides the path; check-onnx and the runtime load alike.
        "config": config and os.path.abspath(config),
        "prediction_type": prediction_type,
        "dtype": export_dtype,
        "opset": opset,
        "dynamic": bool(dynamic),
        # Static: the shapes of every file (each network's own batch is in its "inputs").
        # Dynamic: the example shapes it was traced at.
        "height": height,
        "width": width,
        "batch": batch,
        "export_seconds": round(time.perf_counter() - t0, 2),
        "family": c.family.name,
        "configs": {"unet": asdict(c.unet.config), "vae": asdict(c.vae.config),
                    **{t: asdict(getattr(c, t).config) for t in c.family.text_encoders}},
        "scheduler_config": c.scheduler_config,
        "model_index": _model_index(c, controlled),
        "pad_token": getattr(c.tokenizer, "pad_token", None),
        "pad_token_2": getattr(c.tokenizer_2, "pad_token", None),
        "optimized": None,
        # The LoRAs merged into the weights: {"name", "source", "scale"} each.
        "loras": lora_entries,
        # The textual-inversion embeddings added: {"token", "vectors", "source"} each, their
        # tokens the ids after the vocabulary's, in this order.
        "embeddings": embedding_entries,
        # The ControlNets and T2I-Adapters the UNet runs, each list in the order of its
        # controlnet_* (adapter_*) inputs.
        **control_entries,
        "models": models,
    }
    write_manifest(folder, manifest)
    del c, nets, adapters
    if optimize:
        from .onnx_optimize import optimize_folder
        manifest = optimize_folder(folder, manifest, target, fp16=dtype == "fp16")
    return manifest


__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_BYTES", "MAX_OPSET", "MIN_OPSET", "MODELS",
           "export_onnx"]
