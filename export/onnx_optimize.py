"""ONNX Runtime's Stable Diffusion optimizer on an export: ``sdrt export onnx --optimize ort``.

Each network goes through ``onnxruntime.transformers.optimizer.optimize_model`` with the model
type ORT's ``models/stable_diffusion/optimize_pipeline.py`` gives it ("clip", "unet", "vae")
and that script's fusion options, then, for ``--dtype fp16``, through ORT's float16 conversion
of the fused graph (as ORT does it: fuse in float32 first, else the patterns no longer match).
The inputs and outputs stay float32: callers feed the same arrays as to a float32 export, and
the conversion inserts one Cast at each end. (ORT's own script also converts the inputs and
outputs; Optimum's pipeline casts its inputs to whatever the session asks for either way.)

Targets:

- ``cuda``: ORT's full set (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv,
  attention, packed QKV/KV for float16). GroupNorm, BiasSplitGelu, BiasAdd and NhwcConv are
  operators that only ORT's CUDA provider implements: such a file does not load on the CPU.
- ``cpu``: only the fusions whose operators the CPU provider runs (LayerNorm, SkipLayerNorm,
  GELU, attention).

Afterwards every network is checked against sdrt (``check_onnx``) where the target can run
here (the CPU always; CUDA with a GPU and onnxruntime-gpu); past tolerance the export fails.
"""
import contextlib
import io
import logging
import os
import shutil

from sdrt.engine.errors import SdrtError

from .onnx_manifest import FILES, manifest_family, models_of, write_manifest

TARGETS = ("cuda", "cpu")
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet",
               "vae_decoder": "vae", "vae_encoder": "vae"}
# What ORT's optimizer reports per model type (get_fused_operator_statistics).
FUSED_OPS = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "Attention",
             "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization", "NhwcConv",
             "Gelu")
# Fusions whose operators have no CPU kernel in ONNX Runtime.
_CUDA_ONLY = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
              "enable_nhwc_conv", "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


def check_optimize_args(target):
    if target not in TARGETS:
        raise SdrtError(f"unknown optimization target {target!r}: use {' or '.join(TARGETS)}")
    try:
        import onnxruntime.transformers.optimizer  # noqa: F401
    except ImportError:
        raise SdrtError("--optimize ort needs onnxruntime's transformers optimizer: "
                        "pip install 'sdrt[onnx]'")


def fusion_options(model_type, target, fp16):
    """ORT's fusion options as optimize_pipeline.py sets them, less the CUDA-only fusions for
    the CPU target."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions(model_type)
    if model_type == "unet":
        # optimize_pipeline.py: packed Q/K/V only for float16 (no float32 packed kernel); the
        # BiasAdd fusion on (ORT ≥ 1.15).
        options.enable_packed_kv = fp16 and options.enable_packed_kv
        options.enable_packed_qkv = fp16 and options.enable_packed_qkv
        options.enable_bias_add = True
    if target == "cpu":
        for name in _CUDA_ONLY:
            if hasattr(options, name):
                setattr(options, name, False)
    return options


def optimize_file(path, model_type, target, fp16, external):
    """Optimize one ``model.onnx`` in place; returns the count of each fused operator."""
    from onnxruntime.transformers.optimizer import optimize_model
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # ORT's optimizer draws a tqdm progress bar of its fusion passes on stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        m = optimize_model(path, model_type=model_type, num_heads=0, hidden_size=0,
                           opt_level=0, use_gpu=target == "cuda",
                           optimization_options=fusion_options(model_type, target, fp16))
    if fp16:
        m.convert_float_to_float16(keep_io_types=True)
    counts = {op: len(m.get_nodes_by_op_type(op)) for op in FUSED_OPS}
    # Written beside, then moved over the original: the optimizer may still read the old
    # external-data file while saving.
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, ".optimized")
    os.makedirs(tmp)
    m.save_model_to_file(os.path.join(tmp, "model.onnx"), use_external_data_format=external)
    del m
    for f in os.listdir(folder):
        if f.startswith("model.onnx"):
            os.remove(os.path.join(folder, f))
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(folder, f))
    os.rmdir(tmp)
    return counts


def can_run(target):
    import onnxruntime as ort
    import torch
    if target == "cpu":
        return True
    return torch.cuda.is_available() and \
        "CUDAExecutionProvider" in ort.get_available_providers()


def optimize_folder(folder, manifest, target, fp16, check=True):
    """Optimize every network of the export in ``folder`` (an sdrt export, float32), update and
    rewrite its manifest, and (``check``) check it against sdrt where ``target`` runs here.
    Returns the manifest."""
    import onnx
    import onnxruntime

    from .onnx_export import _value_info
    fused = {}
    for name in models_of(manifest_family(manifest)):
        path = os.path.join(folder, FILES[name])
        info = manifest["models"][name]
        fused[name] = optimize_file(path, MODEL_TYPES[name], target, fp16,
                                    external=info["external_data"] is not None)
        graph = onnx.load(path, load_external_data=False).graph
        info["inputs"], info["outputs"] = _value_info(graph.input), _value_info(graph.output)
    manifest["dtype"] = "fp16" if fp16 else "fp32"
    manifest["optimized"] = {"by": "onnxruntime.transformers.optimizer",
                             "onnxruntime_version": onnxruntime.__version__, "target": target,
                             "fp16": fp16, "fused": fused, "checked": False}
    if check and can_run(target):
        from .onnx_check import check_onnx
        rows = check_onnx(folder, device="cuda" if target == "cuda" else "cpu")
        failed = [r for r in rows if not r.passed]
        if failed:
            worst = max(failed, key=lambda r: r.rel)
            raise SdrtError(f"the ORT-optimized export is past tolerance: {worst.model} on "
                            f"{worst.inputs} inputs, relative error {worst.rel:.2e} > "
                            f"{worst.tol:.0e}")
        manifest["optimized"]["checked"] = True
    write_manifest(folder, manifest)
    shutil.rmtree(os.path.join(folder, ".optimized"), ignore_errors=True)
    return manifest
