"""Export sdrt's networks to ONNX, cross-check them against sdrt, and run them in onnxruntime.

``export_onnx(model_path, out_dir, ...)`` writes Optimum's Stable Diffusion layout
(``text_encoder/model.onnx``, ``unet/model.onnx``, ``vae_decoder/model.onnx``,
``vae_encoder/model.onnx``, each with its ``config.json``, ``model_index.json``, ``tokenizer/``,
``scheduler/``) and ``sdrt_export.json``, optionally through ONNX Runtime's optimizer
(``optimize="ort"``); ``check_onnx(onnx_dir, model_path)`` compares onnxruntime's outputs with
sdrt's; ``onnx_components(onnx_dir, ...)`` gives a ``Pipeline`` the exported networks.
"""
from .onnx_check import check_onnx
from .onnx_export import export_onnx
from .onnx_runtime import onnx_components

__all__ = ["check_onnx", "export_onnx", "onnx_components"]
