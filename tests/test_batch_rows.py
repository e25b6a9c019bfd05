"""Rows of one batch that do not depend on each other: a guidance scale per prompt and a CPU
generator per image (as diffusers takes a list of generators), so a server can batch requests
and each image still equals the one its request gets alone.

The built-in tiny model in float32 on the CPU; a batch and single calls run different matmul
shapes, so images are compared within 1e-4 (they differ by ~1e-6), and each comparison first
checks that the rows really differ from each other by far more than that.
"""
import numpy as np
import pytest
import torch

from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.tiny import tiny_components

SIZE, STEPS = 64, 3
ATOL = 1e-4
PROMPTS = ["a red circle", "a blue square on green"]
SCALES = [3.0, 7.5]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


def _alone(pipe, sampler, i, **kw):
    return pipe(PROMPTS[i], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=SCALES[i], sampler=sampler, seed=SEEDS[i], output_type="np",
                **kw)[0]


def _batched(pipe, sampler, **kw):
    return pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=SCALES, sampler=sampler, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in SEEDS], **kw)


def _assert_rows_equal_alone(batch, alone):
    apart = np.abs(alone[0] - alone[1]).max()
    assert apart > 100 * ATOL, f"the two rows differ by only {apart:.2e}: the test proves nothing"
    for i, image in enumerate(alone):
        diff = np.abs(batch[i] - image).max()
        assert diff <= ATOL, f"row {i}: max abs difference {diff:.3e} from its call alone"


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_each_row_equals_its_call_alone(pipe, sampler):
    # euler_a draws fresh noise at every step: from each row's own generator.
    pipe.runtime = None
    alone = [_alone(pipe, sampler, i) for i in range(2)]
    _assert_rows_equal_alone(_batched(pipe, sampler), alone)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_each_row_equals_its_call_alone_under_a_static_plan(pipe, sampler):
    pipe.runtime = None
    alone = [_alone(pipe, sampler, i) for i in range(2)]
    pipe.compile(height=SIZE, width=SIZE, batch_size=2, num_inference_steps=STEPS,
                 sampler=sampler)
    try:
        _assert_rows_equal_alone(_batched(pipe, sampler), alone)
    finally:
        pipe.runtime = None


def test_img2img_rows_draw_from_their_own_generators(pipe):
    pipe.runtime = None
    rng = np.random.default_rng(0)
    images = [rng.uniform(0.1, 0.9, (SIZE, SIZE, 3)).astype(np.float32) for _ in range(2)]
    alone = [_alone(pipe, "ddim", i, image=images[i], strength=0.6) for i in range(2)]
    _assert_rows_equal_alone(_batched(pipe, "ddim", image=images, strength=0.6), alone)


def test_one_generator_in_a_list_equals_the_seed(pipe):
    pipe.runtime = None
    by_seed = _alone(pipe, "euler_a", 0)
    by_list = pipe(PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=SCALES[0], sampler="euler_a", output_type="np",
                   generator=[torch.Generator().manual_seed(SEEDS[0])])[0]
    assert np.array_equal(by_seed, by_list)


def test_scale_of_one_in_a_guided_batch_is_the_conditional_prediction(pipe):
    pipe.runtime = None
    alone = pipe(PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 guidance_scale=1.0, sampler="ddim", seed=SEEDS[0], output_type="np")[0]
    batch = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 guidance_scale=[1.0, 7.5], sampler="ddim", output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    diff = np.abs(batch[0] - alone).max()
    assert diff <= ATOL, f"max abs difference {diff:.3e}"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(guidance_scale=[7.5]), "guidance_scale must be a number or a list of 2"),
    (dict(guidance_scale=[7.5, float("nan")]), "guidance_scale must be a list of numbers"),
    (dict(guidance_scale=[7.5, "7"]), "at index 1"),
    (dict(generator=[torch.Generator()]), "a list of 2 (one per image)"),
    (dict(generator=[torch.Generator(), "seed"]), "generator must be a CPU torch.Generator"),
])
def test_bad_rows_are_refused(pipe, kwargs, fragment):
    pipe.runtime = None
    args = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    with pytest.raises(SdrtError, match=None) as e:
        pipe(PROMPTS, **{**args, **kwargs})
    assert fragment in str(e.value), str(e.value)
