"""The Triton kernels compile for a GPU (sm_90) — the path the CPU interpreter tests never take.

Triton can compile ahead of time for a given target without a GPU (ptxas ships with triton), so
this catches what the interpreter forgives: typing of scalar arguments (``tl.float64``), loop
carried types, constexpr use. Runs in a subprocess because the test session has
``TRITON_INTERPRET=1``, under which ``@triton.jit`` returns interpreted functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import sys
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile as triton_compile
    except ImportError as exc:
        print(f"cannot import triton's compiler: {exc}")
        sys.exit(77)
    from bissl.kernels import axpby, cg_direction, cg_step, damped_matvec, prox_grad

    KERNELS = [
        axpby._axpby_kernel, cg_direction._cg_direction_kernel, cg_step._cg_step_kernel,
        damped_matvec._damped_matvec_kernel, prox_grad._prox_grad_kernel,
    ]
    for tuned in KERNELS:
        fn = tuned.fn  # the autotuner wraps the JITFunction
        config = tuned.configs[-1]
        for dtype in ("fp32", "fp64"):
            signature, constexprs = {}, {}
            for param in fn.params:
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                    # BLOCK from the config; CHUNK: any power of two >= BLOCK
                    constexprs[param.name] = config.kwargs.get(param.name, 8192)
                elif param.name == "partial_ptr":
                    signature[param.name] = "*fp64"
                elif param.name.endswith("_ptr"):
                    signature[param.name] = "*" + dtype
                elif param.name == "n":
                    signature[param.name] = "i64"
                else:
                    signature[param.name] = param.annotation_type or "fp32"
            compiled = triton_compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": config.num_warps},
            )
            if "cubin" not in compiled.asm:
                print(f"{fn.__name__} {dtype}: no cubin")
                sys.exit(1)
            print(f"ok {fn.__name__} {dtype}")
    """
)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 10, proc.stdout
