"""Textual-inversion embeddings: reading the files people download, in the layouts A1111 and
diffusers write, as (token name, vectors (n, D)).

    A1111 .safetensors      emb_params                (n, D)
    A1111 (older)           string_to_param.*         (n, D)   {"string_to_param": {"*": t}}
    diffusers               {token: tensor}           (D,) or (n, D)   learned_embeds.safetensors
    SDXL                    clip_l + clip_g           refused: SDXL is not supported yet

Only safetensors files are read (a pickle runs code when loaded). An A1111 file is named by its
file's stem, as A1111 names embeddings; a diffusers file by the token it holds; ``token``
overrides both. Adding the vectors to a tokenizer and text encoder is the pipeline's
``load_textual_inversion``.
"""
from pathlib import Path

import torch

from .errors import SdrtError
from .weights import SafetensorsFiles, refuse_pickle

_A1111_KEYS = ("emb_params", "string_to_param.*")


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


def read_embedding(path_or_state_dict, token: str | None = None,
                   hidden_size: int | None = None) -> tuple[str, torch.Tensor]:
    """(token name, vectors (n, D) float32) of one embedding; ``hidden_size`` (the text
    encoder's D) is checked when given."""
    state, where = read_state(path_or_state_dict)
    if "clip_l" in state or "clip_g" in state:
        raise SdrtError(f"{where}: an SDXL embedding (clip_l/clip_g); SDXL is not supported yet")
    a1111 = [k for k in _A1111_KEYS if k in state]
    if a1111:
        vectors = state[a1111[0]]
        if token is None:
            if isinstance(path_or_state_dict, dict):
                raise SdrtError(f"{where}: an A1111 embedding given as a state dict has no file "
                                f"name to call it by; pass token=")
            token = Path(where).stem
    else:
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(sorted(state)[:6]) or "none"
            raise SdrtError(f"{where}: not a textual-inversion embedding (expected emb_params, "
                            f"string_to_param.* or a single token's tensor; keys: {keys})")
        (name, vectors), = tensors.items()
        token = name if token is None else token
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or \
            vectors.ndim not in (1, 2) or vectors.numel() == 0:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise SdrtError(f"{where}: embedding vectors must be a float tensor (D,) or (n, D), "
                        f"got {shape}")
    vectors = vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1])
    if hidden_size is not None and vectors.shape[1] != hidden_size:
        raise SdrtError(f"{where}: embedding vectors have dimension {vectors.shape[1]}, but the "
                        f"text encoder's hidden size is {hidden_size}")
    if not torch.isfinite(vectors).all():
        raise SdrtError(f"{where}: embedding vectors hold inf or NaN")
    return token, vectors


def token_names(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding, as diffusers names them: token, token_1, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]
