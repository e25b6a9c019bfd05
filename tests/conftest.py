"""Shared test set-up.

On a machine without CUDA the Triton kernels run under Triton's interpreter: TRITON_INTERPRET
must be set before triton is first imported in this process, which is why it is set here, at
the top of the first file pytest loads.

Nothing here imports diffusers: the fixtures that build a diffusers reference import it
themselves and skip where it is not installed (the GPU machine), so every file collects
there. Tests that need only a model folder take ``tiny_sd1_folder``, written by sdrt's own
writer (``engine/tiny.py``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # One of several test processes (pytest -n): the cores shared out among them, for torch
    # here and in the processes its tests start (on a 2-core machine two intra-op threads per
    # process make tiny matmuls wait on each other).
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

import pytest  # noqa: E402


def _version(text):
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def _fix_triton_36_interpreter_on_numpy_24():
    """Triton 3.6's interpreter turns a scalar into an int with ``int(handle.data)``, and
    ``handle.data`` is a 1-element 1-d array; NumPy 2.4 made that a TypeError ("only
    0-dimensional arrays can be converted to Python scalars"), which fails every interpreted
    kernel that uses a scalar as an index. Later Triton converts ``handle.data.squeeze()``: the
    same one-line change, applied through the interpreter's own patch scope (so it is undone
    with the interpreter's other patches after each launch). Only with triton 3.6, NumPy ≥ 2.4
    and the interpreter on; the GPU tests never use the interpreter."""
    import numpy
    if os.environ.get("TRITON_INTERPRET") != "1" or _version(numpy.__version__) < (2, 4):
        return
    try:
        import triton
    except ImportError:
        return
    if _version(triton.__version__) != (3, 6):
        return
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_0d_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patch_tensor_with_0d_index


def pytest_configure(config):
    _fix_triton_36_interpreter_on_numpy_24()


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
    """(family, folder, diffusers pipeline loaded from that folder) for a tiny random model
    that diffusers wrote. Skips where diffusers is not installed."""
    pytest.importorskip("diffusers")
    from tiny_models import save_diffusers_folder
    folder = str(tmp_path_factory.mktemp(f"tiny-{request.param}") / "model")
    return request.param, folder, save_diffusers_folder(folder, request.param)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """(folder, diffusers pipeline) for the SD 1-like tiny model diffusers wrote. Skips where
    diffusers is not installed."""
    pytest.importorskip("diffusers")
    from tiny_models import save_diffusers_folder
    folder = str(tmp_path_factory.mktemp("tiny-sd1-only") / "model")
    return folder, save_diffusers_folder(folder, "sd1")


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory):
    """A folder of ``tiny_sd1``'s architecture (sizes that fit one fit the other) written by
    sdrt's own writer, with sdrt's deterministic weights: no diffusers needed."""
    from sdrt.engine.tiny import write_model
    from tiny_models import sdrt_config
    folder = str(tmp_path_factory.mktemp("sdrt-tiny-sd1") / "model")
    write_model(folder, sdrt_config("sd1"))
    return folder


def _sdxl_saved(tmp_path_factory, variant):
    pytest.importorskip("diffusers")
    from sdxl_models import save_diffusers_folder
    folder = str(tmp_path_factory.mktemp(f"tiny-sdxl-{variant}") / "model")
    ref = save_diffusers_folder(folder, variant)
    ref.original_scheduler_config = dict(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return folder, ref


@pytest.fixture(scope="session")
def sdxl_base_folder(tmp_path_factory):
    """(folder, diffusers StableDiffusionXLPipeline) of the tiny SDXL base
    (``sdxl_models.py``). Skips where diffusers is not installed."""
    return _sdxl_saved(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def sdxl_refiner_folder(tmp_path_factory):
    """(folder, diffusers StableDiffusionXLImg2ImgPipeline) of the tiny refiner (text encoder 2
    only, aesthetic-score time ids)."""
    return _sdxl_saved(tmp_path_factory, "refiner")


@pytest.fixture(scope="session")
def sdxl_turbo_folder(tmp_path_factory):
    """(folder, diffusers StableDiffusionXLPipeline) of the tiny Turbo-like model (Euler
    ancestral on trailing timesteps, 64 px by default)."""
    return _sdxl_saved(tmp_path_factory, "turbo")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``), restored after it: on tiny matrices a second intra-op thread only adds
    synchronisation, which on a shared, loaded 2-core machine makes each UNet call ~20x
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sampler_loops():
    """One sampler id per sampling loop: every sampler but the ``X_karras`` ones (X's loop
    along Karras levels, which tests/test_sigma_schedules.py and test_samplers.py check
    level by level), and a few of those that stand for the rest (DPM2's rounds its Karras
    timesteps, an ancestral one, a multistep one, Restart's)."""
    from sdrt.engine.request import SAMPLER_NAMES
    return [s for s in SAMPLER_NAMES if not s.endswith("_karras")] + [
        "dpm2_karras", "euler_a_karras", "dpmpp_2m_karras", "restart_karras"]


def run_eagerly(pipe, **kw):
    """``pipe(**kw)`` without its static plans (as if ``compile`` had not been called), for the
    plan-against-eager comparisons; the plans are kept for the next call."""
    runtime, pipe.runtime = pipe.runtime, None
    try:
        return pipe(**kw)
    finally:
        pipe.runtime = runtime


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
