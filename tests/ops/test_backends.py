"""Backend choice of the fused ops: auto, forcing, clear errors, warn-once fallback, dispatcher."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from bissl.ops import _backends, _library
from bissl.ops._backends import (
    BackendUnavailableError,
    KernelModuleError,
    backend_report,
    cg_vector_ops,
    resolve_backend,
)
from bissl.ops.fused import cg_step_, damped_matvec
from bissl.ops.reference import cg_step_ref_, dot_ref


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    """Each test probes from scratch without BISSL_BACKEND and leaves no simulated state behind."""
    monkeypatch.delenv("BISSL_BACKEND", raising=False)
    _backends._reset_for_tests()
    yield
    monkeypatch.undo()
    _backends._reset_for_tests()


def _simulate_missing_cpp(monkeypatch):
    # A failed import of the extension, as on a machine where it was never built.
    monkeypatch.delenv("BISSL_NO_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "bissl._C", None)
    _backends._reset_for_tests()


@pytest.mark.skipif(os.environ.get("BISSL_NO_EXT") == "1", reason="BISSL_NO_EXT=1: the extension is off on purpose")
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler: setup.py skips the extension",
)
def test_cpp_extension_is_built_and_chosen_on_cpu():
    status = _backends.backend_status("cpp")
    assert status.available, f"setup.py should have built bissl._C (reinstall the package): {status.detail}"
    assert resolve_backend(None, "cpu") == "cpp"
    assert all(_library.has_device_kernel(op, "CPU") for op in _library.OP_NAMES)


def test_dispatcher_runs_the_cpu_kernel_when_cpp_is_available():
    _require_backend_on_cpu("cpp")
    x, r, p, ap = (torch.randn(50_001) for _ in range(4))
    alpha = torch.tensor(0.7)
    x1, r1 = x.clone(), r.clone()
    rr_dispatch = torch.ops.bissl.cg_step_(x1, r1, p, ap, alpha)
    rr_named = cg_step_(x, r, p, ap, alpha, backend="cpp")
    assert torch.equal(rr_dispatch, rr_named) and torch.equal(x1, x) and torch.equal(r1, r)


def _require_backend_on_cpu(name: str) -> None:
    """Skip (with the diagnosis) unless ``name`` runs on CPU here: a test of a compiled or Triton
    backend must not quietly compare the torch reference with itself (CI: a skip fails)."""
    status = _backends.backend_status(name)
    if not (status.available and "cpu" in status.devices):
        pytest.skip(f"{name} backend unavailable on CPU: {status.detail}")


def test_missing_triton_makes_the_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    _backends._reset_for_tests()
    status = _backends.backend_status("triton")
    assert not status.available and "triton is not installed or not usable" in status.detail
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        resolve_backend("triton", "cpu")


def test_a_broken_kernel_module_fails_loudly(monkeypatch):
    """With Triton importable, a failing bissl.kernels module is our bug: it raises, naming the
    module and the real error, instead of reading as "Triton unavailable" (every Triton test a skip)."""
    _require_backend_on_cpu("triton")
    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == "bissl.kernels.cg_step":
            raise SyntaxError("invalid syntax (cg_step.py, line 42)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_backends.importlib, "import_module", import_module)
    _backends._reset_for_tests()
    with pytest.raises(
        KernelModuleError,
        match=r"bissl\.kernels\.cg_step does not import although "
        r"triton does \(SyntaxError: invalid syntax",
    ):
        _backends.backend_status("triton")


def test_environment_variable_forces_a_backend_and_the_argument_wins(monkeypatch):
    monkeypatch.setenv("BISSL_BACKEND", "torch")
    assert resolve_backend(None, "cpu") == "torch"
    assert cg_vector_ops(None, "cpu").name == "torch"
    assert resolve_backend("auto", "cpu") != "torch" or not _backends.backend_status("cpp").available
    monkeypatch.setenv("BISSL_BACKEND", " Torch ")
    assert resolve_backend(None, "cpu") == "torch"


def test_torch_backend_is_reachable_while_the_cpu_kernel_is_registered():
    hv, v = torch.randn(1001, dtype=torch.float64), torch.randn(1001, dtype=torch.float64)
    # The reference's own result, bit for bit: the named torch backend bypasses the dispatcher.
    av, vav = damped_matvec(hv, v, 0.25, 3.0, backend="torch")
    av_ref = torch.add(hv * 0.25, v, alpha=3.0)
    assert torch.equal(av, av_ref) and torch.equal(vav, dot_ref(v, av_ref))


def test_unknown_backend_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        resolve_backend("fortran", "cpu")
    monkeypatch.setenv("BISSL_BACKEND", "cuda-graphs")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda-graphs' \(BISSL_BACKEND="):
        cg_vector_ops(None, "cpu")


def test_explicit_unavailable_backend_raises_naming_it_and_why(monkeypatch):
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' was requested \(backend='cuda'\).*CUDA"):
        resolve_backend("cuda", "cpu")
    _simulate_missing_cpp(monkeypatch)
    x = torch.randn(8)
    with pytest.raises(BackendUnavailableError, match=r"'cpp'.*bissl\._C is not built"):
        cg_step_(x, x.clone(), x.clone(), x.clone(), torch.tensor(1.0), backend="cpp")
    monkeypatch.setenv("BISSL_BACKEND", "cpp")
    with pytest.raises(BackendUnavailableError, match=r"BISSL_BACKEND='cpp'"):
        cg_vector_ops(None, "cpu")


def test_cpp_backend_on_cuda_tensors_raises():
    # Decided from the device type alone, so this runs without a GPU.
    _require_backend_on_cpu("cpp")
    with pytest.raises(BackendUnavailableError, match="does not run on cuda tensors"):
        resolve_backend("cpp", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device triton runs on cuda tensors")
def test_interpreted_triton_on_cuda_tensors_raises():
    _require_backend_on_cpu("triton")
    with pytest.raises(BackendUnavailableError, match="does not run on cuda tensors"):
        resolve_backend("triton", "cuda")


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    _simulate_missing_cpp(monkeypatch)
    x, r, p, ap = (torch.randn(101, dtype=torch.float64) for _ in range(4))
    alpha = torch.tensor(0.5, dtype=torch.float64)
    x_ref, r_ref = x.clone(), r.clone()
    with pytest.warns(RuntimeWarning, match=r"fall back to the 'torch' backend \(cpp: bissl\._C is not built"):
        rr = cg_step_(x, r, p, ap, alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert resolve_backend(None, "cpu") == "torch"
        assert cg_vector_ops("auto", "cpu").name == "torch"
    assert torch.equal(rr, cg_step_ref_(x_ref, r_ref, p, ap, alpha)) and torch.equal(x, x_ref)


def test_auto_falls_back_when_the_extension_is_disabled(monkeypatch):
    monkeypatch.setenv("BISSL_NO_EXT", "1")
    _backends._reset_for_tests()
    with pytest.warns(RuntimeWarning, match="BISSL_NO_EXT=1"):
        assert resolve_backend(None, "cpu") == "torch"
    with pytest.raises(BackendUnavailableError, match="disabled by BISSL_NO_EXT=1"):
        resolve_backend("cpp", "cpu")


def test_cg_vector_ops_bundles_follow_the_backend():
    _require_backend_on_cpu("cpp")
    for name in _backends.available_backends("cpu"):
        ops = cg_vector_ops(name, torch.device("cpu"))
        assert ops.name == name
        p, r = torch.randn(9), torch.randn(9)
        expected = r + 0.5 * p
        out = ops.cg_direction_(p, r, torch.tensor(0.5))
        assert out is p
        torch.testing.assert_close(p, expected)


def test_backend_report_names_every_backend_and_the_choice():
    report = backend_report()
    for name in _backends.BACKENDS:
        assert f"\n  {name} " in report
    assert "cpu tensors run on: " + resolve_backend(None, "cpu") in report
    if not torch.cuda.is_available():
        assert "no CUDA device" in report


def test_without_the_extension_the_dispatcher_runs_the_reference():
    # A fresh interpreter with BISSL_NO_EXT=1: nothing is registered for CPU, the "default"
    # (torch reference) kernel answers torch.ops.bissl.<op>, and the op contract still holds.
    script = textwrap.dedent(
        """
        import warnings, torch
        from bissl.ops import _library, fused
        assert not any(_library.has_device_kernel(op, "CPU") for op in _library.OP_NAMES)
        x, r, p, ap = (torch.randn(37, dtype=torch.float64) for _ in range(4))
        a = torch.tensor(0.3, dtype=torch.float64)
        torch.library.opcheck(torch.ops.bissl.cg_step_.default, (x, r, p, ap, a))
        torch.library.opcheck(torch.ops.bissl.damped_matvec.default, (x, r, 0.5, 1.0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused.axpby(1.0, x, 2.0, r)
            fused.axpby(1.0, x, 2.0, r)
        assert len(caught) == 1 and "BISSL_NO_EXT=1" in str(caught[0].message), caught
        print("ok")
        """
    )
    env = {**os.environ, "BISSL_NO_EXT": "1"}
    env.pop("BISSL_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
