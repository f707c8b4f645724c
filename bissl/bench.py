"""``bissl bench``: hypergradient throughput on a model — ours vs the faithful reference loop.

For users who benchmark on their own models. One run builds a bilevel problem (a built-in
backbone, or the user's ``module:factory``), then times, in interleaved rounds (every measured call
once per round, the order reversed every other round, so machine load hits all of them alike):

* one gradient of the lower loss, one HVP per ``--hvp-mode`` and one matvec of the linearise-once
  operator (:func:`bissl.ops.linearize_hvp`), each as a ratio to the gradient;
* the hypergradient, ours (:func:`bissl.hypergrad.implicit_hypergrad`) and the faithful
  re-implementation of the BiSSL authors' loop (:func:`bissl.hypergrad.reference_hypergrad`,
  without its ``1e-12`` denominator guard, ``guard=None``, so that both compute the same math;
  the work is the same), with the speed-up ``median(reference) / median(ours)`` and the largest difference of the
  answers relative to the reference's largest entry;
* the peak memory each hypergradient adds (CUDA: ``max_memory_allocated``; CPU: growth of the
  process's peak resident set, reset through ``/proc/self/clear_refs``);
* the FLOPs of every measured call, counted once by
  :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions, forward
  and backward; exact, the same on every machine): each HVP's FLOPs as a ratio to the gradient's,
  and the **FLOP ratio** reference / ours of the hypergradients — the speed-up that doing less
  work buys if both ran their FLOPs at the same rate. A measured speed-up above it comes from
  faster kernels, one below it from overhead.

It prints a report and writes JSON (machine, versions, load average, every round);
``--compare OLD.json`` prints the change against an earlier run. The same timing helpers serve
``benchmarks/`` (one place for the method).

Example::

    bissl bench --model resnet18 --batch 16 --solver cg --iters 5 --damping 100
    bissl bench --model benchmarks.networks:vit_tiny --solver cg_layerwise --compare old.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bissl.ops.hvp import HVP_MODES, HVPMode, hvp, linearize_hvp
from bissl.solvers import SOLVERS
from bissl.testing import BilevelProblem, module_problem

#: Built-in models of ``--model`` (anything else must be ``module:factory``).
MODELS: tuple[str, ...] = ("resnet18", "small_cnn", "gpt")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Solvers the reference loop computes too (the authors' global and layer-wise CG).
COMPARABLE_SOLVERS = ("cg", "cg_layerwise")
JSON_VERSION = 1


# -- problems ------------------------------------------------------------------------------------


def gpt_problem(
    *,
    batch: int,
    seq: int = 64,
    vocab: int = 256,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> BilevelProblem:
    """Our :class:`bissl.models.GPT` (width 128, 2 blocks): next-token loss through its LM head
    (lower), 2-class cross-entropy of the pooled features through a linear head (upper)."""
    from bissl.models import build_backbone
    from bissl.tasks.pretext.gpt import GPTPretext

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build_backbone("gpt", vocab_size=vocab, max_len=seq).to(dtype=dtype, device=device)
    width = cast(int, net.out_dim)
    pretext = GPTPretext(width, vocab, pad_id=None).to(dtype=dtype, device=device)
    head = nn.Linear(width, 2).to(dtype=dtype, device=device)
    tokens = torch.randint(1, vocab, (batch, seq), generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)

    def lower_loss(params):
        return pretext.loss(lambda t, **kw: functional_call(net, params, (t,), kw), tokens)

    def upper_loss(params):
        return F.cross_entropy(head(functional_call(net, params, (tokens,))), y)

    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    return BilevelProblem(net, params, lower_loss, upper_loss, {"pretext": pretext, "head": head})


def _image_problem(
    backbone: nn.Module, *, batch: int, image: tuple[int, ...], dtype: torch.dtype, device: str, seed: int
) -> BilevelProblem:
    if not hasattr(backbone, "out_dim"):
        raise ValueError(
            f"{type(backbone).__name__} has no 'out_dim': an image backbone must say how "
            "many features it returns (or return a BilevelProblem from the factory)"
        )
    return module_problem(
        backbone, feat=cast(int, backbone.out_dim), batch=batch, image=image, dtype=dtype, seed=seed, device=device
    )


def _call_factory(factory: Callable, **kwargs: Any) -> Any:
    """Call ``factory`` with those of ``kwargs`` its signature takes."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory()
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})


def build_problem(
    model: str,
    *,
    batch: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    image: tuple[int, ...] = (3, 32, 32),
    seq: int = 64,
    vocab: int = 256,
) -> BilevelProblem:
    """The bilevel problem of ``--model``.

    ``"resnet18"`` (small-input stem) and ``"small_cnn"`` (width 32) get SimCLR's NT-Xent over two
    views through a projector and a 10-class head on random ``image``-shaped data
    (:func:`bissl.testing.module_problem`); ``"gpt"`` is :func:`gpt_problem`. ``"module:factory"``
    imports ``module`` (the current directory is searchable) and calls ``factory`` with whichever of
    ``batch``, ``dtype``, ``device``, ``seed`` it accepts; it may return a
    :class:`~bissl.testing.BilevelProblem` (or anything with ``lower_loss``, ``upper_loss`` and
    ``params``), a ``(lower_loss, upper_loss, params)`` triple, or an image backbone module with an
    ``out_dim`` attribute (wrapped like the built-in CNNs).
    """
    from bissl.models import build_backbone

    torch.manual_seed(seed)
    if model == "resnet18":
        net = build_backbone("resnet18", in_channels=image[0], small_input=True)
        return _image_problem(net, batch=batch, image=image, dtype=dtype, device=device, seed=seed)
    if model == "small_cnn":
        net = build_backbone("small_cnn", in_channels=image[0])
        return _image_problem(net, batch=batch, image=image, dtype=dtype, device=device, seed=seed)
    if model == "gpt":
        return gpt_problem(batch=batch, seq=seq, vocab=vocab, dtype=dtype, device=device, seed=seed)
    if ":" not in model:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)} or module:factory")
    module_name, _, attr = model.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--model {model}: cannot load {attr!r} from module {module_name!r} ({err})") from None
    made = _call_factory(factory, batch=batch, dtype=dtype, device=device, seed=seed)
    if isinstance(made, nn.Module):
        return _image_problem(made, batch=batch, image=image, dtype=dtype, device=device, seed=seed)
    if isinstance(made, tuple) and len(made) == 3:
        lower, upper, params = made
        return BilevelProblem(None, dict(params), lower, upper, {})
    if all(hasattr(made, a) for a in ("lower_loss", "upper_loss", "params")):
        return made
    raise ValueError(
        f"--model {model}: the factory returned {type(made).__name__}; expected a "
        "BilevelProblem, a (lower_loss, upper_loss, params) triple or an image backbone"
    )


# -- measuring -----------------------------------------------------------------------------------


def machine_info(device: str | torch.device = "cpu") -> dict:
    """Device, CPU model, cores, threads, library versions, the code's commit and the UTC date,
    stored with every result."""
    from bissl.provenance import collect_provenance, cpu_model

    cpu = cpu_model() or "unknown"
    dev = torch.device(device)
    info = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    provenance = collect_provenance()
    info["commit"], info["date"] = provenance["commit"], provenance["date"]
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    from bissl.ops._backends import resolve_backend

    info["vector_backend"] = resolve_backend(None, dev)
    return info


def load_info() -> dict:
    """1-minute load average and CPU count: timings taken while the load exceeds the cores are
    slowed by other processes (ratios of interleaved rounds much less than absolute times)."""
    return {"loadavg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rounds(
    calls: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    device: str | torch.device = "cpu",
    on_call: Callable[[], None] | None = None,
    first_round: int = 0,
) -> dict[str, list[float]]:
    """Seconds of every call in every round: each round runs each call once, in the dict's order
    on even rounds and reversed on odd ones (load and caches hit all alike). ``first_round``
    numbers the first round (to continue an alternation across calls)."""
    dev = torch.device(device)
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(first_round, first_round + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(dev)
            start = time.perf_counter()
            calls[name]()
            _sync(dev)
            times[name].append(time.perf_counter() - start)
            if on_call is not None:
                on_call()
    return times


def max_rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got − ref| / max|ref|`` of two flat tensors (the benchmarks' equal-result measure)."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300))


def rel_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖got − exact‖ / ‖exact‖`` in float64: a float32 route's error against the float64 answer.

    Two float32 routes to the same exact quantity (e.g. channels-last against standard
    convolutions) can differ from each other by more than either differs from nothing but
    rounding; on an ill-conditioned network (ResNet-18 with BatchNorm on a batch of 16) both sit
    ~0.5% from the float64 answer. Comparing each with float64 says whether one is less accurate.
    """
    exact = exact.double().reshape(-1)
    return float((got.double().reshape(-1) - exact).norm() / exact.norm().clamp_min(1e-300))


def less_accurate(
    errors: dict[str, float], *, reference: str, factor: float = 2.0, floor: float = 0.0
) -> dict[str, float]:
    """The routes of ``errors`` (name -> :func:`rel_error`) less accurate than ``reference``.

    A route fails when its error exceeds ``max(factor · errors[reference], floor)``; the benchmarks
    assert that this is empty (equal result = no route worse than the reference beyond rounding).
    """
    limit = max(factor * errors[reference], floor)
    return {k: e for k, e in errors.items() if e > limit}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def peak_memory_mb(call: Callable[[], Any], device: str | torch.device = "cpu") -> float | None:
    """Peak memory ``call()`` adds on top of what is resident before it, in MiB (None if unknown).

    CUDA: ``max_memory_allocated`` growth. CPU: growth of the peak resident set (``VmHWM``),
    reset to the current size first through ``/proc/self/clear_refs`` (Linux); memory the
    allocator kept from earlier calls is reused, so this is what the call makes the process grow.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        call()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kb("VmRSS")
        call()
        return (_status_kb("VmHWM") - base) / 1024
    except OSError:
        return None


def _addmm_flops(_self: Any, a: Sequence[int], b: Sequence[int], *_: Any, **__: Any) -> int:
    """``self + a @ b`` with ``a``: ``(m, k)``, ``b``: ``(k, n)``: ``2·m·k·n``."""
    return 2 * a[0] * a[1] * b[1]


def _baddbmm_flops(_self: Any, a: Sequence[int], b: Sequence[int], *_: Any, **__: Any) -> int:
    """``self + a @ b`` batched, ``a``: ``(B, m, k)``, ``b``: ``(B, k, n)``: ``2·B·m·k·n``."""
    return 2 * a[0] * a[1] * a[2] * b[2]


def count_flops(call: Callable[[], Any]) -> int | None:
    """FLOPs of one ``call()`` (matrix products and convolutions, forward and backward), counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`; None where counting fails."""
    from torch.utils.flop_counter import FlopCounterMode

    # The counter knows the out-of-place products only; our kernels also accumulate in place
    # (bissl/ops/linear_double_backward.py), and an uncounted product would flatter our FLOP ratio.
    # The formulas receive the arguments' shapes.
    in_place = {torch.ops.aten.addmm_: _addmm_flops, torch.ops.aten.baddbmm_: _baddbmm_flops}
    try:
        with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
            call()
    except (RuntimeError, NotImplementedError, TypeError):  # an op the counter cannot trace
        return None
    return int(counter.get_total_flops())


def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


def _flat(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1)
    parts = x.values() if isinstance(x, dict) else x
    return torch.cat([t.reshape(-1) for t in parts])


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# -- the command ---------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace, *, progress: bool = True) -> dict:
    """Build the problem, time everything (module docstring), return the JSON-ready result."""
    from bissl.hypergrad import implicit_hypergrad, reference_hypergrad, upper_gradient

    # Checked against HVP_MODES just below.
    modes = cast(list[HVPMode], [m.strip() for m in args.hvp_mode.split(",") if m.strip()])
    bad = [m for m in modes if m not in HVP_MODES]
    if not modes or bad:
        raise ValueError(f"--hvp-mode: unknown {bad or modes}; choose from {', '.join(HVP_MODES)}")
    if args.solver not in SOLVERS:
        raise ValueError(f"--solver: unknown {args.solver!r}; choose from {', '.join(sorted(SOLVERS))}")
    if args.rounds < 1 or args.iters < 0 or args.batch < 1:
        raise ValueError("--rounds and --batch must be >= 1 and --iters >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    image = tuple(int(k) for k in args.image.lower().split("x"))
    prob = build_problem(
        args.model,
        batch=args.batch,
        dtype=dtype,
        device=str(device),
        seed=args.seed,
        image=image,
        seq=args.seq,
        vocab=args.vocab,
    )
    params = prob.params
    n_params = sum(p.numel() for p in params.values())
    kw = dict(lam=args.lam, damping=args.damping, iters=args.iters)
    layerwise = args.solver == "cg_layerwise"

    def ours():
        return implicit_hypergrad(
            prob.lower_loss,
            prob.upper_loss,
            params,
            solver=args.solver,
            hvp_mode=modes[0],
            strict=False,
            return_info=True,
            **kw,
        )

    def reference():
        return reference_hypergrad(prob.lower_loss, prob.upper_loss, params, layerwise=layerwise, guard=None, **kw)

    g = torch.Generator().manual_seed(args.seed + 1)
    direction = {k: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for k, p in params.items()}
    lin = linearize_hvp(prob.lower_loss, params, mode="revrev", need_grad=False)
    flat_dir = _flat(direction)
    hvp_calls: dict[str, Callable[[], Any]] = {"gradient": lambda: upper_gradient(prob.lower_loss, params)}
    for mode in modes:
        hvp_calls[f"hvp_{mode}"] = functools.partial(hvp, prob.lower_loss, params, direction, mode=mode)
    hvp_calls["linearized_matvec"] = lambda: lin(flat_dir)
    hyper_calls = {"ours": lambda: ours(), "reference": reference} if not args.skip_reference else {"ours": ours}

    total = len(hvp_calls) * (args.rounds + 1) + len(hyper_calls) * (args.rounds + 2)
    bar = _progress(total, progress)
    step = bar.update if bar is not None else (lambda *_: None)

    load_before = load_info()
    # Warm-up (first-call costs): the HVP calls' FLOP counts run them once; then the equal-result
    # check, and the hypergradients' FLOP counts (the check needs their answers, so they run twice).
    flops: dict[str, int | None] = {}
    for name, call in hvp_calls.items():
        flops[name] = count_flops(call)
        step()
    x_ours, info = ours()
    step()
    rel = None
    if "reference" in hyper_calls:
        x_ref = reference()
        step()
        rel = max_rel_diff(_flat(x_ours), _flat(x_ref))
    flops.update({name: count_flops(call) for name, call in hyper_calls.items()})
    hvp_times = interleaved_rounds(hvp_calls, args.rounds, device=device, on_call=lambda: step())
    hyper_times = interleaved_rounds(hyper_calls, args.rounds, device=device, on_call=lambda: step())
    memory = {}
    for name, call in hyper_calls.items():
        memory[name] = peak_memory_mb(call, device)
        step()
    if bar is not None:
        bar.close()
    load_after = load_info()

    grad_s = _median(hvp_times["gradient"])
    hvp_result = {
        name.removeprefix("hvp_"): {
            "median_s": _median(t),
            "ratio_to_gradient": _median(t) / grad_s,
            "flops": flops[name],
            "flops_ratio_to_gradient": _ratio(flops[name], flops["gradient"]),
            "per_round_s": t,
        }
        for name, t in hvp_times.items()
        if name != "gradient"
    }
    ours_s = _median(hyper_times["ours"])
    hyper = {
        "ours_median_s": ours_s,
        "ours_per_round_s": hyper_times["ours"],
        "hypergradients_per_s": 1.0 / ours_s,
        "ours_flops": flops["ours"],
        "solver_flags": info.summary(),
    }
    if "reference" in hyper_times:
        ref_s = _median(hyper_times["reference"])
        hyper.update(
            {
                "reference_median_s": ref_s,
                "reference_per_round_s": hyper_times["reference"],
                "speedup": ref_s / ours_s,
                "speedup_per_round": [r / o for o, r in zip(hyper_times["ours"], hyper_times["reference"])],
                "reference_flops": flops["reference"],
                "flop_ratio": _ratio(flops["reference"], flops["ours"]),
                "max_rel_diff": rel,
                "same_method": args.solver in COMPARABLE_SOLVERS,
            }
        )
    return {
        "bissl_bench": JSON_VERSION,
        "config": {
            "model": args.model,
            "batch": args.batch,
            "solver": args.solver,
            "iters": args.iters,
            "hvp_modes": modes,
            "dtype": args.dtype,
            "device": str(device),
            "lam": args.lam,
            "damping": args.damping,
            "rounds": args.rounds,
            "seed": args.seed,
            "params": n_params,
            "image": list(image) if args.model != "gpt" else None,
        },
        "machine": machine_info(device),
        "load_before": load_before,
        "load_after": load_after,
        "gradient_median_s": grad_s,
        "gradient_per_round_s": hvp_times["gradient"],
        "gradient_flops": flops["gradient"],
        "hvp": hvp_result,
        "hypergradient": hyper,
        "peak_memory_mb": memory,
    }


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="bissl bench", unit="call", file=sys.stderr, leave=False)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def format_report(result: dict) -> str:
    """The human-readable summary of one :func:`run_bench` result."""
    c, m, h = result["config"], result["machine"], result["hypergradient"]
    lines = [
        f"bissl bench: {c['model']} ({c['params']:,} parameters), batch {c['batch']}, {c['dtype']} on "
        f"{m['device']} ({m['threads']} threads), solver {c['solver']}, {c['iters']} iterations, "
        f"λ {c['lam']:g}, damping {c['damping']:g}, {c['rounds']} interleaved rounds",
        f"  gradient                {_ms(result['gradient_median_s'])}",
    ]
    for mode, r in result["hvp"].items():
        flops = r.get("flops_ratio_to_gradient")
        flop_note = "" if flops is None else f", {flops:.2f}x its FLOPs"
        lines.append(
            f"  {('hvp ' + mode) if mode != 'linearized_matvec' else 'linearized matvec':<23} "
            f"{_ms(r['median_s'])}  ({r['ratio_to_gradient']:.2f}x the gradient's time{flop_note})"
        )
    lines.append(f"  hypergradient, ours     {_ms(h['ours_median_s'])}  ({h['hypergradients_per_s']:.2f}/s)")
    if "reference_median_s" in h:
        note = "" if h["same_method"] else " (the reference runs CG: a different method)"
        lines.append(f"  hypergradient, reference {_ms(h['reference_median_s'])}")
        lines.append(
            f"  speed-up                {h['speedup']:.2f}x  (rounds {min(h['speedup_per_round']):.2f}–"
            f"{max(h['speedup_per_round']):.2f}), max rel. difference {h['max_rel_diff']:.1e}{note}"
        )
        if h.get("flop_ratio") is not None:
            lines.append(
                f"  FLOP ratio              {h['flop_ratio']:.2f}x  (reference / ours FLOPs: the speed-up "
                "of less work alone, at equal FLOP rates)"
            )
    flags = h["solver_flags"]
    if flags.get("indefinite") or flags.get("nonfinite"):
        lines.append(
            f"  WARNING: our solve reports {'an indefinite system' if flags.get('indefinite') else 'NaN/Inf'} "
            f"(smallest Ritz value {flags.get('ritz_min')}): the answers are not comparable; "
            "raise --damping until the system is positive definite"
        )
    mem = result["peak_memory_mb"]
    lines.append(
        "  peak memory added       "
        + ", ".join(f"{k} {'n/a' if v is None else f'{v:.0f} MiB'}" for k, v in mem.items())
    )
    lines.append(
        f"  load average            {result['load_before']['loadavg_1m']:.2f} -> "
        f"{result['load_after']['loadavg_1m']:.2f} on {result['load_after']['cpu_count']} CPUs"
    )
    return "\n".join(lines)


def _metrics(result: dict) -> dict[str, float]:
    out = {"gradient_s": result["gradient_median_s"]}
    for mode, r in result["hvp"].items():
        out[f"{mode}_over_gradient"] = r["ratio_to_gradient"]
    h = result["hypergradient"]
    out["ours_s"] = h["ours_median_s"]
    for key, name in (("reference_median_s", "reference_s"), ("speedup", "speedup"), ("flop_ratio", "flop_ratio")):
        if h.get(key) is not None:
            out[name] = h[key]
    for k, v in result["peak_memory_mb"].items():
        if v is not None:
            out[f"peak_{k}_mb"] = v
    return out


def format_comparison(old: dict, new: dict) -> str:
    """Old vs new value and change of every metric both results have."""
    a, b = _metrics(old), _metrics(new)
    lines = [
        f"compared with {old['config']['model']} / {old['config']['solver']} "
        f"(torch {old['machine'].get('torch')}, load {old['load_before']['loadavg_1m']:.2f}):",
        f"  {'metric':28s} {'old':>12s} {'new':>12s} {'change':>9s}",
    ]
    for key in [k for k in b if k in a]:
        change = (b[key] / a[key] - 1.0) * 100 if a[key] else math.nan
        lines.append(f"  {key:28s} {a[key]:12.4g} {b[key]:12.4g} {change:+8.1f}%")
    if old["config"] != new["config"]:
        diff = {k: (old["config"].get(k), v) for k, v in new["config"].items() if old["config"].get(k) != v}
        lines.append(f"  (configurations differ: {diff})")
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    """``bissl bench``: run, print, write JSON, optionally compare; returns the exit status."""
    old = None
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
            _metrics(old)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"--compare {args.compare}: not a bissl bench result ({err})", file=sys.stderr)
            return 2
    try:
        result = run_bench(args, progress=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    if old is not None:
        print(format_comparison(old, result))
    return 0
