"""The demo model: the synthetic world and its checker, the shipped weights against the quality
bar, the diffusers round trip of ``write_demo``, and the training script."""
import numpy as np
import pytest
import torch

from conftest import sampler_loops
from sdrt.engine.demo import quality, world
from sdrt.engine.demo.model import WEIGHTS, demo_components, demo_config, write_demo
from sdrt.engine.demo.train import resume_unet, train


# Small networks on a shared CPU: one torch thread (conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_pipe():
    from sdrt.engine import Pipeline
    return Pipeline(demo_components(), "cpu", torch.float32)


def test_checker_is_exact_on_rendered_scenes():
    # The checker must not be the weak link: on the renderer's own pictures it is always right.
    scenes = world.held_out_scenes()
    rng = np.random.default_rng(3)
    scenes += [s for s in (world.random_scene(rng) for _ in range(100)) if len(s.shapes) == 1]
    results = [quality.check(world.render(s), s) for s in scenes]
    assert quality.accuracy(results) == {a: 1.0 for a in quality.ATTRIBUTES}
    assert all(r["regions"] == 1 for r in results)
    # Two shapes of the described colour: both counted, a dot of it not.
    red = world.Shape("red", "circle", "small", (0, 0))
    drawn = world.render(world.Scene((red, world.Shape("red", "square", "small", (2, 2))),
                                     "blue", ""))
    assert quality.check(drawn, world.Scene((red,), "blue", ""))["regions"] == 2
    drawn[15:17, 15:17] = world.COLOURS["red"]
    assert quality.check(drawn, world.Scene((red,), "blue", ""))["regions"] == 2


def test_held_out_prompts_never_appear_in_training():
    held = world.held_out_scenes()
    assert len(held) >= 50 and len({s.caption for s in held}) == len(held)
    assert all(s.held_out() for s in held)
    rng = np.random.default_rng(0)
    training = [world.random_scene(rng) for _ in range(3000)]
    assert not any(s.held_out() for s in training)
    assert not {s.caption for s in held} & {s.caption for s in training}


def test_plain_captions_name_neither_size_nor_position():
    # --plain: that share of one-shape captions names only colour, shape and background; 0
    # leaves the templates' own mix.
    def captions(plain, n=400):
        rng = np.random.default_rng(5)
        scenes = [world.random_scene(rng, plain=plain) for _ in range(n)]
        return [(s.caption, s.shapes[0]) for s in scenes if len(s.shapes) == 1]

    def bare(caption, shape):
        return shape.size not in caption.split() and \
            not any(p in caption for ps in world.POSITIONS.values() for p in ps)

    assert all(bare(*c) for c in captions(1.0))
    share = np.mean([bare(*c) for c in captions(0.0)])
    assert 0.05 < share < 0.25, share  # the templates' own: about 1 in 8
    mixed = np.mean([bare(*c) for c in captions(0.5)])
    assert 0.45 < mixed < 0.65, mixed  # 0.5 + 0.5 × (1/8)


def test_unplaced_shapes_move_to_the_centre():
    # --unplaced centre: a one-shape caption naming no position has its shape in the centre;
    # every other scene keeps the cell its caption names.
    rng = np.random.default_rng(6)
    scenes = [world.random_scene(rng, plain=0.25, unplaced="centre") for _ in range(400)]
    named = lambda s, shape: any(p in s.caption for p in world.POSITIONS[shape.cell])
    unplaced = [s for s in scenes if len(s.shapes) == 1 and not named(s, s.shapes[0])]
    assert len(unplaced) > 50 and all(s.shapes[0].cell == (1, 1) for s in unplaced)
    assert all(named(s, shape) for s in scenes if s not in unplaced for shape in s.shapes)
    rng = np.random.default_rng(6)
    anywhere = [world.random_scene(rng, plain=0.25) for _ in range(400)]
    assert len({s.shapes[0].cell for s in anywhere if len(s.shapes) == 1
                and not named(s, s.shapes[0])}) == 9


def test_training_cli_refuses_a_bad_plain_share(capsys):
    from sdrt.engine.demo.train import main
    with pytest.raises(SystemExit) as e:
        main(["--resume", "--plain", "1.5", "--out", "/nonexistent"])
    assert e.value.code == 2 and "--plain" in capsys.readouterr().err


def test_demo_config_has_defaults():
    config = demo_config()
    assert config["scheduler"]["beta_schedule"] == "scaled_linear"
    # v-prediction (engine/demo/train.py says why).
    assert config["scheduler"]["prediction_type"] == "v_prediction"
    assert set(config["demo_defaults"]) == {"sampler", "num_inference_steps", "guidance_scale",
                                            "height", "width"}
    assert WEIGHTS.endswith("demo.safetensors")


# Six held-out prompts (one per held-out combination, positions spread over the grid) at the
# model's demo defaults and a fixed seed. Measured on the shipped model: 6 of 6 on the colours
# and position, 5 of 6 on the shape (on all 54 prompts: colours and position 100%, shape 87.0%;
# benchmarks/results/demo_quality.md). The bounds sit one below, so that a regression fails and
# a CPU's rounding does not.
SUBSET = [0, 10, 20, 30, 40, 50]
MIN_CORRECT = {"shape_colour": 5, "background": 5, "position": 5, "shape": 4}


def test_shipped_weights_pass_quality_subset(demo_pipe):
    scenes = [world.held_out_scenes()[i] for i in SUBSET]
    settings = demo_config()["demo_defaults"]
    _, results = quality.text_to_image(demo_pipe, scenes, settings, seed=0)
    correct = {a: sum(r[a] for r in results) for a in quality.ATTRIBUTES}
    assert all(correct[a] >= MIN_CORRECT[a] for a in MIN_CORRECT), \
        f"correct of {len(scenes)}: {correct}, needed {MIN_CORRECT}"


def test_first_command_draws_one_red_circle_on_blue(demo_pipe):
    # The README's first command, `sdrt generate "a red circle on a blue background"`, at seeds
    # 1-8: measured 8 of 8 right (one red circle, no second red region, blue background; 32 of
    # seeds 1-32 in benchmarks/results/demo_quality.md). A model that hedges between places
    # draws two circles at most seeds and fails.
    rows = quality.first_command(demo_pipe, demo_config()["demo_defaults"], range(1, 9))
    right = [r for r in rows if r["background"] == "blue" and r["circle"]
             and r["red_regions"] == 1]
    assert len(right) >= 7, rows


@pytest.mark.parametrize("sampler", sorted(set(sampler_loops()) - {"lcm"}) + [
    # sigma schedules on samplers of each kind (tests/test_sigma_schedules.py checks each
    # schedule with each sampler)
    "euler_a_exponential", "dpmpp_2m_sgm_uniform", "unipc_simple", "heun_ddim_uniform",
    "euler_kl_optimal", "dpmpp_2m_align_your_steps"])
def test_every_sampler_draws_the_described_background(demo_pipe, sampler):
    # DDIM and PNDM read clip_sample/set_alpha_to_one from the scheduler config: without SD's
    # values DDIM clipped x0 to [-1, 1] and drew noise. (LCM needs a distilled model.) At the
    # model's own 20 steps: with 10, PNDM's (PLMS) pictures lose a small shape.
    scenes = [world.held_out_scenes()[i] for i in (0, 25)]
    settings = {**demo_config()["demo_defaults"], "sampler": sampler}
    _, results = quality.text_to_image(demo_pipe, scenes, settings, seed=0)
    assert all(r["background"] and r["shape_colour"] for r in results), results


def test_write_demo_loads_in_diffusers_with_the_same_image(tmp_path, demo_pipe):
    diffusers = pytest.importorskip("diffusers")
    write_demo(tmp_path)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        tmp_path, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    settings = demo_config()["demo_defaults"]
    side = settings["height"] // demo_pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(7))
    prompt = world.held_out_scenes()[3].caption
    kwargs = dict(num_inference_steps=settings["num_inference_steps"],
                  guidance_scale=settings["guidance_scale"], output_type="np")
    ref = theirs(prompt, latents=latents.clone(), **kwargs).images
    ours = demo_pipe(prompt, latents=latents.clone(), sampler=settings["sampler"], **kwargs)
    err = np.abs(np.asarray(ours) - ref)
    assert err.max() <= 2e-3, f"max abs {err.max():.2e} at {np.unravel_index(err.argmax(), err.shape)}"


def test_training_script_runs(tmp_path):
    steps = dict(vae_steps=2, unet_steps=3, decoder_steps=2, batch_size=2, vae_batch_size=2)
    config = train(tmp_path / "one", seed=0, **steps)
    assert {k: v["steps"] for k, v in config["training"]["stages"].items()} == \
        {"vae": 2, "unet": 3, "decoder": 2}
    c = demo_components(tmp_path / "one")
    from sdrt.engine import Pipeline
    images = Pipeline(c, "cpu", torch.float32)("a red circle", num_inference_steps=2,
                                               seed=0, output_type="np")
    assert images.shape == (1, world.SIDE, world.SIDE, 3) and np.isfinite(images).all()
    # The stages run one at a time give the same weights as one run (each stage is seeded on
    # its own and starts from what the earlier ones saved).
    train(tmp_path / "split", stages=("vae",), seed=0, **steps)
    train(tmp_path / "split", stages=("unet", "decoder"), seed=0, **steps)
    split = demo_components(tmp_path / "split")
    for name in ("text_encoder", "unet", "vae"):
        ours, theirs = getattr(split, name).state_dict(), getattr(c, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"{name} differs"
    # The UNet stage's own caption mix and loss weighting are used and recorded.
    mixed = train(tmp_path / "mixed", stages=("vae", "unet"), seed=0, shape_weighted=True,
                  plain=0.5, unplaced="centre", **steps)
    assert {k: mixed["training"]["stages"]["unet"][k] for k in
            ("shape_weighted", "plain", "unplaced")} == \
        {"shape_weighted": True, "plain": 0.5, "unplaced": "centre"}
    assert not torch.equal(demo_components(tmp_path / "mixed").unet.conv_in.weight,
                           c.unet.conv_in.weight)
    # A resumption with the loss weightings changes the UNet, not the VAE, and is recorded.
    config = resume_unet(tmp_path / "split", 2, batch_size=2, lr=1e-2,
                         shape_weighted=True, plain=0.5, log=lambda _: None)
    assert config["training"]["resumed"][-1]["unet_steps"] == 2
    assert config["training"]["resumed"][-1]["plain"] == 0.5
    resumed = demo_components(tmp_path / "split")
    assert not torch.equal(resumed.unet.conv_in.weight, split.unet.conv_in.weight)
    assert all(torch.equal(v, split.vae.state_dict()[k])
               for k, v in resumed.vae.state_dict().items())
