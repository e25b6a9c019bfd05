"""Export sdrt's networks to ONNX, cross-check them against sdrt, and run them in onnxruntime.

``export_onnx(model_path, out_dir, ...)`` writes ``text_encoder.onnx``, ``unet.onnx``,
``vae_decoder.onnx``, ``vae_encoder.onnx`` and ``sdrt_export.json``; ``check_onnx(onnx_dir,
model_path)`` compares onnxruntime's outputs with sdrt's; ``onnx_components(onnx_dir, ...)``
gives a ``Pipeline`` the exported networks.
"""
from .onnx_check import check_onnx
from .onnx_export import export_onnx
from .onnx_runtime import onnx_components

__all__ = ["check_onnx", "export_onnx", "onnx_components"]
