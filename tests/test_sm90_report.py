"""benchmarks/sm90_report.py as the judge of the kernels' sm_90 code, without a GPU.

One run of the report for SD 1.5 (UNet batch 2, VAE decoder, text encoder at 512²) and SDXL
(UNet batch 2 at 128² latents with the pooled embedding and time ids, the 1024² VAE decoder
in float32 as the pipeline decodes it and in float16, both text encoders), both conv paths,
compiled for sm_90 by the real Triton compiler in a child process (conftest sets
TRITON_INTERPRET in this one, and under the interpreter nothing compiles), into a fresh
Triton cache as CI has. Then, for every kernel specialisation the engine launches for each
model:

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

MODELS = ("sd15", "sdxl")
OP_FAMILIES = {
    "attention": ("attention",),
    "conv": ("group_norm_silu_conv2d", "group_norm_then_conv2d"),
    "norm": ("group_norm", "layer_norm"),
    "geglu": ("geglu",),
}
# The walks each model's report must contain (network, and conv path where it has convs).
WALKS = {
    "sd15": ("unet fused", "unet unfused", "vae_decoder fused", "vae_decoder unfused",
             "text_encoder"),
    # SDXL's VAE decodes in float32 (force_upcast); a fixed fp16 VAE, or --vae-dtype bf16,
    # runs the fused conv.
    "sdxl": ("unet fused", "unet unfused", "vae_decoder fp32 unfused", "vae_decoder fp16 fused",
             "vae_decoder fp16 unfused", "vae_decoder bf16 fused", "vae_decoder bf16 unfused",
             "text_encoder", "text_encoder_2"),
}
# Attention head dims of each model's UNet: SD 1.5 has 40/80/160 by level, SDXL 64 throughout
# (5, 10, 20 heads over 320, 640, 1280 channels).
HEAD_DIMS = {"sd15": (40, 80, 160), "sdxl": (64,)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache for the run (the report's default): what CI and a new install see.
    r = subprocess.run([sys.executable, "-m", "sdrt.benchmarks.sm90_report", "--models",
                        ",".join(MODELS), "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((out / "sm90_report.json").read_text())


def _uses(row):
    return [u.strip() for u in row["used in"].split(",")]


def _kernels(report, model):
    """The report's rows for the kernels ``model`` launches."""
    return [r for r in report["kernels"] if any(u.startswith(model + " ") for u in _uses(r))]


def test_report_says_it_is_a_compile_report(report):
    assert report["kind"].startswith("compile report") and "no kernel ran" in report["kind"]
    assert report["cold_cache"] and report["conv_paths"] == ["fused", "unfused"]


@pytest.mark.parametrize("model", MODELS)
def test_every_network_runs_on_both_conv_paths(report, model):
    assert [e for e in report["errors"] if e["model"] == model] == []
    uses = {u for r in report["kernels"] for u in _uses(r)}
    for walk in WALKS[model]:
        assert f"{model} {walk}" in uses, f"no kernel launched by {model} {walk}"


@pytest.mark.parametrize("model", MODELS)
def test_head_dims_are_covered(report, model):
    # The judge would prove nothing if the walk missed the shapes it is about.
    rows = _kernels(report, model)
    specs = " ".join(r["spec"] for r in rows if r["op"] == "attention")
    for d in HEAD_DIMS[model]:
        assert f"HEAD_D={d}," in specs, f"no {model} attention kernel for head dim {d}"
    ops = {r["op"] for r in rows}
    assert {"group_norm", "layer_norm", "geglu", "group_norm_silu_conv2d"} <= ops, ops


def test_sdxl_walk_has_sdxl_shapes(report):
    # 128² latents at batch 2 (CFG), 10 heads of 64 at 64², the 1024² VAE.
    rows = _kernels(report, "sdxl")
    examples = " ".join(r["by model"]["sdxl"]["example"] for r in rows)
    for shape in ("2×320×128×128@", "2×10×4096×64@", "1×128×1024×1024@"):
        assert shape in examples, f"no SDXL launch on {shape}"
    # The transformer stacks, 1/2/10 layers by level: 2·2 + 2·10 down, 10 mid, 3·10 + 3·2 up =
    # 70 blocks, each one self- and one cross-attention, per UNet walk (two conv paths).
    for one_key_block in (True, False):
        n = sum(r["by model"]["sdxl"]["launches"] for r in rows if r["op"] == "attention"
                and f"ONE_KEY_BLOCK={one_key_block}" in r["spec"])
        assert n == 2 * 70, f"{n} SDXL attention launches with ONE_KEY_BLOCK={one_key_block}"


@pytest.mark.parametrize("model", MODELS)
def test_no_stack_frames(report, model):
    bad = [f"{r['kernel']} [{r['spec']}]: {r['stack']} B stack, {r['regs']} registers"
           for r in _kernels(report, model) if r["stack"] > 0]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("family", list(OP_FAMILIES))
def test_few_scalar_2_byte_loads(report, model, family):
    rows = [r for r in _kernels(report, model) if r["op"] in OP_FAMILIES[family]]
    assert rows, f"no {family} kernel in the {model} report"
    bad = [f"{r['kernel']} [{r['spec']}] e.g. {r['example']}: {r['ld2']} scalar 2-byte loads"
           for r in rows if r["ld2"] > MAX_SCALAR_LOADS]
    assert not bad, "\n".join(bad)


def test_first_compile_is_reported(report):
    summary = {s["model"]: s for s in report["summary"]}
    assert list(summary) == list(MODELS)
    for model, s in summary.items():
        assert s["kernels"] == len(_kernels(report, model)) and s["first_compile_s"] > 0, s
    assert summary["sd15"]["unet batch"] == summary["sdxl"]["unet batch"] == 2


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
