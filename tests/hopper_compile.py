"""Compiling Triton kernels for sm_90 on a machine without a GPU.

Under TRITON_INTERPRET=1 (how the kernel tests run on a CPU) Triton's compiler never runs, so a
kernel that would not compile for Hopper could still pass them. These helpers run the real
compiler for sm_90 in a child process without TRITON_INTERPRET, which triton reads when a
kernel is decorated (so not in this process, where conftest has set it).

These compile hand-typed variants of one kernel; ``tests/test_sm90_report.py`` compiles every
specialisation the engine really launches for SD 1.5 (``benchmarks/sm90_report.py``) and
reads the resulting machine code.
"""
import os
import subprocess
import sys


def compile_sm90(fn, signature, constants, num_warps=4, num_stages=None):
    """Compile ``fn`` for sm_90: ``signature`` types the runtime arguments ("*fp16", "i32",
    ...), ``constants`` gives the constexpr ones."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    sig = {name: "constexpr" if name in constants else signature[name] for name in fn.arg_names}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in constants.items()})
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def assert_compiles_for_hopper(test_module):
    """Run ``test_module.compile_for_hopper()`` in a child process with the real compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", f"import {test_module} as t; t.compile_for_hopper()"],
                       cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
