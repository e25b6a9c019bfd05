"""ControlNets inside the exported UNet: ``sdrt export onnx --controlnet PATH``.

With ControlNets the UNet file takes two more inputs after its usual ones:

- ``controlnet_images`` (N, B, 3, H, W): each ControlNet's control image in [0, 1] at the
  image's size (the latents' times the VAE's factor), one per row of the UNet's batch;
- ``controlnet_scales`` (N,): each one's conditioning scale,

the names and shapes of ONNX Runtime's and TensorRT's Stable Diffusion demos, which export
their UNet with ControlNets this way (after diffusers' ``convert_stable_diffusion_controlnet_to
_onnx.py``). Every net runs on every call; each one's residuals, times its scale, are summed
into the UNet's skip tensors and mid block. A scale of 0 turns a net off for a call: that is
how a runtime follows ``control_guidance_start``/``_end``, or leaves a net out of a request.
The output stays Optimum's ``out_sample``.
"""
import os
from dataclasses import asdict

import torch
from torch import nn

from sdrt.engine.errors import SdrtError

CONTROL_INPUTS = ("controlnet_images", "controlnet_scales")


class ControlledUNet(nn.Module):
    """The UNet with its ControlNets, inputs in ``unet_inputs`` order then
    ``CONTROL_INPUTS``; ``names`` the UNet's inputs past the first three."""

    def __init__(self, unet, nets, names):
        super().__init__()
        self.unet, self.nets, self.extra = unet, nn.ModuleList(nets), tuple(names)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        *extra, images, scales = extra
        named = dict(zip(self.extra, extra))
        down = mid = None
        for k, net in enumerate(self.nets):
            # An inpainting UNet's sample also holds the mask and the masked image's latents;
            # a ControlNet reads the latents only, as the pipelines hand them to it.
            d, m = net(sample[:, :net.config.in_channels], timestep, encoder_hidden_states,
                       images[k], scales[k].expand(net.num_residuals + 1),
                       text_embeds=named.get("text_embeds"), time_ids=named.get("time_ids"))
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(sample, timestep, encoder_hidden_states, down_residuals=down,
                         mid_residual=mid, **named)


def check_paths(paths):
    """``controlnets`` is a list of existing paths; SdrtError naming the field otherwise."""
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, (list, tuple)):
        raise SdrtError("controlnets must be a list of ControlNet folders or .safetensors files")
    for path in paths:
        if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
            raise SdrtError(f"controlnet {path} does not exist")


def load_controlnets(paths, unet, dtype):
    """The ControlNets of ``paths`` for ``unet`` (sdrt's), on the CPU in ``dtype``."""
    from sdrt.engine.adapter import is_adapter
    from sdrt.engine.controlnet import check_fits, load_controlnet
    nets = []
    for path in paths:
        path = os.fspath(path)
        if is_adapter(path):
            raise SdrtError(f"controlnet {path} is a T2I-Adapter: only ControlNets are "
                            "exported (run adapters in sdrt's own UNet, --runtime torch)")
        net = load_controlnet(path, "cpu", dtype, asdict(unet.config))
        check_fits(net.config, unet.config, path)
        nets.append(net.eval())
    return nets


def control_examples(nets, rows, height, width, dtype, g):
    """Example ``controlnet_images`` (N, rows, 3, height, width) and ``controlnet_scales``
    (N,) in ``dtype``."""
    images = torch.rand(len(nets), rows, 3, height, width, generator=g).to(dtype)
    return images, (0.5 + torch.rand(len(nets), generator=g)).to(dtype)


def manifest_entries(paths, nets):
    """The manifest's ``controlnets``: each net's name (what ``--controlnet`` picks it by:
    its file or folder name, numbered where two are the same), source and config, in input
    order."""
    from sdrt.engine.infotext import numbered_stems
    return [{"name": name, "source": os.path.abspath(path), "config": asdict(net.config)}
            for name, path, net in zip(numbered_stems(paths), paths, nets)]


def fused_controlnets(entries):
    """{name: FusedControlNet} of an export's manifest entries."""
    from sdrt.engine.controlnet import ControlNetConfig, FusedControlNet
    return {e["name"]: FusedControlNet(e["name"], k, len(entries),
                                       ControlNetConfig.from_dict(e["config"]))
            for k, e in enumerate(entries)}
