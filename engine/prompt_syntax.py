"""AUTOMATIC1111's prompt syntax: attention weights, BREAK, and prompts longer than 77 tokens.

A prompt goes through three steps, each a function here, as stable-diffusion-webui does it
(``modules/prompt_parser.py`` and ``modules/sd_hijack_clip.py``, "Original" emphasis):

    parse_attention     "a (red:1.3) fox"  ->  [("a ", 1.0), ("red", 1.3), (" fox", 1.0)]
                        (x) ×1.1, [x] ÷1.1, (x:w) ×w, nested brackets multiply, unclosed
                        brackets close at the end, \\( \\) \\[ \\] \\\\ are the characters
                        themselves; "BREAK" becomes the marker ("BREAK", -1.0); neighbours
                        of equal weight are merged.
    tokenize_weighted   each fragment tokenised on its own (no BOS/EOS), tokens laid out in
                        chunks of 75, each chunk framed as BOS + 75 + EOS = 77 ids with a
                        weight per id (1.0 on BOS, EOS and padding). A chunk is closed early
                        by BREAK, or at the last comma when that comma is at most 20 tokens
                        back (the text after it moves to the next chunk whole).
    apply_weights       every chunk goes through the text encoder as its own 77-token
                        sequence (``conditioning.encode_text``, for each encoder of the
                        family), states × weights, then each chunk rescaled so that the mean
                        of its (77, D) states is the unweighted one; chunks are concatenated
                        along the sequence: (B, 77·n, D).

Prompts of a batch, and the positive and negative prompts of a CFG batch, must have the same
number of chunks: the shorter ones are padded with empty chunks (the ids of "", weights 1),
encoded like any other, as A1111 pads with the states of the empty prompt.

One A1111 quirk is kept on purpose: inside brackets BREAK's -1 is multiplied like any weight,
so "(a BREAK b)" encodes the word "BREAK" with weight -1.1 instead of starting a chunk.

Not handled (A1111 features outside the attention syntax): prompt editing ``[a:b:0.5]``,
alternation ``[a|b]``, ``AND``, textual-inversion embeddings, the "No norm" emphasis.
"""
import math
import re
from dataclasses import dataclass

import torch

from sdrt.engine.errors import SdrtError
from sdrt.engine.request import check_text

BREAK = ("BREAK", -1.0)  # parse_attention's marker for "start a new chunk here"
ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default, in tokens

# One token of the attention syntax per match, in this order of preference:
_ATTENTION_TOKEN = re.compile(r"""
      \\[()\[\]\\]                  # an escaped bracket or backslash: that character
    | \\                            # any other backslash: dropped
    | \( | \[                       # open
    | :([+-]?(?:\d+\.?\d*|\.\d+))\) # ":1.3)": close a round bracket with that weight
    | \) | \]                       # close
    | [^\\()\[\]:]+                 # text
    | :                             # a colon that is not part of a weight
""", re.X)
# A1111 reads the weight as [+-]?[.\d]+ and calls float() on it, which raises for "1.2.3" or
# "."; the pattern above only takes what float() reads, so such a ":1.2.3)" is text followed by
# a plain ")". Every weight A1111 accepts is read the same.

_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)  # the spaces around BREAK go with it

_COMMA = ",</w>"


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's ``parse_prompt_attention``: text -> [(fragment, weight), ...].

    Never raises. The weight of a fragment is the product of the multipliers of the brackets
    around it, applied innermost first. ``BREAK`` (a whole word, upper case) outside brackets
    gives the marker ``("BREAK", -1.0)``; inside brackets its weight is multiplied like any
    other and it is then read as the word "BREAK", as in A1111. Runs of equal weight are
    merged; an empty prompt gives ``[("", 1.0)]``.
    """
    parts: list[list] = []  # [fragment, weight], weights multiplied in place as brackets close
    open_round: list[int] = []  # index in parts where each open bracket starts
    open_square: list[int] = []

    def multiply_from(start, multiplier):
        for part in parts[start:]:
            part[1] *= multiplier

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, including an unmatched ")", "]" or ":w)"
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(list(BREAK))
                parts.append([piece, 1.0])
    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for fragment, weight in parts:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in merged] or [("", 1.0)]


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: ``tokenizer.max_length`` (77) ids and a weight for each."""
    ids: tuple[int, ...]  # BOS, up to 75 prompt tokens, EOS, padding
    weights: tuple[float, ...]  # 1.0 on BOS, EOS and padding


@dataclass(frozen=True)
class WeightedIds:
    """A batch of prompts as chunks: ``ids`` (B, n, 77) int64, ``weights`` (B, n, 77) float32;
    ``empty`` (77,) int64, the empty prompt's chunk, where the weights are ComfyUI's (relative
    to its states: ``comfy_prompt.apply_weights``), else None (A1111's emphasis)."""
    ids: torch.Tensor
    weights: torch.Tensor
    empty: torch.Tensor = None

    @property
    def num_chunks(self) -> int:
        return self.ids.shape[1]

    def to(self, device) -> "WeightedIds":
        return WeightedIds(self.ids.to(device), self.weights.to(device),
                           None if self.empty is None else self.empty.to(device))

    def repeat_interleave(self, k: int) -> "WeightedIds":
        """Each prompt's row k times (``num_images_per_prompt``)."""
        return WeightedIds(self.ids.repeat_interleave(k, dim=0),
                           self.weights.repeat_interleave(k, dim=0), self.empty)


def fragment_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids alone: no BOS/EOS, no padding, no truncation."""
    return tokenizer.token_ids(texts)


def empty_chunk(tokenizer) -> Chunk:
    """The chunk of the empty prompt, which pads shorter prompts: the ids of ``tokenizer("")``."""
    return _frame(tokenizer, [], [])


def _frame(tokenizer, ids, weights) -> Chunk:
    """BOS + ids + EOS, then padding up to max_length; weight 1.0 outside ``ids``.

    A1111 pads with EOS and, where the pad token differs (SD 2.x), turns everything after the
    first EOS into padding; the result is the same as the plain tokenizer's framing.
    """
    pad = tokenizer.max_length - 2 - len(ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return Chunk(ids=(bos, *ids, eos) + (tokenizer.pad_token_id,) * pad,
                 weights=(1.0, *weights, 1.0) + (1.0,) * pad)


def tokenize_weighted(tokenizer, text: str) -> list[Chunk]:
    """One prompt in A1111 syntax -> its chunks (at least one), as A1111's ``tokenize_line``."""
    if not isinstance(text, str):
        raise SdrtError(f"prompt must be a string, got {type(text).__name__}")
    check_text(text, "prompt")
    fragments = parse_attention(text)
    for fragment, weight in fragments:
        if not math.isfinite(weight):
            raise SdrtError(f"prompt weight of {fragment!r} must be finite, got {weight} "
                            f"(from the brackets around it in {text[:80]!r})")
    size = tokenizer.max_length - 2  # prompt tokens per chunk: 75
    comma = tokenizer.token_id(_COMMA)
    chunks: list[Chunk] = []
    ids: list[int] = []  # of the open chunk
    weights: list[float] = []
    last_comma = -1  # index in ids of the open chunk's last comma

    def close(n):
        """Close the open chunk with its first n tokens; the rest start the next one."""
        nonlocal ids, weights, last_comma
        chunks.append(_frame(tokenizer, ids[:n], weights[:n]))
        ids, weights, last_comma = ids[n:], weights[n:], -1

    tokenized = fragment_ids(tokenizer, [fragment for fragment, _ in fragments])
    for (fragment, weight), tokens in zip(fragments, tokenized):
        if (fragment, weight) == BREAK:
            close(len(ids))
            continue
        rest = 0  # ids still to come of a multi-vector embedding, appended without checks
        for token in tokens:
            if rest:
                rest -= 1
                ids.append(token)
                weights.append(weight)
                continue
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                # Full, and a comma not far back: end the chunk there, so the phrase after
                # the comma is not cut in two.
                close(last_comma + 1)
            if len(ids) == size:
                close(size)
            n = tokenizer.embedding_length(token)
            if len(ids) + n > size >= n:
                # A textual-inversion embedding's vectors stay in one chunk: as A1111, the
                # chunk ends early and the embedding starts the next one.
                close(len(ids))
            rest = n - 1 if n <= size else 0  # longer than a chunk: cut like text
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close(len(ids))
    return chunks


def tokenize_prompts(tokenizer, prompts: str | list[str],
                     num_chunks: int | None = None) -> WeightedIds:
    """Prompts -> ids and weights (B, n, 77), every prompt padded with empty chunks to n: the
    most chunks any of them needs, or ``num_chunks`` (refused when a prompt needs more)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rows = [tokenize_weighted(tokenizer, p) for p in prompts]
    return _stack(tokenizer, rows, num_chunks)


def match_chunks(tokenizer, *batches: WeightedIds) -> tuple[WeightedIds, ...]:
    """The batches padded with empty chunks to the same number of chunks (e.g. the positive
    and negative prompts of a CFG batch, as A1111's ``pad_cond_uncond`` does)."""
    n = max(b.num_chunks for b in batches)
    return tuple(_pad(tokenizer, b, n) for b in batches)


def _pad(tokenizer, batch: WeightedIds, num_chunks: int) -> WeightedIds:
    extra = num_chunks - batch.num_chunks
    if extra == 0:
        return batch
    empty = empty_chunk(tokenizer)
    b, _, length = batch.ids.shape
    ids = torch.tensor(empty.ids, dtype=torch.long).expand(b, extra, length)
    weights = torch.tensor(empty.weights, dtype=torch.float32).expand(b, extra, length)
    return WeightedIds(torch.cat([batch.ids, ids], 1), torch.cat([batch.weights, weights], 1))


def _stack(tokenizer, rows: list[list[Chunk]], num_chunks: int | None) -> WeightedIds:
    needed = max(len(chunks) for chunks in rows) if rows else 1
    if num_chunks is None:
        num_chunks = needed
    elif num_chunks < needed:
        raise SdrtError(f"a prompt needs {needed} chunks of {tokenizer.max_length - 2} tokens, "
                        f"more than the {num_chunks} asked for")
    empty = empty_chunk(tokenizer)
    rows = [chunks + [empty] * (num_chunks - len(chunks)) for chunks in rows]
    ids = torch.tensor([[c.ids for c in chunks] for chunks in rows], dtype=torch.long)
    weights = torch.tensor([[c.weights for c in chunks] for chunks in rows], dtype=torch.float32)
    shape = (len(rows), num_chunks, tokenizer.max_length)
    return WeightedIds(ids.reshape(shape), weights.reshape(shape))


def apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on encoded chunks: states (N, 77, D) × weights (N, 77), then
    each chunk scaled back to its unweighted mean over (77, D).

    Computed in float32 and returned in the states' dtype. A chunk whose weights are all 1 is
    returned unchanged (bit for bit), without the division by its mean. Free of host
    synchronisation, so a static plan can capture it with the text encoder.
    """
    z = states.float()
    w = weights.to(device=z.device, dtype=torch.float32)
    weighted = z * w[..., None]
    mean, new_mean = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    # A chunk whose mean is ~0 next to its magnitude (a text encoder whose states are
    # centred, e.g. a final LayerNorm without bias) has no mean to restore: the ratio of two
    # near-zero means would scale the states to ~0 or to inf/NaN, so that chunk keeps its
    # weighted states. Real CLIP states have a clear mean, and are rescaled as A1111 does.
    floor = 1e-3 * z.abs().mean(dim=(1, 2), keepdim=True)
    usable = (mean.abs() > floor) & (new_mean.abs() > floor)
    scale = torch.where(usable, mean / torch.where(usable, new_mean, 1.0), 1.0)
    unweighted = (w == 1).all(dim=1)[:, None, None]
    return torch.where(unweighted, z, weighted * scale).to(states.dtype)
