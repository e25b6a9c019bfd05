"""The pipeline benchmark's report on made-up rows: tables, ablation and chart are written
without a GPU (the numbers here are placeholders, never results)."""
import json

from PIL import Image

from sdrt.benchmarks.bench_pipeline import ablation, report

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
