"""The pipeline benchmark without a GPU: its report on made-up rows (tables, ablation and
chart; the numbers there are placeholders, never results), the ``sdrt bench`` command that runs
it, its dry run on the CPU, and the model folder it writes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.benchmarks.bench_pipeline import PARTS, PROMPT, ablation, read_parts, report, write_model
from sdrt.engine.cli import main

INFO = {"gpu": "Test GPU", "driver": "0", "cuda": "0", "torch": "0", "triton": "0",
        "date": "2026-01-01"}
CEILING = {"copy_gbs": 1.0, "matmul_fp16_tflops": 1.0, "matmul_bf16_tflops": 1.0}


def _row(system, t50, t20):
    return {"model": "sd15", "system": system, "side": 512,
            "latency_ms": {"50": t50, "20": t20}, "unet_it_s": 30 / ((t50 - t20) * 1e-3),
            "build_s": 1.0, "first_image_s": 2.0, "peak_memory_gib": 3.0}


def test_report_writes_tables_ablation_and_chart(tmp_path):
    rows = [_row("diffusers", 1000.0, 420.0), _row("diffusers-compile", 800.0, 340.0),
            _row("sdrt-torch", 600.0, 250.0), _row("sdrt-triton", 500.0, 210.0),
            {"model": "sd15", "system": "broken", "error": "CUDA out of memory"}]
    steps = {(r["from"], r["to"]): r["speed-up"] for r in ablation(rows)}
    assert steps == {("diffusers", "diffusers-compile"): 1000 / 800,
                     ("diffusers", "sdrt-torch"): 1000 / 600,
                     ("sdrt-torch", "sdrt-triton"): 600 / 500}
    json_path, md_path, png_path = report(rows, INFO, CEILING, results_dir=tmp_path)
    payload = json.loads(json_path.read_text())
    table = payload["sections"]["Side by side (fp16, batch 1, same latents)"]
    assert [r["system"] for r in table][:4] == ["diffusers", "diffusers-compile", "sdrt-torch",
                                                "sdrt-triton"]
    assert abs(table[3]["it/s vs diffusers"] - (1000 - 420) / (500 - 210)) < 1e-9
    assert "CUDA out of memory" in md_path.read_text()
    with Image.open(png_path) as im:
        assert im.size[0] == 900 and im.size[1] > 4 * 28


def test_read_parts_orders_rows_by_model_then_system(tmp_path):
    # Parts from two runs into one folder: the report covers both, in MODELS × SYSTEMS order.
    for model, system in [("sd21", "diffusers"), ("sd15", "sdrt-triton"), ("sd15", "diffusers")]:
        (tmp_path / f"{model}_{system}.json").write_text(
            json.dumps({"model": model, "system": system, "error": "placeholder"}))
    assert [(r["model"], r["system"]) for r in read_parts(tmp_path)] == [
        ("sd15", "diffusers"), ("sd15", "sdrt-triton"), ("sd21", "diffusers")]


# -- ``sdrt bench`` (engine.cli's cmd_bench hands its arguments to bench_pipeline.main) --------

def test_sdrt_bench_help_lists_bench_pipeline_options(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--models", "--systems", "--repeats", "--out-dir", "--dry-run"):
        assert option in out, f"{option} missing from 'sdrt bench --help'"


def test_sdrt_bench_refuses_an_unknown_system(capsys):
    assert main(["bench", "--systems", "sdrt-triton,nope"]) == 2
    assert "unknown model or system: nope" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the benchmark")
def test_sdrt_bench_without_a_gpu_measures_nothing_and_says_so(tmp_path):
    status = main(["bench", "--models", "sd15", "--out-dir", str(tmp_path)])
    assert status not in (0, None) and "needs a CUDA GPU" in str(status)
    assert not list(tmp_path.iterdir()), "files written without a measurement"


def test_sdrt_bench_dry_run_writes_the_report_and_each_systems_part(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--dry-run", "--out-dir", str(out), "--cache",
                 str(tmp_path / "cache")]) == 0
    (json_path,) = out.glob("bench_pipeline_*.json")
    payload = json.loads(json_path.read_text())
    assert payload["ceilings"]["label"] == "dry run, not a measurement"
    (row,) = payload["sections"]["Side by side (fp16, batch 1, same latents)"]
    assert (row["model"], row["system"]) == ("tiny", "sdrt-torch") and "error" not in row, row
    assert row["2 steps ms"] > 0 and row["build_s"] >= 0 and row["first_image_s"] > 0
    (parts,) = out.glob(f"{PARTS}_*")
    assert sorted(p.name for p in parts.iterdir()) == ["tiny_sdrt-torch.json",
                                                       "tiny_sdrt-torch.npy"]
    assert (tmp_path / "cache" / "tiny" / "model_index.json").is_file()
    assert "tiny sdrt-torch: done" in capsys.readouterr().out


def test_diffusers_loads_the_benchmark_model_folder_sdrt_writes(tmp_path):
    # bench_pipeline writes its models with sdrt's writer; diffusers must run the same folder.
    diffusers = pytest.importorskip("diffusers")
    from sdrt.engine import Pipeline
    folder = write_model(tmp_path, "tiny", device="cpu")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=7.5, latents=latents,
              output_type="np")
    ours = Pipeline.from_pretrained(str(folder), device="cpu")(PROMPT, **kw)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, **kw).images
    assert np.abs(ours - theirs).max() <= 1e-4


def test_sdrt_bench_dry_run_sdxl_against_diffusers_sdxl_pipeline(tmp_path):
    # `sdrt bench --models sdxl` on the CPU: the SDXL code path (StableDiffusionXLPipeline on
    # the diffusers side, both text encoders, the pooled embedding and time ids) on the tiny
    # SDXL stand-in, from the same folder and the same latents: the images must agree.
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    assert main(["bench", "--dry-run", "--models", "sdxl", "--systems", "diffusers,sdrt-torch",
                 "--out-dir", str(out), "--cache", str(tmp_path / "cache")]) == 0
    (json_path,) = out.glob("bench_pipeline_*.json")
    rows = json.loads(json_path.read_text())["sections"][
        "Side by side (fp16, batch 1, same latents)"]
    assert [(r["model"], r["system"]) for r in rows] == [("tiny-sdxl", "diffusers"),
                                                         ("tiny-sdxl", "sdrt-torch")], rows
    assert all("error" not in r for r in rows), rows
    assert rows[1]["max_abs_diff_vs_diffusers"] <= 1e-4, rows[1]
    index = json.loads((tmp_path / "cache" / "tiny-sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_dry_run_stands_in_a_tiny_model_of_the_same_family():
    from sdrt.benchmarks.bench_pipeline import DRY_RUN_STANDINS, MODELS, model_family
    for real, tiny in DRY_RUN_STANDINS.items():
        assert model_family(real) == model_family(tiny), (real, tiny)
        # Guidance on or off as the real model runs.
        assert (MODELS[real][3] > 1) == (MODELS[tiny][3] > 1), (real, tiny)
    assert MODELS["sdxl"][1:] == (1024, (50, 20), 5.0)
    assert MODELS["sdxl-turbo"][1:3] == (512, (4, 1)) and MODELS["sdxl-turbo"][3] <= 1
