"""Which implementation of the fused vector ops runs: the one place that decides.

Backends (what runs, on which tensors, reached how):

* ``torch``: the references of :mod:`bissl.ops.reference`; any device; a direct Python call.
* ``cpp``: ``bissl._C`` (``csrc/cpu``, OpenMP + compiler vectorisation); CPU tensors;
  ``torch.ops.bissl.<op>`` (the extension registers the CPU dispatch key).
* ``cuda``: ``csrc/cuda``, built and loaded at run time by :func:`load_cuda_extension`; CUDA
  tensors; ``torch.ops.bissl.<op>`` (the extension registers the CUDA dispatch key).
* ``triton``: ``bissl.kernels`` (``kernels/``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (the interpreter: for tests, never chosen automatically); a direct call
  of the launcher.

How this maps onto the torch dispatcher: every op has one schema, ``bissl::<op>``
(:mod:`bissl.ops._library`), whose "default" (CompositeExplicitAutograd) kernel is the torch
reference. Importing this module imports ``bissl._C``, which registers the CPU kernels; on the
first CUDA call this module gives the CUDA key exactly one kernel: the CUDA extension's if it
builds and loads (it registers itself), else the Triton launchers. So ``torch.ops.bissl.<op>``
runs the fastest loaded kernel of the tensors' device; that is what ``torch.compile`` graphs and
other dispatcher callers see.

The public functions (:mod:`bissl.ops.fused`) and :func:`cg_vector_ops` resolve a backend *name*
first and call that backend's entry in :func:`_implementations`: ``torch`` the reference,
``triton`` the launcher, ``cpp``/``cuda`` the dispatcher op (their kernels live only there, and
they are its winners whenever available). This is what lets an explicit choice (``backend=``,
else ``BISSL_BACKEND``) pick a backend that is not the dispatcher's winner (``torch`` on CPU while
the C++ kernel is registered, ``triton`` while the CUDA extension is loaded), and lets ``auto``
skip a loaded kernel that failed its smoke test.

Rules: ``auto`` picks, per device type, the first available of ``cpp, torch`` (CPU) or
``cuda, triton, torch`` (CUDA); when that is not the first preference it warns once per device
type and falls back (never raises). A *named* backend that is unavailable, or does not run on the
tensors' device, raises :class:`BackendUnavailableError` naming it and the reason. A missing or
unusable Triton makes the ``triton`` backend unavailable; a module of ``bissl.kernels`` that does
not import while Triton does raises :class:`KernelModuleError` (our bug, never a fallback).
Availability is probed once per process (import, registration and a smoke test against the reference);
:func:`backend_report` prints every diagnosis (for ``bissl env``).

Environment: ``BISSL_BACKEND`` (auto|torch|cpp|triton|cuda), ``BISSL_NO_EXT=1`` (do not load
``bissl._C``), ``BISSL_CUDA_EXT=0`` (do not build/load the CUDA extension).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bissl.ops import _library
from bissl.ops import reference as ref

BACKENDS = ("torch", "cpp", "triton", "cuda")

#: Preference order of ``auto`` per device type; any other device type gets ``torch``.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

_CSRC = Path(__file__).resolve().parents[2] / "csrc"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (the message says which and why)."""


@dataclass(frozen=True)
class BackendStatus:
    """Diagnosis of one backend.

    Attributes:
        name: backend name.
        available: whether it can run now.
        devices: device types it runs on (empty when unavailable).
        detail: what was loaded, or why it is unavailable.
    """

    name: str
    available: bool
    devices: tuple[str, ...]
    detail: str


@dataclass(frozen=True)
class CGVectorOps:
    """The vector operations a CG iteration needs, as one bundle per backend.

    Attributes:
        name: backend name.
        damped_matvec: ``(hv, v, scale, shift) -> (Av, vᵀAv)``.
        cg_step_: ``(x, r, p, Ap, alpha) -> rᵀr`` (updates x, r in place).
        cg_direction_: ``(p, r, beta) -> p`` (updates p in place).
    """

    name: str
    damped_matvec: Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]]
    cg_step_: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    cg_direction_: Callable[[Tensor, Tensor, Tensor], Tensor]


TORCH_OPS = CGVectorOps("torch", ref.damped_matvec_ref, ref.cg_step_ref_, ref.cg_direction_ref_)

_LOCK = threading.RLock()
_STATUS: dict[str, BackendStatus] = {}
_IMPLS: dict[str, dict[str, Callable]] = {}
_CUDA_KEY_OWNER: list[str] = []  # which backend serves the CUDA dispatch key ([] = not decided)
_WARNED: set[str] = set()


# ----------------------------------------------------------------------------- probing


def _smoke_test(impls: dict[str, Callable], device: torch.device) -> str | None:
    """Run every op once on small float64 inputs against the reference; None if all agree."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hv, v, x, r, p, ap = (torch.randn(37, generator=g, dtype=torch.float64).to(device) for _ in range(6))
    step = torch.tensor(0.3, dtype=torch.float64, device=device)
    x_k, r_k, p_k = x.clone(), r.clone(), p.clone()
    rr_k = impls["cg_step_"](x_k, r_k, p, ap, step)
    impls["cg_direction_"](p_k, r_k, step)
    rr = ref.cg_step_ref_(x, r, p, ap, step)
    ref.cg_direction_ref_(p, r, step)
    pairs = {
        "damped_matvec": (
            impls["damped_matvec"](hv, v, 0.5, 2.0),
            ref.damped_matvec_ref(hv, v, 0.5, 2.0),
        ),
        "prox_grad": ((impls["prox_grad"](hv, v, x, 0.1),), (ref.prox_grad_ref(hv, v, x, 0.1),)),
        "axpby": ((impls["axpby"](2.0, hv, -3.0, v),), (ref.axpby_ref(2.0, hv, -3.0, v),)),
        "cg_step_": ((x_k, r_k, rr_k), (x, r, rr)),
        "cg_direction_": ((p_k,), (p,)),
    }
    for op, (got, want) in pairs.items():
        if not all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(got, want)):
            return f"smoke test: {op} disagrees with the torch reference"
    return None


def _probe_torch() -> BackendStatus:
    return BackendStatus("torch", True, ("any",), "plain-torch reference (bissl.ops.reference)")


def _dispatcher_impls() -> dict[str, Callable]:
    return {op: _library.dispatcher_op(op).default for op in _library.OP_NAMES}


def _import_cpu_extension() -> tuple[object | None, str]:
    """Import ``bissl._C`` (which registers the CPU kernels): (module, "") or (None, why not)."""
    if os.environ.get("BISSL_NO_EXT", "0") == "1":
        return None, "disabled by BISSL_NO_EXT=1 (bissl._C not loaded)"
    try:
        return importlib.import_module("bissl._C"), ""
    except Exception as exc:  # ImportError, or a registration error of a stale build
        return None, (
            f"bissl._C is not built or does not load ({type(exc).__name__}: {exc}); build it with "
            "`pip install --no-build-isolation --no-deps -e .` (needs a C++ compiler and ninja)"
        )


def _probe_cpp() -> BackendStatus:
    module, why_not = _import_cpu_extension()
    if module is None:
        return BackendStatus("cpp", False, (), why_not)
    missing = [op for op in _library.OP_NAMES if not _library.has_device_kernel(op, "CPU")]
    if missing:
        return BackendStatus(
            "cpp",
            False,
            (),
            f"bissl._C loaded but registers no CPU kernel for {missing} (stale build?)",
        )
    impls = _dispatcher_impls()
    try:
        problem = _smoke_test(impls, torch.device("cpu"))
    except Exception as exc:  # any failure of a native kernel means "do not use it"
        problem = f"smoke test raised {type(exc).__name__}: {exc}"
    if problem:
        return BackendStatus("cpp", False, (), f"bissl._C {problem}")
    _IMPLS["cpp"] = impls
    omp = getattr(module, "openmp", 0)
    omp_text = f"OpenMP {omp}, {torch.get_num_threads()} threads" if omp else "no OpenMP (single thread)"
    return BackendStatus("cpp", True, ("cpu",), f"bissl._C ({omp_text}; compiler {getattr(module, 'compiler', '?')})")


class KernelModuleError(RuntimeError):
    """A module of ``bissl.kernels`` fails to import although Triton itself imports: a bug in our
    kernels, raised rather than read as "Triton unavailable" (which would turn every Triton test
    into a skip)."""


def _import_kernels() -> dict[str, object]:
    """Our Triton kernel modules by op; only called once ``triton`` and ``triton.language`` import."""
    kernels: dict[str, object] = {}
    for op in _library.OP_NAMES:
        name = f"bissl.kernels.{op.rstrip('_')}"
        try:
            kernels[op] = importlib.import_module(name)
        except Exception as exc:  # whatever it is, it is ours: re-raised with the module named
            raise KernelModuleError(
                f"{name} does not import although triton does ({type(exc).__name__}: {exc}); "
                "this is a bug in bissl's Triton kernels, not a missing dependency"
            ) from exc
    return kernels


def _probe_triton() -> BackendStatus:
    try:
        triton = importlib.import_module("triton")
        importlib.import_module("triton.language")  # all our kernels need beyond triton itself
    except Exception as exc:  # triton import errors are varied (missing driver, ABI, ...)
        return BackendStatus(
            "triton",
            False,
            (),
            f"triton is not installed or not usable ({type(exc).__name__}: {exc})",
        )
    kernels = _import_kernels()
    impls = {op: getattr(mod, f"{op.rstrip('_')}_triton") for op, mod in kernels.items()}
    # What the kernels were decorated under (triton reads TRITON_INTERPRET at decoration time).
    if importlib.import_module("bissl.kernels._common").INTERPRET:
        _IMPLS["triton"] = impls
        return BackendStatus(
            "triton",
            True,
            ("cpu",),
            f"triton {triton.__version__} under TRITON_INTERPRET=1: CPU interpreter, for testing "
            "the kernels "
            "(correct, slow: never auto-selected)",
        )
    if not torch.cuda.is_available():
        return BackendStatus(
            "triton",
            False,
            (),
            f"triton {triton.__version__} is installed but there is no CUDA device "
            f"(torch.cuda.is_available() is False) and TRITON_INTERPRET is not 1",
        )
    _IMPLS["triton"] = impls
    return BackendStatus("triton", True, ("cuda",), f"triton {triton.__version__} on {torch.cuda.get_device_name()}")


def load_cuda_extension(verbose: bool = False) -> None:
    """Build (first time, cached by torch) and load the CUDA kernels of ``csrc/cuda``.

    Loading registers ``bissl::<op>`` CUDA kernels through ``TORCH_LIBRARY_IMPL`` in
    ``csrc/cuda/binding.cpp``. Needs a CUDA build of torch, nvcc and the source tree (an editable
    install). Called by the ``cuda`` probe on the first CUDA call; call it yourself to build ahead.

    Raises:
        RuntimeError / OSError / ImportError: from the build; the probe records the message.
    """
    from torch.utils.cpp_extension import load

    cuda_dir = _CSRC / "cuda"
    sources = [*sorted(str(p) for p in cuda_dir.glob("*.cu")), str(cuda_dir / "binding.cpp")]
    if not (cuda_dir / "binding.cpp").exists() or len(sources) < 2:
        raise FileNotFoundError(f"CUDA sources not found under {cuda_dir} (they ship with the source tree only)")
    load(
        name="bissl_cuda",
        sources=sources,
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,  # a plain library: its static registrations are the whole interface
        verbose=verbose,
    )


def _probe_cuda() -> BackendStatus:
    if not torch.cuda.is_available():
        return BackendStatus(
            "cuda",
            False,
            (),
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA runtime {torch.version.cuda or 'none: CPU build'})",
        )
    if os.environ.get("BISSL_CUDA_EXT", "1") == "0":
        return BackendStatus("cuda", False, (), "disabled by BISSL_CUDA_EXT=0")
    if not all(_library.has_device_kernel(op, "CUDA") for op in _library.OP_NAMES):
        try:
            load_cuda_extension()
        except Exception as exc:  # build errors come in many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return BackendStatus(
                "cuda",
                False,
                (),
                f"building/loading csrc/cuda failed ({type(exc).__name__}: {first})",
            )
    missing = [op for op in _library.OP_NAMES if not _library.has_device_kernel(op, "CUDA")]
    if missing:
        return BackendStatus("cuda", False, (), f"the CUDA extension loaded but registers no kernel for {missing}")
    impls = _dispatcher_impls()
    try:
        problem = _smoke_test(impls, torch.device("cuda"))
    except Exception as exc:
        problem = f"smoke test raised {type(exc).__name__}: {exc}"
    if problem:
        return BackendStatus("cuda", False, (), f"csrc/cuda {problem}")
    _IMPLS["cuda"] = impls
    _CUDA_KEY_OWNER[:] = ["cuda"]
    return BackendStatus("cuda", True, ("cuda",), f"csrc/cuda kernels on {torch.cuda.get_device_name()}")


_PROBES: dict[str, Callable[[], BackendStatus]] = {
    "torch": _probe_torch,
    "cpp": _probe_cpp,
    "triton": _probe_triton,
    "cuda": _probe_cuda,
}


def backend_status(name: str) -> BackendStatus:
    """Diagnosis of backend ``name`` (probed once, then cached)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    with _LOCK:
        if name not in _STATUS:
            _STATUS[name] = _PROBES[name]()
        return _STATUS[name]


def _ensure_cuda_dispatch() -> None:
    """Give the CUDA dispatch key one kernel, once: the CUDA extension's, else Triton's."""
    with _LOCK:
        if _CUDA_KEY_OWNER:
            return
        if backend_status("cuda").available:
            return  # the extension registered itself and set the owner
        if backend_status("triton").available and "cuda" in backend_status("triton").devices:
            _library.register_device_kernels("CUDA", _IMPLS["triton"])
            _CUDA_KEY_OWNER[:] = ["triton"]
        else:
            _CUDA_KEY_OWNER[:] = ["torch"]


# ----------------------------------------------------------------------------- choosing


def _requested(backend: str | None) -> tuple[str, str]:
    """(backend name or "auto", where the request came from)."""
    if backend is not None:
        source = f"backend={backend!r}"
        name = backend
    else:
        env = os.environ.get("BISSL_BACKEND", "")
        source = f"BISSL_BACKEND={env!r}"
        name = env or "auto"
        if not env:
            source = "default"
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    name = name.strip().lower()
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {name!r} ({source}); choose one of {('auto', *BACKENDS)}")
    return name, source


def _warn_fallback(device_type: str, chosen: str, skipped: list[BackendStatus]) -> None:
    key = f"{device_type}->{chosen}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    why = "; ".join(f"{s.name}: {s.detail}" for s in skipped)
    warnings.warn(
        f"bissl: fused ops on {device_type} fall back to the '{chosen}' backend ({why})",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Name of the backend that runs on ``device`` for the request ``backend``.

    Args:
        backend: "auto", a name in :data:`BACKENDS`, or None (``BISSL_BACKEND``, else auto).
        device: device of the tensors.

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: a named backend that cannot run on ``device`` here.
    """
    name, source = _requested(backend)
    device_type = torch.device(device).type
    if device_type == "cuda":
        _ensure_cuda_dispatch()
    if name == "auto":
        skipped: list[BackendStatus] = []
        for candidate in AUTO_ORDER.get(device_type, ("torch",)):
            status = backend_status(candidate)
            if status.available and (device_type in status.devices or candidate == "torch"):
                if skipped:
                    _warn_fallback(device_type, candidate, skipped)
                return candidate
            skipped.append(status)
        raise AssertionError("unreachable: the torch backend is always available")  # pragma: no cover
    status = backend_status(name)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} was requested ({source}) but is unavailable: {status.detail}")
    if name != "torch" and device_type not in status.devices:
        raise BackendUnavailableError(
            f"backend {name!r} was requested ({source}) but does not run on {device_type} tensors "
            f"(it runs on: {', '.join(status.devices)}; {status.detail})"
        )
    return name


def _torch_impls() -> dict[str, Callable]:
    def cg_direction(p: Tensor, r: Tensor, beta: Tensor) -> None:
        ref.cg_direction_ref_(p, r, beta)

    return {
        "damped_matvec": ref.damped_matvec_ref,
        "cg_step_": ref.cg_step_ref_,
        "cg_direction_": cg_direction,
        "prox_grad": ref.prox_grad_ref,
        "axpby": ref.axpby_ref,
    }


_IMPLS["torch"] = _torch_impls()

# Op registration at import: loading bissl._C registers the CPU kernels with the dispatcher, so
# torch.ops.bissl.<op> runs them from the start. Failures are recorded by the cpp probe (lazy).
_import_cpu_extension()


def _implementations(name: str) -> dict[str, Callable]:
    """Op name -> callable with the op's schema, for an available backend ``name``."""
    backend_status(name)  # probing fills _IMPLS for available backends
    return _IMPLS[name]


def kernel(op: str, backend: str | None, device: torch.device | str) -> tuple[str, Callable]:
    """``(backend name, callable)`` that runs ``op`` on ``device`` for the request ``backend``."""
    name = resolve_backend(backend, device)
    return name, _implementations(name)[op]


def cg_vector_ops(backend: str | None, device: torch.device | str) -> CGVectorOps:
    """The :class:`CGVectorOps` bundle for ``backend`` on ``device`` (resolved once per call).

    The bundle's functions are the backend's kernels without the public functions' Python-side
    validation (the native and Triton kernels validate their inputs themselves); ``cg_direction_``
    returns ``p`` like the reference.
    """
    name = resolve_backend(backend, device)
    if name == "torch":
        return TORCH_OPS
    impls = _implementations(name)
    direction = impls["cg_direction_"]

    def cg_direction_(p: Tensor, r: Tensor, beta: Tensor) -> Tensor:
        direction(p, r, beta)
        return p

    return CGVectorOps(name, impls["damped_matvec"], impls["cg_step_"], cg_direction_)


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """Backends that can run on ``device`` here (``torch`` always), in :data:`BACKENDS` order."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        _ensure_cuda_dispatch()
    return tuple(
        n
        for n in BACKENDS
        if n == "torch" or (backend_status(n).available and device_type in backend_status(n).devices)
    )


def backend_report() -> str:
    """Human-readable diagnosis of every backend and of ``auto``'s choice (``bissl env`` prints it).

    Probing ``cuda`` on a GPU machine builds the CUDA extension the first time (minutes, cached).
    """
    env = os.environ.get("BISSL_BACKEND") or "unset"
    lines = [f"bissl fused-op backends (torch {torch.__version__}; BISSL_BACKEND={env}):"]
    for name in BACKENDS:
        s = backend_status(name)
        where = ", ".join(s.devices) if s.available else "-"
        lines.append(f"  {name:<7} {'available' if s.available else 'unavailable':<12} {where:<16} {s.detail}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                chosen = resolve_backend(None, dev)
            except (ValueError, BackendUnavailableError) as exc:
                chosen = f"error: {exc}"
        lines.append(f"  {dev} tensors run on: {chosen}")
    return "\n".join(lines)


def _reset_for_tests() -> None:
    """Forget probes and warnings (tests monkeypatch probes/environment, then call this)."""
    with _LOCK:
        _STATUS.clear()
        _WARNED.clear()
        for name in list(_IMPLS):
            if name != "torch":
                del _IMPLS[name]
