"""A1111's prompt editing and alternation: the schedules its parser gives (written out here
from A1111's rules), and whole images against diffusers whose text embeddings a step-end
callback switches on the UNet calls the schedule says, for a first- and a second-order
sampler, prompt and negative prompt; a hires fix's second-pass timeline; eager under a
static-plan pipeline."""
import numpy as np
import pytest
import torch

from conftest import assert_close_abs
from sdrt.engine.prompt_schedule import (composable_parts, edited, editing_steps, schedule,
                                         text_at)
from test_pipeline import IMAGE_ATOL, _assert_lively, _diffusers_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("prompt, steps, base, want", [
    # a fraction of the steps, cut down to a step; the first text up to and with that step
    ("a [cat:dog:0.5] b", 8, None, [(4, "a cat b"), (8, "a dog b")]),
    ("a [cat:dog:0.55] b", 9, None, [(4, "a cat b"), (9, "a dog b")]),
    # a step number past the steps: never switches
    ("[cat:dog:10]", 8, None, [(8, "cat")]),
    # removed after, added after, switched at 0 (from the first step on)
    ("[cat::5]", 8, None, [(5, "cat"), (8, "")]),
    ("[cat:5]", 8, None, [(5, ""), (8, "cat")]),
    ("[cat:dog:0]", 8, None, [(8, "dog")]),
    # alternation: a text per step, empty options too
    ("a [b|c|d] e", 4, None, [(1, "a b e"), (2, "a c e"), (3, "a d e"), (4, "a b e")]),
    ("[a|]", 3, None, [(1, "a"), (2, ""), (3, "a")]),
    # inside emphasis (kept for the weights' parser), nested, with spaces around the number
    ("(a [x:y:0.25]:1.2)", 8, None, [(2, "(a x:1.2)"), (8, "(a y:1.2)")]),
    ("x [[a:b:3]:c:6]", 8, None, [(3, "x a"), (6, "x b"), (8, "x c")]),
    ("a [x:y: 0.5 ] z", 8, None, [(4, "a x z"), (8, "a y z")]),
    ("[a (b:1.1):c:2]", 4, None, [(2, "a (b:1.1)"), (4, "c")]),
    # not editing: square brackets are emphasis, escaped ones are text, stray brackets and
    # colons stay as they are
    ("[a:b]", 8, None, [(8, "[a:b]")]),
    ("[cat]", 8, None, [(8, "[cat]")]),
    ("\\[a:b:1\\]", 8, None, [(8, "\\[a:b:1\\]")]),
    ("a) [b:c:2", 4, None, [(4, "a) [b:c:2")]),
    # unparsable as a whole (a stray |, a trailing backslash): the prompt on every step
    ("a | [b:c:2]", 4, None, [(4, "a | [b:c:2]")]),
    ("[b:c:2] tail\\", 4, None, [(4, "[b:c:2] tail\\")]),
    # a hires fix's second pass of 10 steps after a first of 20: fractions past 1, steps past 20
    ("[a:b:1.5]", 10, 20, [(5, "a"), (10, "b")]),
    ("[a:b:25]", 10, 20, [(5, "a"), (10, "b")]),
    ("[a:b:0.5]", 10, 20, [(10, "b")]),
])
def test_schedules(prompt, steps, base, want):
    assert schedule(prompt, steps, base) == want
    assert edited(prompt) == (len(want) > 1 or want[0][1] != prompt)


def test_calls_and_steps():
    entries = [(4, "a"), (8, "b")]
    assert [text_at(entries, c) for c in range(10)] == ["a"] * 5 + ["b"] * 4 + ["a"]
    assert editing_steps("heun_karras", 10) == 20 and editing_steps("restart_beta", 4) == 8
    assert editing_steps("dpm2_a", 5) == 10 and editing_steps("dpmpp_2m_sde_heun", 5) == 5
    assert editing_steps("euler_a", 7) == 7


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(sdrt's pipeline, diffusers' pipeline) of the built-in model, whose pictures follow
    their prompts closely (a tiny random model's barely do): diffusers reads the folder
    ``write_demo`` writes."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    from sdrt.engine.demo.model import demo_pipeline, write_demo
    folder = str(tmp_path_factory.mktemp("demo") / "model")
    write_demo(folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.original_scheduler_config = dict(ref.scheduler.config)
    return demo_pipeline(), ref


FOX, HOUSE = "a red fox", "a blue house"


@pytest.mark.parametrize("sampler, steps, prompt, negative, switch", [
    # euler, 6 steps: [fox:house:0.25] is the fox on calls 0-1 (0.25 · 6 cut to step 1), the
    # house on calls 2-5
    ("euler", 6, f"[{FOX}:{HOUSE}:0.25]", "blurry", {2: (HOUSE, "blurry")}),
    # heun, 3 steps (5 calls, 6 editing steps): the prompt switches after call 1, the
    # negative prompt after call 2
    ("heun", 3, f"[{FOX}:{HOUSE}:0.2]", "[blurry::2]", {2: (HOUSE, "blurry"), 3: (HOUSE, "")}),
    # alternation: calls 0 and 1 on the first option, then one each
    ("euler", 5, f"[{FOX}|{HOUSE}]", "blurry", {2: (HOUSE, "blurry"), 3: (FOX, "blurry"),
                                                 4: (HOUSE, "blurry")}),
])
def test_images_match_diffusers_switching_embeddings(demo, sampler, steps, prompt, negative,
                                                      switch):
    ours, ref = demo
    ref.scheduler = _diffusers_scheduler(ref, sampler)
    embeds = {}

    def encoded(positive, negative):
        if (positive, negative) not in embeds:
            p, n = ref.encode_prompt(positive, "cpu", 1, True, negative)
            embeds[positive, negative] = torch.cat([n, p])
        return embeds[positive, negative]

    def callback(pipe, i, t, kw):
        # After call i, the embeddings of call i + 1 (diffusers runs one UNet call a step).
        if i + 1 in switch:
            return {"prompt_embeds": encoded(*switch[i + 1])}
        return {}
    p0, n0 = ref.encode_prompt(FOX, "cpu", 1, True, "blurry")  # every case's call 0
    f = ours.vae_scale_factor
    latents = torch.randn(1, ours.unet.config.out_channels, 64 // f, 64 // f,
                          generator=torch.Generator().manual_seed(7))
    kw = dict(height=64, width=64, num_inference_steps=steps, guidance_scale=5.0,
              latents=latents, output_type="np")
    expected = ref(prompt_embeds=p0, negative_prompt_embeds=n0, callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw).images
    _assert_lively(expected, f"prompt editing with {sampler}")
    got = ours(prompt, negative_prompt=negative, sampler=sampler, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{prompt!r} with {sampler}")
    plain = ours(FOX, negative_prompt="blurry", sampler=sampler, **kw)
    assert np.abs(plain - got).max() > 0.1, "the edit changed nothing"


def test_hires_second_pass(tmp_path):
    # On the built-in model: "[fox:house:1.5]" is the fox on the first pass and switches
    # half way through the second; "[fox:house:N]" with N the first pass's steps plus half
    # the second's is the same image.
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.engine.hires import Hires, generate
    pipe = demo_pipeline()
    hires = Hires(scale=1.5, upscaler="Latent", steps=4, strength=0.6)

    def run(prompt):
        images = generate(pipe, hires, prompt, None, 64, 64, 4, "euler",
                          [torch.Generator().manual_seed(2)], guidance_scale=5.0)
        return np.asarray(images[0], dtype=np.int16)
    fraction, steps = run(f"[{FOX}:{HOUSE}:1.5]"), run(f"[{FOX}:{HOUSE}:6]")
    assert np.array_equal(fraction, steps)
    assert np.abs(fraction - run(FOX)).max() > 10 and np.abs(fraction - run(HOUSE)).max() > 10


@pytest.mark.parametrize("model", ["demo", "sdxl"])
def test_static_plans_edit_as_the_eager_loop(model, request):
    # A static plan encodes every set of texts the calls read and gathers one per call: the
    # eager loop's image, for an edit in the prompt and one in the negative (the SDXL base:
    # pooled embeddings too, and its absent negative prompt's zeros), alternation included;
    # a plan of that many sets serves another prompt with as many.
    import warnings

    from sdrt.engine import Pipeline
    if model == "demo":
        from sdrt.engine.demo.model import demo_pipeline
        pipe, side = demo_pipeline(), 64
    else:
        folder, _ = request.getfixturevalue("sdxl_base_folder")
        pipe, side = Pipeline.from_pretrained(folder, device="cpu"), 16
    kw = dict(height=side, width=side, num_inference_steps=4, sampler="euler_a",
              guidance_scale=5.0, output_type="np")
    cases = [(f"[{FOX}:{HOUSE}:0.5]", "[blurry|dark]"), (f"[{HOUSE}|{FOX}]", None),
             (f"a [{FOX}::2]", "[dark:blurry:1]")]
    eager = [pipe(p, negative_prompt=n, seed=5, **kw) for p, n in cases]
    pipe.compile(side, side, num_inference_steps=4, sampler="euler_a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plans built on demand say so
        static = [pipe(p, negative_prompt=n, seed=5, **kw) for p, n in cases]
    for (p, n), a, b in zip(cases, eager, static):
        assert_close_abs(b, a, 1e-5, f"{p!r} / {n!r} under a static plan")
    shapes = [s for s in pipe.runtime.plans if s.text_variants > 1]
    assert shapes and all(s.text_variants <= 4 for s in shapes)


@pytest.mark.parametrize("prompt, want", [
    ("a cat AND a dog:1.2", [("a cat", 1.0), (" a dog", 1.2)]),
    ("a cat:1.5", [("a cat", 1.5)]),             # one part with a weight
    ("x (y:1.2)", [("x (y:1.2)", 1.0)]),          # emphasis is not a weight
    ("ANDROID AND x", [("ANDROID", 1.0), (" x", 1.0)]),  # AND as a word only
    ("a:-0.5 AND b :2", [("a", -0.5), (" b", 2.0)]),
])
def test_composable_parts(prompt, want):
    assert composable_parts(prompt) == want


def _by_hand(ref, parts, negative, scale, steps, latents):
    """Composable diffusion written out over diffusers' modules: Euler on the unconditional
    noise prediction plus scale · Σ weight · (part's − unconditional)."""
    from diffusers import EulerDiscreteScheduler
    sched = EulerDiscreteScheduler.from_config(ref.original_scheduler_config)
    sched.set_timesteps(steps)
    embeds = [ref.encode_prompt(t, "cpu", 1, False)[0] for t, _ in parts]
    uncond = ref.encode_prompt(negative, "cpu", 1, False)[0]
    x = latents * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x] * (1 + len(parts))), t)
            eps = ref.unet(inp, t, encoder_hidden_states=torch.cat([uncond, *embeds])).sample
            guided = eps[:1] + scale * sum(w * (eps[1 + i:2 + i] - eps[:1])
                                           for i, (_, w) in enumerate(parts))
            x = sched.step(guided, t, x).prev_sample
        image = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_composable_diffusion_matches_it_written_out(demo):
    ours, ref = demo
    f = ours.vae_scale_factor
    latents = torch.randn(1, 4, 64 // f, 64 // f, generator=torch.Generator().manual_seed(3))
    kw = dict(height=64, width=64, num_inference_steps=4, sampler="euler", output_type="np")
    parts = [(FOX, 0.7), (" " + HOUSE, 0.6)]
    expected = _by_hand(ref, parts, "blurry", 5.0, 4, latents)
    _assert_lively(expected, "composable diffusion")
    got = ours(f"{FOX}:0.7 AND {HOUSE}:0.6", negative_prompt="blurry", guidance_scale=5.0,
               latents=latents, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "two parts")
    # One part weighed w is the prompt at w times the guidance; two equal halves the prompt.
    plain = ours(FOX, negative_prompt="blurry", guidance_scale=6.0, latents=latents, **kw)
    assert_close_abs(ours(f"{FOX}:1.2", negative_prompt="blurry", guidance_scale=5.0,
                          latents=latents, **kw), plain, 1e-5, "one weighed part")
    halves = ours(f"{FOX}:0.5 AND {FOX}:0.5", negative_prompt="blurry", guidance_scale=6.0,
                  latents=latents, **kw)
    assert_close_abs(halves, plain, 1e-5, "two halves")
    # With prompt editing inside a part, and two prompts of 1 and 2 parts, 2 images each.
    both = ours([FOX, f"[{FOX}:{HOUSE}:0.5] AND {FOX}:0.3"], negative_prompt="blurry",
                guidance_scale=5.0, num_images_per_prompt=2, seed=4, **kw)
    alone = ours(FOX, negative_prompt="blurry", guidance_scale=5.0, num_images_per_prompt=2,
                 seed=4, **kw)
    assert_close_abs(both[:2], alone, 1e-5, "the one-part prompt beside a composable one")
    from sdrt.engine import SdrtError
    with pytest.raises(SdrtError, match="composable diffusion\\) need classifier-free"):
        ours(f"{FOX} AND {HOUSE}", guidance_scale=1.0, **kw)
    for bad in ((4,), (4, 0), [4, 8], (4.0, 8)):
        with pytest.raises(SdrtError, match="prompt_edit_steps must be None or \\(steps, the "
                                            "first pass's steps\\)"):
            ours(FOX, prompt_edit_steps=bad, **kw)


def test_composable_diffusion_with_controlnets_and_an_ip_adapter(demo, tmp_path):
    # Each part's row gets its image's control image (a ControlNet, in guess mode too, and a
    # T2I-Adapter) and the image prompt: one part weighed w is the prompt at w times the
    # guidance, two equal halves the prompt, and a composable prompt beside a plain one keeps
    # its own control image.
    from safetensors.torch import save_file

    from sdrt.engine.adapter import AdapterConfig, T2IAdapter
    from sdrt.engine.demo.model import demo_config
    from sdrt.engine.ip_adapter import cross_attentions
    from sdrt.engine.tiny import controlnet_config, write_controlnet
    from test_ip_adapter import _own_encoder, _picture, _weights
    ours, _ = demo
    cfg = demo_config()
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    write_controlnet(str(tmp_path / "net"), controlnet_config(cfg["unet"], factor), 6)
    torch.manual_seed(9)
    adapter = T2IAdapter(AdapterConfig(channels=tuple(cfg["unet"]["block_out_channels"]),
                                       num_res_blocks=1, downscale_factor=2 * factor,
                                       adapter_type="full_adapter_xl"))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()},
              str(tmp_path / "t2i.safetensors"))
    widths = tuple(a.to_q.out_features for a in cross_attentions(ours.unet))
    save_file(_weights("plus", 5, widths, cross=ours.unet.config.cross_attention_dim),
              str(tmp_path / "ip.safetensors"))
    _own_encoder(tmp_path / "clip.safetensors")
    ours.load_controlnet(str(tmp_path / "net"), name="net")
    ours.load_controlnet(str(tmp_path / "t2i.safetensors"), name="t2i")
    ours.load_ip_adapter(tmp_path / "ip.safetensors", tmp_path / "clip.safetensors", name="ip")
    rng = np.random.default_rng(3)
    hints = [rng.random((64, 64, 3)).astype(np.float32) for _ in range(2)]
    kw = dict(height=64, width=64, num_inference_steps=3, sampler="euler", output_type="np",
              negative_prompt="blurry", seed=8, ip_adapter_image=_picture(4, 40, 40),
              ip_adapter="ip", ip_adapter_scale=1.5)
    try:
        for guess in (False, True):
            control = dict(control_image=[hints[0], hints[1]], controlnet=["net", "t2i"],
                           guess_mode=guess, controlnet_conditioning_scale=[1.3, 0.8])
            plain = ours(FOX, guidance_scale=6.0, **control, **kw)
            assert_close_abs(ours(f"{FOX}:1.2", guidance_scale=5.0, **control, **kw), plain,
                             1e-5, f"one weighed part, guess mode {guess}")
            assert_close_abs(ours(f"{FOX}:0.5 AND {FOX}:0.5", guidance_scale=6.0, **control,
                                  **kw), plain, 1e-5, f"two halves, guess mode {guess}")
        per_prompt = dict(control_image=[hints[1], hints[0]], controlnet="net")
        both = ours([f"{HOUSE}:0.5 AND {HOUSE}:0.5", FOX], guidance_scale=6.0, **per_prompt, **kw)
        alone = ours([HOUSE, FOX], guidance_scale=6.0, **per_prompt, **kw)
        assert_close_abs(both, alone, 1e-5, "a control image per prompt beside parts")
        assert np.abs(alone[0] - ours(HOUSE, guidance_scale=6.0, control_image=hints[0],
                                      controlnet="net", **kw)[0]).max() > 0.02, \
            "the control image changed nothing"
    finally:
        ours.unload_controlnet()
        ours.unload_ip_adapter()


@pytest.mark.gpu
def test_cuda_static_plans_edit_as_the_eager_loop():
    # Under CUDA graphs: the sets of texts gathered per call by a device index, replayed.
    import warnings

    from sdrt.engine.demo.model import demo_pipeline
    pipe = demo_pipeline("cuda", torch.float32)
    kw = dict(height=64, width=64, num_inference_steps=4, sampler="euler_a",
              guidance_scale=5.0, output_type="np", seed=5)
    prompt, negative = f"[{FOX}:{HOUSE}:0.5]", "[blurry|dark]"
    eager = pipe(prompt, negative_prompt=negative, **kw)
    pipe.compile(64, 64, num_inference_steps=4, sampler="euler_a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan is built on demand
        first = pipe(prompt, negative_prompt=negative, **kw)
        again = pipe(f"[{HOUSE}:{FOX}:0.25]", negative_prompt="[dark|blurry]", **kw)
    assert any(s.text_variants > 1 for s in pipe.runtime.plans)
    assert_close_abs(first, eager, 2e-3, "an edited prompt under CUDA graphs")
    pipe.runtime = None
    assert_close_abs(again, pipe(f"[{HOUSE}:{FOX}:0.25]", negative_prompt="[dark|blurry]", **kw),
                     2e-3, "another edit replayed by the same graphs")


def test_a1111_api_edits_and_alternates(tmp_path):
    # Over real HTTP, two requests batched together (one edited, one composable) give the
    # library's images, and the PNG info keeps each prompt as it was written.
    import base64
    import concurrent.futures
    import io
    import json

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from PIL import Image

    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.serve.local import LocalServer
    from test_serve import TIMEOUT, assert_same_image, config
    prompts = [f"[{FOX}:{HOUSE}:0.5]", f"{FOX} AND {HOUSE}:0.5"]
    with LocalServer(config(max_batch=2, batch_window_ms=300)) as url:
        def post(prompt):
            return httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
                "prompt": prompt, "negative_prompt": "blurry", "steps": 3, "cfg_scale": 5,
                "seed": 3, "width": 64, "height": 64})
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(post, prompts))
    pipe = demo_pipeline()
    for prompt, r in zip(prompts, responses):
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        want = pipe(prompt, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                    seed=3, height=64, width=64)[0]
        assert_same_image(got, want, prompt)
        assert json.loads(r.json()["info"])["infotexts"][0].startswith(prompt + "\n")
