"""ComfyUI's ConditioningZeroOut on the negative prompt (the pipeline's ``zero_out_negative``):
the negative half's conditioning zeros, equal to zero ``negative_prompt_embeds`` (whose match
with diffusers ``tests/test_prompt_embeds.py`` checks), in the eager loop, a static plan and
with A1111's AND; the workflow node (directly, or beyond a ControlNet) in ``comfy.read``,
``--workflow`` and ``--zero-out-negative``, and on the ComfyUI API."""
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline, SdrtError, comfy
from sdrt.engine.tiny import tiny_components
from test_comfy import DEFAULT, SMALL_OPTIONS, _small, draw, with_controlnets
from test_cli import tiny_dir  # noqa: F401  (the fixture)

KW = dict(height=64, width=64, num_inference_steps=3, sampler="euler_a", seed=2,
          output_type="np", guidance_scale=6.0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


def _zeros(pipe, tokens=77):
    return torch.zeros(1, tokens, pipe.unet.config.cross_attention_dim)


def test_the_negative_is_zeros(pipe):
    got = pipe("a fox", negative_prompt="ugly", zero_out_negative=True, **KW)
    want = pipe("a fox", negative_prompt_embeds=_zeros(pipe), **KW)
    assert np.abs(got - want).max() <= 1e-6
    assert np.array_equal(got, pipe("a fox", zero_out_negative=True, **KW))  # (text unread)
    assert np.abs(got - pipe("a fox", negative_prompt="ugly", **KW)).max() > 1e-3
    # with A1111's AND: the negative rows zeros, each part's its own
    parts = pipe("a fox AND a bird", negative_prompt="ugly", zero_out_negative=True, **KW)
    assert np.abs(parts - pipe("a fox AND a bird", negative_prompt="ugly", **KW)).max() > 1e-3
    with pytest.raises(SdrtError, match="zero_out_negative zeros the negative half; it cannot "
                                        "be combined with negative_prompt_embeds"):
        pipe("a fox", negative_prompt_embeds=_zeros(pipe), zero_out_negative=True, **KW)
    with pytest.raises(SdrtError, match="zero_out_negative must be True or False, got 1"):
        pipe("a fox", zero_out_negative=1, **KW)


def test_a_static_plan_takes_it_as_an_input():
    pipe = Pipeline(tiny_components(), torch.device("cpu"), torch.float32)
    eager = pipe("a fox", negative_prompt="ugly", zero_out_negative=True, **KW)
    pipe.compile(height=64, width=64, num_inference_steps=3, sampler="euler_a", strict=True)
    assert np.abs(pipe("a fox", negative_prompt="ugly", zero_out_negative=True, **KW)
                  - eager).max() <= 1e-6
    plain = pipe("a fox", negative_prompt="ugly", **KW)  # (the same plan, the negative again)
    assert np.abs(plain - eager).max() > 1e-3


def _zeroed(graph, above=None):
    """``graph`` with a ConditioningZeroOut on the KSampler's negative input (or on the input
    ``above`` = (node, input) names)."""
    g = copy.deepcopy(graph)
    node, key = above or ("3", "negative")
    g["20"] = {"class_type": "ConditioningZeroOut",
               "inputs": {"conditioning": g[node]["inputs"][key]}}
    g[node]["inputs"][key] = ["20", 0]
    return g


def test_workflow_node():
    assert comfy.read(_zeroed(DEFAULT)).zero_out_negative
    assert not comfy.read(DEFAULT).zero_out_negative
    # beyond a ControlNet, on either side of it: the ControlNet still applies
    for above in (("3", "negative"), ("32", "negative")):
        flow = comfy.read(_zeroed(with_controlnets(), above))
        assert flow.zero_out_negative and len(flow.controlnets) == 1
        assert flow.negative == "text, watermark"
    with pytest.raises(SdrtError, match="workflow node 20 \\(ConditioningZeroOut\\) is not "
                                        "supported as KSampler's positive"):
        comfy.read(_zeroed(DEFAULT, ("3", "positive")))
    twice = _zeroed(DEFAULT)
    twice["21"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["20", 0]}}
    twice["3"]["inputs"]["negative"] = ["21", 0]
    with pytest.raises(SdrtError, match="ConditioningZeroOut\\) is not supported"):
        comfy.read(twice)


def test_cli_workflow_equals_the_option(tiny_dir, tmp_path, capsys):
    (tmp_path / "wf.json").write_text(json.dumps(_zeroed(_small(DEFAULT))))
    outs = draw({"workflow": ["--workflow", str(tmp_path / "wf.json")],
                 "option": [*SMALL_OPTIONS, "--zero-out-negative"], "plain": SMALL_OPTIONS},
                ["--model", tiny_dir], tmp_path, capsys)
    assert np.array_equal(outs["workflow"], outs["option"])
    assert np.abs(outs["option"].astype(int) - outs["plain"]).max() > 2


def test_comfy_api(tmp_path):
    pytest.importorskip("fastapi")
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.serve.local import LocalServer
    from test_serve import assert_same_image, config
    from test_serve_comfy import _history, _queue, _view, _workflow
    with LocalServer(config()) as url:
        graph = _zeroed(_workflow(url, DEFAULT, seed=16))
        entry = _history(url, _queue(url, graph)["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
    ref = demo_pipeline(torch.device("cpu"), torch.float32)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
              sampler="euler_a_normal", seed=16, prompt_syntax="comfy")
    want = ref("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
               zero_out_negative=True, **kw)[0]
    assert_same_image(png, want, "ConditioningZeroOut")
    plain = ref("beautiful scenery nature glass bottle", negative_prompt="text, watermark",
                **kw)[0]
    assert np.abs(np.asarray(want, dtype=int) - np.asarray(plain, dtype=int)).max() > 2
