"""The GPU tests collect and have their model folder where diffusers is not installed, as on the
lent GPU machine.

A child process makes ``import diffusers`` fail (a meta-path finder that refuses it, first in
``sys.meta_path``), checks that it does, then runs ``pytest --collect-only -m gpu`` over the
whole suite: every file must import, and the GPU tests must be there to run.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.engine import Pipeline
from tiny_models import unet_kwargs

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import importlib.abc, sys

class NoDiffusers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError(f"{name} is blocked: this run stands for a machine without diffusers")
        return None

sys.meta_path.insert(0, NoDiffusers())
try:
    import diffusers  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("the blocker let diffusers through")
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"]))
"""

# GPU tests that once needed a diffusers-built fixture: they must be collected, not skipped.
MUST_COLLECT = ["tests/test_engine_triton.py::test_images_on_triton_kernels_equal_torch_ops",
                "tests/test_engine_triton.py::test_full_size_unet_and_vae_on_triton_kernels[sd15]",
                "tests/test_runtime.py::test_graph_replays_with_changing_prompts_equal_eager_and_do_not_grow_memory"]


def test_gpu_tests_collect_without_diffusers():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"collection failed (exit {r.returncode}):\n{out[-3000:]}"
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
    assert m, f"no count of collected tests in:\n{out[-2000:]}"
    assert int(m[1]) > 0, f"no GPU test collected:\n{out[-2000:]}"
    missing = [t for t in MUST_COLLECT if t not in out]
    assert not missing, f"not collected: {missing}\n{out[-2000:]}"


def test_gpu_fixture_folder_runs_and_matches_the_diffusers_tiny_model(tiny_sd1_folder):
    # The GPU tests' folder, written by sdrt's writer, must load, run, and have the diffusers
    # tiny model's architecture (the sizes those tests use were chosen for it).
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, device="cpu")
    image = pipe("a red fox", height=16, width=24, num_inference_steps=2, seed=0,
                 output_type="np")
    assert image.shape == (1, 16, 24, 3) and np.isfinite(image).all()
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**unet_kwargs("sd1"))
    ours = {n: tuple(p.shape) for n, p in pipe.unet.named_parameters()}
    assert ours == {n: tuple(p.shape) for n, p in ref.named_parameters()}
