"""CG vector updates: fused kernels vs torch, as achieved memory bandwidth.

Groups (one per size P of float32 vectors):

* ``cg_update-P``: one CG iteration's vector work after the matvec, ``x += αp; r −= αAp;
  rᵀr; p = r + βp``, per provider:

  - ``torch_loop``: a Python loop over the tensors of a ResNet-18-shaped parameter list (the
    reference BiSSL code's style; 62 tensors with ResNet-18's relative sizes, scaled to P);
  - ``torch_foreach``: the same list with ``torch._foreach_*`` (one call per op for all tensors);
  - ``torch_flat``: the torch reference on flat buffers (:mod:`bissl.ops.reference`), which
    allocates two P-sized temporaries (``α·p``, ``α·Ap``) per update;
  - ``torch_flat_prealloc``: the same with one preallocated temporary (``torch.mul(..., out=)``):
    the best unfused flat torch, separating the kernel's fusion from the allocations it avoids
    (on this VM a fresh P-sized tensor costs first-touch page faults: about 80 ms at P = 2.5e7);
  - ``cpp``: the fused C++ kernels (``cg_step_`` + ``cg_direction_``), through the same
    :func:`~bissl.ops._backends.cg_vector_ops` bundle that ``cg_solve`` uses;
  - ``triton``: only on a GPU — under ``TRITON_INTERPRET=1`` on a CPU it is a NumPy interpreter
    whose timings mean nothing, so it is skipped there.

  Bytes counted = what an ideal fused update must move: 7 passes over P elements (reads x, r, p,
  Ap; writes x, r, p). Our kernels make 9 (``p``/``r`` are read again by the direction update,
  which needs the completed ``rᵀr`` first), so 7/9 of the copy rate is the most a two-pass
  update can show against a copy that moves exactly its counted bytes.
* ``damped_matvec-P``: ``Av = scale·Hv + shift·v`` and ``vᵀAv`` (3 passes counted).
* ``copy-P``: ``dst.copy_(src)`` (2 passes counted) and ``src.clone()`` in the same run; the
  faster is the copy bandwidth every fraction refers to.
* ``cg_resnet18``: a whole 5-iteration ``cg_solve`` with a real HVP (the linearize-once
  ``revrev`` matvec of :func:`bissl.ops.linearize_hvp`) on the ResNet-18 benchmark problem of
  :func:`bissl.testing.named_problem`; reports the fraction of the solve spent outside the HVPs.

Run: ``pytest benchmarks/bench_cg_step.py --benchmark-only
--benchmark-json=benchmarks/results/cpu-cg_step.json``; a summary with every ratio measured in
the run is printed and written to ``benchmarks/results/cpu-cg_step-summary.json``.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import RESULTS, machine, record_bandwidth, vector_bytes

from bissl.ops import _backends
from bissl.ops.reference import cg_direction_ref_, cg_step_ref_, damped_matvec_ref

SIZES = [100_000, 1_000_000, 10_000_000, 25_000_000]
UPDATE_PROVIDERS = [
    "torch_loop",
    "torch_foreach",
    "torch_flat",
    "torch_flat_prealloc",
    "cpp",
    "triton",
]
MATVEC_PROVIDERS = ["torch_flat", "cpp", "triton"]
DTYPE = torch.float32
UPDATE_PASSES, MATVEC_PASSES, COPY_PASSES = 7, 3, 2

_states: dict[int, dict] = {}
_summary: dict[str, dict] = {}


def _resnet18_numels() -> list[int]:
    from bissl.models import build_backbone

    net = build_backbone("resnet18", in_channels=3, small_input=True)
    return [p.numel() for p in net.parameters()] + [512 * 10, 10]  # + a 10-class linear head


def _split(total: int) -> list[int]:
    """Sizes of a ResNet-18-shaped tensor list scaled to ``total`` elements (every tensor >= 1)."""
    shape = _resnet18_numels()
    scale = total / sum(shape)
    sizes = [max(1, round(n * scale)) for n in shape]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)
    return sizes


def _state(n: int) -> dict:
    if n not in _states:
        g = torch.Generator().manual_seed(n)
        flat = {k: torch.randn(n, generator=g, dtype=DTYPE) for k in ("x", "r", "p", "ap", "hv")}
        sizes = _split(n)
        lists = {k: list(torch.split(v, sizes)) for k, v in flat.items()}
        _states.clear()  # one size resident at a time (2.5e7 floats are 100 MB per vector)
        _states[n] = {
            "flat": flat,
            "lists": lists,
            "n_tensors": len(sizes),
            "alpha": torch.tensor(1e-3, dtype=DTYPE),
            "beta": torch.tensor(0.5, dtype=DTYPE),
            "copy_dst": torch.empty(n, dtype=DTYPE),
        }
    return _states[n]


def _rounds(n: int, passes: int) -> int:
    # About a second per benchmark at ~10 GB/s; never fewer than 10 samples for the median.
    est = vector_bytes(n, DTYPE, passes) / 10e9
    return int(min(300, max(10, 1.0 / est)))


def _skip_unavailable(provider: str) -> None:
    if provider == "triton":
        # These benchmarks time CPU tensors; Triton reaches a CPU only through its interpreter.
        pytest.skip(
            "triton on CPU runs only in the TRITON_INTERPRET=1 NumPy interpreter, "
            "whose timings are "
            "meaningless; benchmark it on a GPU"
        )
    if provider == "cpp":
        status = _backends.backend_status(provider)
        if not status.available:
            pytest.skip(f"{provider} unavailable: {status.detail}")


def _update_fn(provider: str, st: dict):
    alpha, beta = st["alpha"], st["beta"]
    if provider == "torch_loop":
        xs, rs, ps, aps = (st["lists"][k] for k in ("x", "r", "p", "ap"))

        def step():
            rr = torch.zeros((), dtype=DTYPE)
            for x, r, p, ap in zip(xs, rs, ps, aps):
                x.add_(alpha * p)
                r.sub_(alpha * ap)
                rr += torch.dot(r, r)
            for p, r in zip(ps, rs):
                p.mul_(beta).add_(r)
            return rr

        return step
    if provider == "torch_foreach":
        xs, rs, ps, aps = (st["lists"][k] for k in ("x", "r", "p", "ap"))

        def step():
            torch._foreach_add_(xs, torch._foreach_mul(ps, alpha))
            torch._foreach_sub_(rs, torch._foreach_mul(aps, alpha))
            rr = torch.stack(torch._foreach_norm(rs)).square().sum()
            torch._foreach_mul_(ps, beta)
            torch._foreach_add_(ps, rs)
            return rr

        return step
    x, r, p, ap = (st["flat"][k] for k in ("x", "r", "p", "ap"))
    if provider == "torch_flat_prealloc":
        tmp = torch.empty_like(x)

        def step():
            x.add_(torch.mul(p, alpha, out=tmp))
            r.sub_(torch.mul(ap, alpha, out=tmp))
            rr = torch.dot(r, r)
            p.mul_(beta).add_(r)
            return rr

        return step
    ops = _backends.cg_vector_ops("torch" if provider == "torch_flat" else provider, "cpu")

    def step():
        rr = ops.cg_step_(x, r, p, ap, alpha)
        ops.cg_direction_(p, r, beta)
        return rr

    return step


def _entry(benchmark, median: float, passes: int, n: int) -> dict:
    """Summary row: median and min time, counted GB/s from each (min is robust to other load)."""
    tmin = float(benchmark.stats.stats.min)
    moved = vector_bytes(n, DTYPE, passes)
    return {
        "ms": median * 1e3,
        "gbs": moved / median / 1e9,
        "ms_min": tmin * 1e3,
        "gbs_from_min": moved / tmin / 1e9,
        "loadavg_1min": os.getloadavg()[0],
    }


def _check_update(provider: str, st: dict) -> dict:
    """One update from a copy of the state vs the flat torch reference in float64."""
    saved = {k: v.clone() for k, v in st["flat"].items()}
    rr = _update_fn(provider, st)()
    got = {k: st["flat"][k].clone() for k in ("x", "r", "p")}
    for k, v in saved.items():
        st["flat"][k].copy_(v)
    x, r, p, ap = (saved[k].double() for k in ("x", "r", "p", "ap"))
    rr_ref = cg_step_ref_(x, r, p, ap, st["alpha"].double())
    cg_direction_ref_(p, r, st["beta"].double())
    err = max(float((got[k].double() - v).abs().max()) for k, v in (("x", x), ("r", r), ("p", p)))
    return {
        "max_abs_err_vs_float64": err,
        "rr_rel_err_vs_float64": float(abs(rr.double() - rr_ref) / rr_ref),
    }


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
def test_copy_bandwidth(benchmark, medians, n):
    st = _state(n)
    src, dst = st["flat"]["x"], st["copy_dst"]
    benchmark.group = f"copy-{n:.0e}"
    benchmark.pedantic(lambda: dst.copy_(src), rounds=_rounds(n, COPY_PASSES), warmup_rounds=2, iterations=1)
    copy_gbs = record_bandwidth(benchmark, vector_bytes(n, DTYPE, COPY_PASSES))
    copy_gbs_min = vector_bytes(n, DTYPE, COPY_PASSES) / float(benchmark.stats.stats.min) / 1e9
    clone_times = []
    for _ in range(_rounds(n, COPY_PASSES)):
        t0 = time.perf_counter()
        src.clone()
        clone_times.append(time.perf_counter() - t0)
    clone_gbs = vector_bytes(n, DTYPE, COPY_PASSES) / sorted(clone_times)[len(clone_times) // 2] / 1e9
    clone_gbs_min = vector_bytes(n, DTYPE, COPY_PASSES) / min(clone_times) / 1e9
    benchmark.extra_info.update({"clone_gbs": clone_gbs, "loadavg_1min": os.getloadavg()[0], **machine()})
    medians.record("cg_step", f"copy/{n}", benchmark)
    row = _summary.setdefault(str(n), {})
    row.update(
        {
            "copy_gbs": max(copy_gbs, clone_gbs),
            "copy_gbs_from_min": max(copy_gbs_min, clone_gbs_min),
            "copy_into_gbs": copy_gbs,
            "clone_gbs": clone_gbs,
        }
    )


@pytest.mark.parametrize("provider", UPDATE_PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
def test_cg_update(benchmark, medians, n, provider):
    _skip_unavailable(provider)
    st = _state(n)
    benchmark.group = f"cg_update-{n:.0e}"
    fn = _update_fn(provider, st)
    benchmark.pedantic(fn, rounds=_rounds(n, UPDATE_PASSES), warmup_rounds=2, iterations=1)
    copy_gbs = _summary.get(str(n), {}).get("copy_gbs")
    record_bandwidth(benchmark, vector_bytes(n, DTYPE, UPDATE_PASSES), copy_gbs)
    benchmark.extra_info.update(
        {"provider": provider, "n": n, "n_tensors": st["n_tensors"], **_check_update(provider, st)}
    )
    median = medians.record("cg_step", f"cg_update/{n}/{provider}", benchmark)
    _summary.setdefault(str(n), {})[f"cg_update/{provider}"] = _entry(benchmark, median, UPDATE_PASSES, n)


@pytest.mark.parametrize("provider", MATVEC_PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
def test_damped_matvec(benchmark, medians, n, provider):
    _skip_unavailable(provider)
    st = _state(n)
    hv, v = st["flat"]["hv"], st["flat"]["p"]
    ops = _backends.cg_vector_ops("torch" if provider == "torch_flat" else provider, "cpu")
    benchmark.group = f"damped_matvec-{n:.0e}"
    benchmark.pedantic(
        lambda: ops.damped_matvec(hv, v, 0.1, 1.0),
        rounds=_rounds(n, MATVEC_PASSES),
        warmup_rounds=2,
        iterations=1,
    )
    copy_gbs = _summary.get(str(n), {}).get("copy_gbs")
    record_bandwidth(benchmark, vector_bytes(n, DTYPE, MATVEC_PASSES), copy_gbs)
    av, vav = ops.damped_matvec(hv, v, 0.1, 1.0)
    av_ref, vav_ref = damped_matvec_ref(hv.double(), v.double(), 0.1, 1.0)
    benchmark.extra_info.update(
        {
            "provider": provider,
            "n": n,
            "max_abs_err_vs_float64": float((av.double() - av_ref).abs().max()),
            "vav_rel_err_vs_float64": float(abs(vav.double() - vav_ref) / vav_ref.abs()),
        }
    )
    median = medians.record("cg_step", f"damped_matvec/{n}/{provider}", benchmark)
    _summary.setdefault(str(n), {})[f"damped_matvec/{provider}"] = _entry(benchmark, median, MATVEC_PASSES, n)


PASSES = {
    "copy": COPY_PASSES,
    "clone": COPY_PASSES,
    "matvec_torch_flat": MATVEC_PASSES,
    "matvec_cpp": MATVEC_PASSES,
}


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
def test_interleaved_ratios(benchmark, n):
    """All providers round-robin in one loop: the ratios least disturbed by other load.

    On a shared machine, contention changes between the separate benchmarks above; here every
    round times each provider once, in a fresh random order, so all of them sample the same
    conditions. The minimum over rounds estimates the undisturbed time; medians are kept too.
    """
    st = _state(n)
    cpp_ok = _backends.backend_status("cpp").available
    hv, v, src, dst = st["flat"]["hv"], st["flat"]["p"], st["flat"]["x"], st["copy_dst"]
    fns = {"copy": lambda: dst.copy_(src), "clone": lambda: src.clone()}
    for name in ("torch_loop", "torch_foreach", "torch_flat", "torch_flat_prealloc", "cpp"):
        if name != "cpp" or cpp_ok:
            fns[name] = _update_fn(name, st)
    for backend, label in (("torch", "matvec_torch_flat"), ("cpp", "matvec_cpp")):
        if backend != "cpp" or cpp_ok:
            bundle = _backends.cg_vector_ops(backend, "cpu")
            fns[label] = lambda bundle=bundle: bundle.damped_matvec(hv, v, 0.1, 1.0)
    rounds = int(min(200, max(15, 3e8 / n)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = torch.Generator().manual_seed(0)

    def run():
        for name in order:  # warm-up
            fns[name]()
        for _ in range(rounds):
            for i in torch.randperm(len(order), generator=rng).tolist():
                name = order[i]
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)

    benchmark.group = f"interleaved-{n:.0e}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    table = {}
    for name, ts in times.items():
        ts = sorted(ts)
        moved = vector_bytes(n, DTYPE, PASSES.get(name, UPDATE_PASSES))
        table[name] = {
            "ms_min": ts[0] * 1e3,
            "ms_median": ts[len(ts) // 2] * 1e3,
            "gbs_from_min": moved / ts[0] / 1e9,
        }
    copy_gbs = max(table["copy"]["gbs_from_min"], table["clone"]["gbs_from_min"])
    for row in table.values():
        row["fraction_of_copy"] = row["gbs_from_min"] / copy_gbs
    ratios = {}
    if "cpp" in table:
        for base in ("torch_loop", "torch_foreach", "torch_flat", "torch_flat_prealloc"):
            ratios[f"cg_update_cpp_vs_{base}"] = table[base]["ms_min"] / table["cpp"]["ms_min"]
            ratios[f"cg_update_cpp_vs_{base}_median"] = table[base]["ms_median"] / table["cpp"]["ms_median"]
        ratios["damped_matvec_cpp_vs_torch_flat"] = table["matvec_torch_flat"]["ms_min"] / table["matvec_cpp"]["ms_min"]
    info = {
        "n": n,
        "rounds": rounds,
        "copy_gbs": copy_gbs,
        "providers": table,
        "ratios": ratios,
        "loadavg_1min": os.getloadavg()[0],
    }
    benchmark.extra_info.update({**info, **machine()})
    _summary.setdefault("interleaved", {})[str(n)] = info


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cg_resnet18_time_outside_hvps(benchmark, medians, backend):
    """Whole 5-iteration CG with the real linearize-once HVP on ResNet-18 (11 M parameters)."""
    _skip_unavailable(backend)
    from bissl.ops import linearize_hvp
    from bissl.solvers import cg_solve
    from bissl.testing import named_problem

    _states.clear()
    prob = named_problem("resnet18", batch=16)
    lin = linearize_hvp(prob.lower_loss, prob.params)
    b = torch.randn(lin.spec.numel, generator=torch.Generator().manual_seed(0))
    hvp_seconds: list[float] = []

    def timed_matvec(v):
        t0 = time.perf_counter()
        out = lin.matvec(v)
        hvp_seconds.append(time.perf_counter() - t0)
        return out

    def solve():
        hvp_seconds.clear()
        t0 = time.perf_counter()
        res = cg_solve(timed_matvec, b, iters=5, scale=1 / 10.001, damping=1.0, backend=backend)
        total = time.perf_counter() - t0
        outside.append((total - sum(hvp_seconds)) / total)
        return res

    outside: list[float] = []
    benchmark.group = "cg_resnet18"
    benchmark.pedantic(solve, rounds=3, warmup_rounds=1, iterations=1)
    median = medians.record("cg_step", f"cg_resnet18/{backend}", benchmark)
    frac = sorted(outside[1:])[len(outside[1:]) // 2]  # rounds only, not the warm-up
    benchmark.extra_info.update(
        {
            "backend": backend,
            "params": lin.spec.numel,
            "batch": 16,
            "image": "3x32x32",
            "fraction_outside_hvps": frac,
        }
    )
    _summary.setdefault("cg_resnet18", {})[backend] = {
        "params": lin.spec.numel,
        "solve_ms": median * 1e3,
        "fraction_outside_hvps": frac,
    }


@pytest.fixture(scope="module", autouse=True)
def _write_summary():
    yield
    if not _summary:
        return
    for key, row in _summary.items():
        if key in ("cg_resnet18", "interleaved") or "copy_gbs" not in row:
            continue
        for entry in list(row.values()):
            if isinstance(entry, dict):
                entry["fraction_of_copy"] = entry["gbs"] / row["copy_gbs"]
                entry["fraction_of_copy_from_min"] = entry["gbs_from_min"] / row["copy_gbs_from_min"]
        for op, bases in (
            ("cg_update", ("torch_loop", "torch_foreach", "torch_flat", "torch_flat_prealloc")),
            ("damped_matvec", ("torch_flat",)),
        ):
            cpp = row.get(f"{op}/cpp")
            for base in bases:
                ref = row.get(f"{op}/{base}")
                if ref and cpp:
                    row[f"{op}/speedup_cpp_vs_{base}"] = ref["ms"] / cpp["ms"]
                    row[f"{op}/speedup_cpp_vs_{base}_from_min"] = ref["ms_min"] / cpp["ms_min"]
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": machine(),
        "dtype": str(DTYPE),
        "counted_passes": {
            "cg_update": UPDATE_PASSES,
            "damped_matvec": MATVEC_PASSES,
            "copy": COPY_PASSES,
        },
        "sizes": _summary,
    }
    (RESULTS / "cpu-cg_step-summary.json").write_text(json.dumps(out, indent=2))
    print("\n" + json.dumps(out["sizes"], indent=1))
