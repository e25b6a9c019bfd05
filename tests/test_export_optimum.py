"""Optimum loads sdrt's ONNX export unmodified and draws the image sdrt draws.

``optimum-onnx`` needs transformers < 4.58, which the rest of the suite does not run with: CI
runs this file alone in its own environment (``.venv-optimum``, made by ``.ci/run``); in the
main environment it skips.

Both tiny families, in the two export modes: sd1 static (PNDM, epsilon), sd2 dynamic with
every weight in external data (DDIM, v-prediction, linear projections). Optimum's
``ORTStableDiffusionPipeline`` (diffusers' pipeline code, the ONNX files in onnxruntime) and
sdrt's own pipeline (torch) start from the same latents.
"""
import pytest
import torch

pytest.importorskip("optimum.onnxruntime")

from conftest import assert_close_abs  # noqa: E402
from sdrt.engine import Pipeline  # noqa: E402
from sdrt.export import export_onnx  # noqa: E402

# Images in [0, 1] after 4 steps: the ONNX networks are within 1e-5 of sdrt's, and the two
# pipelines' schedulers do the same arithmetic in different orders.
IMAGE_ATOL = 2e-3
MODES = {"sd1": dict(height=16, width=24, dynamic=False),
         "sd2": dict(height=16, width=16, dynamic=True, external_data_bytes=0)}


@pytest.fixture(scope="module")
def optimum_export(tiny_model, tmp_path_factory):
    family, folder, _ = tiny_model
    out = str(tmp_path_factory.mktemp(f"optimum-{family}") / "export")
    export_onnx(folder, out, **MODES[family])
    return family, folder, out


def test_optimum_generates_sdrts_image(optimum_export):
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    family, folder, out = optimum_export
    theirs = ORTStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider")
    ours = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32")
    # A dynamic export also runs at a size it was not traced at.
    h, w = (MODES[family]["height"], MODES[family]["width"]) if family == "sd1" else (24, 16)
    latents = torch.randn(1, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(3))
    kw = dict(negative_prompt="blurry", height=h, width=w, num_inference_steps=4,
              guidance_scale=7.5, output_type="np")
    expected = ours("a red fox", latents=latents, **kw)
    assert expected.std() > 0.01, f"{family}: the reference image is flat"
    got = theirs("a red fox", latents=latents.clone(), **kw).images
    assert_close_abs(got, expected, IMAGE_ATOL,
                     f"{family}: Optimum's pipeline on sdrt's export vs sdrt")


def test_optimum_reads_the_export_as_its_own(optimum_export):
    # Input and output names as Optimum exports them: its pipeline calls each session by them.
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    family, _, out = optimum_export
    pipe = ORTStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider")
    names = {part: ([i.name for i in m.session.get_inputs()],
                    [o.name for o in m.session.get_outputs()])
             for part, m in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet),
                             ("vae_decoder", pipe.vae_decoder),
                             ("vae_encoder", pipe.vae_encoder))}
    assert names == {
        "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
        "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        "vae_decoder": (["latent_sample"], ["sample"]),
        "vae_encoder": (["sample"], ["latent_parameters"]),
    }, family
    assert pipe.unet.session.get_inputs()[1].shape == [], "timestep: a scalar, as Optimum's"
