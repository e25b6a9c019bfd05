"""sdrt's CLIP tokenizer against transformers' CLIPTokenizer on the same tokenizer folder.

The folder is written by ``write_clip_tokenizer`` from the bundled merges file, once per pad
token (SD 1.x pads with "<|endoftext|>", SD 2.x with "!"); transformers builds its own pipeline
from those files, so equal ids mean equal normalisation, splitting, BPE and framing.
"""
import json
import shutil
import warnings

import pytest
import torch
import transformers

from sdrt.engine.errors import SdrtError
from sdrt.engine.tokenizer import ClipTokenizer, PromptTruncatedWarning, write_clip_tokenizer

PAD_TOKENS = ["<|endoftext|>", "!"]  # SD 1.x, SD 2.x

# In transformers 5 CLIPTokenizerFast is an alias of CLIPTokenizer; in 4.x it is the
# tokenizers-backed class beside the Python one. Compare against each distinct class.
REFERENCES = list(dict.fromkeys([transformers.CLIPTokenizer,
                                 getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)]))

LONG_PROMPT = ("an intricately detailed oil painting of a sprawling medieval city at dusk, "
               "glowing lanterns, cobblestone streets, towering cathedrals, misty mountains in "
               "the distance, dramatic volumetric lighting, by greg rutkowski and alphonse mucha, "
               "trending on artstation, 8k, ultra-detailed, sharp focus, cinematic composition, "
               "rich colour palette, highly intricate architecture, bustling market square, "
               "banners fluttering, birds in flight, reflections in puddles, golden hour, a lone "
               "knight on a white horse crossing the ancient stone bridge while children chase "
               "pigeons past the fountain and merchants haggle over silk, spices and copper pots")

PROMPTS = [
    # the diffusers example prompt: plain lowercase words
    "a photo of an astronaut riding a horse on mars",
    # empty negative prompt: <|startoftext|> <|endoftext|> then 75 pad ids
    "",
    # prompt-weighting syntax: punctuation runs are their own pieces; "!" is SD 2.x's pad token,
    # which transformers matches as a special token inside the prompt
    "masterpiece, (best quality:1.2), [ugly], {blue|red} -- 8k!!! #art @user",
    # contractions are split off by CLIP's regex ('s 't 're 've 'm 'll 'd)
    "it's a dog's life; they'll say we'd've been I'M fine",
    # accented Latin letters: multi-byte UTF-8 in byte-level BPE
    "Café naïve résumé Ångström Œuvre",
    # a decomposed accent: NFC composes e + U+0301 into é before BPE
    "cafe\u0301",
    # CJK, Hangul and emoji (incl. a ZWJ sequence): many bytes per character
    "東京の夜景 🌃🤖 한국어 👩‍🚀",
    # digits are single-character pieces: 3.14 -> 3 . 1 4, 1,000,000 -> 1 , 0 0 0 ...
    "pi is 3.14 and 1,000,000 people in 2024",
    # mixed case: everything is lowercased
    "A PhOtO Of A CAT wearing SUNGLASSES",
    # whitespace runs, newlines and tabs collapse to one space; leading/trailing dropped
    "  leading and trailing  \n\n\ttabs\tand   spaces  \r\n",
    # non-ASCII whitespace (no-break, em, ideographic space) is \s too
    "no\u00a0break\u2003em\u3000ideographic",
    # literal special tokens in a prompt are matched whole, not BPE'd
    "hello <|endoftext|> world<|startoftext|>again",
    # NFC (not NFKC): full-width letters and ligatures keep their own bytes
    "ＡＢＣ ﬁne ½",
    # zero-width space and a control character: neither letter, digit nor whitespace
    "zero\u200bwidth\u0007bell",
    # exactly 75 word tokens: fills max_length with no truncation
    " ".join(["a"] * 75),
    # 76 word tokens: one over, the last word is dropped
    " ".join(["a"] * 76),
    # far over 77 tokens: truncated to 76 tokens + the final <|endoftext|>
    LONG_PROMPT,
]


PAD_IDS = {"<|endoftext|>": 49407, "!": 0}


@pytest.fixture(scope="module", params=PAD_TOKENS)
def tokenizer_dir(request, tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"), pad_token=request.param)


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return ClipTokenizer.from_folder(tokenizer_dir)


@pytest.fixture(scope="module", params=REFERENCES, ids=lambda c: c.__name__)
def reference(request, tokenizer_dir):
    return request.param.from_pretrained(tokenizer_dir)


def _prompt_id(prompt: str) -> str:
    return repr(prompt[:24]) + (f"+{len(prompt) - 24}" if len(prompt) > 24 else "")


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "tokenizer")


def _ours(tok: ClipTokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tok(prompts)


def _theirs(ref, prompts) -> torch.Tensor:
    return ref(prompts, padding="max_length", truncation=True, max_length=77,
               return_tensors="pt").input_ids


def assert_ids_equal(ours: torch.Tensor, ref: torch.Tensor, prompts: list[str]):
    assert ours.dtype == torch.long
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != transformers' {tuple(ref.shape)}"
    diff = (ours != ref).nonzero()
    if len(diff):
        b, i = diff[0].tolist()
        pytest.fail(f"prompt {prompts[b]!r}: first difference at position {i}: "
                    f"ours {ours[b, i:i + 5].tolist()} vs transformers {ref[b, i:i + 5].tolist()}")


@pytest.mark.parametrize("prompt", PROMPTS, ids=_prompt_id)
def test_ids_match_transformers(ours, reference, prompt):
    assert_ids_equal(_ours(ours, prompt), _theirs(reference, [prompt]), [prompt])


def test_batch_matches_transformers(ours, reference):
    # the whole varied set as one batch: rows must not influence each other's padding
    assert_ids_equal(_ours(ours, PROMPTS), _theirs(reference, PROMPTS), PROMPTS)


def test_pinned_ids():
    # ids as openai/clip-vit-large-patch14 gives them: checks the vocabulary's derivation from
    # the merges file, which the comparison above (same files on both sides) cannot.
    tok = ClipTokenizer.bundled()
    ids = tok("a photo of an astronaut riding a horse on mars")[0]
    assert ids[:12].tolist() == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert (ids[12:] == 49407).all()
    assert (tok.vocab_size, tok.max_length, tok.bos_token_id, tok.eos_token_id) == (49408, 77, 49406, 49407)


def test_bundled_equals_from_folder(ours):
    bundled = ClipTokenizer.bundled(pad_token=ours.pad_token)
    for tok in (bundled, ours):
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
            PAD_IDS[ours.pad_token], 49406, 49407)
        assert (tok.vocab_size, tok.max_length) == (49408, 77)
    assert_ids_equal(_ours(bundled, PROMPTS), _ours(ours, PROMPTS), PROMPTS)


@pytest.mark.parametrize("prompt, dropped", [
    (" ".join(["a"] * 75), 0),  # exactly fills 77: no warning
    (" ".join(["a"] * 76), 1),  # one word over
    (LONG_PROMPT, None),        # far over: count taken from transformers' untruncated ids
], ids=["fits", "one-over", "long"])
def test_truncation_warning(ours, reference, prompt, dropped):
    if dropped is None:
        dropped = len(reference(prompt).input_ids) - 77
        assert dropped > 30
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = ours([prompt, "short"])
    truncation = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    if dropped == 0:
        assert truncation == []
    else:
        assert len(truncation) == 1, [str(w.message) for w in caught]
        message = str(truncation[0].message)
        assert "CLIP can only handle sequences up to 77 tokens" in message
        assert f"({dropped} tokens dropped: " in message, message
        # One short line: the count and a few words, not every dropped token.
        assert "\n" not in message and len(message) < 160, message
        # As Python prints it: no source line follows the message.
        w = truncation[0]
        shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
        assert shown.count("\n") == 1, shown
    assert ids[0, -1] == ours.eos_token_id  # the kept sequence still ends in <|endoftext|>


def test_tokenizer_json_only(tmp_path, tokenizer_dir, reference):
    # a folder holding only the tokenizers-format file (as transformers 5 saves one) and the config
    ref = reference
    only_json = tmp_path / "tokenizer"
    only_json.mkdir()
    ref.backend_tokenizer.save(str(only_json / "tokenizer.json"))
    shutil.copy(tokenizer_dir / "tokenizer_config.json", only_json)
    ours = ClipTokenizer.from_folder(only_json)
    assert ours.pad_token_id == ref.pad_token_id
    assert_ids_equal(_ours(ours, PROMPTS), _theirs(ref, PROMPTS), PROMPTS)


def test_special_tokens_map_overrides_legacy_config(tmp_path, tokenizer_dir):
    # tokenizer_config.json and special_tokens_map.json disagree on the pad token (older SD 2.x
    # folders do): for a config without added_tokens_decoder transformers takes the map's
    folder = _copy(tokenizer_dir, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    pad = config["pad_token"]
    other = next(t for t in PAD_TOKENS if t != pad)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": other}))
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = ClipTokenizer.from_folder(folder)
    assert ours.pad_token_id == ref.pad_token_id == PAD_IDS[pad]
    assert_ids_equal(_ours(ours, PROMPTS), _theirs(ref, PROMPTS), PROMPTS)


def test_added_tokens_decoder_normalized(tmp_path, tokenizer_dir):
    # a config with an added_tokens_decoder (as transformers >= 4.34 saves one) whose tokens are
    # marked normalized: transformers then matches them in the lowercased prompt, so
    # "<|ENDOFTEXT|>" is id 49407, not BPE pieces; "!" is listed for both pad tokens, so for
    # SD 1.x's folder it is an added token beyond the four named ones
    folder = _copy(tokenizer_dir, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(i): {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in ((0, "!"), (49406, "<|startoftext|>"), (49407, "<|endoftext|>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = ClipTokenizer.from_folder(folder)
    prompts = ["<|ENDOFTEXT|> a <|StartOfText|> b", *PROMPTS]
    assert_ids_equal(_ours(ours, prompts), _theirs(ref, prompts), prompts)


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_file_names_it(tmp_path, missing):
    # the other file is present (its content is never read: the check comes first)
    present = {"vocab.json", "merges.txt"} - {missing}
    (tmp_path / present.pop()).write_text("")
    with pytest.raises(SdrtError, match=missing) as err:
        ClipTokenizer.from_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(SdrtError, match="does not exist"):
        ClipTokenizer.from_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer_config.json",
                                  "special_tokens_map.json", "tokenizer.json"])
@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])  # malformed; valid but not an object
def test_bad_json_file_names_it(tmp_path, tokenizer_dir, name, content):
    folder = _copy(tokenizer_dir, tmp_path)
    if name == "tokenizer.json":  # read only when vocab.json + merges.txt are absent
        (folder / "vocab.json").unlink()
        (folder / "merges.txt").unlink()
    (folder / name).write_text(content)
    with pytest.raises(SdrtError, match=name) as err:
        ClipTokenizer.from_folder(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("line", ["a", "a b c"])  # one token, three
def test_bad_merges_line_names_file_and_line(tmp_path, tokenizer_dir, line):
    folder = _copy(tokenizer_dir, tmp_path)
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines.insert(5, line)  # line 6: after "#version" and four merges
    (folder / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(SdrtError, match=r"merges\.txt, line 6") as err:
        ClipTokenizer.from_folder(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("settings,match", [
    ({"model_max_length": "77"}, "model_max_length"),
    ({"pad_token": 5}, "pad_token"),
    ({"pad_token": {"id": 0}}, "pad_token"),
    ({"added_tokens_decoder": {"0": "!"}}, "added_tokens_decoder"),
])
def test_bad_tokenizer_config_values(tmp_path, tokenizer_dir, settings, match):
    folder = _copy(tokenizer_dir, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    (folder / "special_tokens_map.json").unlink()  # else it overrides the config's tokens
    with pytest.raises(SdrtError, match=match) as err:
        ClipTokenizer.from_folder(folder)
    assert "\n" not in str(err.value)


def test_merge_out_of_vocabulary(tmp_path, tokenizer_dir):
    folder = _copy(tokenizer_dir, tmp_path)
    with open(folder / "merges.txt", "a", encoding="utf-8") as fh:
        fh.write("qqqq zzzz\n")
    with pytest.raises(SdrtError, match="out of vocabulary") as err:
        ClipTokenizer.from_folder(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prompts, name, position", [
    ("a fox\udcff", "prompt", 5),                 # invalid UTF-8 from a shell, as surrogateescape
    (["fine", "\ud800 alone"], "prompt\\[1\\]", 0),  # a lone high surrogate, second prompt
])
def test_lone_surrogate_is_refused_with_its_position(ours, prompts, name, position):
    with pytest.raises(SdrtError, match=rf"{name} must be valid Unicode text, got '\\ud[8c]..' "
                                        rf"at position {position}"):
        ours(prompts)


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_embedding_tokens_written_and_read_back(tmp_path, pad):
    # An export's tokenizer folder: the bundled vocabulary and two embeddings' tokens (one of
    # three vectors, one of one) recorded as transformers records added tokens; read back
    # by sdrt (the three-vector one grouped by name again) and by transformers, the same ids.
    from sdrt.engine.tokenizer import write_embedding_tokens
    ours = ClipTokenizer.bundled(pad_token=pad)
    ours.add_embedding_tokens(["styleq", "styleq_1", "styleq_2"])
    ours.add_embedding_tokens(["neg_x"])
    folder = write_clip_tokenizer(tmp_path / "tok", pad_token=pad)
    write_embedding_tokens(folder, ours)
    back = ClipTokenizer.from_folder(folder)
    prompts = ["a styleq fox, neg_x", "styleq_1 alone", "Styleq!"]
    assert back.embedding_tokens == ours.embedding_tokens == {
        "styleq": 49408, "styleq_1": 49409, "styleq_2": 49410, "neg_x": 49411}
    assert torch.equal(back(prompts), ours(prompts))
    assert back(prompts)[0, :7].tolist() == [49406, 320, 49408, 49409, 49410, 3240, 267]
    theirs = transformers.CLIPTokenizer.from_pretrained(folder)
    expanded = ["a styleq styleq_1 styleq_2 fox, neg_x", "styleq_1 alone"]
    assert theirs(expanded, padding="max_length", max_length=77,
                  return_tensors="pt").input_ids.tolist() == ours(prompts[:2]).tolist()
    assert theirs.pad_token == pad


def test_embedding_tokens_past_the_vocabulary_must_follow_it(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"49410": {"content": "zqxgapz", "normalized": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SdrtError, match="must have the ids from 49408 on"):
        ClipTokenizer.from_folder(folder)
