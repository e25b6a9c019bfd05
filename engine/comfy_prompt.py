"""ComfyUI's prompt weighting (``prompt_syntax="comfy"``): how ComfyUI's CLIPTextEncode reads a
prompt, for the prompts of ComfyUI workflows.

It differs from A1111's syntax (``prompt_syntax.py``) in four places:

- **Weights** (``parse_weights``): only round brackets. ``(text)`` multiplies the weight by 1.1,
  nested ones again; ``(text:w)`` *sets* it to w (the float after the group's last colon,
  which replaces the brackets' 1.1 and any weight from outside). ``\\(`` and ``\\)`` are the
  characters themselves; square brackets and BREAK are text. A ``)`` with no ``(`` before it
  leaves the rest of the prompt unweighted, and a ``(`` never closed is text, as ComfyUI's
  parser reads them.
- **Chunks** (``tokenize``): each weighted piece of text is tokenised whole, a group of tokens.
  Chunks hold 75 tokens between BOS and EOS; a group that does not fit in the open chunk moves
  whole to the next one when it is short (under 8 tokens), else fills the chunk and goes on in
  the next (no comma backtracking).
- **Emphasis** (``apply_weights``): a token of weight w ≠ 1 becomes ``(z - e) · w + e``, with
  e the state at the same position of the empty prompt's chunk (BOS, EOS, padding); tokens
  of weight 1 are left alone, and nothing is rescaled afterwards.
- **Prompts of different lengths** (``tokenize_prompts``): ComfyUI repeats each prompt's chunks
  up to the least common multiple of the counts (attention over a repeated sequence is
  attention over the sequence), where A1111 pads with empty chunks. Within a prompt, SDXL's
  two encoders' chunks are first evened out with empty ones, as CLIPTextEncodeSDXL does.

``embedding:NAME`` (after a space, or at a piece's start; the name ends at a space, ``<`` or
``[``, its ``.safetensors``/``.pt``/``.bin`` dropped) is the textual-inversion embedding loaded
under that name, its vectors one group; one not loaded is refused (ComfyUI would leave it out
with a warning in its log).
"""
import math
import re

import torch

from .errors import SdrtError
from .prompt_syntax import Chunk, WeightedIds, _frame, empty_chunk
from .request import check_text

GROUP_MULTIPLIER = 1.1  # (text)
SHORT_GROUP = 8  # tokens: a shorter group is not split across chunks
EMBEDDING = "embedding:"
_EMBEDDING_START = re.compile(r"(?<=\s)" + re.escape(EMBEDDING))
_EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_OPEN, _CLOSE = "\0\2", "\0\1"  # escaped brackets while the groups are read
MAX_CHUNKS = 64  # the most chunks a batch's prompts are repeated to


def parse_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """ComfyUI's weights of a prompt: [(piece, weight), ...] in order (see the module
    docstring). Never raises."""
    text = text.replace("\\)", _CLOSE).replace("\\(", _OPEN)
    return [(piece.replace(_CLOSE, ")").replace(_OPEN, "("), w)
            for piece, w in _weights(text, weight)]


def _weights(text, weight):
    out = []
    for piece in _top_level(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner, inner_weight = piece[1:-1], weight * GROUP_MULTIPLIER
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:  # not a number: the colon is text
                    pass
            out += _weights(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


def _top_level(text):
    """``text`` cut into its top-level bracket groups and the text between them. A group opens
    at a "(" at depth 0 and closes where the depth is back to 0; a ")" at depth 0 takes the
    depth below 0, where no group opens or closes again."""
    pieces, start, depth = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            if depth == 0 and i > start:
                pieces.append(text[start:i])
                start = i
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                pieces.append(text[start:i + 1])
                start = i + 1
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _groups(tokenizer, text):
    """The prompt's token groups: [(ids, weight)], each weighted piece's tokens one group, an
    embedding's vectors another."""
    groups = []
    for piece, weight in parse_weights(text):
        if not math.isfinite(weight):
            raise SdrtError(f"prompt weight of {piece!r} must be finite, got {weight} (from "
                            f"the brackets around it in {text[:80]!r})")
        parts = _EMBEDDING_START.split(piece)
        words = [parts[0]] + [EMBEDDING + part for part in parts[1:]]
        for word in filter(None, words):
            if word.startswith(EMBEDDING):
                ids, word = _embedding(tokenizer, word[len(EMBEDDING):].strip("\n"))
                groups.append((ids, weight))
                if not word:
                    continue
            groups.append((tokenizer.token_ids([word])[0], weight))
    return groups


def _embedding(tokenizer, text):
    """(the ids of the embedding ``text`` starts with, the text after its name)."""
    words = text.split()
    name, rest = (words[0], " ".join(words[1:])) if words else ("", "")
    name = re.split(r"[/\\]", name)[-1]  # (a subfolder's: the file's name)
    cut = re.search(r"[<\[]", name)
    if cut is not None:
        rest = name[cut.start():] + (" " + rest if rest else "")
        name = name[:cut.start()]
    for candidate in (name, name.strip(",")):
        stem = next((candidate[:-len(s)] for s in _EMBEDDING_SUFFIXES
                     if candidate.lower().endswith(s)), candidate)
        if stem in tokenizer.embedding_tokens:
            if candidate != name:  # the commas after the name are text
                rest = name[len(candidate):] + (" " + rest if rest else "")
            return tokenizer.token_ids([stem])[0], rest
    loaded = ", ".join(sorted(tokenizer.embedding_tokens)) or "none"
    raise SdrtError(f"prompt names {EMBEDDING}{name}, which is not a loaded textual-inversion "
                    f"embedding (loaded: {loaded}); load_textual_inversion (sdrt generate "
                    f"--embedding PATH) loads one under its file's name")


def tokenize(tokenizer, text: str) -> list[Chunk]:
    """One prompt read as ComfyUI reads it → its chunks (at least one)."""
    if not isinstance(text, str):
        raise SdrtError(f"prompt must be a string, got {type(text).__name__}")
    check_text(text, "prompt")
    size = tokenizer.max_length - 2  # prompt tokens per chunk: 75
    chunks, ids, weights = [], [], []
    for group, weight in _groups(tokenizer, text):
        short = len(group) < SHORT_GROUP
        while group:
            room = size - len(ids)
            if len(group) <= room:
                ids += group
                weights += [weight] * len(group)
                break
            if not short:  # as much as fits here, the rest in the next chunk
                ids += group[:room]
                weights += [weight] * room
                group = group[room:]
            chunks.append(_frame(tokenizer, ids, weights))
            ids, weights = [], []
    chunks.append(_frame(tokenizer, ids, weights))
    return chunks


def tokenize_prompts(tokenizers: list, texts: list[list[str]]) -> list[WeightedIds]:
    """The prompts of a batch for each tokenizer (``texts[i]``: tokenizer i's, one per row) →
    a ``WeightedIds`` per tokenizer: in each row the tokenizers' chunks evened out with empty
    ones, then every row's repeated up to the least common multiple of the rows' counts (at
    most ``MAX_CHUNKS``); ``empty`` the empty prompt's chunk, for ``apply_weights``."""
    rows = [[tokenize(tokenizer, text) for text in batch]
            for tokenizer, batch in zip(tokenizers, texts)]
    counts = [max(len(chunks[r]) for chunks in rows) for r in range(len(rows[0]))]
    total = math.lcm(*counts)
    if total > MAX_CHUNKS:
        *most, last = sorted(set(counts))
        raise SdrtError(f"prompts of {', '.join(map(str, most))} and {last} chunks of 75 "
                        f"tokens: ComfyUI repeats each to {total} chunks, more than "
                        f"{MAX_CHUNKS}; shorten the longer prompts")
    out = []
    for tokenizer, chunks in zip(tokenizers, rows):
        empty = empty_chunk(tokenizer)
        tiled = [(row + [empty] * (count - len(row))) * (total // count)
                 for row, count in zip(chunks, counts)]
        out.append(WeightedIds(
            torch.tensor([[c.ids for c in row] for row in tiled], dtype=torch.long),
            torch.tensor([[c.weights for c in row] for row in tiled], dtype=torch.float32),
            empty=torch.tensor(empty.ids, dtype=torch.long)))
    return out


def apply_weights(states: torch.Tensor, weights: torch.Tensor,
                  empty: torch.Tensor) -> torch.Tensor:
    """ComfyUI's emphasis on encoded chunks: states (N, 77, D), weights (N, 77), ``empty`` the
    empty chunk's states (1, 77, D): ``(z - e) · w + e`` where w ≠ 1, the rest as it is (bit for
    bit). Computed in float32 and returned in the states' dtype; free of host synchronisation."""
    z = states.float()
    w = weights.to(device=z.device, dtype=torch.float32)[..., None]
    e = empty.float()
    return torch.where(w != 1, (z - e) * w + e, z).to(states.dtype)
