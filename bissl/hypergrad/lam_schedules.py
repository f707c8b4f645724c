"""Lower-level regularisation scale λ over training (``bissl.lam_schedule``).

BiSSL's lower problem is ``min_θ L_P(θ) + (λ/2)‖θ − φ‖²``. With a constant λ the proximal pull
is negligible while θ ≈ φ and may dominate once θ has drifted, or the reverse; an adaptive λ
keeps the balance. Whatever λ the lower steps use, the upper step's implicit gradient must use
the same value (the IFT is taken at the current lower problem), so the trainer reads one λ from
its schedule and hands it to both.

Interface (what a user plugs in with ``bissl.lam_schedule: "package.module:factory"``)::

    factory(base_lam: float, **lam_options) -> schedule
    schedule.value -> float | tuple[float, ...] # λ for the next lower/upper step (one, or one
                                                # per backbone parameter tensor, in θ's order)
    schedule.observe(stats: LowerStepStats)     # called after every lower step
    schedule.state_dict() / load_state_dict(d)  # checkpointed with the run

Built-in rules:

* ``constant`` — λ = ``lam`` (the paper).
* ``grad_ratio`` — keep the proximal gradient at a fixed fraction of the pretext gradient:
  target ``λ* = ratio · ‖∇_θ L_P‖ / ‖θ − φ‖``, smoothed by an exponential moving average and
  clipped to ``[min, max]``. ``ratio`` 1 means the pull and the pretext gradient have equal norm.
* ``distance`` — stiffen the pull as θ drifts: ``λ = lam · max(1, d / target)^power`` with the
  relative distance ``d = ‖θ − φ‖ / ‖φ‖``, clipped to ``max``.
* ``grad_ratio_per_tensor`` — ``grad_ratio`` for each backbone parameter tensor separately
  (``λ_i`` from ``‖∇_{θ_i} L_P‖ / ‖θ_i − φ_i‖``): one λ per tensor, the form the reference code
  accepts (a tuple of λ). The lower step pulls each tensor with its own ``λ_i`` and the upper step
  solves the IFT system with ``Λ = diag(λ_i)`` (:mod:`bissl.hypergrad.implicit`).

The thesis behind BiSSL reports that adaptive scaling gave no consistent gain; the rules exist so
that users can ask the question on their own task (``bissl sweep``), not as a recommended default.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "LAM_SCHEDULES",
    "ConstantLam",
    "DistanceLam",
    "GradRatioLam",
    "GradRatioPerTensorLam",
    "LamSchedule",
    "LowerStepStats",
    "build_lam_schedule",
]


@dataclass(frozen=True)
class LowerStepStats:
    """What one lower step measured (backbone parameters only; floats on the host).

    Attributes:
        step: 0-based index of the lower step over the whole BiSSL stage.
        pretext_grad_norm: ``‖∇_θ L_P(θ)‖`` (before the proximal term and clipping).
        distance: ``‖θ − φ‖`` before the step.
        phi_norm: ``‖φ‖``.
        grad_norms, distances: the same two per backbone parameter tensor, in θ's order.
    """

    step: int
    pretext_grad_norm: float
    distance: float
    phi_norm: float
    grad_norms: tuple[float, ...] = ()
    distances: tuple[float, ...] = ()


class LamSchedule(Protocol):
    """A λ schedule: ``value`` now, ``observe`` after each lower step, and its checkpoint state."""

    @property
    def value(self) -> float | tuple[float, ...]: ...

    def observe(self, stats: LowerStepStats) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Scalar:
    """Shared state handling: the schedule's only state is the current λ."""

    def __init__(self, lam: float) -> None:
        self._lam = float(lam)

    @property
    def value(self) -> float:
        return self._lam

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self._lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lam = float(state["lam"])


class ConstantLam(_Scalar):
    """λ fixed at ``lam`` (the paper's setting)."""

    def __init__(self, lam: float) -> None:
        super().__init__(lam)

    def observe(self, stats: LowerStepStats) -> None:
        pass


class GradRatioLam(_Scalar):
    """λ tracks ``ratio · ‖∇L_P‖ / ‖θ − φ‖`` (EMA ``ema``, clipped to ``[min, max]``).

    Args:
        lam: initial λ (and the centre of the default clip range).
        ratio: wanted ``λ‖θ − φ‖ / ‖∇L_P‖``.
        ema: weight of the previous λ in the moving average (0: jump to the target).
        min, max: clip range (default ``lam/100`` and ``lam·100``).
    """

    def __init__(
        self, lam: float, ratio: float = 1.0, ema: float = 0.9, min: float | None = None, max: float | None = None
    ) -> None:
        super().__init__(lam)
        lo = lam / 100.0 if min is None else float(min)
        hi = lam * 100.0 if max is None else float(max)
        if not ratio > 0:
            raise ValueError(f"grad_ratio: ratio must be > 0, got {ratio}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"grad_ratio: ema must be in [0, 1), got {ema}")
        if not 0 < lo <= hi:
            raise ValueError(f"grad_ratio: need 0 < min <= max, got min={lo}, max={hi}")
        self.ratio, self.ema, self.lo, self.hi = float(ratio), float(ema), lo, hi

    def observe(self, stats: LowerStepStats) -> None:
        # θ = φ (start of the stage, or a zero pretext gradient) defines no ratio: keep λ.
        if not (stats.distance > 0 and math.isfinite(stats.pretext_grad_norm)):
            return
        target = self.ratio * stats.pretext_grad_norm / stats.distance
        target = min(self.hi, max(self.lo, target))
        self._lam = self.ema * self._lam + (1.0 - self.ema) * target


class DistanceLam(_Scalar):
    """``λ = lam · max(1, (‖θ−φ‖/‖φ‖) / target)^power``, at most ``max``.

    Args:
        lam: λ while θ stays within ``target`` relative distance of φ.
        target: relative distance where the pull starts to stiffen.
        power: growth exponent beyond ``target``.
        max: cap (default ``lam·100``).
    """

    def __init__(self, lam: float, target: float = 0.01, power: float = 1.0, max: float | None = None) -> None:
        super().__init__(lam)
        if not target > 0:
            raise ValueError(f"distance: target must be > 0, got {target}")
        if not power > 0:
            raise ValueError(f"distance: power must be > 0, got {power}")
        self.base, self.target, self.power = float(lam), float(target), float(power)
        self.hi = lam * 100.0 if max is None else float(max)
        if self.hi < lam:
            raise ValueError(f"distance: max must be >= lam, got max={self.hi}, lam={lam}")

    def observe(self, stats: LowerStepStats) -> None:
        if not stats.phi_norm > 0:
            return
        rel = stats.distance / stats.phi_norm
        self._lam = min(self.hi, self.base * max(1.0, rel / self.target) ** self.power)


class GradRatioPerTensorLam:
    """λ_i tracks ``ratio · ‖∇_{θ_i} L_P‖ / ‖θ_i − φ_i‖`` per backbone tensor (EMA ``ema``, clipped
    to ``[min, max]``).

    Every λ_i starts at ``lam``: ``value`` is the float ``lam`` until the first lower step has
    been observed, then a tuple with one λ per tensor. A tensor with ``θ_i = φ_i`` (or a
    non-finite gradient) keeps its λ_i.

    Args:
        lam: initial λ of every tensor (and the centre of the default clip range).
        ratio: wanted ``λ_i‖θ_i − φ_i‖ / ‖∇_{θ_i} L_P‖``.
        ema: weight of the previous λ_i in the moving average (0: jump to the target).
        min, max: clip range (default ``lam/100`` and ``lam·100``).
    """

    def __init__(
        self, lam: float, ratio: float = 1.0, ema: float = 0.9, min: float | None = None, max: float | None = None
    ) -> None:
        # The scalar rule validates the shared options and holds them.
        self._rule = GradRatioLam(lam, ratio=ratio, ema=ema, min=min, max=max)
        self._lam0 = float(lam)
        self._lams: list[float] = []

    @property
    def value(self) -> float | tuple[float, ...]:
        return tuple(self._lams) if self._lams else self._lam0

    def observe(self, stats: LowerStepStats) -> None:
        if len(stats.grad_norms) != len(stats.distances) or not stats.grad_norms:
            raise ValueError("grad_ratio_per_tensor: the lower step reported no per-tensor statistics")
        if not self._lams:
            self._lams = [self._lam0] * len(stats.grad_norms)
        if len(self._lams) != len(stats.grad_norms):
            raise ValueError(
                f"grad_ratio_per_tensor: {len(stats.grad_norms)} tensors observed, {len(self._lams)} before"
            )
        r = self._rule
        for i, (g, d) in enumerate(zip(stats.grad_norms, stats.distances)):
            if d > 0 and math.isfinite(g):
                target = min(r.hi, max(r.lo, r.ratio * g / d))
                self._lams[i] = r.ema * self._lams[i] + (1.0 - r.ema) * target

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self._lam0, "lams": list(self._lams)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lam0, self._lams = float(state["lam"]), [float(x) for x in state["lams"]]


#: Built-in schedules by config name.
LAM_SCHEDULES: dict[str, Callable[..., LamSchedule]] = {
    "constant": ConstantLam,
    "grad_ratio": GradRatioLam,
    "distance": DistanceLam,
    "grad_ratio_per_tensor": GradRatioPerTensorLam,
}


def _import_factory(spec: str) -> Callable[..., LamSchedule]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"lam_schedule {spec!r}: use one of {sorted(LAM_SCHEDULES)} or 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"lam_schedule {spec!r}: cannot import {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"lam_schedule {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def build_lam_schedule(name: str, lam: float, options: dict[str, Any] | None = None) -> LamSchedule:
    """The schedule ``name`` (built-in or ``"package.module:factory"``) starting at ``lam``.

    Raises:
        ValueError: unknown name, an option the schedule does not take, a bad option value, or a
            custom factory whose result lacks the :class:`LamSchedule` methods.
    """
    options = dict(options or {})
    factory = LAM_SCHEDULES.get(name) or _import_factory(name)
    try:
        schedule = factory(lam, **options)
    except TypeError as err:
        raise ValueError(f"lam_schedule {name!r}: bad options {sorted(options)} ({err})") from None
    missing = [m for m in ("value", "observe", "state_dict", "load_state_dict") if not hasattr(schedule, m)]
    if missing:
        raise ValueError(f"lam_schedule {name!r}: the schedule lacks {', '.join(missing)}")
    if not (isinstance(schedule.value, float) and schedule.value > 0):
        raise ValueError(f"lam_schedule {name!r}: initial value must be a float > 0, got {schedule.value!r}")
    return schedule
