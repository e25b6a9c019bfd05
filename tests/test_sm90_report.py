"""benchmarks/sm90_report.py as the judge of the kernels' sm_90 code, without a GPU.

One run of the report for SD 1.5 (UNet batch 2, VAE decoder, text encoder at 512², both conv
paths), compiled for sm_90 by the real Triton compiler in a child process (conftest sets
TRITON_INTERPRET in this one, and under the interpreter nothing compiles), into a fresh
Triton cache as CI has. Then, for every kernel specialisation the engine launches:

- no stack frame (a stack means spilled registers: local-memory traffic in the hot loop);
- at most ``MAX_SCALAR_LOADS`` scalar 2-byte global loads: more means Triton could not
  prove the addresses aligned and loads fp16 one element at a time, without cp.async.

The conv kernels (kernels/group_norm_silu_conv2d.py) are held to the same bar.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from sdrt.benchmarks.sm90_report import MAX_SCALAR_LOADS  # noqa: E402

OP_FAMILIES = {
    "attention": ("attention",),
    "conv": ("group_norm_silu_conv2d", "group_norm_then_conv2d"),
    "norm": ("group_norm", "layer_norm"),
    "geglu": ("geglu",),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache for the run (the report's default): what CI and a new install see.
    r = subprocess.run([sys.executable, "-m", "sdrt.benchmarks.sm90_report", "--models", "sd15",
                        "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((out / "sm90_report.json").read_text())


def test_every_network_runs_on_both_conv_paths(report):
    assert report["errors"] == [], report["errors"]
    assert report["conv_paths"] == ["fused", "unfused"]
    uses = " ".join(r["used in"] for r in report["kernels"])
    for network in ("sd15 unet fused", "sd15 unet unfused", "sd15 vae_decoder fused",
                    "sd15 vae_decoder unfused", "sd15 text_encoder"):
        assert network in uses, f"no kernel launched by {network}"


def test_sd15_head_dims_are_covered(report):
    # The judge would prove nothing if the walk missed the shapes it is about.
    specs = " ".join(r["spec"] for r in report["kernels"] if r["op"] == "attention")
    for d in (40, 80, 160):
        assert f"HEAD_D={d}," in specs, f"no attention kernel for head dim {d}"
    ops = {r["op"] for r in report["kernels"]}
    assert {"group_norm", "layer_norm", "geglu", "group_norm_silu_conv2d"} <= ops, ops


def test_no_stack_frames(report):
    bad = [f"{r['kernel']} [{r['spec']}]: {r['stack']} B stack, {r['regs']} registers"
           for r in report["kernels"] if r["stack"] > 0]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", list(OP_FAMILIES))
def test_few_scalar_2_byte_loads(report, family):
    rows = [r for r in report["kernels"] if r["op"] in OP_FAMILIES[family]]
    assert rows, f"no {family} kernel in the report"
    bad = [f"{r['kernel']} [{r['spec']}] e.g. {r['example']}: {r['ld2']} scalar 2-byte loads"
           for r in rows if r["ld2"] > MAX_SCALAR_LOADS]
    assert not bad, "\n".join(bad)


def test_first_compile_is_reported(report):
    (sd15,) = report["summary"]
    assert sd15["kernels"] == len(report["kernels"]) and sd15["first_compile_s"] > 0
    assert report["cold_cache"]


def test_sass_opcode_counting():
    # The instruction counts behind ld2 / ld16 / cp.async, on a hand-written SASS excerpt
    # (predicated and plain; a 16-bit load must not count as a 128-bit one or vice versa).
    from sdrt.benchmarks.sm90_report import _sass_ops
    sass = """
        /*0100*/                   LDG.E.U16 R3, desc[UR8][R8.64] ;
        /*0110*/              @!P0 LDG.E.U16 R4, desc[UR8][R8.64+0x2] ;
        /*0120*/               @P1 LDG.E.128 R12, desc[UR8][R2.64] ;
        /*0130*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR8][R6.64] ;
        /*0140*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*0150*/                   STL.64 [R1], R2 ;
    """
    ops = _sass_ops(sass)
    assert ops["LDG.E.U16"] == 2 and ops["LDG.E.128"] == 1
    assert ops["LDGSTS.E.BYPASS.LTC128B.128"] == 1 and ops["HGMMA.64x64x16.F32"] == 1
    assert ops["STL.64"] == 1
