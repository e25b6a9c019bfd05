"""Static plans for image to image, inpainting and a hires fix's second pass: the init image
is encoded (and every draw made, in the eager path's order) before the replay, and the plan
gives the eager pipeline's image. On a CPU the plan runs its stages eagerly over its buffers;
on a GPU the same tests replay CUDA graphs."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_eagerly
from sdrt.engine import Pipeline

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return Pipeline.from_pretrained(tiny_sd1_folder)


@pytest.fixture(scope="module")
def inpainting_pipe(tmp_path_factory):
    """sdrt's tiny SD 1 architecture with an inpainting UNet (9 input channels)."""
    from sdrt.engine.tiny import write_model
    from tiny_models import sdrt_config
    config = sdrt_config("sd1")
    config["unet"]["in_channels"] = 9
    folder = str(tmp_path_factory.mktemp("sdrt-tiny-inpainting") / "model")
    write_model(folder, config)
    return Pipeline.from_pretrained(folder)


def _images(n, seed=0, size=(24, 16)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            for _ in range(n)]


def _mask(size=(24, 16)):
    m = np.zeros((size[1], size[0]), dtype=np.float32)
    m[3:13, 5:18] = 1
    return m


def _tol(pipe):
    return 1e-5 if pipe.device.type == "cpu" else 2e-3


def _assert_plan_equals_eager(pipe, compile_kw, call_kw, what):
    pipe.runtime = None
    plan = pipe.compile(**compile_kw)
    for seed in (1, 2):
        static = pipe(seed=seed, **call_kw)
        assert list(pipe.runtime.plans.values()) == [plan], f"{what}: the plan was not used"
        eager = run_eagerly(pipe, seed=seed, **call_kw)
        assert eager.std() > 0.01, f"{what}: the eager image is flat"
        diff = np.abs(static - eager).max()
        assert diff <= _tol(pipe), f"{what} seed {seed}: static differs by {diff:.3g}"
    return plan


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.6), ("euler_a", 0.75),
                                              ("dpmpp_2m", 1.0), ("pndm", 0.8)])
def test_image_to_image_plan_equals_eager(pipe, sampler, strength):
    _assert_plan_equals_eager(
        pipe, dict(height=16, width=24, batch_size=2, num_inference_steps=5, sampler=sampler,
                   strength=strength),
        dict(prompt=PROMPTS, image=_images(2), strength=strength, negative_prompt="blurry",
             num_inference_steps=5, sampler=sampler, guidance_scale=6.0, output_type="np"),
        f"image to image {sampler} {strength}")


def test_latent_resize_plan_equals_eager(pipe):
    """A1111's latent upscale: 16×8 images encoded, their latents resized to 24×16."""
    _assert_plan_equals_eager(
        pipe, dict(height=16, width=24, batch_size=2, num_inference_steps=5, sampler="euler_a",
                   strength=0.7),
        dict(prompt=PROMPTS, image=_images(2, size=(16, 8)), strength=0.7, height=16, width=24,
             latent_resize=True, num_inference_steps=5, sampler="euler_a", output_type="np"),
        "latent resize")


@pytest.mark.parametrize("sampler,strength", [("euler_a", 1.0), ("ddim", 0.6)])
def test_inpainting_plan_equals_eager(pipe, sampler, strength):
    # A UNet that sees no mask: the plan keeps the unmasked latents after every step.
    plan = _assert_plan_equals_eager(
        pipe, dict(height=16, width=24, batch_size=2, num_inference_steps=4, sampler=sampler,
                   strength=strength, masked=True),
        dict(prompt=PROMPTS, image=_images(1), mask_image=_mask(), strength=strength,
             num_inference_steps=4, sampler=sampler, guidance_scale=6.0, output_type="np"),
        f"inpainting {sampler} {strength}")
    assert plan.mask is not None


@pytest.mark.parametrize("content", ["latent_noise", "latent_nothing"])
def test_masked_content_plan_equals_eager(pipe, content):
    _assert_plan_equals_eager(
        pipe, dict(height=16, width=24, num_inference_steps=4, sampler="euler_a",
                   strength=0.7, masked=True),
        dict(prompt=PROMPTS[0], image=_images(1), mask_image=_mask(), strength=0.7,
             masked_content=content, num_inference_steps=4, sampler="euler_a",
             guidance_scale=6.0, output_type="np"), f"masked content {content}")


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_unet_plan_equals_eager(inpainting_pipe, strength):
    plan = _assert_plan_equals_eager(
        inpainting_pipe, dict(height=16, width=24, num_inference_steps=4, sampler="euler",
                              strength=strength, masked=True),
        dict(prompt=PROMPTS[0], image=_images(1), mask_image=_mask(), strength=strength,
             num_inference_steps=4, sampler="euler", guidance_scale=6.0, output_type="np"),
        f"inpainting UNet {strength}")
    assert plan.mask is None and plan.image_cond.shape[1] == 5
    assert (plan.x0 is None) == (strength == 1.0), "full strength encodes no init image"


def test_inpainting_unet_image_to_image_without_a_mask(inpainting_pipe):
    _assert_plan_equals_eager(
        inpainting_pipe, dict(height=16, width=24, num_inference_steps=3, sampler="dpmpp_2m",
                              strength=0.8),
        dict(prompt=PROMPTS[0], image=_images(1, seed=4), strength=0.8, num_inference_steps=3,
             sampler="dpmpp_2m", guidance_scale=5.0, output_type="np"),
        "inpainting UNet, image to image")


def test_latents_in_plan_equals_eager(pipe):
    # A hires fix's second pass takes the first pass's upscaled latents as its image.
    f = pipe.vae_scale_factor
    latents = 0.7 * torch.randn(2, 4, 16 // f, 24 // f, generator=torch.Generator().manual_seed(3))
    _assert_plan_equals_eager(
        pipe, dict(height=16, width=24, batch_size=2, num_inference_steps=5, sampler="euler",
                   strength=0.5),
        dict(prompt=PROMPTS, image=latents.to(pipe.device), strength=0.5, num_inference_steps=5,
             sampler="euler", guidance_scale=6.0, output_type="np"), "latents in")


def test_each_kind_of_request_gets_its_own_plan(pipe):
    pipe.runtime = None
    pipe.compile(height=16, width=24, num_inference_steps=3, sampler="euler")
    kw = dict(prompt=PROMPTS[0], height=16, width=24, num_inference_steps=3, sampler="euler",
              seed=0, output_type="np")
    with pytest.warns(UserWarning, match="built a static plan .* on demand"):
        pipe(image=_images(1), strength=0.5, **kw)
    with pytest.warns(UserWarning, match="inpainting at strength 0.5"):
        pipe(image=_images(1), mask_image=_mask(), strength=0.5, **kw)
    pipe(**kw)
    described = sorted(shape.describe() for shape in pipe.runtime.plans)
    assert len(described) == 3 and sum("strength 0.5" in d for d in described) == 2


def test_callback_sees_the_kept_latents(pipe):
    # A callback under an inpainting plan sees the latents after the unmasked ones are put
    # back, as in the eager path.
    seen = {}

    def grab(p, i, t, kw):
        seen.setdefault(p.runtime is None, []).append(kw["latents"].clone())
    kw = dict(prompt=PROMPTS[0], image=_images(1), mask_image=_mask(), strength=0.6,
              num_inference_steps=3, sampler="ddim", seed=5, output_type="np", callback=grab)
    pipe.runtime = None
    pipe.compile(height=16, width=24, num_inference_steps=3, sampler="ddim", strength=0.6,
                 masked=True)
    pipe(**kw)
    run_eagerly(pipe, **kw)
    static, eager = seen[False], seen[True]
    assert len(static) == len(eager) > 0
    for a, b in zip(static, eager):
        assert (a - b).abs().max() <= _tol(pipe)


@pytest.mark.gpu
def test_image_plans_replay_cuda_graphs(tiny_sd1_folder, tmp_path):
    # On CUDA the plans capture graphs: image to image, inpainting (the kept latents inside
    # the graph) and an inpainting UNet's buffers replay with new images, masks and seeds, give
    # the eager images, and do not grow memory.
    from sdrt.engine.tiny import write_model
    from tiny_models import sdrt_config
    config = sdrt_config("sd1")
    config["unet"]["in_channels"] = 9
    write_model(str(tmp_path / "inpainting"), config)
    cases = [(tiny_sd1_folder, dict(strength=0.6), False),
             (tiny_sd1_folder, dict(strength=0.8), True),
             (str(tmp_path / "inpainting"), dict(strength=1.0), True)]
    for folder, kw, masked in cases:
        pipe = Pipeline.from_pretrained(folder, device="cuda", dtype=torch.float16)
        plan = pipe.compile(height=16, width=24, num_inference_steps=4, sampler="euler_a",
                            masked=masked, **kw)
        assert plan.graphs, "no CUDA graphs were captured"
        for seed in range(3):
            call = dict(prompt=PROMPTS[seed % 2], image=_images(1, seed=seed),
                        mask_image=_mask() if masked else None, num_inference_steps=4,
                        sampler="euler_a", seed=seed, output_type="np", **kw)
            static = pipe(**call)
            diff = np.abs(static - run_eagerly(pipe, **call)).max()
            assert diff <= 2e-3, f"{folder} {kw} masked={masked} seed {seed}: {diff:.3g}"
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for seed in range(20):
            pipe(**{**call, "seed": seed})
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before, "memory grew over 20 replays"
