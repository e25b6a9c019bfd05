"""CLIP text encoders (transformers' CLIPTextModel and CLIPTextModelWithProjection layouts):
SD 1.x's and SDXL's ViT-L/14, SD 2.x's OpenCLIP ViT-H as diffusers stores it (its config
already drops the last layer) and SDXL's OpenCLIP ViT-bigG with its pooled-output projection."""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .configs import (MAX_CHANNELS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCABULARY,
                      ConfigCheck)
from .errors import SdrtError
from .layers import LayerNorm

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")

# Keys of transformers' CLIPTextConfig, and of the PretrainedConfig base that older
# transformers dumped in full (e.g. a CLIPConfig's "text_config"), that change nothing the
# encoder computes at inference. Every other key is either implemented (a TextConfig field,
# "architectures") or refused by name.
NO_EFFECT_KEYS = frozenset({
    # training only
    "attention_dropout", "dropout", "initializer_range", "initializer_factor",
    "gradient_checkpointing", "tf_legacy_loss",
    # token ids the encoder never reads (eos_token_id is read: it places the pooled output)
    "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    # bookkeeping, storage and output format
    "transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
    "use_bfloat16", "torchscript", "tokenizer_class", "prefix", "finetuning_task", "id2label",
    "label2id", "num_labels", "problem_type", "task_specific_params", "return_dict",
    "output_attentions", "output_hidden_states", "output_scores", "return_dict_in_generate",
    "use_cache",
    # which attention kernel transformers picks: all compute the same softmax attention
    "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
    # CLIP's feed-forward never chunks, has no cross-attention, decoder or output embeddings
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_word_embeddings", "tie_encoder_decoder",
    # generation settings: the encoder generates nothing
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})

# Keys accepted only at the value sdrt implements (None meaning "not set").
_ONLY = {
    "model_type": lambda v: v in (None, "clip_text_model"),
    "pruned_heads": lambda v: not v,
    "architectures": lambda v: v is None or (isinstance(v, list) and
                                             all(a in ARCHITECTURES for a in v)),
}


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
    projection_dim: int = None    # the pooled output's projection (used only with_projection)
    eos_token_id: int = 2         # 2 (pre-2023 configs): pool at the highest id; see eos_positions
    with_projection: bool = False  # CLIPTextModelWithProjection: encode() returns text_embeds

    @classmethod
    def from_dict(cls, d):
        """The config of a ``config.json`` dict (or its ``text_config``), every value checked
        before anything is built (``SdrtError`` naming the key).

        ``with_projection`` comes from ``"architectures"`` naming CLIPTextModelWithProjection
        (or from the key itself, as ``dataclasses.asdict`` writes it)."""
        check = ConfigCheck("text encoder")
        d = check.dict(check.dict(d).get("text_config", d))
        names = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key in names or key in NO_EFFECT_KEYS or (key in _ONLY and _ONLY[key](value)):
                continue
            raise SdrtError(f"text encoder config: unsupported setting {key} = {_short(value)} "
                            f"(sdrt runs transformers' {' and '.join(ARCHITECTURES)})")
        cfg = cls(**{k: v for k, v in d.items() if k in names and k != "with_projection"})
        cfg.with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        if "with_projection" in d:
            flag = check.flag("with_projection", d["with_projection"])
            if "architectures" in d and flag != cfg.with_projection:
                check.fail("with_projection", f"{cfg.with_projection} as architectures "
                           f"{d['architectures']} says", flag)
            cfg.with_projection = flag
        if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in ACTIVATIONS:
            raise SdrtError(f"text encoder config: unsupported setting hidden_act = "
                            f"{_short(cfg.hidden_act)} (sdrt runs {', '.join(ACTIVATIONS)})")
        check.integer("vocab_size", cfg.vocab_size, hi=MAX_VOCABULARY)
        hidden = check.integer("hidden_size", cfg.hidden_size)
        check.integer("intermediate_size", cfg.intermediate_size, hi=4 * MAX_CHANNELS)
        check.integer("num_hidden_layers", cfg.num_hidden_layers, hi=MAX_LAYERS)
        heads = check.integer("num_attention_heads", cfg.num_attention_heads)
        if hidden % heads:
            check.fail("num_attention_heads", f"a divisor of hidden_size {hidden}", heads)
        check.integer("max_position_embeddings", cfg.max_position_embeddings, hi=MAX_POSITIONS)
        check.number("layer_norm_eps", cfg.layer_norm_eps, positive=True)
        if cfg.projection_dim is not None or cfg.with_projection:
            check.integer("projection_dim", cfg.projection_dim)
        if cfg.eos_token_id is not None:
            check.integer("eos_token_id", cfg.eos_token_id, lo=0, hi=MAX_VOCABULARY)
        return cfg


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    # transformers writes this one out (0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))): the
    # same function as the tanh-approximate GELU, equal up to float rounding.
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class CLIPAttention(nn.Module):
    """Multi-head self-attention: causal in the text tower, over every token in the vision
    tower (``causal=False``)."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.causal = cfg.num_attention_heads, causal
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # (B, S, D)
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # Attention over 77 tokens (257 patches once per request for the vision tower) is
        # ~0.01% of a request's FLOPs: no kernel of its own.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
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
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
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
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal)
                                    for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)



def kept_layers(clip_skip, n):
    """How many of a text encoder's ``n`` layers run for diffusers' ``clip_skip`` (all but
    ``clip_skip``); ``SdrtError`` naming the field if it is not an integer from 0 to n - 1."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < n:
        raise SdrtError(f"clip_skip must be an integer from 0 to {n - 1} (the text encoder "
                        f"has {n} layers), got {clip_skip!r}")
    return n - clip_skip

class CLIPTextModel(nn.Module):
    """Token ids (B, S) → hidden states (B, S, D) after the final LayerNorm; ``encode`` adds
    the pooled output (B, D) at each row's end-of-text token."""

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

    def _kept_layers(self, clip_skip):
        return kept_layers(clip_skip, len(self.text_model.encoder.layers))

    def forward(self, ids, clip_skip=0, final_norm=True):
        """The states after all but ``clip_skip`` layers (diffusers' ``clip_skip``), through
        the final LayerNorm when ``final_norm``: (B, S) → (B, S, D)."""
        tm = self.text_model
        x = tm.embeddings(ids)
        for layer in tm.encoder.layers[: self._kept_layers(clip_skip)]:
            x = layer(x)
        return tm.final_layer_norm(x) if final_norm else x

    def encode(self, ids, clip_skip=0, final_norm=True):
        """(states (B, S, D) as ``forward`` gives them, pooled (B, D)) in one pass over the
        layers. The pooled output is transformers' ``pooler_output``: the last layer's output
        through the final LayerNorm, at each row's end-of-text token (``eos_positions``)."""
        tm = self.text_model
        kept = self._kept_layers(clip_skip)
        x = tm.embeddings(ids)
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x)
            if i + 1 == kept:
                states = x
        if final_norm:
            states = tm.final_layer_norm(states)
        rows = torch.arange(x.shape[0], device=x.device)
        # The LayerNorm is per token: normalising the B pooled rows alone gives the same values.
        pooled = tm.final_layer_norm(x[rows, self.eos_positions(ids)])  # (B, D)
        return states, pooled

    def eos_positions(self, ids):
        """Where each row of ids (B, S) has its end-of-text token, by transformers' rule.

        Configs written before transformers#24773 carry eos_token_id 2 (wrong for CLIP's
        vocabulary); for them transformers keeps the original CLIP rule, the position of the
        highest id, which is the EOS token (49407) unless textual-inversion tokens were added
        above it. Other configs name the EOS id: its first occurrence, since the padding may
        repeat it."""
        eos = self.config.eos_token_id
        if eos is None:
            raise SdrtError("the text encoder config has no eos_token_id: no pooled output")
        if eos == 2:
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text tower with its projection (SDXL's OpenCLIP ViT-bigG): ``encode`` returns
    the pooled output projected to ``projection_dim`` (transformers' ``text_embeds``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def encode(self, ids, clip_skip=0, final_norm=True):
        states, pooled = super().encode(ids, clip_skip, final_norm)
        return states, self.text_projection(pooled)  # (B, S, D), (B, projection_dim)


def text_model_class(cfg: TextConfig):
    """The module class for a checked config."""
    return CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel


def checkpoint_rename(keys):
    """How our parameter names map to a text encoder checkpoint's keys: None when they are the
    same, else a rename (our name → the checkpoint's key) for ``load_parameters``.

    transformers 4.x saves both classes, and 5.x saves CLIPTextModelWithProjection, as
    ``text_model.<...>`` (+ ``text_projection.weight``), as our modules name them; transformers
    5.x saves CLIPTextModel without the ``text_model.`` level."""
    if any(k.startswith("text_model.") for k in keys):
        return None
    return _without_text_model


def _without_text_model(name):
    return name[len("text_model."):] if name.startswith("text_model.") else name
