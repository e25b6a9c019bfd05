"""CLIP text encoder (transformers' CLIPTextModel layout): SD 1.x's ViT-L/14 and SD 2.x's
OpenCLIP ViT-H as diffusers stores it (its config already drops the last layer)."""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .configs import (MAX_CHANNELS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCABULARY,
                      ConfigCheck)
from .errors import SdrtError
from .layers import LayerNorm


@dataclass
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d):
        """The config of a ``config.json`` dict (or its ``text_config``), every value checked
        before anything is built (``SdrtError`` naming the key)."""
        check = ConfigCheck("text encoder")
        d = check.dict(check.dict(d).get("text_config", d))
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_act not in ACTIVATIONS:
            raise SdrtError(f"text encoder config: unsupported hidden_act {cfg.hidden_act}")
        check.integer("vocab_size", cfg.vocab_size, hi=MAX_VOCABULARY)
        hidden = check.integer("hidden_size", cfg.hidden_size)
        check.integer("intermediate_size", cfg.intermediate_size, hi=4 * MAX_CHANNELS)
        check.integer("num_hidden_layers", cfg.num_hidden_layers, hi=MAX_LAYERS)
        heads = check.integer("num_attention_heads", cfg.num_attention_heads)
        if hidden % heads:
            check.fail("num_attention_heads", f"a divisor of hidden_size {hidden}", heads)
        check.integer("max_position_embeddings", cfg.max_position_embeddings, hi=MAX_POSITIONS)
        check.number("layer_norm_eps", cfg.layer_norm_eps, positive=True)
        return cfg


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # (B, S, D)
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # Causal attention over 77 tokens is ~0.01% of a request's FLOPs: no kernel of its own.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, s, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):  # (B, S) → (B, S, D)
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Token ids (B, 77) → hidden states (B, 77, D) after the final LayerNorm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    @torch.no_grad()
    def add_token_embeddings(self, vectors: torch.Tensor) -> range:
        """Append rows (k, D) to the token-embedding table (textual inversion) and return their
        ids. The table is a new, larger ``nn.Embedding`` (the old rows copied, the new ones cast
        to the table's dtype): anything that captured the old table's storage (a static plan)
        must be rebuilt."""
        old = self.text_model.embeddings.token_embedding
        n, d = old.weight.shape
        if vectors.ndim != 2 or vectors.shape[1] != d:
            raise SdrtError(f"token embeddings must be (k, {d}), got {tuple(vectors.shape)}")
        new = nn.Embedding(n + len(vectors), d, device=old.weight.device, dtype=old.weight.dtype)
        new.weight[:n] = old.weight
        new.weight[n:] = vectors.to(new.weight)
        new.requires_grad_(old.weight.requires_grad)
        self.text_model.embeddings.token_embedding = new
        self.config.vocab_size = n + len(vectors)
        return range(n, n + len(vectors))

    def forward(self, ids, clip_skip=0):
        """``clip_skip`` layers from the end are skipped, as diffusers' ``clip_skip`` does."""
        tm = self.text_model
        x = tm.embeddings(ids)
        for layer in tm.encoder.layers[: len(tm.encoder.layers) - clip_skip]:
            x = layer(x)
        return tm.final_layer_norm(x)
