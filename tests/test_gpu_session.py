"""benchmarks/gpu_session.py, the one command a lent GPU runs, checked on the CPU.

``--dry-run`` runs every stage's code path on the CPU (tiny shapes, numbers labelled "dry run,
not a measurement"), so the script cannot rot between GPU sessions: the files it leaves must be
few enough to come back from the device (≤ 8), parseable, and name every stage with a status.
The helpers that read the benchmarks' reports are checked on made-up reports (their numbers
are placeholders, never results).
"""
import io
import json
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sdrt.benchmarks import gpu_session

ROOT = Path(__file__).resolve().parent.parent
STATUSES = {"ok", "failed", "timeout", "skipped"}


def _tar(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _session(out, *args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "sdrt.benchmarks.gpu_session", "--out", str(out),
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((out / "session.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every stage, with a carried Triton cache to unpack and pack again. The
    budget is generous: on a CPU shared with other work, a stage cut short proves nothing."""
    tmp = tmp_path_factory.mktemp("gpu-session")
    carried = tmp / "carried.tar.gz"
    _tar(carried, {"KEY/_k.json": b"{}", "KEY/_k.cubin": b"\x7fELF", "KEY/_k.ptx": b"//"})
    out = tmp / "out"
    session = _session(out, "--dry-run", "--budget", "800", "--triton-cache", str(tmp / "cache"),
                       "--carried-cache", str(carried), "--work", str(tmp / "work"))
    return out, session, tmp / "cache"


def test_dry_run_files_come_back_and_parse(dry_run):
    out, session, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, f"more files than the device hands back: {files}"
    assert sorted(session["files"]) == files
    assert set(files) <= set(gpu_session.FILES.values()), files
    md = (out / "session.md").read_text()
    assert "dry run, not a measurement" in md
    assert session["dry_run"] is True and session["label"] == "dry run, not a measurement"
    ET.parse(out / "pytest-gpu.xml")


def test_dry_run_names_every_stage_with_a_status(dry_run):
    _, session, _ = dry_run
    assert list(session["stages"]) == [s.name for s in gpu_session.STAGES]
    for name, st in session["stages"].items():
        assert st["status"] in STATUSES, f"{name}: {st}"
    # The core stages (a)-(d) and the SDXL extras run on the CPU; the other extras (whose CPU
    # form would repeat ``pipeline``'s) are for a GPU.
    ran = {n: st for n, st in session["stages"].items() if gpu_session.BY_NAME[n].dry}
    assert {"env", "tests", "kernels", "conv", "pipeline", "kernels-sdxl", "conv-sdxl",
            "pipeline-sdxl", "pipeline-sdxl-turbo", "pipeline-inpaint",
            "pipeline-controlnet"} <= set(ran)
    failed = {n: (st["status"], st.get("tail")) for n, st in ran.items() if st["status"] != "ok"}
    assert not failed, failed
    assert all(st["label"] == "dry run, not a measurement" for st in ran.values())
    extras = [st["status"] for n, st in session["stages"].items() if n not in ran]
    assert extras == ["skipped"] * len(extras) and extras


def test_dry_run_stage_results(dry_run):
    _, session, _ = dry_run
    stages = session["stages"]
    env = stages["env"]["results"]
    assert env["device"]["gpu"] == "CPU (dry run, not a measurement)"
    assert {"torch", "triton", "numpy", "cuda", "driver"} <= env["device"].keys()
    assert env["ceilings"]["label"] == "dry run, not a measurement"
    assert env["ceilings"]["copy_gbs"] > 0 and env["ceilings"]["matmul_bf16_tflops"] > 0
    assert env["cold_compile"]["first_call_s"] > 0
    # The GPU tests were collected (and, on a CPU, skipped): none may be missing or failing.
    tests = stages["tests"]["results"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0, tests
    assert tests["skipped"] == tests["tests"], tests
    (report,) = stages["pipeline"]["results"]["reports"]
    rows = report["sections"]["Side by side (fp16, batch 1, same latents)"]
    assert [(r["model"], r["system"]) for r in rows] == [("tiny", "sdrt-torch")]
    assert "error" not in rows[0] and rows[0]["2 steps ms"] > 0
    assert any("dry run, not a measurement" in n for n in report["notes"])
    assert any("cold Triton compile" in k for k in session["first_compile"])
    # The SDXL pipeline stages add their tiny stand-ins' rows to the same report.
    (report,) = stages["pipeline-sdxl-turbo"]["results"]["reports"]
    rows = report["sections"]["Side by side (fp16, batch 1, same latents)"]
    assert [(r["model"], r["system"]) for r in rows] == [
        ("tiny", "sdrt-torch"), ("tiny-sdxl", "sdrt-torch"), ("tiny-sdxl-turbo", "sdrt-torch")]
    assert all("error" not in r and r["1 steps ms"] > 0 for r in rows), rows
    # And the inpainting stage its tiny stand-in's (SD 1.x, a mask, strength 1).
    (report,) = stages["pipeline-inpaint"]["results"]["reports"]
    rows = report["sections"]["Side by side (fp16, batch 1, same latents)"]
    assert [(r["model"], r["system"]) for r in rows][-1] == ("tiny-inpaint", "sdrt-torch")
    assert "error" not in rows[-1] and rows[-1]["1 steps ms"] > 0, rows
    # And the ControlNet stage its tiny stand-in's (SD 1.x with one ControlNet).
    (report,) = stages["pipeline-controlnet"]["results"]["reports"]
    rows = report["sections"]["Side by side (fp16, batch 1, same latents)"]
    assert [(r["model"], r["system"]) for r in rows][-1] == ("tiny-controlnet", "sdrt-torch")
    assert "error" not in rows[-1] and rows[-1]["1 steps ms"] > 0, rows
    # The upscale stage's report: every model at both dry-run sizes, whole and tiled.
    (report,) = stages["upscale"]["results"]["reports"]
    rows = report["sections"]["Upscale models"]
    assert {(r["model"], r["path"].split(",")[0].split(" ")[0]) for r in rows} == {
        (m, p) for m in ("esrgan-x4", "real-esrgan-x2", "compact-x4", "span-x4")
        for p in ("whole", "tiles")}
    assert all(r["ms"] > 0 and r["conv_tflops"] >= 0 for r in rows), rows
    # bench_kernels' and bench_conv's command lines took SDXL.
    for name in ("kernels-sdxl", "conv-sdxl"):
        assert "--models sdxl" in stages[name]["command"], stages[name]
    assert "--ops attention --sweep" in stages["kernels-sweep"]["command"]


def test_carried_triton_cache_is_unpacked_and_packed_again(dry_run):
    out, session, cache = dry_run
    assert (cache / "KEY" / "_k.cubin").read_bytes() == b"\x7fELF"
    with tarfile.open(out / "triton-cache.tar.gz") as tar:
        names = set(tar.getnames())
    # What a cache hit reads comes back; the IR dumps do not.
    assert {"KEY/_k.json", "KEY/_k.cubin"} <= names and "KEY/_k.ptx" not in names
    assert "3 files at start" in session["triton_cache"]


def test_a_stage_that_does_not_fit_the_budget_is_skipped(tmp_path):
    session = _session(tmp_path / "out", "--dry-run", "--stage", "env", "--budget", "2",
                       "--carried-cache", str(tmp_path / "none.tar.gz"),
                       "--triton-cache", str(tmp_path / "cache"), timeout=120)
    assert session["stages"]["env"]["status"] == "skipped"
    assert "budget" in session["stages"]["env"]["note"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["session.json", "session.log",
                                                                    "session.md"]


def test_the_sdxl_group_names_its_stages_in_order(tmp_path):
    session = _session(tmp_path / "out", "--dry-run", "--stage", "sdxl", "--budget", "2",
                       "--carried-cache", str(tmp_path / "none.tar.gz"),
                       "--triton-cache", str(tmp_path / "cache"), timeout=120)
    assert list(session["stages"]) == list(gpu_session.GROUPS["sdxl"])
    assert all(st["status"] == "skipped" for st in session["stages"].values())


def _stages(*names):
    return [gpu_session.BY_NAME[n] for n in names]


def test_named_extras_keep_their_floors_and_others_take_what_is_left():
    todo = _stages("pipeline", "kernels-sdxl", "pipeline-sdxl")
    floor = {s.name: s.floor_s for s in todo}
    # Not named: the core stage keeps nothing for the extras, each extra takes what is left.
    assert gpu_session.stage_timeout(todo, 0, 1000, set(), False) == todo[0].limit_s
    assert gpu_session.stage_timeout(todo, 1, 100, set(), False) == 100
    # Named: kernels-sdxl leaves pipeline-sdxl its floor.
    named = {"kernels-sdxl", "pipeline-sdxl"}
    assert gpu_session.stage_timeout(todo, 1, 300, named, False) == 300 - floor["pipeline-sdxl"]
    assert gpu_session.stage_timeout(todo, 0, 400, named, False) == \
        min(todo[0].limit_s, 400 - floor["kernels-sdxl"] - floor["pipeline-sdxl"])
    assert gpu_session.stage_timeout(todo, 2, 1000, named, False) == todo[2].limit_s


def test_unknown_stage_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdrt.benchmarks.gpu_session", "--out",
                        str(tmp_path), "--stage", "env,nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown stage: nope" in r.stderr


def test_conv_sweep_best_from_a_made_up_report():
    report = {"device": {"gpu": "Test GPU", "driver": "0", "cuda": "0", "torch": "0",
                         "triton": "0", "date": "2026-01-01"},
              "sections": {
                  "unet (fp16)": [
                      {"shape": "2×320×64×64 → 320", "n": 2, "cin": 320, "h": 64, "w": 64,
                       "cout": 320, "k": 3, "stride": 1, "padding": 1, "groups": 32,
                       "eps": 1e-5, "add": "channel", "fused_ms": 1.5, "sweep_best_ms": 1.25,
                       "sweep_best_config": "128/64/32 w4 s3"},
                      {"shape": "no sweep", "cin": 4, "fused_ms": 0.1}],
                  "unet: block-config sweep": [{"shape": "2×320×64×64 → 320",
                                                "sweep_best_config": "64/64/32 w4 s3"}]}}
    best = gpu_session.conv_sweep_best([report])
    assert best["measured_on"]["gpu"] == "Test GPU"
    (row,) = best["shapes"]
    assert row["network"] == "unet" and row["shape"]["cin"] == 320 and row["table_ms"] == 1.5
    assert row["best"] == {"block_m": 128, "block_n": 64, "block_k": 32, "num_warps": 4,
                           "num_stages": 3}


def test_junit_summary_counts_and_names_problems(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/>'
        '</testcase>'
        '<testcase classname="tests.test_b" name="test_s1"><skipped message="needs diffusers"/>'
        '</testcase>'
        '<testcase classname="tests.test_b" name="test_s2"><skipped message="needs diffusers"/>'
        '</testcase></testsuite></testsuites>')
    s = gpu_session._junit_summary(path)
    assert (s["tests"], s["passed"], s["failures"], s["skipped"]) == (4, 1, 1, 2)
    assert s["problems"] == [{"test": "tests.test_a::test_bad", "failure": "assert 1 == 2"}]
    assert s["skip_reasons"] == {"needs diffusers": 2}
