"""Text states given instead of prompts (diffusers' prompt_embeds, negative_prompt_embeds and
SDXL's pooled ones): against diffusers' pipelines given the same states, against sdrt's own
prompts, through a static plan, and what is refused."""
import numpy as np
import pytest
import torch

from conftest import assert_close_abs
from sdrt.engine import SdrtError
from test_pipeline import IMAGE_ATOL, PROMPTS, _assert_lively, _diffusers_scheduler
from test_pipeline import pipes  # noqa: F401  (the fixture)

ARGS = dict(height=16, width=24, num_inference_steps=4, guidance_scale=7.0, output_type="np")
LONG = ", ".join(["a very detailed oil painting of a red fox in fresh snow at dawn"] * 8)


def _latents(seed, h=16, w=24):
    return torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


def _states(seed, tokens, width):
    # Not any prompt's states: what Compel-like tools hand over.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, tokens, width, generator=g)


@pytest.mark.parametrize("tokens", [77, 100])
def test_states_match_diffusers(pipes, tokens):
    family, ours, ref = pipes
    ref.scheduler = _diffusers_scheduler(ref, "euler")
    width = ref.unet.config.cross_attention_dim
    pe, npe = _states(1, tokens, width), _states(2, tokens, width)
    latents = _latents(4)
    expected = ref(prompt_embeds=pe, negative_prompt_embeds=npe, latents=latents,
                   **ARGS).images
    _assert_lively(expected, f"{family} prompt_embeds")
    out = np.full_like(expected, np.nan)
    out[:] = ours(prompt_embeds=pe, negative_prompt_embeds=npe, latents=latents,
                  sampler="euler", **ARGS)
    assert_close_abs(out, expected, IMAGE_ATOL, f"{family} prompt_embeds of {tokens} tokens")


def test_states_beside_a_negative_text_match_diffusers(pipes):
    # Each half may be text: the negative prompt encoded as diffusers encodes it.
    family, ours, ref = pipes
    ref.scheduler = _diffusers_scheduler(ref, "euler")
    pe = _states(3, 77, ref.unet.config.cross_attention_dim)
    latents = _latents(5)
    expected = ref(prompt_embeds=pe, negative_prompt=["blurry, low quality"] * 2,
                   latents=latents, **ARGS).images
    got = ours(prompt_embeds=pe, negative_prompt="blurry, low quality", latents=latents,
               sampler="euler", prompt_syntax="plain", **ARGS)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} prompt_embeds + negative_prompt")
    expected = ref(PROMPTS, negative_prompt_embeds=pe, latents=latents, **ARGS).images
    got = ours(PROMPTS, negative_prompt_embeds=pe, latents=latents, sampler="euler",
               prompt_syntax="plain", **ARGS)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} prompt + negative_prompt_embeds")


def test_own_states_give_the_prompt_image(pipes):
    # encode_prompt's states are the prompt: a long prompt's two chunks, the negative text
    # padded with an empty chunk as A1111 pads it.
    _, ours, _ = pipes
    kw = dict(sampler="euler", seed=3, **ARGS)
    prompts = [LONG, "a lighthouse at dusk"]
    want = ours(prompts, negative_prompt="blurry", **kw)
    states = ours.encode_prompt(prompts).states
    assert states.shape[1] == 154
    got = ours(prompt_embeds=states, negative_prompt="blurry", **kw)
    assert np.abs(got - want).max() <= 1e-5
    negative = ours.encode_prompt(["blurry"] * 2).states
    with pytest.raises(SdrtError, match="prompt_embeds and negative_prompt_embeds must have the "
                                        "same shape, got \\(2, 154, .*\\) and \\(2, 77, "):
        ours(prompt_embeds=states, negative_prompt_embeds=negative, **kw)
    with pytest.raises(SdrtError, match="negative_prompt encodes to 154 tokens where "
                                        "prompt_embeds has 77: give negative_prompt_embeds "
                                        "of 77 tokens too"):
        ours(prompt_embeds=negative, negative_prompt=LONG, **kw)


def test_static_plan(pipes):
    _, ours, ref = pipes
    width = ref.unet.config.cross_attention_dim
    kw = dict(sampler="euler", seed=3, **ARGS)
    pe, npe = _states(6, 154, width), _states(7, 154, width)
    ours.runtime = None
    eager = ours(prompt_embeds=pe, negative_prompt_embeds=npe, **kw)
    beside_text = ours(prompt_embeds=pe[:, :77], negative_prompt="blurry", **kw)
    odd = ours(prompt_embeds=pe[:, :90], negative_prompt_embeds=npe[:, :90], **kw)
    ours.compile(height=16, width=24, batch_size=2, num_inference_steps=4, sampler="euler",
                 num_chunks=2)
    ours.compile(height=16, width=24, batch_size=2, num_inference_steps=4, sampler="euler")
    try:
        plans = len(ours.runtime.plans)
        out = np.full_like(eager, np.nan)
        out[:] = ours(prompt_embeds=pe, negative_prompt_embeds=npe, **kw)
        assert np.abs(out - eager).max() <= 1e-5
        assert np.abs(ours(prompt_embeds=pe[:, :77], negative_prompt="blurry", **kw)
                      - beside_text).max() <= 1e-5
        # 90 tokens fill no whole chunks: the eager loop, no new plan
        assert np.abs(ours(prompt_embeds=pe[:, :90], negative_prompt_embeds=npe[:, :90], **kw)
                      - odd).max() <= 1e-5
        assert len(ours.runtime.plans) == plans
        # a prompt after states: the plan's text stage runs again
        text = ours(PROMPTS, **kw)
        ours.runtime = None
        assert np.abs(ours(PROMPTS, **kw) - text).max() <= 1e-5
    finally:
        ours.runtime = None


def test_refusals(pipes):
    family, ours, ref = pipes
    width = ref.unet.config.cross_attention_dim
    pe = _states(8, 77, width)
    kw = dict(sampler="euler", seed=3, **ARGS)
    for call, message in (
            (dict(prompt="a fox", prompt_embeds=pe),
             "prompt and prompt_embeds cannot both be given"),
            (dict(prompt_embeds=pe, negative_prompt="x", negative_prompt_embeds=pe),
             "negative_prompt and negative_prompt_embeds cannot both be given"),
            (dict(prompt_embeds=pe[..., :-1]),
             f"prompt_embeds must have the shape \\(prompts, tokens, {width}\\)"),
            (dict(prompt_embeds=pe[0]), "prompt_embeds must be a float tensor of shape "
                                        "\\(prompts, tokens, .*\\), got a torch.float32 tensor "
                                        "of shape \\(77, "),
            (dict(prompt_embeds=pe.long()), "prompt_embeds must be a float tensor"),
            (dict(prompt_embeds=[[0.0]]), "prompt_embeds must be a float tensor of shape .*, "
                                          "got \\[\\[0.0\\]\\]"),
            (dict(prompt_embeds=torch.full_like(pe, float("nan"))),
             "prompt_embeds must hold finite numbers"),
            (dict(prompt_embeds=pe, pooled_prompt_embeds=torch.zeros(2, 8)),
             "pooled_prompt_embeds is not used by"),
            (dict(negative_pooled_prompt_embeds=torch.zeros(2, 8), prompt="x"),
             "negative_pooled_prompt_embeds needs negative_prompt_embeds"),
            (dict(prompt=["a", "b", "c"], negative_prompt_embeds=pe),
             "negative_prompt_embeds must have a row per prompt \\(3\\), got 2"),
            (dict(prompt_embeds=pe, negative_prompt="[a:b:2]"),
             "prompt: A1111's prompt editing, alternation and AND cannot be combined"),
            (dict(prompt_embeds=torch.zeros(2, 77 * 64 + 1, width)), "1 to 4928 tokens")):
        with pytest.raises(SdrtError, match=message):
            ours(**{**kw, **call})


def test_sdxl_matches_diffusers(sdxl_base_folder):
    from test_sdxl import H, W, _latents as sdxl_latents, _ours, _scheduler
    folder, ref = sdxl_base_folder
    ref.scheduler = _scheduler(ref, "euler")
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=6.0,
              latents=sdxl_latents(2, 3), output_type="np")
    g = torch.Generator().manual_seed(11)
    width = ref.unet.config.cross_attention_dim
    pooled = ref.text_encoder_2.config.projection_dim
    pe, npe = torch.randn(2, 77, width, generator=g), torch.randn(2, 77, width, generator=g)
    ppe, nppe = torch.randn(2, pooled, generator=g), torch.randn(2, pooled, generator=g)
    ours = _ours(folder)
    with torch.no_grad():
        expected = ref(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                       negative_pooled_prompt_embeds=nppe, **kw).images
    got = ours(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
               negative_pooled_prompt_embeds=nppe, sampler="euler", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "SDXL prompt_embeds")
    # No negative: zeros, as force_zeros_for_empty_prompt gives them
    with torch.no_grad():
        expected = ref(prompt_embeds=pe, pooled_prompt_embeds=ppe, **kw).images
    got = ours(prompt_embeds=pe, pooled_prompt_embeds=ppe, sampler="euler", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "SDXL prompt_embeds, zero negative")
    with pytest.raises(SdrtError, match="prompt_embeds needs pooled_prompt_embeds for SDXL"):
        ours(prompt_embeds=pe, sampler="euler", **kw)
    with pytest.raises(SdrtError, match=f"pooled_prompt_embeds must have the shape \\(2, "
                                        f"{pooled}\\)"):
        ours(prompt_embeds=pe, pooled_prompt_embeds=ppe[:1], sampler="euler", **kw)
