"""A1111 prompt syntax (engine/prompt_syntax.py): parsing against A1111's own published
examples, chunking against token lists built by hand, and weighting against a hand
computation on the tiny text encoder's states."""
import math

import numpy as np
import pytest
import torch

from sdrt.engine.conditioning import TextInputs, encode_text
from sdrt.engine.errors import SdrtError
from sdrt.engine.families import SD1
from sdrt.engine.prompt_syntax import (BREAK, COMMA_BACKTRACK, WeightedIds, apply_weights,
                                       empty_chunk, fragment_ids, match_chunks,
                                       parse_attention, tokenize_prompts, tokenize_weighted)
from sdrt.engine.tiny import tiny_components
from sdrt.engine.tokenizer import ClipTokenizer


def encode_weighted(text_encoder, tokenizer, prompts, clip_skip=0):
    """Prompts in A1111 syntax → SD 1.x text states (B, 77·n, D), as the pipeline encodes them."""
    inputs = TextInputs({"tokenizer": tokenize_prompts(tokenizer, prompts)})
    states, _ = encode_text(SD1, {"text_encoder": text_encoder}, inputs, clip_skip)
    return states


pytest.importorskip("hypothesis")  # in the "test" extra; absent on a bare GPU machine
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# fp32 on the CPU: the same chunk encoded in a batch of B·n rows or alone differs only by the
# matmul's blocking, far below this.
ATOL, RTOL = 1e-5, 1e-5

# Every example of the docstring of A1111's parse_prompt_attention (modules/prompt_parser.py),
# verbatim: the input as the doctest's source line reads it, the output as the doctest prints
# it. The docstring is not a raw string, so '\(' there is a backslash and a bracket.
A1111_DOCTESTS = [
    ('normal text', [['normal text', 1.0]]),
    ('an (important) word', [['an ', 1.0], ['important', 1.1], [' word', 1.0]]),
    ('(unbalanced', [['unbalanced', 1.1]]),
    ('\\(literal\\]', [['(literal]', 1.0]]),
    ('(unnecessary)(parens)', [['unnecessaryparens', 1.1]]),
    ('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
     [['a ', 1.0],
      ['house', 1.5730000000000004],
      [' ', 1.1],
      ['on', 1.0],
      [' a ', 1.1],
      ['hill', 0.55],
      [', sun, ', 1.1],
      ['sky', 1.4641000000000006],
      ['.', 1.1]]),
]


@pytest.mark.parametrize("text, expected", A1111_DOCTESTS, ids=[t for t, _ in A1111_DOCTESTS])
def test_parse_attention_matches_a1111_doctests(text, expected):
    # Exact float equality: the weights are multiplied in A1111's order, innermost first.
    assert [[fragment, weight] for fragment, weight in parse_attention(text)] == expected


# Further cases, each worked out by hand from A1111's rules (the reason is the id).
PARSE_CASES = {
    "square divides by 1.1": ("a [b]", [("a ", 1.0), ("b", 1 / 1.1)]),
    "nested squares": ("[[b]]", [("b", 1 / 1.1 / 1.1)]),
    "explicit weight 1.0 is plain": ("a (fox:1.0)", [("a fox", 1.0)]),
    "weight forms A1111 reads": ("(a:2)(b:.5)(c:1.)(d:+1.25)(e:-0.5)",
                                 [("a", 2.0), ("b", 0.5), ("c", 1.0), ("d", 1.25), ("e", -0.5)]),
    "weight applies to the whole bracket": ("(a (b) c:2)", [("a ", 2.0), ("b", 1.1 * 2.0),
                                                           (" c", 2.0)]),
    "unmatched closers are text": ("a) b] c:1.5)", [("a) b] c:1.5)", 1.0)]),
    "colon without a number is text": ("(a:b)", [("a:b", 1.1)]),
    # A1111 raises ValueError on float("1.2.3"); here the ":1.2.3)" is text and ")" closes.
    "malformed weight is text": ("(x:1.2.3)", [("x:1.2.3", 1.1)]),
    "escaped backslash": ("a\\\\b", [("a\\b", 1.0)]),
    "lone backslash is dropped": ("a\\b", [("ab", 1.0)]),
    "escapes inside brackets are weighted": ("(\\(x\\))", [("(x)", 1.1)]),
    "empty prompt": ("", [("", 1.0)]),
    "empty brackets": ("()[]", [("", 1.0)]),
    "BREAK eats the spaces around it": ("a  BREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    "BREAK alone": ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    "BREAK is a whole upper-case word": ("aBREAK break BREAKs", [("aBREAK break BREAKs", 1.0)]),
    # Inside brackets the marker's -1 is multiplied like any weight, so it is no longer the
    # marker: A1111 then encodes the word "BREAK" with weight -1.1.
    "BREAK inside brackets is a word": ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
}


@pytest.mark.parametrize("text, expected", PARSE_CASES.values(), ids=PARSE_CASES.keys())
def test_parse_attention_cases(text, expected):
    got = parse_attention(text)
    assert [f for f, _ in got] == [f for f, _ in expected], got
    for (fragment, weight), (_, want) in zip(got, expected):
        assert math.isclose(weight, want, rel_tol=1e-12), (fragment, weight, want)


# -- properties -----------------------------------------------------------------------------

_SYNTAX_HEAVY = st.text(alphabet=st.sampled_from(list("()[]\\:.1-+ ,aBREK\n")) | st.characters(),
                        max_size=80)


def _is_subsequence(short, long):
    it = iter(long)
    return all(c in it for c in short)


@settings(max_examples=300, deadline=None)
@given(_SYNTAX_HEAVY)
def test_parse_attention_never_raises_and_only_removes_characters(text):
    parts = parse_attention(text)
    assert parts and all(isinstance(f, str) and isinstance(w, float) for f, w in parts)
    joined = "".join(f for f, w in parts if (f, w) != BREAK)
    assert _is_subsequence(joined, text), (text, parts)


# A prompt built from a tree, rendered in A1111 syntax, with the text and per-character
# weights the syntax stands for known by construction.
_WORD = st.from_regex(r"[a-z,.!é0-9-]+( [a-z,.!é0-9-]+)*", fullmatch=True)
_WEIGHT = st.sampled_from(["0.5", "1.3", "2", "0", "1.", ".75", "+1.25", "-0.5"])
_ESCAPED = st.sampled_from(list("()[]\\"))


def _nodes(children):
    return st.one_of(
        st.tuples(st.just("round"), children),
        st.tuples(st.just("square"), children),
        st.tuples(st.just("weight"), children, _WEIGHT),
    )


_TREE = st.recursive(
    st.one_of(st.tuples(st.just("text"), _WORD), st.tuples(st.just("escape"), _ESCAPED)),
    lambda inner: _nodes(st.lists(inner, max_size=4)), max_leaves=12)


def _render(node):
    """Node -> (A1111 syntax, [(character, weight)]), weights multiplied innermost first."""
    kind = node[0]
    if kind == "text":
        return node[1], [(c, 1.0) for c in node[1]]
    if kind == "escape":
        return "\\" + node[1], [(node[1], 1.0)]
    rendered = [_render(child) for child in node[1]]
    inner = "".join(r for r, _ in rendered)
    chars = [pair for _, pairs in rendered for pair in pairs]
    if kind == "round":
        return f"({inner})", [(c, w * 1.1) for c, w in chars]
    if kind == "square":
        return f"[{inner}]", [(c, w * (1 / 1.1)) for c, w in chars]
    return f"({inner}:{node[2]})", [(c, w * float(node[2])) for c, w in chars]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_TREE, max_size=4), min_size=1, max_size=3))
def test_parse_attention_recovers_text_and_weights(segments):
    """Segments of trees joined by " BREAK ": the fragments between the markers join to each
    segment's text with the syntax removed, and every character carries its weight."""
    rendered = [[_render(tree) for tree in segment] for segment in segments]
    text = " BREAK ".join("".join(r for r, _ in segment) for segment in rendered)
    parts = parse_attention(text)

    got_segments, current = [], []
    for fragment, weight in parts:
        if (fragment, weight) == BREAK:
            got_segments.append(current)
            current = []
        else:
            current.extend((c, weight) for c in fragment)
    got_segments.append(current)
    want_segments = [[pair for _, pairs in segment for pair in pairs] for segment in rendered]
    assert len(got_segments) == len(want_segments), (text, parts)
    for got, want in zip(got_segments, want_segments):
        assert "".join(c for c, _ in got) == "".join(c for c, _ in want), (text, parts)
        # Exact: the same multiplications in the same order as A1111's.
        assert [w for _, w in got] == [w for _, w in want], (text, parts)
    for a, b in zip(parts, parts[1:]):
        assert a[1] != b[1], f"equal weights not merged: {parts}"


# -- chunking -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its final LayerNorm given a non-zero bias: as in real CLIP, the states
    then have a mean well away from 0, which A1111's mean restoration divides by (with the
    default zero bias every token's states average to ~1e-9 and the rescale is noise)."""
    c = tiny_components()
    norm = c.text_encoder.text_model.final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(-0.3 + 0.1 * torch.randn(norm.bias.shape,
                                                 generator=torch.Generator().manual_seed(0)))
    return c


def _framed(tok, ids, weights=None):
    """BOS + ids + EOS + padding, built by hand (the reference for the chunk layout)."""
    pad = tok.max_length - 2 - len(ids)
    assert pad >= 0
    weights = [1.0] * len(ids) if weights is None else weights
    return ([tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * pad,
            [1.0, *weights, 1.0] + [1.0] * pad)


def _as_lists(chunks):
    return [(list(c.ids), list(c.weights)) for c in chunks]


def _token(tok, text):
    (ids,) = fragment_ids(tok, [text])
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-!"])
@pytest.mark.parametrize("prompt", ["a red fox in the snow", "", "  "], ids=["words", "empty",
                                                                           "spaces"])
def test_short_prompt_chunk_equals_plain_tokenizer(pad_token, prompt):
    # The chunk of a prompt without syntax is what the plain tokenizer gives, for both pads.
    tok = ClipTokenizer.bundled(pad_token=pad_token)
    (chunk,) = tokenize_weighted(tok, prompt)
    assert list(chunk.ids) == tok(prompt)[0].tolist()
    assert chunk.weights == (1.0,) * tok.max_length
    assert empty_chunk(tok).ids == tuple(tok("")[0].tolist())


def test_weights_follow_their_tokens(tiny):
    tok = tiny.tokenizer
    a, red, fox, big = (_token(tok, w) for w in ("a", "red", "fox", "big"))
    chunks = tokenize_weighted(tok, "a (red:1.3) [big] fox")
    assert _as_lists(chunks) == [_framed(tok, [a, red, big, fox], [1.0, 1.3, 1 / 1.1, 1.0])]


def test_long_prompt_is_cut_every_75_tokens(tiny):
    tok = tiny.tokenizer
    prompt = " ".join(f"word{i}" for i in range(60))  # "word", "1", ... : >150 tokens, no commas
    ids = fragment_ids(tok, [prompt])[0]
    assert len(ids) > 150
    chunks = tokenize_weighted(tok, prompt)
    assert _as_lists(chunks) == [_framed(tok, ids[:75]), _framed(tok, ids[75:150]),
                                 _framed(tok, ids[150:])]


@pytest.mark.parametrize("comma_at, backtracks", [
    (75 - COMMA_BACKTRACK, True),        # the farthest comma that still moves the tail
    (75 - COMMA_BACKTRACK - 1, False),   # one token farther: the chunk is cut at 75
    (74, True),                          # comma last in the chunk: nothing to move
])
def test_comma_backtrack(tiny, comma_at, backtracks):
    tok = tiny.tokenizer
    a, b, comma = _token(tok, "a"), _token(tok, "b"), _token(tok, ",")
    prompt = "a " * comma_at + ", " + "b " * 30
    ids = [a] * comma_at + [comma] + [b] * 30
    assert fragment_ids(tok, [prompt])[0] == ids
    cut = comma_at + 1 if backtracks else 75
    assert _as_lists(tokenize_weighted(tok, prompt)) == [_framed(tok, ids[:cut]),
                                                         _framed(tok, ids[cut:])]


def test_comma_that_would_open_a_chunk_stays_first(tiny):
    # A comma arriving when the chunk is full starts the next chunk (A1111 notes the comma,
    # then cuts at 75 before appending it).
    tok = tiny.tokenizer
    a, comma = _token(tok, "a"), _token(tok, ",")
    ids = [a] * 75 + [comma] + [a] * 3
    chunks = tokenize_weighted(tok, "a " * 75 + ", " + "a " * 3)
    assert _as_lists(chunks) == [_framed(tok, ids[:75]), _framed(tok, ids[75:])]


def test_break_starts_a_new_chunk(tiny):
    tok = tiny.tokenizer
    a, b, c = (_token(tok, w) for w in "abc")
    assert _as_lists(tokenize_weighted(tok, "a BREAK b (c)")) == [
        _framed(tok, [a]), _framed(tok, [b, c], [1.0, 1.1])]
    # BREAK first: an empty chunk (A1111 closes the open chunk even when it is empty).
    assert _as_lists(tokenize_weighted(tok, "BREAK a")) == [_framed(tok, []), _framed(tok, [a])]
    # Inside brackets it is the word, with weight -1.1 (see parse_attention).
    brk = _token(tok, "BREAK")
    assert _as_lists(tokenize_weighted(tok, "(a BREAK b)")) == [
        _framed(tok, [a, brk, b], [1.1, -1.1, 1.1])]


def test_escapes_are_the_characters_themselves(tiny):
    tok = tiny.tokenizer
    (chunk,) = tokenize_weighted(tok, "a \\(fox\\) \\[b\\] c\\\\")
    assert list(chunk.ids) == tok("a (fox) [b] c\\")[0].tolist()
    assert set(chunk.weights) == {1.0}


def test_bad_text_is_refused(tiny):
    with pytest.raises(SdrtError, match="string"):
        tokenize_weighted(tiny.tokenizer, b"a fox")
    with pytest.raises(SdrtError, match="surrogate"):
        tokenize_weighted(tiny.tokenizer, "a \udcff fox")


def test_non_finite_weight_is_refused(tiny):
    with pytest.raises(SdrtError, match="finite"):
        tokenize_weighted(tiny.tokenizer, "(fox:" + "9" * 400 + ")")


def test_batch_pads_with_empty_chunks_and_num_chunks_is_checked(tiny):
    tok = tiny.tokenizer
    batch = tokenize_prompts(tok, ["a fox", "a BREAK b BREAK c"])
    assert batch.ids.shape == batch.weights.shape == (2, 3, 77)
    empty = torch.tensor(empty_chunk(tok).ids)
    assert torch.equal(batch.ids[0, 0], tok("a fox")[0])
    assert torch.equal(batch.ids[0, 1], empty) and torch.equal(batch.ids[0, 2], empty)
    assert tokenize_prompts(tok, "a fox", num_chunks=2).num_chunks == 2
    with pytest.raises(SdrtError, match="needs 3 chunks"):
        tokenize_prompts(tok, "a BREAK b BREAK c", num_chunks=2)


def test_match_chunks_pads_the_shorter_side(tiny):
    tok = tiny.tokenizer
    positive = tokenize_prompts(tok, ["a BREAK b"])
    negative = tokenize_prompts(tok, ["blurry"])
    pos, neg = match_chunks(tok, positive, negative)
    assert pos is positive and neg.num_chunks == 2
    assert torch.equal(neg.ids[:, :1], negative.ids)
    assert neg.ids[0, 1].tolist() == list(empty_chunk(tok).ids)
    assert torch.equal(neg.weights[0, 1], torch.ones(77))


# -- encoding -------------------------------------------------------------------------------

def _encode(tiny, ids, clip_skip=0):
    """The text encoder on (N, 77) ids, by hand."""
    with torch.no_grad():
        return tiny.text_encoder(torch.as_tensor(ids).reshape(-1, 77), clip_skip=clip_skip)


def _close(got, want, what):
    err = (got - want).abs()
    where = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), (
        f"{what}: max |diff| {err.max():.3g} at {where}")


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_long_prompt_states_are_its_chunks_encoded_alone(tiny, clip_skip):
    tok = tiny.tokenizer
    prompt = " ".join(f"word{i}" for i in range(45))  # 90 tokens: two chunks
    ids = fragment_ids(tok, [prompt])[0]
    assert 75 < len(ids) <= 150
    with torch.no_grad():
        got = encode_weighted(tiny.text_encoder, tok, [prompt], clip_skip=clip_skip)
    want = torch.cat([_encode(tiny, _framed(tok, ids[:75])[0], clip_skip)[0],
                      _encode(tiny, _framed(tok, ids[75:])[0], clip_skip)[0]])
    assert got.shape == (1, 154, tiny.text_encoder.config.hidden_size)
    _close(got[0], want, "2-chunk prompt vs its chunks encoded by hand")


def test_weight_one_is_exactly_the_plain_prompt(tiny):
    tok = tiny.tokenizer
    with torch.no_grad():
        plain = tiny.text_encoder(tok(["a red fox"]))
        for prompt in ("a red fox", "a (red:1.0) fox", "a ((red:1.0):1) fox"):
            got = encode_weighted(tiny.text_encoder, tok, [prompt])
            assert torch.equal(got, plain), prompt


@pytest.mark.parametrize("weight", [1.5, 0.6, -0.5], ids=["up", "down", "negative"])
def test_weight_scales_states_then_restores_the_mean(tiny, weight):
    tok = tiny.tokenizer
    a, red, fox = (_token(tok, w) for w in ("a", "red", "fox"))
    ids, weights = _framed(tok, [a, red, fox], [1.0, weight, 1.0])
    z = _encode(tiny, ids)[0].double()  # (77, D)
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    want = z * w * (z.mean() / (z * w).mean())  # A1111's "Original" emphasis, by hand
    with torch.no_grad():
        got = encode_weighted(tiny.text_encoder, tok, [f"a (red:{weight}) fox"])[0]
    _close(got.double(), want, f"weight {weight} vs hand computation")
    # The mean is the unweighted one; the weighted token moved against the others by w.
    assert math.isclose(got.double().mean().item(), z.mean().item(), rel_tol=1e-5)
    plain = z.float()
    assert (got - plain).abs().max() > 100 * ATOL
    ratio_red = got[2].double() / z[2]
    ratio_fox = got[3].double() / z[3]
    assert torch.allclose(ratio_red / ratio_fox, torch.full_like(ratio_red, weight), rtol=1e-4)


def test_apply_weights_rows_are_independent():
    # Each chunk keeps its own mean: weighting one chunk leaves the other bit for bit.
    states = -2.3 + 0.5 * torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 77)
    weights[1, 5] = 1.4
    out = apply_weights(states, weights)
    assert torch.equal(out[0], states[0])
    assert not torch.equal(out[1], states[1])
    assert math.isclose(out[1].mean().item(), states[1].mean().item(), rel_tol=1e-5)
    # A chunk with unit weights is returned as it is, even one whose mean is 0 (no 0/0).
    zeros = torch.zeros(1, 77, 8)
    assert torch.equal(apply_weights(zeros, torch.ones(1, 77)), zeros)


def test_centred_states_keep_their_weighted_values_instead_of_blowing_up():
    # States with (almost) zero mean, as from a final LayerNorm without bias: restoring the
    # mean would divide by ~0. The chunk keeps z·w, finite, and a chunk with a usable mean
    # is still rescaled.
    g = torch.Generator().manual_seed(1)
    centred = torch.randn(1, 77, 8, generator=g)
    centred = centred - centred.mean()
    shifted = -2.3 + 0.5 * torch.randn(1, 77, 8, generator=g)
    weights = torch.ones(2, 77)
    weights[:, 3] = 1.6
    out = apply_weights(torch.cat([centred, shifted]), weights)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], centred[0] * weights[0][:, None])
    assert math.isclose(out[1].mean().item(), shifted.mean().item(), rel_tol=1e-5)


def test_batch_with_different_chunk_counts(tiny):
    tok = tiny.tokenizer
    long_prompt = " ".join(f"word{i}" for i in range(45))
    ids = fragment_ids(tok, [long_prompt])[0]
    with torch.no_grad():
        got = encode_weighted(tiny.text_encoder, tok, ["a (fox:1.2)", long_prompt])
    assert got.shape == (2, 154, tiny.text_encoder.config.hidden_size)
    a, fox = _token(tok, "a"), _token(tok, "fox")
    z = _encode(tiny, _framed(tok, [a, fox])[0])[0]
    w = torch.tensor(_framed(tok, [a, fox], [1.0, 1.2])[1])[:, None]
    short_want = torch.cat([z * w * (z.mean() / (z * w).mean()), _encode(tiny, tok("")[0])[0]])
    long_want = torch.cat([_encode(tiny, _framed(tok, ids[:75])[0])[0],
                           _encode(tiny, _framed(tok, ids[75:])[0])[0]])
    _close(got[0], short_want, "1-chunk prompt padded with the empty prompt's states")
    _close(got[1], long_want, "2-chunk prompt in the same batch")


def test_weighted_ids_shape_contract(tiny):
    batch = tokenize_prompts(tiny.tokenizer, ["a", "b"])
    assert isinstance(batch, WeightedIds)
    assert batch.ids.dtype == torch.long and batch.weights.dtype == torch.float32


# -- through the pipeline ------------------------------------------------------------------------
# The built-in tiny model in float32 on the CPU, small and few steps: A1111 syntax is the
# pipeline's default, "plain" is diffusers' reading.

PIPE_ARGS = dict(height=64, width=64, num_inference_steps=2, sampler="ddim", seed=3,
                 output_type="np")
LONG = ", ".join(f"word{i}" for i in range(30))  # 89 tokens: two chunks


@pytest.fixture(scope="module")
def pipe():
    from sdrt.engine import Pipeline
    from sdrt.engine.tiny import tiny_components
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


def test_pipeline_reads_a1111_syntax_by_default(pipe):
    pipe.runtime = None
    plain = pipe("a red fox", prompt_syntax="plain", **PIPE_ARGS)
    neutral = pipe("a (red:1.0) fox", **PIPE_ARGS)
    weighted = pipe("a (red:1.6) fox", **PIPE_ARGS)
    assert np.array_equal(plain, neutral), "weight 1.0 must read as the plain prompt"
    diff = np.abs(weighted - plain).max()
    assert diff > 1e-3, f"a weight of 1.6 changed the image by only {diff:.2e}"


def test_long_prompt_is_chunked_not_cut(pipe, recwarn):
    pipe.runtime = None
    ids = pipe.text_inputs([LONG])
    assert ids.num_chunks == 2
    chunked = pipe(LONG, **PIPE_ARGS)
    assert not [w for w in recwarn if "tokens" in str(w.message)], "A1111 syntax cut the prompt"
    with pytest.warns(UserWarning, match="tokens dropped"):
        cut = pipe(LONG, prompt_syntax="plain", **PIPE_ARGS)
    assert np.abs(chunked - cut).max() > 1e-4, "the second chunk changed nothing"


def test_static_plan_keyed_by_chunks_equals_eager(pipe):
    pipe.runtime = None
    eager = pipe([LONG, "a (blue:1.3) square"], negative_prompt="blur BREAK noise", **PIPE_ARGS)
    plan = pipe.compile(height=64, width=64, batch_size=2, num_inference_steps=2,
                        sampler="ddim", num_chunks=2, strict=True)
    assert plan.cond.states.shape[1] == 2 * 77
    try:
        static = pipe([LONG, "a (blue:1.3) square"], negative_prompt="blur BREAK noise",
                      **PIPE_ARGS)
        assert np.abs(static - eager).max() <= 1e-5
        with pytest.raises(SdrtError, match="1 text chunk|no static plan"):
            pipe("short", **{**PIPE_ARGS, "num_inference_steps": 2})  # 1 chunk: not built
    finally:
        pipe.runtime = None


def test_unknown_prompt_syntax_is_refused(pipe):
    with pytest.raises(SdrtError,
                       match="prompt_syntax must be one of a1111, plain, comfy, got 'compel'"):
        pipe("x", prompt_syntax="compel", **PIPE_ARGS)
