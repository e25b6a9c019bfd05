"""SDXL on CUDA: static plans replayed as CUDA graphs, the base → refiner hand-off in fp16,
and the fp16 VAE that ``force_upcast`` decodes in float32. On folders sdrt writes (the GPU
machine has no diffusers); the CPU tests compare the same code paths with diffusers."""
import numpy as np
import pytest
import torch

from conftest import run_eagerly
from sdrt.engine import Pipeline

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from sdrt.engine.tiny import tiny_config, write_model
    out = {}
    for family in ("sdxl", "sdxl-refiner"):
        out[family] = str(tmp_path_factory.mktemp(family) / "model")
        write_model(out[family], tiny_config(family))
    return out


def test_sdxl_graph_replays_equal_eager_and_do_not_grow_memory(folders):
    pipe = Pipeline.from_pretrained(folders["sdxl"], device="cuda", dtype=torch.float16)
    pipe.compile(height=64, width=64, batch_size=1, num_inference_steps=4, sampler="euler_a")
    assert pipe.runtime.plans and next(iter(pipe.runtime.plans.values())).graphs
    for i in range(20):
        kw = dict(prompt=f"a fox number {i}", prompt_2=f"style {i % 3}", height=64, width=64,
                  seed=i, num_inference_steps=4, sampler="euler_a", output_type="np",
                  original_size=(64 + 8 * i, 64), negative_prompt=None if i % 2 else "blurry")
        static = pipe(**kw)
        if i % 5 == 0:
            assert np.abs(static - run_eagerly(pipe, **kw)).max() <= 2e-3, f"replay {i}"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(200):
        pipe(f"prompt {i}", height=64, width=64, seed=i, num_inference_steps=4,
             sampler="euler_a", output_type="np")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before, "memory grew over 200 replays"


def test_base_to_refiner_in_fp16_with_the_vae_upcast(folders):
    base = Pipeline.from_pretrained(folders["sdxl"], device="cuda", dtype=torch.float16)
    refiner = Pipeline.from_pretrained(folders["sdxl-refiner"], device="cuda",
                                       dtype=torch.float16)
    assert base.vae.config.force_upcast and base.vae_run_dtype() == torch.float32
    latents = base("a fox", height=64, width=64, num_inference_steps=5, seed=1,
                   denoising_end=0.8, output_type="latent")
    image = refiner("a fox", image=latents, num_inference_steps=5, denoising_start=0.8,
                    seed=1, output_type="np")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01
    # The upcast decode is the float32 VAE's: the same image as a float32 decode.
    decoded = base.decode_latents(latents)
    reference = base._vae_in(torch.float32).decode(latents.float() / base.vae.config.scaling_factor)
    reference = (reference.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    assert np.abs(decoded - reference).max() <= 1e-5
