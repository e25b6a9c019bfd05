"""The static-shape runtime: plans, the LRU of built shapes, strict mode, and equality with
the eager pipeline. On a CPU the plan runs its stages eagerly over its static buffers; the
same tests on a GPU replay CUDA graphs."""
import numpy as np
import pytest
import torch

from conftest import run_eagerly
from sdrt.engine import Pipeline, SdrtError

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return Pipeline.from_pretrained(tiny_sd1_folder)


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler_a", "dpmpp_2m_karras", "heun",
                                     "dpm2_a_karras", "dpmpp_2m_sde", "unipc", "lms_karras",
                                     "deis", "dpmpp_3m_sde_karras", "dpmpp_sde_karras",
                                     # sigma schedules: a table of its own, fractional
                                     # timesteps, a two-call run ending on sigma_min, a
                                     # table longer than the steps
                                     "euler_a_align_your_steps", "dpmpp_2m_sgm_uniform",
                                     "heun_kl_optimal", "dpmpp_sde_comfy_beta",
                                     "deis_ddim_uniform", "dpmpp_2s_a_karras",
                                     "restart_karras",
                                     # several calls a step, noise at a step's end
                                     "dpm_fast_a", "heunpp2_linear_quadratic"])
def test_static_plan_equalsrun_eagerly(pipe, sampler):
    pipe.runtime = None
    steps = 20 if sampler.startswith("restart") else 5  # (20: a restart, its noise drawn)
    pipe.compile(height=16, width=24, batch_size=2, num_inference_steps=steps, sampler=sampler)
    kw = dict(prompt=PROMPTS, negative_prompt="blurry", height=16, width=24,
              num_inference_steps=steps, sampler=sampler, guidance_scale=6.0, output_type="np")
    for seed in (1, 2):
        static = pipe(seed=seed, **kw)
        eager = run_eagerly(pipe, seed=seed, **kw)
        tol = 1e-5 if pipe.device.type == "cpu" else 2e-3
        assert np.abs(static - eager).max() <= tol, f"{sampler} seed {seed}"
    assert len(pipe.runtime.plans) == 1


@pytest.mark.parametrize("guidance_scale", [1.0, 0.0])
def test_static_plan_without_guidance_equalsrun_eagerly(pipe, guidance_scale):
    # guidance ≤ 1: the plan is built without the unconditional half (rows = batch, not 2×).
    pipe.runtime = None
    plan = pipe.compile(height=16, width=24, batch_size=2, num_inference_steps=4,
                        sampler="euler_a", guidance=False)
    assert plan.cond.states.shape[0] == 2, "a plan without CFG must not batch an unconditional half"
    kw = dict(prompt=PROMPTS, height=16, width=24, num_inference_steps=4, sampler="euler_a",
              guidance_scale=guidance_scale, output_type="np", seed=3)
    static = pipe(**kw)
    eager = run_eagerly(pipe, **kw)
    assert list(pipe.runtime.plans.values()) == [plan], "the call did not use the built plan"
    tol = 1e-5 if pipe.device.type == "cpu" else 2e-3
    assert np.abs(static - eager).max() <= tol, np.abs(static - eager).max()
    # And it is not the guided image: the CFG flag reached the plan.
    guided = run_eagerly(pipe, **{**kw, "guidance_scale": 6.0})
    assert np.abs(static - guided).max() > 1e-3


def test_new_prompt_seed_guidance_and_latents_reuse_the_plan(pipe):
    pipe.runtime = None
    plan = pipe.compile(height=16, width=16, num_inference_steps=3, sampler="euler")
    outputs = []
    for i, (prompt, g) in enumerate([("a fox", 7.5), ("a cat", 3.0), ("a cat", 3.0)]):
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i % 2))
        outputs.append(pipe(prompt, guidance_scale=g, latents=latents, num_inference_steps=3,
                            sampler="euler", height=16, width=16, output_type="np"))
    assert list(pipe.runtime.plans.values()) == [plan]
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3, "inputs were not copied in"
    # The returned array must not alias the plan's buffer, which the next request overwrites.
    assert np.abs(outputs[1] - outputs[2]).max() > 1e-3


def test_unbuilt_shape_is_built_and_cached_lru(pipe):
    pipe.runtime = None
    pipe.compile(height=16, width=16, num_inference_steps=2, sampler="ddim", max_shapes=2)
    run = lambda h, w: pipe("a fox", height=h, width=w, num_inference_steps=2, sampler="ddim",
                            seed=0, output_type="latent")
    with pytest.warns(UserWarning, match=r"built a static plan for 24x16, batch 1, 2 steps"):
        run(16, 24)                 # a second shape: built on demand (reported), two cached
    run(16, 16)                     # the first again: now the most recently used
    with pytest.warns(UserWarning, match="on demand"):
        run(24, 16)                 # a third: the least recently used (24×16) is dropped
    assert [(s.height, s.width) for s in pipe.runtime.plans] == [(16, 16), (24, 16)]


def test_strict_mode_refuses_unbuilt_shape(pipe):
    pipe.runtime = None
    pipe.compile(height=16, width=16, num_inference_steps=2, sampler="ddim", strict=True)
    with pytest.raises(SdrtError, match=r"no static plan for 24x16, batch 1, 2 steps of ddim, "
                                        r"with CFG \(strict mode; built: 16x16"):
        pipe("a fox", height=16, width=24, num_inference_steps=2, sampler="ddim")
    with pytest.raises(SdrtError, match="no static plan"):  # another step count is another shape
        pipe("a fox", height=16, width=16, num_inference_steps=3, sampler="ddim")
    pipe("a fox", height=16, width=16, num_inference_steps=2, sampler="ddim", seed=1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=13), "height must be a multiple of 2"),
    (dict(sampler="dpm_adaptive"), "sampler must be one of"),
    (dict(batch_size=0), "batch_size must be an integer from 1 to 64 .*, got 0"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1 to 1000"),
    (dict(max_shapes=0), "max_shapes"),
])
def test_compile_rejects_bad_arguments(pipe, kwargs, message):
    with pytest.raises(SdrtError, match=message):
        pipe.compile(**kwargs)


@pytest.mark.gpu
def test_graph_replays_with_changing_prompts_equal_eager_and_do_not_grow_memory(tiny_sd1_folder):
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, device="cuda", dtype=torch.float16)
    pipe.compile(height=16, width=16, batch_size=1, num_inference_steps=4, sampler="euler_a")
    words = ["fox", "cat", "owl", "boat", "tree"]
    for i in range(100):
        kw = dict(prompt=f"a {words[i % 5]} number {i}", height=16, width=16, seed=i,
                  num_inference_steps=4, sampler="euler_a", output_type="np")
        static = pipe(**kw)
        if i % 10 == 0:
            assert np.abs(static - run_eagerly(pipe, **kw)).max() <= 2e-3, f"replay {i}"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(200):
        pipe(f"prompt {i}", height=16, width=16, seed=i, num_inference_steps=4,
             sampler="euler_a", output_type="np")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before, "memory grew over 200 replays"


def _control_replays(folder, tmp_path, device, guess_mode, replays, checks, adapter=False):
    """Two ControlNets (or a T2I-Adapter and a ControlNet) inside the plan's loop: new control
    images, scales, shares of the schedule and control modes are buffer writes, so every call
    reuses the one plan; ``checks`` replays are compared with the eager run, then memory must
    stay put over ``replays`` more (CUDA)."""
    import json

    from sdrt.engine.tiny import (adapter_config, controlnet_config, write_adapter,
                                  write_controlnet)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = Pipeline.from_pretrained(folder, device=device, dtype=dtype)
    with open(f"{folder}/unet/config.json") as fh:
        unet_config = json.load(fh)
    write = {"a": (write_adapter, adapter_config) if adapter else
             (write_controlnet, controlnet_config), "b": (write_controlnet, controlnet_config)}
    for seed, (name, (writer, config)) in enumerate(write.items(), 1):
        pipe.load_controlnet(writer(str(tmp_path / name), config(
            unet_config, pipe.vae_scale_factor), seed), name=name)
    pipe.compile(height=16, width=24, num_inference_steps=4, sampler="dpmpp_2m",
                 controlnet=["a", "b"], guess_mode=guess_mode)
    modes = ("balanced", "prompt", "controlnet")

    def call(i):
        g = torch.Generator().manual_seed(i)
        hints = [torch.rand(1, 3, 16, 24, generator=g) for _ in range(2)]
        return dict(prompt=f"a fox number {i}", height=16, width=24, seed=i,
                    num_inference_steps=4, sampler="dpmpp_2m", output_type="np",
                    control_image=hints, controlnet=["a", "b"], guess_mode=guess_mode,
                    controlnet_conditioning_scale=[0.5 + i % 3, 1.0],
                    control_guidance_end=[1.0, 0.5 + 0.1 * (i % 5)],
                    control_mode="balanced" if guess_mode else
                    [modes[i % 3], modes[(i + 1) % 3]])
    tolerance = 2e-3 if device == "cuda" else 1e-5
    first = None
    for i in range(checks):
        static = pipe(**call(i))
        first = static if first is None else first
        assert np.abs(static - run_eagerly(pipe, **call(i))).max() <= tolerance, f"call {i}"
    assert np.abs(pipe(**call(0)) - first).max() <= tolerance, "a replay of call 0 changed"
    other = dict(call(0), control_image=[1 - h for h in call(0)["control_image"]])
    assert np.abs(pipe(**other) - first).max() > 10 * tolerance, "the controls did nothing"
    assert len(pipe.runtime.plans) == 1, "a new image, scale or mode built another plan"
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for i in range(replays):
            pipe(**call(i))
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before, f"memory grew over {replays} replays"
        assert len(pipe.runtime.plans) == 1


@pytest.mark.parametrize("adapter", [False, True], ids=["controlnets", "adapter"])
def test_control_plan_reused_across_images_scales_and_modes(tiny_sd1_folder, tmp_path, adapter):
    # The GPU test's calls, fewer of them, on the CPU (its plan runs eagerly over its buffers).
    _control_replays(tiny_sd1_folder, tmp_path, "cpu", False, replays=0, checks=3,
                     adapter=adapter)


@pytest.mark.gpu
@pytest.mark.parametrize("guess_mode,adapter", [(False, False), (True, False), (False, True)],
                         ids=["controlnets", "guess-mode", "adapter"])
def test_control_graph_replays_equal_eager_and_do_not_grow_memory(tiny_sd1_folder, tmp_path,
                                                                  guess_mode, adapter):
    # On CUDA the loop with the ControlNets (or adapter) is a captured graph.
    _control_replays(tiny_sd1_folder, tmp_path, "cuda", guess_mode, replays=100, checks=4,
                     adapter=adapter)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_fp16_vae_overflow_is_decoded_again_in_fp32(static):
    from test_vae_dtype import overflowing_fp16_pipe
    pipe = overflowing_fp16_pipe()
    if static:
        pipe.compile(height=64, width=64, num_inference_steps=2, sampler="euler")
    with pytest.warns(UserWarning, match="overflowed in torch.float16"):
        image = pipe("a fox", height=64, width=64, num_inference_steps=2, sampler="euler",
                     seed=0, output_type="np")
    assert np.isfinite(image).all()
    # Saturated to 0 and 1, not the NaN-turned-black of an unguarded decode.
    assert (image == 1).any() and (image == 0).any()


def test_clip_skip_requests_bypass_the_static_plan(pipe):
    pipe.runtime = None
    pipe.compile(height=16, width=16, num_inference_steps=2, sampler="ddim")
    kw = dict(prompt="a fox", height=16, width=16, num_inference_steps=2, sampler="ddim",
              seed=4, output_type="np", clip_skip=1)
    assert np.array_equal(pipe(**kw), run_eagerly(pipe, **kw))
    assert np.abs(pipe(**kw) - pipe(**{**kw, "clip_skip": 0})).max() > 1e-4


def test_a_new_scheduler_config_rebuilds_the_plan(pipe):
    from sdrt.engine.samplers import SchedulerConfig
    pipe.runtime = None
    before = pipe.scheduler_config
    first = pipe.compile(height=16, width=16, num_inference_steps=3, sampler="ddim")
    try:
        pipe.scheduler_config = SchedulerConfig.from_dict(
            {"_class_name": "DDIMScheduler", "timestep_spacing": "trailing"})
        kw = dict(prompt="a fox", height=16, width=16, num_inference_steps=3, sampler="ddim",
                  seed=2, output_type="np")
        with pytest.warns(UserWarning, match="on demand"):
            static = pipe(**kw)
        assert pipe.runtime.plans[first.shape] is not first
        assert np.abs(static - run_eagerly(pipe, **kw)).max() <= 1e-5
    finally:
        pipe.scheduler_config = before


def test_compile_with_other_cache_settings_keeps_plans(pipe):
    pipe.runtime = None
    a = pipe.compile(height=16, width=16, num_inference_steps=2, sampler="ddim")
    b = pipe.compile(height=16, width=24, num_inference_steps=2, sampler="ddim")
    pipe.compile(height=16, width=24, num_inference_steps=2, sampler="ddim", max_shapes=1,
                 strict=True)
    assert list(pipe.runtime.plans.values()) == [b] and a is not b and pipe.runtime.strict


def _tiny_cuda_pipe():
    from sdrt.engine.tiny import tiny_components
    c = tiny_components()
    for m in (c.text_encoder, c.unet, c.vae):
        m.to("cuda", torch.float16)
    return Pipeline(c, torch.device("cuda"), torch.float16)


@pytest.mark.gpu
def test_callback_under_a_cuda_plan_runs_the_denoising_stage_eagerly():
    # A replayed graph cannot call back: with a callback the plan's denoising stage runs
    # eagerly over its buffers, between the text-encoder and decoder replays.
    pipe = _tiny_cuda_pipe()
    pipe.compile(height=64, width=64, num_inference_steps=4, sampler="euler_a")
    kw = dict(prompt="a fox", height=64, width=64, num_inference_steps=4, sampler="euler_a",
              seed=3, output_type="np")
    replayed = pipe(**kw)
    steps = []
    called = pipe(callback=lambda p, i, t, k: steps.append((i, p.num_timesteps)), **kw)
    assert steps == [(i, 4) for i in range(4)]
    assert np.abs(called - replayed).max() <= 2e-3
    assert np.abs(pipe(**kw) - replayed).max() <= 2e-3, "the graphs broke after an eager stage"
    assert len(pipe.runtime.plans) == 1


@pytest.mark.gpu
def test_newer_sampler_loops_replay_as_cuda_graphs_equal_to_eager():
    # The loops with several calls a step, noise drawn before the replay, or the
    # unconditional prediction (CFG++), each captured once and replayed with new seeds.
    pipe = _tiny_cuda_pipe()
    for sampler in ("dpm_fast_a", "heunpp2_karras", "seeds_3", "sa_solver", "sa_solver_pece",
                    "cfgpp_dpmpp_2s_a", "cfgpp_ddim"):
        pipe.compile(height=64, width=64, num_inference_steps=6, sampler=sampler)
        for seed in (1, 2):
            kw = dict(prompt="a fox", negative_prompt="blurry", height=64, width=64,
                      num_inference_steps=6, sampler=sampler, seed=seed, output_type="np")
            assert np.abs(pipe(**kw) - run_eagerly(pipe, **kw)).max() <= 2e-3, (sampler, seed)
        pipe.runtime = None


@pytest.mark.gpu
def test_memory_estimate_bounds_the_measured_peak_on_cuda():
    from sdrt.engine.memory import fused_attention, request_bytes
    pipe = _tiny_cuda_pipe()
    pipe("warm-up", height=64, width=64, num_inference_steps=1, output_type="latent")
    workspace = 128 * 2 ** 20  # cuDNN's and the conv chooser's scratch, outside the estimate
    for side, batch in ((512, 2), (1024, 1)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        pipe("a fox", height=side, width=side, num_images_per_prompt=batch,
             num_inference_steps=2, sampler="euler", seed=0, output_type="np")
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
        estimate, _ = request_bytes(pipe.unet.config, pipe.vae.config, pipe.text_encoder.config,
                                    side, side, batch, True, pipe.dtype,
                                    fused_attention(pipe.unet, pipe.device, pipe.dtype))
        assert measured <= estimate + workspace, \
            f"{side}² × {batch}: measured {measured} > estimate {estimate}"


@pytest.mark.gpu
def test_freeu_pag_and_comfy_weights_replay_as_cuda_graphs_equal_to_eager():
    # FreeU's FFTs (each style), perturbed-attention guidance's third rows, the guidance's
    # rescale (ComfyUI's: the timestep's sigma looked up on the device) and ComfyUI's prompt
    # weights (the empty prompt encoded with the chunks) inside captured graphs: the replay
    # equals the eager run, new prompts too.
    pipe = _tiny_cuda_pipe()
    for style, pag, rescale in (("diffusers", 0.0, 0.7), ("comfy", 3.0, 0.5),
                                ("comfy_v2", 0.0, 0.0)):
        pipe.enable_freeu(0.9, 0.2, 1.3, 1.4, style)
        guidance = dict(pag_scale=pag, guidance_rescale=rescale,
                        guidance_rescale_style="diffusers" if pag else "comfy")
        pipe.compile(height=64, width=64, num_inference_steps=4, sampler="euler_karras",
                     prompt_syntax="comfy", **guidance)
        for prompt in ("a (red:1.3) fox", "((a blue bird))"):
            kw = dict(prompt=prompt, negative_prompt="(blurry:1.2)", height=64, width=64,
                      num_inference_steps=4, sampler="euler_karras", seed=1,
                      output_type="np", prompt_syntax="comfy", **guidance)
            assert np.abs(pipe(**kw) - run_eagerly(pipe, **kw)).max() <= 2e-3, (style, prompt)
        pipe.runtime = None
    pipe.disable_freeu()


@pytest.mark.gpu
def test_given_text_states_replay_as_cuda_graphs_equal_to_eager():
    # prompt_embeds of 77·n tokens copied over the plan's text stage (not replayed), a text
    # negative encoded beside them; then a prompt: the text graph runs again.
    pipe = _tiny_cuda_pipe()
    pipe.compile(height=64, width=64, batch_size=2, num_inference_steps=4, sampler="euler",
                 num_chunks=2)
    g = torch.Generator().manual_seed(3)
    width = pipe.unet.config.cross_attention_dim
    states = torch.randn(2, 154, width, generator=g).to("cuda", torch.float16)
    kw = dict(height=64, width=64, num_inference_steps=4, sampler="euler", seed=1,
              output_type="np")
    for given in (dict(prompt_embeds=states, negative_prompt_embeds=states.flip(0)),
                  dict(prompt_embeds=states, negative_prompt="blurry")):
        assert np.abs(pipe(**given, **kw) - run_eagerly(pipe, **given, **kw)).max() <= 2e-3
    prompts = dict(prompt=["a red fox", "a lighthouse"], **kw)
    text = pipe(**prompts)
    assert np.abs(text - run_eagerly(pipe, **prompts)).max() <= 2e-3
