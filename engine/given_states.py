"""Text states given instead of prompts: diffusers' ``prompt_embeds``, ``negative_prompt_embeds``
and, for families with a pooled text embedding (SDXL), ``pooled_prompt_embeds`` and
``negative_pooled_prompt_embeds``, as its pipelines take them (from Compel, sd_embed, or an
earlier ``encode_prompt``).

Either half of a classifier-free-guidance batch may come as states, the other as text, as in
diffusers. States are (prompts, L, D) float tensors, D the UNet's cross-attention width and L
any number of tokens (a static plan takes L = 77·n); both halves get the same L: a text half
is encoded to it (A1111 syntax pads a shorter prompt with empty chunks), or refused by name.
"""
from dataclasses import dataclass

import torch

from .errors import SdrtError
from .request import short_repr

MAX_TOKENS = 77 * 64  # as many as 64 chunks of a prompt
MAX_STATE = 1e4  # far past any text encoder's states (tens at most), below fp16's overflow


@dataclass
class GivenStates:
    """The checked tensors of each half (None: that half is text), in the pipeline's dtype on
    its device, one row per prompt."""
    states: torch.Tensor = None
    pooled: torch.Tensor = None
    negative: torch.Tensor = None
    negative_pooled: torch.Tensor = None

    @property
    def tokens(self):
        return (self.states if self.states is not None else self.negative).shape[1]

    @property
    def prompts(self):
        return (self.states if self.states is not None else self.negative).shape[0]

    @property
    def num_chunks(self):
        """77-token chunks the tokens take (the memory check's count; a static plan's where
        they fill them)."""
        return -(-self.tokens // 77)


def given_states(pipe, prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                 negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds):
    """The call's ``GivenStates``, checked against ``pipe``'s model and against the text
    arguments they replace; None where no states are given."""
    given = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                 pooled_prompt_embeds=pooled_prompt_embeds,
                 negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    if all(v is None for v in given.values()):
        return None
    texts = dict(prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt,
                 negative_prompt_2=negative_prompt_2)
    for text, value in texts.items():
        name = "negative_prompt_embeds" if text.startswith("negative") else "prompt_embeds"
        if given[name] is not None and value is not None:
            raise SdrtError(f"{text} and {name} cannot both be given: {name} replaces it")
    pooled_dim = _pooled_dim(pipe)
    for states, pooled in (("prompt_embeds", "pooled_prompt_embeds"),
                           ("negative_prompt_embeds", "negative_pooled_prompt_embeds")):
        if given[pooled] is not None and given[states] is None:
            raise SdrtError(f"{pooled} needs {states} (the pooled embedding of those states)")
        if given[states] is not None and pooled_dim is not None and given[pooled] is None:
            raise SdrtError(f"{states} needs {pooled} for {pipe.family.label} models (its "
                            f"UNet takes the pooled text embedding too)")
        if given[pooled] is not None and pooled_dim is None:
            raise SdrtError(f"{pooled} is not used by {pipe.family.label} models (no pooled "
                            f"text embedding)")
    width = pipe.unet.config.cross_attention_dim
    out = GivenStates()
    for field, name in (("states", "prompt_embeds"), ("negative", "negative_prompt_embeds")):
        value = given[name]
        if value is None:
            continue
        _check(name, value, 3, f"(prompts, tokens, {width})")
        n, length, d = value.shape
        if d != width or not 1 <= length <= MAX_TOKENS or not 1 <= n <= pipe.limits.max_images:
            raise SdrtError(f"{name} must have the shape (prompts, tokens, {width}), 1 to "
                            f"{pipe.limits.max_images} prompts (SDRT_MAX_IMAGES) of 1 to "
                            f"{MAX_TOKENS} tokens, got {tuple(value.shape)}")
        setattr(out, field, value.to(pipe.device, pipe.dtype))
    for field, name in (("pooled", "pooled_prompt_embeds"),
                        ("negative_pooled", "negative_pooled_prompt_embeds")):
        value = given[name]
        if value is None:
            continue
        rows = getattr(out, "states" if field == "pooled" else "negative").shape[0]
        _check(name, value, 2, f"({rows}, {pooled_dim})")
        if tuple(value.shape) != (rows, pooled_dim):
            raise SdrtError(f"{name} must have the shape ({rows}, {pooled_dim}) (a row per "
                            f"prompt), got {tuple(value.shape)}")
        setattr(out, field, value.to(pipe.device, pipe.dtype))
    if out.states is not None and out.negative is not None and \
            out.states.shape != out.negative.shape:
        raise SdrtError(f"prompt_embeds and negative_prompt_embeds must have the same shape, "
                        f"got {tuple(out.states.shape)} and {tuple(out.negative.shape)}")
    return out


def _check(name, value, ndim, shape):
    if not isinstance(value, torch.Tensor) or value.ndim != ndim or \
            not value.dtype.is_floating_point:
        got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}"
               if isinstance(value, torch.Tensor) else
               f"a {type(value).__module__}.{type(value).__name__} of shape {value.shape}"
               if hasattr(value, "shape") else short_repr(value))
        raise SdrtError(f"{name} must be a float tensor of shape {shape}, got {got}")
    if value.is_meta:
        raise SdrtError(f"{name} must hold its values (a tensor on a device), got a meta "
                        f"tensor")
    if not torch.isfinite(value).all():
        raise SdrtError(f"{name} must hold finite numbers (it has NaN or infinity)")
    if value.numel() and value.abs().max() > MAX_STATE:
        raise SdrtError(f"{name} must hold values within ±{MAX_STATE:g}, got "
                        f"{value.abs().max().item():.3g}")


def _pooled_dim(pipe):
    """The pooled text embedding's width the UNet takes, None for families without one."""
    component = pipe.family.pooled
    if component is None:
        return None
    return pipe.text_encoders[component].config.projection_dim
