"""What the UNet is conditioned on, as one value that flows from the text encoders to the UNet.

``Conditioning`` holds the text states every family has and, where the family has them (SDXL),
the pooled text embeddings and the micro-conditioning numbers ("time ids"). It is passed to
the UNet as named inputs (``unet(x, t, **cond.unet_inputs())``); the CFG batching, the static
runtime's buffers and the ONNX inputs are all derived from its fields.
"""
from dataclasses import dataclass, fields

import torch

from .comfy_prompt import apply_weights as comfy_weights
from .prompt_syntax import WeightedIds, apply_weights


@dataclass(frozen=True)
class Conditioning:
    """Rows are images (and CFG halves: ``[negative..., positive...]``, diffusers' order)."""
    states: torch.Tensor                     # (B, 77·n, D) text states, cross-attention keys
    text_embeds: torch.Tensor | None = None  # (B, P) pooled (projected) text embedding, SDXL
    time_ids: torch.Tensor | None = None     # (B, K) micro-conditioning numbers, SDXL
    # IP-Adapters: per adapter, (B, n, D) image tokens (a tuple); their scales on each UNet
    # call, (B, calls, adapters): the UNet gets call i's (B, adapters) (stages.guided).
    image_tokens: tuple | None = None
    image_scales: torch.Tensor | None = None
    # Regional IP-Adapters: per adapter, (B, images, Σ h·w) mask weights at every UNet level's
    # queries (``ImagePromptRequest.regions``); None when no adapter has masks.
    image_regions: tuple | None = None

    # The UNet's argument name of each field.
    UNET_NAMES = {"states": "encoder_hidden_states", "text_embeds": "text_embeds",
                  "time_ids": "time_ids", "image_tokens": "image_tokens",
                  "image_scales": "image_scales", "image_regions": "image_regions"}

    def items(self):
        """(field name, tensor) of the fields this conditioning has."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None]

    def unet_inputs(self) -> dict:
        return {self.UNET_NAMES[name]: t for name, t in self.items()}

    def map(self, fn) -> "Conditioning":
        """``fn`` applied to each tensor this conditioning has (each of a tuple's)."""
        return Conditioning(**{name: tuple(map(fn, t)) if isinstance(t, tuple) else fn(t)
                               for name, t in self.items()})

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def repeat_interleave(self, k: int) -> "Conditioning":
        """Each row ``k`` times in a row: one per image of a prompt."""
        return self.map(lambda t: t.repeat_interleave(k, dim=0))

    def rows(self, index) -> "Conditioning":
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(parts) -> "Conditioning":
        """Rows of several conditionings, in order (all with the same fields)."""
        def cat(n):
            first = getattr(parts[0], n)
            if isinstance(first, tuple):
                return tuple(torch.cat([getattr(p, n)[i] for p in parts])
                             for i in range(len(first)))
            return torch.cat([getattr(p, n) for p in parts])
        return Conditioning(**{n: cat(n) for n, _ in parts[0].items()})

    def copy_(self, other: "Conditioning") -> None:
        """Copy ``other`` into these tensors (a static plan's buffers) in place."""
        for name, t in self.items():
            for mine, theirs in (zip(t, getattr(other, name)) if isinstance(t, tuple)
                                 else [(t, getattr(other, name))]):
                mine.copy_(theirs)


@dataclass(frozen=True)
class TextInputs:
    """Token ids and weights (B, n, 77) of a batch of prompts, one ``WeightedIds`` per tokenizer
    of the family (``{"tokenizer": ..., "tokenizer_2": ...}``), all with the same n."""
    by_tokenizer: dict

    @property
    def num_chunks(self) -> int:
        return next(iter(self.by_tokenizer.values())).num_chunks

    def items(self):
        return self.by_tokenizer.items()

    def __getitem__(self, tokenizer) -> WeightedIds:
        return self.by_tokenizer[tokenizer]

    def to(self, device) -> "TextInputs":
        return TextInputs({t: b.to(device) for t, b in self.items()})

    def repeat_interleave(self, k: int) -> "TextInputs":
        return TextInputs({t: b.repeat_interleave(k) for t, b in self.items()})


def encode_text(family, encoders: dict, inputs: TextInputs,
                clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids of each tokenizer → (states (B, 77·n, D), pooled (B, P) or None), as ``family``
    reads them: every chunk of every prompt through each of the family's text encoders as one
    batch, each encoder's states weighted (A1111 emphasis) on their own, concatenated along
    the features (SDXL: CLIP ViT-L then OpenCLIP bigG), chunks joined along the sequence.

    ``encoders`` maps component names to modules; ``inputs`` (``TextInputs``) are on the
    encoders' device (ComfyUI's weights, ``WeightedIds.empty``, encode the empty prompt's
    chunk too, which they are relative to). SD 1.x/2.x take the final layer (or
    ``clip_skip`` from the end) through the final LayerNorm; SDXL takes the penultimate one
    (``hidden_states[-(clip_skip + 2)]`` in diffusers) without it. The pooled embedding is the
    first chunk's, as A1111 takes it.
    """
    parts, pooled = [], None
    for component, tokenizer in zip(family.text_encoders, family.tokenizers):
        batch: WeightedIds = inputs[tokenizer]
        b, n, length = batch.ids.shape
        ids = batch.ids.reshape(b * n, length)
        if batch.empty is not None:  # ComfyUI's weights: the empty prompt's chunk as well
            ids = torch.cat([ids, batch.empty.to(ids.device)[None]])
        encoder = encoders[component]
        if family.penultimate and component == family.pooled:
            # The pooled output needs every layer; the states are taken on the way.
            states, pool = encoder.encode(ids, clip_skip=clip_skip + 1, final_norm=False)
            pooled = pool[:b * n].reshape(b, n, -1)[:, 0]
        elif family.penultimate:  # the layers past the one read are not run
            states = encoder(ids, clip_skip=clip_skip + 1, final_norm=False)
        else:
            states = encoder(ids, clip_skip=clip_skip)
        weights = batch.weights.reshape(b * n, length)
        if batch.empty is None:
            states = apply_weights(states, weights)
        else:
            states = comfy_weights(states[:b * n], weights, states[b * n:])
        parts.append(states.reshape(b, n * length, states.shape[-1]))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0], pooled
