"""Shared test set-up.

On a machine without CUDA the Triton kernels run under Triton's interpreter: TRITON_INTERPRET
must be set before triton is first imported in this process, which is why it is set here, at
the top of the first file pytest loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_backend(monkeypatch):
    """Every op runs its Triton kernel, on CPU tensors too (interpreted)."""
    monkeypatch.setenv("SDRT_BACKEND", "triton")


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def tiny_model(request, tmp_path_factory):
    """(family, folder, diffusers pipeline loaded from that folder) for a tiny random model."""
    from tiny_models import save_diffusers_folder
    folder = str(tmp_path_factory.mktemp(f"tiny-{request.param}") / "model")
    return request.param, folder, save_diffusers_folder(folder, request.param)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    from tiny_models import save_diffusers_folder
    folder = str(tmp_path_factory.mktemp("tiny-sd1-only") / "model")
    return folder, save_diffusers_folder(folder, "sd1")


def assert_close_rel(ours, ref, tol, what):
    """‖ours − ref‖ / ‖ref‖ ≤ tol, with the worst element named on failure."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert ref.norm() > 0, f"{what}: the reference is all zeros, the comparison proves nothing"
    err = ((ours - ref).norm() / ref.norm()).item()
    worst = (ours - ref).abs().argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
    assert err <= tol, (f"{what}: relative error {err:.3e} > {tol:.0e}; worst at {idx}: "
                        f"{ours[idx].item():.6g} vs {ref[idx].item():.6g}")


def assert_close_abs(ours, ref, atol, what):
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    worst = diff.argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
    assert diff.max() <= atol, (f"{what}: max abs difference {diff.max().item():.3e} > {atol:.0e} "
                                f"at {idx}: {ours[idx].item():.6g} vs {ref[idx].item():.6g}")
