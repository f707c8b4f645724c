"""Paired statistics for comparing two arms of an experiment over the same seeds.

Every comparison in this project is *paired*: the arms (baseline, compute-matched baseline, BiSSL)
of one seed share the pretext checkpoint, the head initialisation and the data order, so the unit
of analysis is the per-seed difference ``d_s = a_s − b_s`` (e.g. BiSSL − baseline test accuracy).
This module turns ``n`` such pairs into:

* the paired mean difference and the sample standard deviation of ``d`` (ddof 1);
* a 95% percentile bootstrap interval of the mean difference (:func:`bootstrap_interval`): seeded,
  so the same inputs always give the same interval;
* the two-sided paired t-test p-value (:func:`paired_t_test`, Student's t with ``n − 1`` degrees of
  freedom, through :func:`scipy.stats.t`);
* the two-sided Wilcoxon signed-rank p-value (:func:`wilcoxon_signed_rank`), computed exactly by
  counting all sign patterns, for up to :data:`WILCOXON_EXACT_MAX_N` nonzero differences;
* McNemar's test on per-example correctness (:func:`mcnemar`), the exact binomial test on the
  discordant counts, per seed and pooled over seeds (:func:`mcnemar_pooled`);
* Holm's step-down adjustment of p-values across cells (:func:`holm`).

Degenerate inputs (every rule below is tested in ``tests/test_stats.py``):

* Lengths that differ, empty inputs, non-finite values or arrays that are not 1-D raise
  ``ValueError`` naming the problem.
* ``n = 1``: the mean difference is reported; the standard deviation, the bootstrap interval and
  the t-test are undefined (NaN). The Wilcoxon p-value is 1 for a zero difference and exactly 1
  otherwise too (one nonzero difference: both sign patterns are as extreme), so it carries no
  evidence; this follows from the definition, not from a special case.
* Differences are compared after rounding to :data:`TIE_DECIMALS` decimals, so accuracy
  differences that are the same fraction ``k/N`` (computed from different floats) tie exactly and
  a difference of ``1e-17`` counts as zero.
* Every difference zero (the arms agree on every seed): t = 0 and both p-values are 1 (there is no
  difference to test); the bootstrap interval is ``[0, 0]``.
* Every difference equal but nonzero: the t statistic is undefined (zero standard error) and its
  p-value is NaN rather than scipy's 0; the Wilcoxon p-value is the exact ``2 / 2^n``; the
  bootstrap interval is ``[d, d]``.
* Wilcoxon zero differences are dropped before ranking (Wilcoxon's original treatment; scipy's
  ``zero_method="wilcox"``); tied absolute differences get their average rank, and the exact
  p-value is that of the sign-flip (permutation) distribution of the statistic given those ranks,
  so it stays exact with ties. Above :data:`WILCOXON_EXACT_MAX_N` nonzero differences the normal
  approximation with the tie-corrected variance is used (no continuity correction).
* Small ``n`` limits what the rank test can show: with ``m`` nonzero differences the smallest
  two-sided Wilcoxon p-value is ``2 / 2^m`` (0.25 at 3 seeds, 0.0625 at 5, 0.031 at 6), so fewer
  than 6 nonzero differences can never reach p < 0.05. The percentile bootstrap is known to be too
  narrow for small ``n`` (it ignores the ``n − 1`` correction and the t tails); read it together
  with the t-test, and use 10 or more seeds.

Example:
    >>> base = [0.970, 0.968, 0.975, 0.970]
    >>> bissl = [0.974, 0.970, 0.978, 0.973]
    >>> c = compare_paired(bissl, base)
    >>> round(c.mean, 4), c.n, c.p_wilcoxon
    (0.003, 4, 0.125)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "TIE_DECIMALS",
    "WILCOXON_EXACT_MAX_N",
    "McNemarResult",
    "PairedComparison",
    "bootstrap_interval",
    "compare_paired",
    "holm",
    "mcnemar",
    "mcnemar_pooled",
    "paired_differences",
    "paired_t_test",
    "wilcoxon_signed_rank",
]

#: Decimals kept when deciding ties and zeros among differences (accuracies are fractions k/N with
#: N < 10^6, so distinct values differ in the 7th decimal at the latest).
TIE_DECIMALS = 12
#: Up to this many nonzero differences the Wilcoxon p-value is exact (all 2^m sign patterns
#: counted).
WILCOXON_EXACT_MAX_N = 50
#: Bootstrap resamples of the default interval.
BOOTSTRAP_RESAMPLES = 10_000


def _as_vector(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or Inf: {arr.tolist()}")
    return arr


def paired_differences(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    """``a − b`` elementwise, float64 ``(n,)``, after checking that the inputs pair up.

    Raises:
        ValueError: lengths differ, an input is empty, not 1-D, or holds NaN/Inf.
    """
    x, y = _as_vector(a, "the first arm's values"), _as_vector(b, "the second arm's values")
    if x.shape != y.shape:
        raise ValueError(f"paired values need one value per seed in each arm; got {x.size} and {y.size} values")
    return x - y


def _rounded(d: np.ndarray) -> np.ndarray:
    return np.round(d, TIE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def bootstrap_interval(
    diffs: Sequence[float] | np.ndarray, *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``.

    ``resamples`` samples of ``n`` indices with replacement are drawn from
    ``numpy.random.default_rng(seed)``; the interval is the ``(1 − level)/2`` and ``(1 + level)/2``
    quantiles (numpy's default linear interpolation) of the resampled means. Same inputs and
    seed, same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for ``n < 2`` (one value says nothing about its spread);
        ``(d, d)`` when every difference equals ``d``.

    Raises:
        ValueError: bad ``diffs``, ``level`` outside (0, 1) or ``resamples < 1``.
    """
    d = _as_vector(diffs, "diffs")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if d.size < 2:
        return math.nan, math.nan
    if np.ptp(_rounded(d)) == 0:
        return float(d[0]), float(d[0])  # every resample is the same value; avoid rounding noise
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_t_test(diffs: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sided one-sample t-test of ``mean(diffs) = 0`` (the paired t-test).

    ``t = mean / (sd / √n)`` with the sample sd (ddof 1); the p-value is ``2·P(T_{n−1} ≥ |t|)``.

    Returns:
        ``(t, p)``. ``(nan, nan)`` for ``n < 2``; ``(0, 1)`` when every difference is zero;
        ``(±inf, nan)`` when every difference equals the same nonzero value (zero standard error:
        the test's model does not apply).
    """
    from scipy.stats import t as student_t

    d = _as_vector(diffs, "diffs")
    n = d.size
    if n < 2:
        return math.nan, math.nan
    r = _rounded(d)
    if np.ptp(r) == 0:
        if r[0] == 0:
            return 0.0, 1.0
        return math.copysign(math.inf, float(r[0])), math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    t = mean / (sd / math.sqrt(n))
    p = float(2.0 * student_t.sf(abs(t), df=n - 1))
    return t, min(1.0, p)


def wilcoxon_signed_rank(diffs: Sequence[float] | np.ndarray) -> tuple[float, float, int]:
    """Two-sided Wilcoxon signed-rank test of ``diffs`` being symmetric about 0.

    Zero differences are dropped; the ``m`` others are ranked by absolute value (ties share their
    average rank). The statistic is ``W+``, the rank sum of the positive differences. Under the
    null every sign pattern is equally likely, so for ``m ≤`` :data:`WILCOXON_EXACT_MAX_N` the
    p-value is exact: the fraction of the ``2^m`` patterns whose ``|W+ − m(m+1)/4|`` is at least the
    observed one. Beyond that, the normal approximation with the tie-corrected variance
    ``Σ r_i² / 4``.

    Returns:
        ``(W+, p, m)``; ``(0, 1, 0)`` when every difference is zero.
    """
    from scipy.stats import norm, rankdata

    d = _rounded(_as_vector(diffs, "diffs"))
    nz = d[d != 0]
    m = int(nz.size)
    if m == 0:
        return 0.0, 1.0, 0
    ranks = rankdata(np.abs(nz))  # average ranks for ties
    w_plus = float(ranks[nz > 0].sum())
    center = float(ranks.sum()) / 2.0
    observed = abs(w_plus - center)
    if m <= WILCOXON_EXACT_MAX_N:
        # Average ranks are multiples of 1/2: count sign patterns per value of 2·W+ exactly
        # (subset-sum counts, integers below 2^m), instead of listing all 2^m patterns.
        doubled = np.rint(2 * ranks).astype(np.int64)
        counts = np.zeros(int(doubled.sum()) + 1, dtype=np.int64)
        counts[0] = 1
        for r in doubled:
            counts[r:] = counts[r:] + counts[:-r].copy()
        sums = np.arange(counts.size)
        extreme = np.abs(sums - doubled.sum() / 2.0) >= 2 * observed
        return w_plus, float(counts[extreme].sum() / 2.0**m), m
    var = float((ranks**2).sum()) / 4.0
    z = observed / math.sqrt(var)
    return w_plus, min(1.0, float(2.0 * norm.sf(z))), m


@dataclass(frozen=True)
class PairedComparison:
    """Statistics of paired per-seed values ``a`` vs ``b`` (difference ``a − b``).

    Attributes:
        n: number of pairs (seeds).
        mean: mean difference; std: its sample standard deviation (ddof 1; NaN for ``n = 1``).
        ci_low, ci_high: percentile bootstrap interval of the mean (``level``, ``resamples``,
            ``seed`` as used).
        t: paired t statistic; p_t: its two-sided p-value.
        w_plus: Wilcoxon ``W+``; p_wilcoxon: its two-sided p-value; n_nonzero: nonzero differences.
        diffs: the per-seed differences.
    """

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    w_plus: float
    p_wilcoxon: float
    n_nonzero: int
    level: float = 0.95
    resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = 0
    diffs: tuple[float, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN/inf become None, as JSON has neither)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def compare_paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """All paired statistics of ``a − b`` (one value per seed in each, in the same seed order).

    Raises:
        ValueError: the inputs do not pair up (see :func:`paired_differences`).
    """
    d = paired_differences(a, b)
    lo, hi = bootstrap_interval(d, level=level, resamples=resamples, seed=seed)
    t, p_t = paired_t_test(d)
    w, p_w, m = wilcoxon_signed_rank(d)
    return PairedComparison(
        n=int(d.size),
        mean=float(d.mean()),
        std=float(d.std(ddof=1)) if d.size > 1 else math.nan,
        ci_low=lo,
        ci_high=hi,
        t=t,
        p_t=p_t,
        w_plus=w,
        p_wilcoxon=p_w,
        n_nonzero=m,
        level=level,
        resamples=resamples,
        seed=seed,
        diffs=tuple(float(x) for x in d),
    )


# --------------------------------------------------------------------------- McNemar
@dataclass(frozen=True)
class McNemarResult:
    """McNemar's exact test on paired per-example correctness.

    Attributes:
        only_a: examples arm ``a`` got right and ``b`` wrong; only_b: the reverse.
        both, neither: the concordant counts.
        p: two-sided exact binomial p-value of ``only_a`` among ``only_a + only_b`` trials with
            success probability 1/2 (1 when there is no discordant example).
    """

    only_a: int
    only_b: int
    both: int
    neither: int
    p: float

    @property
    def discordant(self) -> int:
        return self.only_a + self.only_b

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _correctness(values: Sequence[Any] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of per-example correctness, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{what} must hold booleans or 0/1 (correct or not per test example)")
        arr = arr.astype(bool)
    return arr


def _exact_binomial_half(k: int, n: int) -> float:
    from scipy.stats import binomtest

    return 1.0 if n == 0 else float(binomtest(k, n, 0.5, alternative="two-sided").pvalue)


def mcnemar(correct_a: Sequence[Any] | np.ndarray, correct_b: Sequence[Any] | np.ndarray) -> McNemarResult:
    """McNemar's exact test for one seed: are the two arms' errors on the same test examples
    equally likely to go either way?

    Only discordant examples carry information. Under the null each of the ``n = only_a +
    only_b`` discordant examples is equally likely to favour either arm, so ``only_a ~ Bin(n, ½)``
    and the two-sided p-value is ``min(1, 2·P(X ≤ min(only_a, only_b)))`` (scipy's ``binomtest``,
    exact; the distribution is symmetric, so its two-sided rule gives exactly this).

    Args:
        correct_a, correct_b: ``(N,)`` booleans (or 0/1): arm ``a``/``b`` classified test example
            ``i`` correctly. Same examples in the same order.

    Raises:
        ValueError: lengths differ, empty, not 1-D, or values other than booleans/0/1.
    """
    ca, cb = _correctness(correct_a, "correct_a"), _correctness(correct_b, "correct_b")
    if ca.shape != cb.shape:
        raise ValueError(f"McNemar pairs the same test examples; got {ca.size} and {cb.size} predictions")
    if ca.size == 0:
        raise ValueError("McNemar needs at least one test example")
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    both, neither = int((ca & cb).sum()), int((~ca & ~cb).sum())
    return McNemarResult(only_a, only_b, both, neither, _exact_binomial_half(min(only_a, only_b), only_a + only_b))


def mcnemar_pooled(per_seed: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> McNemarResult:
    """McNemar's exact test pooled over seeds: discordant counts summed, one binomial test.

    Each seed contributes its ``(correct_a, correct_b)`` pair. The counts ``only_a = Σ_s only_a_s``
    and ``only_b = Σ_s only_b_s`` are tested as in :func:`mcnemar`; this is also the
    Mantel–Haenszel test for matched pairs stratified by seed. It treats every (seed, example)
    discordance as an independent trial. The same test examples recur in every seed, so an example
    that one arm gets right on every seed counts once per seed: the pooled test asks whether *on
    this test set* the arms' errors differ, and is anti-conservative as a test about new seeds when
    errors cluster on particular examples. Report it with the per-seed tests and the seed-level
    tests of :func:`compare_paired`, whose unit is the seed.

    Raises:
        ValueError: no seeds, or a seed whose pair does not match (see :func:`mcnemar`).
    """
    if len(per_seed) == 0:
        raise ValueError("mcnemar_pooled needs at least one seed")
    results = [mcnemar(a, b) for a, b in per_seed]
    only_a, only_b = sum(r.only_a for r in results), sum(r.only_b for r in results)
    return McNemarResult(
        only_a,
        only_b,
        sum(r.both for r in results),
        sum(r.neither for r in results),
        _exact_binomial_half(min(only_a, only_b), only_a + only_b),
    )


# --------------------------------------------------------------------------- multiplicity
def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error control across cells).

    With the ``m`` defined p-values sorted ascending, ``p_(1) ≤ … ≤ p_(m)``, the adjusted value of
    ``p_(i)`` is ``max_{j ≤ i} min(1, (m − j + 1)·p_(j))``; results come back in input order.
    Undefined entries (None or NaN, e.g. a t-test with one seed) stay None and do not count in
    ``m``. Ties among p-values are ordered by position, which does not change the adjusted values.

    Raises:
        ValueError: a defined p-value outside [0, 1].
    """
    defined = [(i, float(p)) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    for i, p in defined:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value {i} is {p}, outside [0, 1]")
    out: list[float | None] = [None] * len(pvalues)
    m = len(defined)
    running = 0.0
    for rank, (i, p) in enumerate(sorted(defined, key=lambda ip: ip[1])):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
