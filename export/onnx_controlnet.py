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

T2I-Adapters given the same way run inside the UNet too, with ``adapter_images`` (M, B, 3, H,
W) and ``adapter_scales`` (M,) after the ControlNets' inputs: each adapter's features of its
image (a one-channel adapter reads the image's grey), times its scale, summed and added
along the UNet's down path. No demo has a convention for them; they follow the ControlNets'.
The adapters run on every call, though their features depend on the image only.
"""
import os
from dataclasses import asdict

import torch
from torch import nn

from sdrt.engine.adapter import adapter_input
from sdrt.engine.controlnet import FUSED_INPUTS
from sdrt.engine.errors import SdrtError

CONTROL_INPUTS, ADAPTER_INPUTS = FUSED_INPUTS["controlnet"], FUSED_INPUTS["adapter"]
# The manifest's field and the UNet's inputs of each kind of net.
KINDS = {"controlnet": ("controlnets", CONTROL_INPUTS), "adapter": ("adapters", ADAPTER_INPUTS)}


def input_names(nets, adapters):
    """The UNet's inputs after its own for ``nets`` ControlNets and ``adapters``."""
    return (CONTROL_INPUTS if nets else ()) + (ADAPTER_INPUTS if adapters else ())


class ControlledUNet(nn.Module):
    """The UNet with its ControlNets and T2I-Adapters, inputs in ``unet_inputs`` order then
    ``input_names(nets, adapters)``; ``names`` the UNet's inputs past the first three."""

    def __init__(self, unet, nets, names, adapters=()):
        super().__init__()
        self.unet, self.nets, self.extra = unet, nn.ModuleList(nets), tuple(names)
        self.adapters = nn.ModuleList(adapters)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        named = dict(zip(self.extra, extra))
        control = dict(zip(input_names(self.nets, self.adapters), extra[len(self.extra):]))
        kwargs = {}
        if self.nets:
            kwargs["down_residuals"], kwargs["mid_residual"] = self._residuals(
                sample, timestep, encoder_hidden_states, named, control["controlnet_images"],
                control["controlnet_scales"])
        if self.adapters:
            kwargs["adapter_features"] = self._features(control["adapter_images"],
                                                        control["adapter_scales"])
        return self.unet(sample, timestep, encoder_hidden_states, **named, **kwargs)

    def _features(self, images, scales):
        summed = None
        for k, adapter in enumerate(self.adapters):
            f = [t * scales[k] for t in adapter(adapter_input(adapter.config, images[k]))]
            summed = f if summed is None else [a + b for a, b in zip(summed, f)]
        return summed

    def _residuals(self, sample, timestep, encoder_hidden_states, named, images, scales):
        down = mid = None
        for k, net in enumerate(self.nets):
            # An inpainting UNet's sample also holds the mask and the masked image's latents;
            # a ControlNet reads the latents only, as the pipelines hand them to it.
            d, m = net(sample[:, :net.config.in_channels], timestep, encoder_hidden_states,
                       images[k], scales[k].expand(net.num_residuals + 1),
                       text_embeds=named.get("text_embeds"), time_ids=named.get("time_ids"))
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid


def check_paths(paths):
    """``controlnets`` is a list of existing paths; SdrtError naming the field otherwise."""
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, (list, tuple)):
        raise SdrtError("controlnets must be a list of ControlNet folders or .safetensors files")
    for path in paths:
        if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
            raise SdrtError(f"controlnet {path} does not exist")


def load_controlnets(paths, unet, dtype, vae_scale_factor):
    """The ControlNets and the T2I-Adapters of ``paths`` for ``unet`` (sdrt's), on the CPU
    in ``dtype``, each list in the order given; and the manifest's entries for them
    ({"controlnets": [...], "adapters": [...]}: each net's name, what ``--controlnet`` picks
    it by (its file or folder name, numbered where two are the same), source, config and
    number of scaled outputs)."""
    from sdrt.engine.adapter import T2IAdapter
    from sdrt.engine.control import load_control_net, scale_count
    from sdrt.engine.infotext import numbered_stems
    nets, adapters, entries = [], [], {"controlnets": [], "adapters": []}
    for name, path in zip(numbered_stems(paths), map(os.fspath, paths)):
        net = load_control_net(path, unet.config, vae_scale_factor, "cpu", dtype).eval()
        adapter = isinstance(net, T2IAdapter)
        (adapters if adapter else nets).append(net)
        field, factors = "adapters" if adapter else "controlnets", scale_count(net)
        entries[field].append({"name": name, "source": os.path.abspath(path),
                               "config": asdict(net.config), "factors": factors})
    return nets, adapters, entries


def control_examples(nets, rows, height, width, dtype, g):
    """Example images (N, rows, 3, height, width) and scales (N,) in ``dtype`` for ``nets``
    (ControlNets or adapters)."""
    images = torch.rand(len(nets), rows, 3, height, width, generator=g).to(dtype)
    return images, (0.5 + torch.rand(len(nets), generator=g)).to(dtype)


def fused_controlnets(manifest):
    """{name: FusedControlNet} of the ControlNets and adapters of an export's manifest."""
    from sdrt.engine.adapter import AdapterConfig
    from sdrt.engine.controlnet import ControlNetConfig, FusedControlNet
    configs = {"controlnet": ControlNetConfig, "adapter": AdapterConfig}
    out = {}
    for kind, (field, _) in KINDS.items():
        entries = manifest.get(field) or []
        for k, e in enumerate(entries):
            out[e["name"]] = FusedControlNet(e["name"], k, len(entries),
                                             configs[kind].from_dict(e["config"]), kind,
                                             e["factors"])
    return out
