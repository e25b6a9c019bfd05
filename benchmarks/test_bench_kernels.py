"""bench_kernels through pytest-benchmark: ``python -m pytest benchmarks/test_bench_kernels.py``.

Collected only when pytest is pointed at benchmarks/ (pytest.ini's testpaths is tests/), and
skipped without CUDA. pytest-benchmark times on the host, so each round synchronises; the
CUDA-event numbers with rooflines come from ``python -m sdrt.benchmarks.bench_kernels``.
"""
import pytest
import torch

from sdrt.benchmarks.bench_kernels import MODELS, make_problem, model_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = sorted({case for model in MODELS for calls in model_cases(model).values()
                for case in calls}, key=str)


@pytest.mark.parametrize("impl", ["sdrt", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel(benchmark, case, impl):
    problem = make_problem(case)
    if impl == "sdrt":
        fn = problem.sdrt
    else:  # the first baseline that runs (SDPA: flash, else efficient, else cuDNN)
        for fn in problem.baselines.values():
            try:
                fn()
                break
            except RuntimeError:
                continue
    benchmark.group = str(case)

    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, warmup_rounds=10, rounds=100)
