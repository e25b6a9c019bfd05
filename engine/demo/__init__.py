"""The demo model: a small Stable Diffusion (sdrt's CLIP text encoder, UNet with cross-attention,
VAE; the SD 1.x code paths and scheduler) trained on a synthetic world of coloured shapes.

``world`` renders scenes and their captions (with held-out combinations), ``train`` trains the
model, ``quality`` measures what it draws, and ``model`` loads the shipped weights
(``demo_components()``) and writes them as a diffusers folder (``write_demo(folder)``).
"""
