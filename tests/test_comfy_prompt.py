"""ComfyUI's prompt weighting (engine/comfy_prompt.py, ``prompt_syntax="comfy"``): the weights
against the examples ComfyUI's ``token_weights`` publishes, the chunks against ComfyUI's
batching loop written out here, the emphasis against the states computed by hand, the rows'
repetition, embeddings, the static plan, and ``--workflow`` reading its prompts this way."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.engine import Pipeline, comfy_prompt
from sdrt.engine.conditioning import TextInputs, encode_text
from sdrt.engine.errors import SdrtError
from sdrt.engine.families import SD1
from sdrt.engine.prompt_syntax import empty_chunk, fragment_ids
from sdrt.engine.tiny import tiny_components
from test_cli import _run, tiny_dir  # noqa: F401  (tiny_dir: the fixture)
from test_comfy import DEFAULT, _pixels, _small

# The examples of the docstring of ComfyUI's token_weights (comfy/sd1_clip.py), as it prints
# them, and the ones its parser's rules give for escapes and unmatched brackets.
COMFY_EXAMPLES = [
    ("(foo)", [("foo", 1.1)]),
    ("(foo)(bar)", [("foo", 1.1), ("bar", 1.1)]),
    ("(foo:2.0)", [("foo", 2.0)]),
    ("((foo))", [("foo", 1.21)]),
    ("((foo):1.1)", [("foo", 1.21)]),
    ("((foo:1.1))", [("foo", 1.1)]),
    ("(foo:0.0)", [("foo", 0.0)]),
    ("((foo:1.0):0.0)", [("foo", 1.0)]),
    ("foo ((((lol (cat:666) attack:100)))) baz",
     [("foo ", 1.0), ("lol ", 100.0), ("cat", 666.0), (" attack", 100.0), (" baz", 1.0)]),
    ("foo ((((lol (cat:666) attack):100))) baz",
     [("foo ", 1.0), ("lol ", 110.0), ("cat", 666.0), (" attack", 110.0), (" baz", 1.0)]),
    ("\\(literal\\) (x)", [("(literal) ", 1.0), ("x", 1.1)]),
    ("[square] BREAK words", [("[square] BREAK words", 1.0)]),  # (no meaning in ComfyUI)
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),  # never closed: text
    ("a) b (c)", [("a) b (c)", 1.0)]),  # a ")" first: the rest unweighted
    ("(a:b)", [("a:b", 1.1)]),  # not a number after the colon: text
    ("(:2)", [(":2", 1.1)]),  # a colon first: text
]


@pytest.mark.parametrize("text,expected", COMFY_EXAMPLES)
def test_weights_are_comfyuis(text, expected):
    got = comfy_prompt.parse_weights(text)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def comfy_batches(tok, groups):
    """ComfyUI's SDTokenizer batching written out: a batch opens with BOS; a group that does
    not fit in the 76 places before EOS is split where it fills the batch when it has 8 tokens
    or more, else the batch is closed (EOS, padding) and the group goes on in the next; the
    last batch is closed the same way. [(ids, weights)] per 77-token batch."""
    batches, batch = [], [(tok.bos_token_id, 1.0)]
    for group, weight in groups:
        group = [(t, weight) for t in group]
        large = len(group) >= 8
        while group:
            if len(group) + len(batch) > 76:
                remaining = 76 - len(batch)
                if large:
                    batch += group[:remaining]
                    group = group[remaining:]
                batch.append((tok.eos_token_id, 1.0))
                batch += [(tok.pad_token_id, 1.0)] * (77 - len(batch))
                batches.append(batch)
                batch = [(tok.bos_token_id, 1.0)]
            else:
                batch += group
                group = []
    batch.append((tok.eos_token_id, 1.0))
    batches.append(batch + [(tok.pad_token_id, 1.0)] * (77 - len(batch)))
    return [([t for t, _ in b], [w for _, w in b]) for b in batches]


@pytest.fixture(scope="module")
def tiny():
    c = tiny_components()
    norm = c.text_encoder.text_model.final_layer_norm  # (states away from 0, as real CLIP's)
    with torch.no_grad():
        norm.bias.copy_(-0.3 + 0.1 * torch.randn(norm.bias.shape,
                                                 generator=torch.Generator().manual_seed(0)))
    return c


PROMPTS = [
    "a red fox",
    "",
    "(masterpiece:1.2), best quality, (a fox:1.3) in ((snow)), " + ", ".join(
        f"word{i}" for i in range(30)),
    # pieces of 7 and 8+ tokens meeting a chunk's end: the short one moves, the long one splits
    "a " * 70 + "(one two three four five six seven:1.1) tail",
    "a " * 70 + "(one two three four five six seven eight nine:0.8)",
    "(" + " ".join(f"long{i}" for i in range(100)) + ":1.05) and more",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chunks_are_comfyuis(tiny, prompt):
    tok = tiny.tokenizer
    pieces = comfy_prompt.parse_weights(prompt)
    groups = [(ids, w) for ids, (_, w) in zip(fragment_ids(tok, [p for p, _ in pieces]), pieces)]
    want = comfy_batches(tok, groups)
    got = [(list(c.ids), list(c.weights)) for c in comfy_prompt.tokenize(tok, prompt)]
    assert got == want
    if prompt.startswith("a " * 70):  # (70 tokens, then a group of 7 or 9)
        split = "eight" in prompt  # the long group fills the chunk, the short one moves whole
        assert len(got) == 2 and got[0][0][76 if split else 71] == tok.eos_token_id


def test_rows_repeat_to_the_least_common_multiple(tiny):
    tok = tiny.tokenizer
    two = ", ".join(f"word{i}" for i in range(30))  # 2 chunks (word, number, comma)
    three = ", ".join(f"word{i}" for i in range(50))  # 3 chunks
    (batch,) = comfy_prompt.tokenize_prompts([tok], [["a fox", two, three]])
    assert batch.ids.shape == (3, 6, 77) and batch.empty.tolist() == list(empty_chunk(tok).ids)
    one = comfy_prompt.tokenize(tok, "a fox")
    assert batch.ids[0].tolist() == [list(one[0].ids)] * 6
    chunks = [list(c.ids) for c in comfy_prompt.tokenize(tok, two)]
    assert batch.ids[1].tolist() == chunks * 3
    assert batch.ids[2].tolist() == [list(c.ids) for c in comfy_prompt.tokenize(tok, three)] * 2
    seven = ", ".join(f"word{i}" for i in range(120))
    assert len(comfy_prompt.tokenize(tok, seven)) == 7
    (batch,) = comfy_prompt.tokenize_prompts([tok], [[two, three, seven]])
    assert batch.num_chunks == 42
    eleven = ", ".join(f"word{i}" for i in range(180))
    with pytest.raises(SdrtError, match="prompts of 1, 3, 7 and 11 chunks of 75 tokens: "
                                        "ComfyUI repeats each to 231 chunks, more than 64"):
        comfy_prompt.tokenize_prompts([tok], [[three, seven, eleven, "x"]])


def test_two_tokenizers_are_evened_with_empty_chunks_first():
    # SDXL's CLIPTextEncodeSDXL: within a row, the encoder with fewer chunks gets empty ones;
    # then the rows are repeated.
    from sdrt.engine.tokenizer import ClipTokenizer
    l_tok, g_tok = ClipTokenizer.bundled(), ClipTokenizer.bundled(pad_token="!")
    two = ", ".join(f"word{i}" for i in range(30))
    l_batch, g_batch = comfy_prompt.tokenize_prompts(
        [l_tok, g_tok], [["a fox", "blur"], [two, "grey"]])
    assert l_batch.ids.shape == g_batch.ids.shape == (2, 2, 77)
    assert l_batch.ids[0, 1].tolist() == list(empty_chunk(l_tok).ids)
    assert g_batch.ids[0].tolist() == [list(c.ids) for c in comfy_prompt.tokenize(g_tok, two)]
    assert l_batch.ids[1, 0].tolist() == l_batch.ids[1, 1].tolist()  # 1 chunk, repeated
    assert g_batch.empty.tolist() == list(empty_chunk(g_tok).ids)  # (padded with "!")


def test_non_finite_weight_is_refused(tiny):
    with pytest.raises(SdrtError, match="prompt weight of 'a' must be finite, got inf"):
        comfy_prompt.tokenize(tiny.tokenizer, "(a:inf) b")


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_emphasis_is_relative_to_the_empty_prompt(tiny, clip_skip):
    # (z - e) * w + e on the tokens of weight w != 1, e the empty chunk's state at the same
    # place; the other tokens (and every chunk) as encoded alone. Checked by hand.
    tok, encoder = tiny.tokenizer, tiny.text_encoder
    prompts = ["a (red:1.6) fox, ((snow))", ", ".join(f"word{i}" for i in range(30)) +
               " (tail:0.3)"]
    (batch,) = comfy_prompt.tokenize_prompts([tok], [prompts])
    with torch.no_grad():
        got, _ = encode_text(SD1, {"text_encoder": encoder}, TextInputs({"tokenizer": batch}),
                             clip_skip)
        empty = encoder(torch.tensor([empty_chunk(tok).ids]), clip_skip=clip_skip)[0]
        for row, prompt in enumerate(prompts):
            chunks = comfy_prompt.tokenize(tok, prompt)
            want = []
            for chunk in chunks * (2 // len(chunks)):
                z = encoder(torch.tensor([chunk.ids]), clip_skip=clip_skip)[0]
                w = torch.tensor(chunk.weights)[:, None]
                want.append(torch.where(w != 1, (z - empty) * w + empty, z))
            want = torch.cat(want)
            assert got.shape == (2, 154, want.shape[-1])
            assert torch.allclose(got[row], want, atol=1e-5, rtol=1e-5), (
                row, (got[row] - want).abs().max())
        # weight 1 everywhere: the plain prompt's states, bit for bit
        (plain,) = comfy_prompt.tokenize_prompts([tok], [["a (red:1.0) fox"]])
        states, _ = encode_text(SD1, {"text_encoder": encoder}, TextInputs({"tokenizer": plain}))
        assert torch.equal(states[0], encoder(tok(["a red fox"]))[0])


def test_sdxl_weighs_each_encoder_against_its_own_empty_prompt():
    # SDXL: each encoder's states (penultimate layer, no final norm) weighted against its own
    # empty chunk, joined along the features; the pooled text is the first chunk's, unweighted.
    from sdrt.engine.families import SDXL
    from sdrt.engine.tiny import TINY_SDXL, random_components
    c = random_components(TINY_SDXL)
    toks, encoders = (c.tokenizer, c.tokenizer_2), (c.text_encoder, c.text_encoder_2)
    texts = [["a (red:1.5) fox"], ["(a fox:0.7), " + ", ".join(f"w{i}" for i in range(40))]]
    batches = comfy_prompt.tokenize_prompts(list(toks), texts)
    inputs = TextInputs(dict(zip(("tokenizer", "tokenizer_2"), batches)))
    with torch.no_grad():
        got, pooled = encode_text(SDXL, dict(zip(("text_encoder", "text_encoder_2"), encoders)),
                                  inputs)
        parts = []
        for tok, encoder, batch in zip(toks, encoders, batches):
            ids = batch.ids[0]
            z, pool = encoder.encode(torch.cat([ids, batch.empty[None]]), clip_skip=1,
                                     final_norm=False)
            w = batch.weights[0][..., None]
            e = z[-1:]
            parts.append(torch.where(w != 1, (z[:-1] - e) * w + e, z[:-1]).flatten(0, 1))
        want = torch.cat(parts, dim=-1)
    n = batches[1].num_chunks  # (the first prompt's one chunk evened out with empty ones)
    assert n > 1 and batches[0].num_chunks == n and got.shape == (1, 77 * n, want.shape[-1])
    assert batches[0].ids[0, 1].tolist() == list(empty_chunk(toks[0]).ids)
    assert torch.allclose(got[0], want, atol=1e-5, rtol=1e-5), (got[0] - want).abs().max()
    assert torch.allclose(pooled[0], pool[0], atol=1e-6)


def test_a_repeated_context_is_the_context(tiny):
    # Why ComfyUI's repetition keeps a shorter prompt's meaning: the UNet attends over [c, c]
    # exactly as over c (each key twice: softmax's numerator and denominator both doubled).
    unet = tiny.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        once = unet(x, torch.tensor([500]), c)
        twice = unet(x, torch.tensor([500]), torch.cat([c, c], dim=1))
    assert torch.allclose(once, twice, atol=1e-5, rtol=1e-4), (once - twice).abs().max()


ARGS = dict(height=64, width=64, num_inference_steps=2, sampler="ddim", seed=3,
            output_type="np")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


def test_pipeline_reads_comfyuis_weights(pipe):
    pipe.runtime = None
    plain = pipe("a red fox", prompt_syntax="plain", **ARGS)
    assert np.array_equal(pipe("a (red:1.0) fox", prompt_syntax="comfy", **ARGS), plain)
    comfy = pipe("a (red:1.6) fox", prompt_syntax="comfy", **ARGS)
    a1111 = pipe("a (red:1.6) fox", **ARGS)
    assert np.abs(comfy - plain).max() > 1e-3 and np.abs(comfy - a1111).max() > 1e-3


def test_static_plan_equals_eager(pipe):
    pipe.runtime = None
    long = ", ".join(f"word{i}" for i in range(30))
    call = dict(negative_prompt="(blur:1.2)", prompt_syntax="comfy", **ARGS)
    eager = pipe([long, "a (blue:1.3) square"], **call)
    pipe.compile(height=64, width=64, batch_size=2, num_inference_steps=2, sampler="ddim",
                 num_chunks=2, strict=True, prompt_syntax="comfy")
    try:
        static = pipe([long, "a (blue:1.3) square"], **call)
        assert np.abs(static - eager).max() <= 1e-5
        with pytest.raises(SdrtError, match="no static plan|static plan"):  # (A1111's weights)
            pipe([long, "a (blue:1.3) square"], negative_prompt="(blur:1.2)", **ARGS)
    finally:
        pipe.runtime = None


def test_embeddings_by_name(tmp_path):
    pipe = Pipeline(tiny_components(), torch.device("cpu"), torch.float32)
    width = pipe.text_encoder.config.hidden_size
    path = tmp_path / "inkstyle.safetensors"
    save_file({"emb_params": torch.randn(3, width, generator=torch.Generator().manual_seed(2))},
              str(path))
    pipe.load_textual_inversion(str(path))
    tok = pipe.tokenizer
    ids = fragment_ids(tok, ["inkstyle"])[0]
    assert len(ids) == 3
    for prompt in ("a fox, embedding:inkstyle", "a fox, embedding:inkstyle.safetensors",
                   "a fox, embedding:embeddings/inkstyle.pt"):
        (chunk,) = comfy_prompt.tokenize(tok, prompt)
        assert list(chunk.ids[1:-1]).count(ids[0]) == 1 and ids == [
            t for t in chunk.ids if t in ids], prompt
    (chunk,) = comfy_prompt.tokenize(tok, "(embedding:inkstyle, snow:1.3)")
    start = list(chunk.ids).index(ids[0])
    assert chunk.weights[start:start + 3] == (1.3,) * 3
    with pytest.raises(SdrtError, match="prompt names embedding:badhands, which is not a loaded "
                                        "textual-inversion embedding \\(loaded: inkstyle"):
        comfy_prompt.tokenize(tok, "a fox embedding:badhands")


def test_cli_workflow_reads_its_prompts_as_comfyui(tiny_dir, tmp_path, capsys):
    graph = _small(DEFAULT)
    graph["6"]["inputs"]["text"] = "a (red:1.5) fox in ((snow))"
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    options = ["a (red:1.5) fox in ((snow))", "--negative", "text, watermark", "--seed", "4",
               "--steps", "3", "--guidance", "6.5", "--sampler", "euler_a_normal", "--width",
               "32", "--height", "24", "--model", tiny_dir]
    outs = {}
    for name, args in (("workflow", ["--workflow", str(tmp_path / "wf.json"), "--model",
                                     tiny_dir]),
                       ("comfy", options + ["--prompt-syntax", "comfy"]),
                       ("a1111", options),
                       ("workflow-a1111", ["--workflow", str(tmp_path / "wf.json"), "--model",
                                           tiny_dir, "--prompt-syntax", "a1111"])):
        code, _, err = _run(["generate", *args, "-o", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
        outs[name] = _pixels(tmp_path / f"{name}.png")
    assert np.array_equal(outs["workflow"], outs["comfy"])
    assert np.array_equal(outs["workflow-a1111"], outs["a1111"])
    assert np.abs(outs["comfy"].astype(int) - outs["a1111"]).max() > 2
    assert math.isfinite(outs["comfy"].mean())
