"""kernels/attention.py: the Triton kernel (interpreted on CPU) against float64 attention.

bfloat16 runs only on a GPU: Triton's interpreter multiplies bfloat16 bit patterns as integers
in ``tl.dot`` (triton-lang/triton#11584; the maintainers answered that the interpreter does
not support bfloat16 yet).
"""
import importlib
import math
import os

import pytest
import torch
from hopper_compile import assert_compiles_for_hopper, compile_sm90

from sdrt.kernels.attention import _blocks, attention, attention_reference, pieces

# the module, not the function ``sdrt.kernels.attention`` that the package exports
attention_module = importlib.import_module("sdrt.kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# P is rounded to the input dtype before P·V (as in FlashAttention), on top of rounding the
# output once: a few units in the last place of outputs near |v| ≈ 2.3.
DTYPES = [
    (torch.float16, 5e-3, 5e-3),
    pytest.param(torch.bfloat16, 3e-2, 3e-2, marks=pytest.mark.skipif(
        INTERPRETED, reason="the Triton interpreter's tl.dot is wrong on bfloat16 (#11584)")),
]

# ‖ours − ref‖ / ‖ref‖ at SD sizes on zero-mean inputs. Emulating the kernel's roundings (P to
# the dtype before P·V, the output once) against float32 SDPA rounded to the dtype gives
# 3e-4 (fp16) and 2.6e-3 (bf16) at T = 77…9216; the bounds leave 4-6× margin. The bugs they
# are there to catch cost far more: a uniform softmax 0.8, scale 1/D instead of 1/√D 0.7,
# dropping 1/64 of the keys 0.12.
GPU_REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (B, H, S, T, D)
SHAPES = [
    (2, 2, 100, 77, 40),    # SD 1.5 cross-attention at level 1: 77 text keys in one block
    (1, 2, 130, 130, 40),   # self-attention, S = T = 2 past a block: ragged last q and k blocks
    (1, 1, 192, 192, 64),   # SD 2.x head dim; T a multiple of BLOCK_N: no masked key block
    (1, 2, 70, 77, 80),     # head dim 80 (SD 1.5 level 2) cross-attention, S < BLOCK_M
    (1, 1, 65, 150, 160),   # head dim 160 (SD 1.5 levels 3-4), T ≠ S on the self path
    (1, 1, 17, 129, 40),    # T = 129: one key past the cross path, a 1-key masked last block
    (1, 2, 50, 1, 64),      # a single key: the output is v
    (1, 2, 33, 140, 36),    # head dim 36: strides not multiples of 8 (STRIDE_UNIT 1), self path
    (1, 1, 40, 200, 100),   # head dim 100: 64 + 64 is no better than 128, so one padded piece
    (1, 2, 30, 60, 24),     # head dim 24: 16 + 16 = 32, one piece
    (1, 2, 40, 33, 64),     # 33 keys on the cross path: 32 + 16, the second piece 1 key
    (2, 1, 20, 20, 40),     # 20 keys: one piece of 32 (16 + 16 would save nothing)
    (2, 2, 70, 4, 40),      # an IP-Adapter's 4 image tokens: fewer keys than the least block
    (1, 2, 40, 16, 80),     # IP-Adapter Plus's 16 tokens at head dim 80
    (1, 1, 30, 257, 40),    # a full-face IP-Adapter's 257 tokens: the self path, 1 key past
]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same inputs every run: a failure reproduces


def _randn(*shape, dtype, mean=-2.3, std=0.5):
    return (mean + std * torch.randn(*shape, device=DEVICE)).to(dtype)


def _qkv(b, h, s, t, d, dtype, fused, mean=-2.3, std=0.5):
    r = dict(dtype=dtype, mean=mean, std=std)
    if not fused:
        return _randn(b, h, s, d, **r), _randn(b, h, t, d, **r), _randn(b, h, t, d, **r)
    # Views of one projection output, as SD's attention sees them: q from B×S×(H·D), k and v
    # from a fused B×T×2×H×D; none contiguous, all with unit last stride.
    q = _randn(b, s, h, d, **r).transpose(1, 2)
    kv = _randn(b, t, 2, h, d, **r)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def _exact(q, k, v, scale=None):
    """softmax(q·kᵀ·scale)·v in float64, rounded once to q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return (s.softmax(-1) @ v.double()).to(q.dtype)


def _last_key_decides(q, k, v):
    """Make the last key decide the even queries and vanish from the odd ones, in place.

    With −2.3 ± 0.5 inputs every key scores about the same and every output is ≈ mean(v), so
    a kernel that dropped a key (the masked last block at T = 129 is one key) would still pass.
    Here the last key scores ~15 above the rest for even queries (softmax weight ≈ 1) and
    its value is +2.3 against the others' −2.3; odd queries are negated, so it scores lowest
    for them: both a dropped and a wrongly masked-in last key show.
    """
    k[..., -1, :] *= 1.4
    v[..., -1, :] = 2.3
    q[..., 1::2, :] *= -1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_attention(triton_backend, shape, dtype, atol, rtol):
    q, k, v = _qkv(*shape, dtype, fused=False)
    _last_key_decides(q, k, v)
    expected = _exact(q, k, v)
    if shape[3] > 1:  # the comparison can fail: without its last key the answer moves
        without_last = _exact(q, k[..., :-1, :], v[..., :-1, :])
        assert (without_last.double() - expected.double()).abs().max() > 100 * atol
    out = torch.full_like(q, float("nan"))  # every element must be written
    y = attention(q, k, v, out=out)
    assert y is out
    torch.testing.assert_close(y, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_attention_strided_views(triton_backend, shape, dtype, atol, rtol):
    # q, k, v read in place through their strides; the output written through its own, in the
    # B×S×H×D layout the op allocates by default (checked on two query rows: cheap, and S > 1
    # so that the layout shows in the strides).
    q, k, v = _qkv(*shape, dtype, fused=True)
    b, h, s, d = q.shape
    out = torch.full((b, s, h, d), float("nan"), device=DEVICE, dtype=dtype).transpose(1, 2)
    y = attention(q, k, v, scale=0.3, out=out)
    assert y is out
    torch.testing.assert_close(y, _exact(q, k, v, scale=0.3), atol=atol, rtol=rtol)
    allocated = attention(q[:, :, :2], k, v, scale=0.3)
    assert allocated.shape == (b, h, 2, d) and allocated.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(allocated, y[:, :, :2], atol=0, rtol=0)


def test_attention_float32_runs_the_reference(triton_backend):
    # No float32 kernel: the Triton backend hands float32 to F.scaled_dot_product_attention.
    q, k, v = _qkv(1, 2, 20, 77, 40, torch.float32, fused=False)
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), atol=0, rtol=0)


def test_attention_block_table():
    # The cross path takes every key at once, SD's 77 as 64 + 16; the self path streams
    # BLOCK_N at a time.
    cross = _blocks(40, 77)
    assert cross.one_key_block and (cross.block_n, cross.block_n2) == (64, 16)
    assert (cross.block_d, cross.block_d2) == (32, 16)
    assert not _blocks(160, 4096).one_key_block and _blocks(160, 4096).block_n2 == 0
    for d in (40, 64, 80, 160):
        blk = _blocks(d, 4096)
        assert blk.block_d + blk.block_d2 >= d and blk.block_m % 16 == 0
        assert blk.block_n % 16 == 0


def test_sweep_blocks_start_with_the_table_and_keep_the_pieces():
    for d, t in ((40, 4096), (40, 77), (160, 256), (64, 9216)):
        rows = attention_module.sweep_blocks(d, t)
        assert rows[0] == _blocks(d, t) and len(set(rows)) == len(rows) > 3
        assert {(r.block_d, r.block_d2, r.one_key_block) for r in rows} == {
            (rows[0].block_d, rows[0].block_d2, rows[0].one_key_block)}
        if rows[0].one_key_block:  # all keys at once: the key pieces cannot change
            assert {(r.block_n, r.block_n2, r.stages) for r in rows} == {(64, 16, 1)}


@pytest.mark.parametrize("shape", [(1, 2, 130, 150, 40), (1, 1, 40, 77, 80)])
def test_attention_with_swept_blocks(triton_backend, shape):
    # Every block config the GPU sweep may pick computes the same attention.
    q, k, v = _qkv(*shape, torch.float16, fused=True)
    _last_key_decides(q, k, v)
    expected = _exact(q, k, v)
    for blk in attention_module.sweep_blocks(shape[-1], shape[3]):
        out = torch.full_like(q, float("nan"))
        y = attention_module._attention_triton(q, k, v, shape[-1] ** -0.5, out, blk)
        torch.testing.assert_close(y, expected, atol=5e-3, rtol=5e-3, msg=lambda m: f"{blk}: {m}")


@pytest.mark.parametrize("n, split, padded", [
    (40, (32, 16), (64, 0)), (80, (64, 16), (128, 0)), (160, (128, 32), (256, 0)),
    (77, (64, 16), (128, 0)), (64, (64, 0), (64, 0)), (36, (32, 16), (64, 0)),
    (72, (64, 16), (128, 0)), (96, (64, 32), (128, 0)), (100, (128, 0), (128, 0)),
    (24, (32, 0), (32, 0)), (8, (16, 0), (16, 0)), (1, (16, 0), (16, 0)), (256, (256, 0), (256, 0)),
])
def test_pieces(n, split, padded):
    # SD 1.5's head dims 40, 80 and 160 and its 77 text keys lose no more than 8 columns of 48
    # (3 keys of 80) to padding, split.
    assert pieces(n, split=True) == split
    assert pieces(n, split=False) == padded


@pytest.mark.parametrize("shape", [(1, 2, 130, 150, 40), (2, 1, 70, 77, 80),
                                   (1, 1, 65, 150, 160)])
def test_attention_padded(triton_backend, monkeypatch, shape):
    # The kernel without the splits (what benchmarks time it against) stays right.
    monkeypatch.setattr(attention_module, "SPLIT_HEAD_DIM", False)
    monkeypatch.setattr(attention_module, "SPLIT_KEYS", False)
    blk = _blocks(shape[-1], shape[3])
    assert blk.block_d2 == 0 and blk.block_n2 == 0
    q, k, v = _qkv(*shape, torch.float16, fused=True)
    _last_key_decides(q, k, v)
    out = torch.full_like(q, float("nan"))
    torch.testing.assert_close(attention(q, k, v, out=out), _exact(q, k, v), atol=5e-3,
                               rtol=5e-3)


@pytest.mark.parametrize("case", ["rank", "head dims differ", "k and v differ", "dtypes differ",
                                  "q last dim strided", "out shape"])
def test_attention_bad_inputs(triton_backend, case):
    q, k, v = _qkv(1, 2, 8, 8, 16, torch.float16, fused=False)
    out = None
    if case == "rank":
        q = q[0]
    elif case == "head dims differ":
        k, v = k[..., :8], v[..., :8]
    elif case == "k and v differ":
        v = v[:, :, :4]
    elif case == "dtypes differ":
        v = v.float()
    elif case == "q last dim strided":
        q = _randn(1, 2, 16, 8, dtype=torch.float16).transpose(2, 3)
    elif case == "out shape":
        out = torch.empty(1, 2, 8, 15, device=DEVICE, dtype=q.dtype)
    with pytest.raises(ValueError, match="attention"):
        attention(q, k, v, out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40),    # SD 1.5 level 1, self and cross
    (2, 8, 4096, 4, 40), (2, 8, 4096, 16, 40),       # its IP-Adapter (Plus) image tokens
    (2, 8, 1024, 1024, 80), (2, 8, 256, 77, 160),    # SD 1.5 levels 2 and 3
    (2, 8, 64, 64, 160),                             # SD 1.5 mid block
    (2, 5, 9216, 9216, 64), (2, 20, 576, 77, 64),    # SD 2.1 at 768²
])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_attention_sd_shapes_gpu(triton_backend, shape, dtype, atol, rtol):
    # Zero-mean inputs, std 1: with −2.3 ± 0.5 every output would be ≈ mean(v) whatever the
    # weights, so a uniform softmax, a wrong scale or dropped keys would pass. Here the outputs
    # themselves are small (std ≈ √(e/T): 0.017 at T = 9216, below bf16's atol), so the
    # relative-norm bound below is what catches such bugs.
    q, k, v = _qkv(*shape, dtype, fused=True, mean=0.0, std=1.0)
    out = torch.full_like(q, float("nan"))
    y = attention(q, k, v, out=out)
    # float32 SDPA as the reference: a float64 score matrix at 9216² would not fit.
    ref = attention_reference(q.float(), k.float(), v.float()).to(dtype)
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    # imported here, not at the top: compile_for_hopper's child process imports this module,
    # and conftest would set TRITON_INTERPRET in it
    from conftest import assert_close_rel
    assert_close_rel(y, ref, GPU_REL_TOL[dtype], f"attention {shape} {dtype}")


def compile_for_hopper():
    """Compile the SD variants for sm_90 (run by ``assert_compiles_for_hopper``)."""
    import importlib
    mod = importlib.import_module("sdrt.kernels.attention")
    fn = mod._attention_kernel
    ints = [n for n in fn.arg_names if n.startswith("stride_")] + ["H", "S", "T"]
    # Head dim 40 (self, with a masked tail; cross over 77 keys, split too), 160 (the largest
    # block), each split into two pieces, and 64 (one piece); an IP-Adapter's 4 image keys.
    for d, t in ((40, 4100), (40, 77), (160, 4100), (64, 4100), (40, 4)):
        blk = mod._blocks(d, t)
        consts = {"HEAD_D": d, "BLOCK_M": blk.block_m, "BLOCK_N": blk.block_n,
                  "BLOCK_N2": blk.block_n2, "BLOCK_D": blk.block_d, "BLOCK_D2": blk.block_d2,
                  "ONE_KEY_BLOCK": blk.one_key_block, "STRIDE_UNIT": 8}
        sig = {n: "i32" if n in ints else "fp32" if n == "qk_scale" else "*fp16"
               for n in fn.arg_names}
        compile_sm90(fn, sig, consts, num_warps=blk.warps, num_stages=blk.stages)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile it")
def test_attention_compiles_for_hopper():
    pytest.importorskip("triton")
    assert_compiles_for_hopper("test_attention")
