"""Textual-inversion embeddings: reading the files people download, in the layouts A1111 and
diffusers write, as (token name, vectors (n, D) for each text encoder).

    A1111 .safetensors      emb_params                (n, D)
    A1111 (older)           string_to_param.*         (n, D)   {"string_to_param": {"*": t}}
    diffusers               {token: tensor}           (D,) or (n, D)   learned_embeds.safetensors
    SDXL (A1111, civitai)   clip_l (n, 768)           rows for text_encoder (CLIP ViT-L)
                            clip_g (n, 1280)          rows for text_encoder_2 (OpenCLIP bigG)

The first three are for one-text-encoder models (SD 1.x, SD 2.x); an SDXL file is for SDXL,
whose every text encoder gets its own rows for the same tokens (the refiner, with only
text_encoder_2, takes ``clip_g``). Each is refused, saying so, by a model of the other kind.

Only safetensors files are read (a pickle runs code when loaded). An A1111 or SDXL file is
named by its file's stem, as A1111 names embeddings; a diffusers file by the token it holds;
``token`` overrides both. Adding the vectors to the tokenizers and text encoders is the
pipeline's ``load_textual_inversion``.
"""
from pathlib import Path

import torch

from .errors import SdrtError
from .weights import SafetensorsFiles, refuse_pickle

_A1111_KEYS = ("emb_params", "string_to_param.*")
# The SDXL layout's key for each text encoder's rows.
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def _flatten(state: dict, prefix="") -> dict:
    """{"string_to_param": {"*": t}} -> {"string_to_param.*": t}, as safetensors stores it."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_state(path_or_state_dict) -> tuple[dict, str]:
    """The tensors of an embedding file (or a given state dict, nested dicts flattened with
    "."), and a name to report it by."""
    if isinstance(path_or_state_dict, dict):
        return _flatten(path_or_state_dict), "embedding state dict"
    path = str(path_or_state_dict)
    refuse_pickle(path)
    if not Path(path).is_file():
        raise SdrtError(f"embedding file {path} does not exist")
    with SafetensorsFiles([path]) as files:
        return {k: read() for k, read in files.source.items()}, path


def read_embeddings(path_or_state_dict, token: str | None, hidden_sizes: dict,
                    model: str) -> tuple[str, dict]:
    """(token name, {text encoder: vectors (n, D) float32}) of one embedding for a model whose
    text encoders are ``hidden_sizes`` ({component: D, or None to take any D}); ``model``
    names it in messages ("SDXL"). A file of the other kind (SD 1.x/2.x vs SDXL) is
    refused."""
    state, where = read_state(path_or_state_dict)
    sdxl_file = any(k in state for k in SDXL_KEYS.values())
    sdxl_model = set(hidden_sizes) != {"text_encoder"}
    if sdxl_file and not sdxl_model:
        raise SdrtError(f"{where}: an SDXL embedding (clip_l/clip_g vectors), for SDXL models, "
                        f"not {model}")
    if sdxl_model and not sdxl_file:
        raise SdrtError(f"{where}: not an SDXL embedding (expected clip_l and clip_g vectors; "
                        f"keys: {_keys(state)}): an SD 1.x/2.x embedding does not fit {model}")
    if not sdxl_model:
        token, vectors = _one_encoder(state, where, token, isinstance(path_or_state_dict, dict))
        return token, {"text_encoder": _checked(vectors, where, "embedding",
                                                hidden_sizes["text_encoder"])}
    unknown = sorted(set(state) - set(SDXL_KEYS.values()))
    if unknown:
        raise SdrtError(f"{where}: an SDXL embedding holds clip_l and clip_g only; it also has "
                        f"{', '.join(unknown[:6])}")
    missing = [SDXL_KEYS[c] for c in hidden_sizes if SDXL_KEYS[c] not in state]
    if missing:
        raise SdrtError(f"{where}: the SDXL embedding has no {' or '.join(missing)} vectors, "
                        f"which {model} needs")
    vectors = {c: _checked(state[SDXL_KEYS[c]], where, SDXL_KEYS[c], d, c)
               for c, d in hidden_sizes.items()}
    counts = {SDXL_KEYS[c]: len(v) for c, v in vectors.items()}
    if len(set(counts.values())) > 1:
        raise SdrtError(f"{where}: clip_l and clip_g must hold as many vectors each (one per "
                        f"token), got {counts}")
    return _stem_token(token, where, isinstance(path_or_state_dict, dict)), vectors


def read_embedding(path_or_state_dict, token: str | None = None,
                   hidden_size: int | None = None) -> tuple[str, torch.Tensor]:
    """(token name, vectors (n, D) float32) of one one-text-encoder embedding (SD 1.x/2.x);
    ``hidden_size`` (the text encoder's D) is checked when given."""
    token, vectors = read_embeddings(path_or_state_dict, token, {"text_encoder": hidden_size},
                                     "SD 1.x/2.x")
    return token, vectors["text_encoder"]


def _one_encoder(state, where, token, from_dict):
    """(token, raw vectors) of an A1111 or diffusers one-text-encoder embedding."""
    a1111 = [k for k in _A1111_KEYS if k in state]
    if a1111:
        return _stem_token(token, where, from_dict), state[a1111[0]]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1:
        raise SdrtError(f"{where}: not a textual-inversion embedding (expected emb_params, "
                        f"string_to_param.* or a single token's tensor; keys: {_keys(state)})")
    (name, vectors), = tensors.items()
    return (name if token is None else token), vectors


def _stem_token(token, where, from_dict):
    """``token``, else the file's stem (A1111's name for an embedding)."""
    if token is not None:
        return token
    if from_dict:
        raise SdrtError(f"{where}: an A1111 embedding given as a state dict has no file name to "
                        f"call it by; pass token=")
    return Path(where).stem


def _keys(state):
    return ", ".join(sorted(state)[:6]) or "none"


def _checked(vectors, where, what, hidden_size, encoder="the text encoder"):
    """Vectors as (n, D) float32 on the CPU, checked: a float tensor, D = ``hidden_size``
    (when given), finite."""
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or \
            vectors.ndim not in (1, 2) or vectors.numel() == 0:
        shape = (tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else
                 type(vectors).__name__)
        raise SdrtError(f"{where}: {what} vectors must be a float tensor (D,) or (n, D), "
                        f"got {shape}")
    vectors = vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1])
    if hidden_size is not None and vectors.shape[1] != hidden_size:
        raise SdrtError(f"{where}: {what} vectors have dimension {vectors.shape[1]}, but "
                        f"{encoder}'s hidden size is {hidden_size}")
    if not torch.isfinite(vectors).all():
        raise SdrtError(f"{where}: {what} vectors hold inf or NaN")
    return vectors


def token_names(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding, as diffusers names them: token, token_1, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_embedding(tokenizers: dict, encoders: dict, family, path_or_state_dict,
                  token: str | None, loaded: dict) -> str:
    """Add one embedding to sdrt's ``tokenizers`` ({"tokenizer": ..., ...}) and text
    ``encoders`` ({"text_encoder": ..., ...}) of a model of ``family``: its tokens, the same ids
    in every tokenizer, and each text encoder's rows (see ``Pipeline.load_textual_inversion``).
    ``loaded`` ({token: rows}) holds those added before and gets this one; the same token again
    is a no-op with the same vectors, refused with others. Returns the token."""
    if token is not None and not isinstance(token, str):
        raise SdrtError(f"token must be a string, got {type(token).__name__}")
    token, rows = read_embeddings(path_or_state_dict, token,
                                  {c: m.config.hidden_size for c, m in encoders.items()},
                                  family.label)
    pairs = dict(zip(family.tokenizers, family.text_encoders))
    for t, c in pairs.items():
        if tokenizers[t].vocab_size != encoders[c].config.vocab_size:
            raise SdrtError(f"cannot add embedding tokens: {t} has {tokenizers[t].vocab_size} "
                            f"tokens but {c} {encoders[c].config.vocab_size} rows")
    sizes = {t: tokenizers[t].vocab_size for t in pairs}
    if len(set(sizes.values())) > 1:
        raise SdrtError(f"cannot add embedding tokens: the tokenizers' vocabularies differ in "
                        f"size ({sizes}), so one token would get different ids")
    if token in loaded:
        if all(torch.equal(loaded[token][c], rows[c]) for c in rows):
            return token
        raise SdrtError(f"embedding token {token!r} is already loaded with other vectors; "
                        f"load this one under another token name")
    # The new tokens' ids are the new rows: each table and its vocabulary had one size, the
    # same for every tokenizer (which share CLIP's vocabulary), so the ids agree too.
    names = token_names(token, len(rows[family.text_encoders[0]]))
    for t in pairs:
        tokenizers[t].add_embedding_tokens(names)
    for c, vectors in rows.items():
        encoders[c].add_token_embeddings(vectors)
    loaded[token] = rows
    return token
