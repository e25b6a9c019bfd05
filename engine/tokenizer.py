"""CLIP's byte-level BPE tokenizer, as Stable Diffusion's text encoders expect it.

The BPE itself runs in the ``tokenizers`` library; this file only assembles the same pipeline
that transformers' ``CLIPTokenizer`` assembles, so the ids are equal to what diffusers feeds
the text encoder:

    normalise   NFC, every whitespace run -> " ", lowercase
    split       CLIP's regex: contractions, letter runs, single digits, punctuation runs
    BPE         byte-level, "</w>" marks the end of a word
    frame       <|startoftext|> ... <|endoftext|>, cut to max_length keeping the final
                <|endoftext|>, then padded with pad_token

SD 1.x pads with "<|endoftext|>" (id 49407); SD 2.x (OpenCLIP) pads with "!" (id 0). The text
encoder only reads up to the first <|endoftext|> for its pooled output, but the per-token
states the UNet attends to do depend on the padding, so the pad token must be the model's own.
"""
import gzip
import json
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sdrt.engine.errors import SdrtError
from sdrt.engine.request import check_text
from sdrt.engine.weights import read_json

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's text encoder has 77 position embeddings

_BUNDLED_MERGES = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's simple_tokenizer.py keeps the first 49152 - 256 - 2 merges (line 0 is a header):
# 256 byte tokens + 256 byte+"</w>" tokens + 48894 merges + 2 specials = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenisation regex (OpenAI simple_tokenizer.py, as transformers writes it); the
# text is already lowercased, so OpenAI's re.IGNORECASE changes nothing.
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
               r"|[^\s\p{L}\p{N}]+")

_SHOWN_WORDS = 6  # of the dropped tail, in the truncation warning

# transformers writes model_max_length = int(1e30) when a tokenizer config does not set one.
_UNSET_MAX_LENGTH = int(1e29)


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder can read; the tail was dropped."""


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte -> printable-character table, in CLIP's vocabulary order.

    The 188 printable Latin-1 bytes stand for themselves and come first; the other 68 bytes
    (whitespace, control characters) follow as chr(256), chr(257), ... so that no token holds
    whitespace. This order is OpenAI's bytes_to_unicode() dict order, which fixes ids 0-511.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and merges, from the bundled merges file.

    Built exactly as OpenAI's simple_tokenizer.py builds it: ids are positions in
    bytes + bytes+"</w>" + joined merges + [BOS, EOS].
    """
    lines = gzip.open(_BUNDLED_MERGES, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    byte_chars = _byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


class ClipTokenizer:
    """Prompts -> (B, max_length) int64 token ids, equal to transformers' CLIPTokenizer with
    ``padding="max_length", truncation=True``."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 pad_token: str = EOS, bos_token: str = BOS, eos_token: str = EOS,
                 unk_token: str = EOS, max_length: int = MAX_LENGTH,
                 added_tokens: dict[str, bool] | None = None,
                 extra_tokens: dict[str, int] | None = None):
        """``added_tokens``: a tokenizer_config.json's added_tokens_decoder as {content:
        normalized}, for tokens of the vocabulary; those tokens are matched whole too, and those
        marked normalized are matched in the normalised (lowercased) prompt rather than
        verbatim. ``extra_tokens``: its tokens past the vocabulary, {content: id}, the ids
        following it: textual-inversion tokens as ``add_embedding_tokens`` adds them (a
        saved pipeline's or an ONNX export's), an n-vector one's ``token_1`` ... grouped with
        its ``token`` by name, as diffusers' ``maybe_convert_prompt`` finds them."""
        added_tokens = added_tokens or {}
        for token in added_tokens:
            if token not in vocab:
                raise SdrtError(f"CLIP tokenizer: added token {token!r} is not in the vocabulary")
        for name, token in (("pad", pad_token), ("bos", bos_token), ("eos", eos_token),
                            ("unk", unk_token)):
            if token not in vocab:
                raise SdrtError(f"CLIP tokenizer: {name} token {token!r} is not in the vocabulary")
        if max_length < 2:
            raise SdrtError(f"CLIP tokenizer: max_length {max_length} leaves no room for "
                            f"{bos_token} and {eos_token}")
        try:
            model = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token)
        except Exception as e:  # tokenizers raises a bare Exception for a merge out of vocabulary
            raise SdrtError(f"CLIP tokenizer: bad vocabulary or merges ({str(e).splitlines()[0]})")
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            # invert=True + "removed": the regex matches are the pieces, the spaces between go.
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # transformers registers these as special added tokens: a literal "<|endoftext|>" in a
        # prompt is matched whole, before BPE. So is SD 2.x's pad "!": "horse!" becomes
        # "horse</w>", "!" (id 0), not "horse</w>", "!</w>" (id 256) as OpenCLIP would give.
        specials = dict.fromkeys((unk_token, bos_token, eos_token, pad_token), False) | added_tokens
        tok.add_special_tokens([AddedToken(t, special=True, normalized=n) for t, n in specials.items()])
        tok.post_processor = processors.RobertaProcessing(
            (eos_token, vocab[eos_token]), (bos_token, vocab[bos_token]),
            trim_offsets=False, add_prefix_space=False)
        self._tokenizer = tok
        self.max_length = max_length
        self.pad_token, self.bos_token, self.eos_token = pad_token, bos_token, eos_token
        self.unk_token = unk_token
        self.pad_token_id = vocab[pad_token]
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # Textual-inversion embeddings: a multi-vector embedding's first token -> the ids of all
        # its vectors, which replace it wherever it is matched (diffusers' maybe_convert_prompt);
        # and every embedding token's id, in the order added.
        self._groups: dict[int, tuple[int, ...]] = {}
        self.embedding_tokens: dict[str, int] = {}
        self._base_vocab = vocab
        for names in _embedding_groups(extra_tokens or {}, len(vocab)):
            self.add_embedding_tokens(names)

    def add_embedding_tokens(self, names: list[str]) -> list[int]:
        """Add the tokens of one textual-inversion embedding (``name``, ``name_1``, ...) and
        return their new ids, in order.

        Each is an added token, matched whole in the lowercased prompt before BPE, as
        transformers' ``add_tokens`` (which diffusers' ``load_textual_inversion`` uses), but only
        as a whole word: ``easyneg`` is matched in "easyneg, hands", not inside "myeasyneg"
        (A1111 too matches an embedding's name only where it is a word of its own). Where the
        first name is matched, the ids of all the names follow, so a prompt only writes the
        first. Refuses a name that is already a token or a CLIP word (which would lose its
        meaning in every prompt)."""
        for name in names:
            if not isinstance(name, str) or not name.strip() or name != name.strip():
                raise SdrtError(f"embedding token {name!r} must be a non-empty string without "
                                f"surrounding spaces")
            normal = self._tokenizer.normalizer.normalize_str(name)
            clash = next((t for t in (name, normal, normal + "</w>")
                          if self._tokenizer.token_to_id(t) is not None), None)
            if clash is not None:
                raise SdrtError(f"embedding token {name!r} is already in the tokenizer's "
                                f"vocabulary (as {clash!r}); load it under another token name")
        before = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._tokenizer.add_tokens([AddedToken(n, single_word=True, normalized=True)
                                    for n in names])
        ids = [self._tokenizer.token_to_id(n) for n in names]
        if ids != list(range(before, before + len(names))):
            raise SdrtError(f"embedding tokens {names} did not get consecutive new ids ({ids})")
        self.vocab_size = before + len(names)
        if len(ids) > 1:
            self._groups[ids[0]] = tuple(ids)
        self.embedding_tokens.update(zip(names, ids))
        return ids

    def embedding_length(self, token_id: int) -> int:
        """How many ids the embedding that starts with ``token_id`` takes (1 for any other)."""
        return len(self._groups.get(token_id, (token_id,)))

    def _expand(self, ids: list[int]) -> list[int]:
        if not self._groups:
            return ids
        return [j for i in ids for j in self._groups.get(i, (i,))]

    @classmethod
    def bundled(cls, pad_token: str = EOS, max_length: int = MAX_LENGTH) -> "ClipTokenizer":
        """CLIP's vocabulary from engine/data, for checkpoints that ship no tokenizer folder."""
        vocab, merges = clip_vocabulary()
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    @classmethod
    def from_folder(cls, path: str | Path) -> "ClipTokenizer":
        """A diffusers ``tokenizer/`` folder: vocab.json + merges.txt, or tokenizer.json, plus the
        optional tokenizer_config.json / special_tokens_map.json for the special tokens and
        model_max_length."""
        path = Path(path)
        if not path.is_dir():
            raise SdrtError(f"tokenizer folder {path} does not exist")
        vocab_file, merges_file, json_file = (path / "vocab.json", path / "merges.txt",
                                              path / "tokenizer.json")
        if vocab_file.is_file() and merges_file.is_file():
            vocab = _read_json_object(vocab_file, "tokenizer vocabulary")
            merges = _read_merges_txt(merges_file)
        elif json_file.is_file():
            vocab, merges = _read_tokenizer_json(json_file)
        else:
            missing = vocab_file if not vocab_file.is_file() else merges_file
            raise SdrtError(f"tokenizer folder {path} has no {missing.name} (nor a tokenizer.json)")

        settings = _read_optional_json(path / "tokenizer_config.json", "tokenizer config")
        # transformers 5 reads special_tokens_map.json only for configs without an
        # added_tokens_decoder, and then lets it override tokenizer_config.json.
        added = settings.get("added_tokens_decoder")
        if added is None:
            settings.update(_read_optional_json(path / "special_tokens_map.json",
                                                "special tokens map"))
        config_file = path / "tokenizer_config.json"
        if not isinstance(added or {}, dict) or not all(
                isinstance(t, dict) and isinstance(t.get("content"), str) for t in (added or {}).values()):
            raise SdrtError(f"{config_file}: added_tokens_decoder must map ids to objects with a "
                            f"'content' string")
        entries = (added or {}).values()
        added_tokens = {t["content"]: bool(t.get("normalized")) for t in entries
                        if t["content"] in vocab}
        try:
            extra = {t["content"]: int(i) for i, t in (added or {}).items()
                     if t["content"] not in vocab}
        except ValueError:
            raise SdrtError(f"{config_file}: added_tokens_decoder's keys must be token "
                            f"ids") from None
        max_length = settings.get("model_max_length") or MAX_LENGTH
        if isinstance(max_length, bool) or not isinstance(max_length, (int, float)):
            raise SdrtError(f"{config_file}: model_max_length must be a number, got {max_length!r}")
        if max_length >= _UNSET_MAX_LENGTH:
            max_length = MAX_LENGTH
        return cls(vocab, merges, max_length=int(max_length),
                   pad_token=_token_text(settings, "pad_token", EOS, path),
                   bos_token=_token_text(settings, "bos_token", BOS, path),
                   eos_token=_token_text(settings, "eos_token", EOS, path),
                   unk_token=_token_text(settings, "unk_token", EOS, path),
                   added_tokens=added_tokens, extra_tokens=extra)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids, (B, max_length) int64; a single string gives B = 1.

        A prompt longer than ``max_length`` tokens is cut, with a one-line
        ``PromptTruncatedWarning`` saying how many tokens were dropped.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise SdrtError(f"prompt[{i}] must be a string, got {type(prompt).__name__}")
            check_text(prompt, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        rows = []
        for enc in self._tokenizer.encode_batch(prompts):
            ids = self._expand(enc.ids)  # [bos, ..., eos]
            if len(ids) > self.max_length:
                self._warn_truncated(ids[self.max_length - 1:-1])
                ids = ids[:self.max_length - 1] + [self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids alone: no BOS/EOS, no padding, no truncation."""
        return [self._expand(e.ids)
                for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def token_id(self, token: str):
        """A vocabulary entry's id (e.g. ``",</w>"``), None when absent."""
        return self._tokenizer.token_to_id(token)

    def _warn_truncated(self, dropped):
        words = self.decode(dropped[:_SHOWN_WORDS]).split()[:_SHOWN_WORDS]
        more = " …" if len(dropped) > len(words) else ""
        message = (f"CLIP can only handle sequences up to {self.max_length} tokens "
                   f"({len(dropped)} tokens dropped: {' '.join(words)!r}{more})")
        # warn_explicit with no source line: the warning prints as one line, not followed by
        # whichever line of the caller's code it would be attributed to.
        warnings.warn_explicit(message, PromptTruncatedWarning, "sdrt", 0, module=__name__)

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, words separated by single spaces."""
        return self._tokenizer.decode(ids, skip_special_tokens=False).replace("</w>", " ").strip()


def write_clip_tokenizer(folder: str | Path, pad_token: str = EOS) -> Path:
    """Write CLIP's bundled vocabulary as a diffusers/transformers tokenizer folder.

    vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, laid out as the
    SD 1.x (pad "<|endoftext|>") and SD 2.x (pad "!") repositories have them, so that
    ``transformers.CLIPTokenizer.from_pretrained(folder)`` and ``ClipTokenizer.from_folder``
    both load it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocabulary()
    if pad_token not in vocab:
        raise SdrtError(f"pad token {pad_token!r} is not in CLIP's vocabulary")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {**special, "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def _embedding_groups(tokens: dict[str, int], first: int) -> list[list[str]]:
    """Tokens past a vocabulary of ``first`` entries ({content: id}), in id order from
    ``first`` on without a gap, as the groups of one embedding each: a token and the
    ``token_1``, ``token_2``, ... right after it."""
    order = sorted(tokens, key=tokens.get)
    if [tokens[t] for t in order] != list(range(first, first + len(order))):
        raise SdrtError(f"CLIP tokenizer: the tokens past the vocabulary ({len(order)}) must "
                        f"have the ids from {first} on, one after another; got "
                        f"{sorted(tokens.values())[:8]}")
    groups = []
    for token in order:
        if groups and token == f"{groups[-1][0]}_{len(groups[-1])}":
            groups[-1].append(token)
        else:
            groups.append([token])
    return groups


def write_embedding_tokens(folder: str | Path, tokenizer: "ClipTokenizer") -> None:
    """Record ``tokenizer``'s embedding tokens in the tokenizer folder ``folder`` (which holds
    its vocabulary) as transformers' ``save_pretrained`` records added tokens: entries of
    tokenizer_config.json's added_tokens_decoder, {id: {"content", ...}}, matched whole words
    in the lowercased prompt as sdrt matches them; the special tokens (bos, eos, unk, pad) are
    listed there too, since a config with an added_tokens_decoder is read without
    special_tokens_map.json. transformers' CLIPTokenizer (4.x and 5) and
    ``ClipTokenizer.from_folder`` then give the tokens their ids, and diffusers'
    ``maybe_convert_prompt`` expands an n-vector token to its n tokens."""
    if not tokenizer.embedding_tokens:
        return
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    settings = _read_optional_json(config_file, "tokenizer config")
    decoder = settings.get("added_tokens_decoder")
    if decoder is None:
        settings.update(_read_optional_json(folder / "special_tokens_map.json",
                                            "special tokens map"))
        decoder = {}
    vocab = tokenizer._base_vocab
    for key, value in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token),
                       ("unk_token", tokenizer.unk_token),
                       ("pad_token", tokenizer.pad_token)):
        settings[key] = value
        decoder.setdefault(str(vocab[value]), _added_entry(value, special=True))
    for name, i in tokenizer.embedding_tokens.items():
        decoder[str(i)] = _added_entry(name, special=False)
    settings["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")


def _added_entry(content: str, special: bool) -> dict:
    """An added_tokens_decoder entry as transformers writes it: a special token verbatim, an
    embedding token a whole word of the lowercased prompt."""
    return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False,
            "single_word": not special, "special": special}


def _token_text(settings: dict, key: str, default: str, folder: Path) -> str:
    """A special token as tokenizer configs hold it: a string or an AddedToken dict."""
    value = settings.get(key)
    if value is None:
        return default
    text = value.get("content") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise SdrtError(f"tokenizer folder {folder}: {key} must be a string or an object with a "
                        f"'content' string, got {value!r}")
    return text


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON file holding an object; SdrtError naming the file when it is not one."""
    value = read_json(str(path), what)
    if not isinstance(value, dict):
        raise SdrtError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def _read_optional_json(path: Path, what: str) -> dict:
    return _read_json_object(path, what) if path.is_file() else {}


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SdrtError(f"{path}: unreadable merges ({e})")
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = tuple(line.split())
        if len(pair) != 2:
            raise SdrtError(f"{path}, line {number}: a merge is two tokens separated by a space, "
                            f"got {line.strip()[:60]!r}")
        merges.append(pair)
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a tokenizers-format file; like transformers' CLIPTokenizer,
    the file's own normaliser and pre-tokeniser are replaced by CLIP's."""
    model = _read_json_object(path, "tokenizer").get("model", {})
    if (not isinstance(model, dict) or model.get("type", "BPE") != "BPE"
            or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list)):
        raise SdrtError(f"{path} does not hold a BPE vocabulary and merges")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for i, m in enumerate(merges):
        if len(m) != 2 or not all(isinstance(t, str) for t in m):
            raise SdrtError(f"{path}: merge {i} is not a pair of tokens: {model['merges'][i]!r}")
    return dict(model["vocab"]), merges
