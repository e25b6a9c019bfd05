"""Textual-inversion embeddings against diffusers' ``load_textual_inversion``: the same file,
in each layout people download, gives the same text states and the same image."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.embeddings import read_embedding
from sdrt.engine.tokenizer import ClipTokenizer

STATES_ATOL = 1e-4  # float32 text states
IMAGE_ATOL = 2e-3  # float32; images are in [0, 1]
D = 32  # tiny_models.TEXT hidden_size


def _vectors(n, seed):
    # Non-zero mean and a scale well above the token table's, so the embedding visibly moves
    # the states.
    g = torch.Generator().manual_seed(seed)
    return -0.3 + 0.8 * torch.randn(n, D, generator=g)


def _write(folder, layout, token, vectors):
    """An embedding file in one of the layouts people download; returns its path."""
    if layout == "diffusers":  # learned_embeds.safetensors: {token: (D,) or (n, D)}
        path, state = folder / "learned_embeds.safetensors", {
            token: vectors[0] if len(vectors) == 1 else vectors}
    elif layout == "emb_params":  # A1111's own .safetensors export
        path, state = folder / f"{token}.safetensors", {"emb_params": vectors}
    else:  # A1111's .pt layout converted to safetensors: string_to_param flattened
        path, state = folder / f"{token}.safetensors", {"string_to_param.*": vectors}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _reference(ref, path, token):
    """A diffusers pipeline sharing the UNet/VAE of the session's reference, with its own
    copies of the tokenizer and text encoder (the shared ones stay untouched)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**{**ref.components,
                                      "tokenizer": copy.deepcopy(ref.tokenizer),
                                      "text_encoder": copy.deepcopy(ref.text_encoder)})
    pipe.load_textual_inversion(str(path), token=token)
    return pipe


def _diffusers_states(pipe, prompt):
    states, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return states


# (layout, token, vectors): each layout single- and multi-vector; the A1111 files are named
# by their stem with a bare word, as A1111 users write them.
CASES = [("diffusers", "<cat-toy>", 1), ("diffusers", "<cat-toy>", 3),
         ("emb_params", "sdrtstyle", 1), ("emb_params", "sdrtstyle", 4),
         ("string_to_param", "sdrtstyle", 2)]


@pytest.mark.parametrize("layout,token,n", CASES)
def test_states_match_diffusers(tiny_model, tmp_path, layout, token, n):
    family, folder, ref = tiny_model
    path = _write(tmp_path, layout, token, _vectors(n, seed=n))
    ours = Pipeline.from_pretrained(folder, device="cpu")
    plain = ours.encode_prompt(f"a photo of {token}", prompt_syntax="plain").states
    assert ours.load_textual_inversion(path) == token  # default token: key or file stem
    assert ours.embeddings == {token: n}
    reference = _reference(ref, path, token)
    for prompt in (f"a photo of {token}", f"{token}, a red fox in the snow"):
        expected = _diffusers_states(reference, prompt)
        for syntax in ("plain", "a1111"):
            got = ours.encode_prompt(prompt, prompt_syntax=syntax).states
            assert_close_abs(got, expected, STATES_ATOL, f"{family} {layout} n={n} {syntax} "
                             f"{prompt!r}")
    # The comparison proves something only if the embedding moved the states.
    moved = (ours.encode_prompt(f"a photo of {token}", prompt_syntax="plain").states
             - plain).abs().max()
    assert moved > 100 * STATES_ATOL, f"the embedding changed the states by only {moved:.2e}"


def test_image_matches_diffusers(tiny_sd1, tmp_path):
    from diffusers import DDIMScheduler
    folder, ref = tiny_sd1
    path = _write(tmp_path, "emb_params", "sdrtstyle", _vectors(3, seed=5))
    ours = Pipeline.from_pretrained(folder, device="cpu")
    ours.load_textual_inversion(path)
    reference = _reference(ref, path, "sdrtstyle")
    reference.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = dict(height=16, width=16, num_inference_steps=4, guidance_scale=7.5, latents=latents,
              output_type="np")
    prompt = "a photo of sdrtstyle"
    expected = reference(prompt, negative_prompt="blurry", **kw).images
    got = ours(prompt, negative_prompt="blurry", sampler="ddim", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "image with a 3-vector embedding")
    without = ours("a photo of something", negative_prompt="blurry", sampler="ddim", **kw)
    assert abs(without - expected).max() > 10 * IMAGE_ATOL, "the embedding did not change the image"


def _tokenizer_with(token, n):
    tok = ClipTokenizer.bundled()
    ids = tok.add_embedding_tokens([token] + [f"{token}_{i}" for i in range(1, n)])
    return tok, ids


def test_a1111_weights_and_whole_words():
    from sdrt.engine.prompt_syntax import tokenize_weighted
    tok, ids = _tokenizer_with("sdrtstyle", 3)
    assert ids == [49408, 49409, 49410]
    (chunk,) = tokenize_weighted(tok, "a (sdrtstyle:1.2) cat, SDRTSTYLE")
    start = chunk.ids.index(ids[0])
    assert list(chunk.ids[start:start + 3]) == ids
    assert chunk.weights[start:start + 3] == (1.2, 1.2, 1.2)
    assert list(chunk.ids).count(ids[0]) == 2  # matched in the lowercased prompt too
    # Only as a word of its own: inside another word it is plain text.
    assert ids[0] not in tok("mysdrtstyle sdrtstyles")[0].tolist()


def test_multi_vector_embedding_is_not_split_across_chunks():
    from sdrt.engine.prompt_syntax import tokenize_weighted
    tok, ids = _tokenizer_with("sdrtstyle", 4)
    # 73 words, then the 4 vectors: they do not fit in the 75-token chunk, so it ends early.
    chunks = tokenize_weighted(tok, "a " * 73 + "sdrtstyle b")
    assert len(chunks) == 2
    assert chunks[0].ids[74] == tok.eos_token_id and chunks[0].ids[1:74] == (320,) * 73
    assert list(chunks[1].ids[1:6]) == ids + [tok.token_ids(["b"])[0][0]]
    # With room left, it stays where it is.
    chunks = tokenize_weighted(tok, "a " * 71 + "sdrtstyle")
    assert len(chunks) == 1 and list(chunks[0].ids[72:76]) == ids


def test_static_plans_dropped_when_vocabulary_grows(tiny_sd1, tmp_path):
    folder, _ = tiny_sd1
    ours = Pipeline.from_pretrained(folder, device="cpu")
    ours.compile(height=16, width=16, num_inference_steps=2)
    assert ours.runtime is not None
    ours.load_textual_inversion(_write(tmp_path, "emb_params", "sdrtstyle", _vectors(2, 1)))
    assert ours.runtime is None
    assert ours.text_encoder.config.vocab_size == ours.tokenizer.vocab_size == 49410


def test_refusals(tiny_sd1, tmp_path):
    folder, _ = tiny_sd1
    ours = Pipeline.from_pretrained(folder, device="cpu")

    def refused(match, *args, **kw):
        with pytest.raises(SdrtError, match=match) as e:
            ours.load_textual_inversion(*args, **kw)
        assert "\n" not in str(e.value)

    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.randn(2, 768)}, str(wide))
    refused(r"dimension 768.*hidden size is 32", wide)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(sdxl))
    refused("SDXL", sdxl)
    pickle = tmp_path / "style.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, D)}}, pickle)
    refused("pickle", pickle)
    refused("already in the tokenizer's vocabulary", {"cat": torch.randn(D)})
    refused("not a textual-inversion embedding", {"a": torch.randn(D), "b": torch.randn(D)})

    path = _write(tmp_path, "emb_params", "sdrtstyle", _vectors(2, 1))
    ours.load_textual_inversion(path)
    ours.load_textual_inversion(path)  # the same vectors again: nothing to do
    assert ours.tokenizer.vocab_size == 49410
    refused("already loaded with other vectors", {"emb_params": _vectors(2, 2)},
            token="sdrtstyle")
    # A token of another embedding's vectors is refused too, and nothing is half-added.
    refused("already in the tokenizer's vocabulary", {"sdrtstyle_1": torch.randn(D)})
    assert ours.tokenizer.vocab_size == ours.text_encoder.config.vocab_size == 49410


def test_layouts_read_the_same_vectors(tmp_path):
    vectors = _vectors(2, 9)
    for layout in ("diffusers", "emb_params", "string_to_param"):
        token, got = read_embedding(_write(tmp_path, layout, "x-emb", vectors), hidden_size=D)
        assert token == "x-emb" and torch.equal(got, vectors), layout
    token, got = read_embedding({"string_to_param": {"*": vectors}}, token="y")
    assert token == "y" and torch.equal(got, vectors)
