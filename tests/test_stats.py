"""bissl.stats against hand-computed and textbook values, scipy where it is exact, and the
documented degenerate cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from bissl.stats import (
    bootstrap_interval,
    compare_paired,
    holm,
    mcnemar,
    mcnemar_pooled,
    paired_differences,
    paired_t_test,
    wilcoxon_signed_rank,
)


# --------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    "a, b, match",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "got 3 and 2 values"),
        ([], [], "empty"),
        ([1.0, float("nan")], [1.0, 2.0], "NaN or Inf"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
    ],
)
def test_unpaired_inputs_raise(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_differences(a, b)
    with pytest.raises(ValueError, match=match):
        compare_paired(a, b)


def test_documented_example():
    c = compare_paired([0.974, 0.970, 0.978, 0.973], [0.970, 0.968, 0.975, 0.970])
    assert (round(c.mean, 4), c.n, c.p_wilcoxon) == (0.003, 4, 0.125)


# --------------------------------------------------------------------------- t-test
def test_t_test_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, t = 2·√3; for 2 degrees of freedom P(T ≥ t) = (1 − t/√(t²+2))/2.
    t, p = paired_t_test([1.0, 2.0, 3.0])
    assert t == pytest.approx(2 * math.sqrt(3), rel=1e-14)
    assert p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-12)


def test_t_test_matches_scipy_on_random_pairs():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=12), rng.normal(size=12)
    c = compare_paired(a, b)
    ref = scipy.stats.ttest_rel(a, b)
    assert c.t == pytest.approx(float(ref.statistic), rel=1e-12)
    assert c.p_t == pytest.approx(float(ref.pvalue), rel=1e-10)


# --------------------------------------------------------------------------- Wilcoxon
def test_wilcoxon_textbook_values():
    # |d| ranks 1..6, the negative one has rank 4: T− = 4; 7 of the 64 sign patterns have T− ≤ 4.
    w, p, m = wilcoxon_signed_rank([1, 2, 3, -4, 5, 6])
    assert (w, m) == (17.0, 6) and p == 14 / 64
    # All six positive: only the two extreme patterns are as extreme.
    assert wilcoxon_signed_rank([0.5, 1, 2, 3, 4, 9])[1] == 2 / 64
    # Five positive: 2/32 = 0.0625 > 0.05, as the docstring says.
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5])[1] == 2 / 32


def test_wilcoxon_exact_matches_scipy_without_ties():
    rng = np.random.default_rng(0)
    for n in (3, 7, 15, 30):
        d = rng.normal(0.4, 1.0, n)
        ours = wilcoxon_signed_rank(d)[1]
        assert ours == pytest.approx(scipy.stats.wilcoxon(d, method="exact").pvalue, rel=1e-12)


def test_wilcoxon_ties_are_exact_by_hand():
    # |d| = 1, 1, 1, 2 -> average ranks 2, 2, 2, 4; W+ = 8, centre 5. Of the 16 sign patterns,
    # W+ ≤ 2 (empty set, three single 2s) or W+ ≥ 8 (three {2,2,4}, all) are as extreme: 8/16.
    w, p, m = wilcoxon_signed_rank([1.0, 1.0, -1.0, 2.0])
    assert (w, p, m) == (8.0, 0.5, 4)


def test_wilcoxon_drops_zeros_and_float_noise():
    noise = 0.1 + 0.2 - 0.3  # 5.6e-17, not a real difference
    assert wilcoxon_signed_rank([0.0, noise, 1.0, 2.0, 3.0]) == (6.0, 0.25, 3)
    # Accuracy differences equal as fractions tie although the floats differ in the last bit.
    d1, d2 = 0.9805013927576601 - 0.9777158774373259, 0.9832869080779945 - 0.9805013927576601
    assert d1 != d2
    assert wilcoxon_signed_rank([d1, -d2])[1] == 1.0  # one tie: W+ = 1.5 is the centre


def test_wilcoxon_large_n_uses_normal_approximation():
    d = np.arange(1, 61, dtype=float) * np.where(np.arange(60) % 3 == 0, -1, 1)
    _, p, m = wilcoxon_signed_rank(d)
    ref = scipy.stats.wilcoxon(d, method="approx", correction=False).pvalue
    assert m == 60 and p == pytest.approx(ref, rel=1e-10)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_two_values_by_hand():
    # Resampled means of (0, 1) are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are 0 and 1.
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)


def test_bootstrap_is_deterministic_and_seeded():
    d = np.random.default_rng(5).normal(size=10)
    assert bootstrap_interval(d, seed=1) == bootstrap_interval(d, seed=1)
    assert bootstrap_interval(d, seed=1) != bootstrap_interval(d, seed=2)
    lo, hi = bootstrap_interval(d)
    assert lo < d.mean() < hi
    lo90, hi90 = bootstrap_interval(d, level=0.9)
    assert lo <= lo90 and hi90 <= hi


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_interval([1.0, 2.0], resamples=0)


# --------------------------------------------------------------------------- degenerate inputs
def test_all_differences_zero():
    c = compare_paired([0.9, 0.95, 0.97], [0.9, 0.95, 0.97])
    assert (c.mean, c.std, c.ci_low, c.ci_high) == (0.0, 0.0, 0.0, 0.0)
    assert (c.t, c.p_t, c.p_wilcoxon, c.n_nonzero) == (0.0, 1.0, 1.0, 0)


def test_all_differences_equal_nonzero():
    c = compare_paired([0.3, 0.4, 0.5, 0.6, 0.7], [0.2, 0.3, 0.4, 0.5, 0.6])
    assert c.ci_low == c.ci_high == pytest.approx(0.1, abs=1e-15)
    assert c.t == math.inf and math.isnan(c.p_t)  # zero standard error: no t-test
    assert c.p_wilcoxon == 2 / 32


def test_one_seed():
    c = compare_paired([0.98], [0.97])
    assert c.n == 1 and c.mean == pytest.approx(0.01)
    assert all(math.isnan(v) for v in (c.std, c.ci_low, c.ci_high, c.t, c.p_t))
    assert c.p_wilcoxon == 1.0


def test_to_dict_is_strict_json():
    c = compare_paired([0.98], [0.97])
    text = json.dumps(c.to_dict(), allow_nan=False)
    assert json.loads(text)["p_t"] is None


# --------------------------------------------------------------------------- McNemar
def test_mcnemar_by_hand():
    # 9 examples only a gets right, 1 only b: p = 2·P(Bin(10, ½) ≤ 1) = 2·11/1024.
    a = [1] * 9 + [0] * 1 + [1] * 5 + [0] * 3
    b = [0] * 9 + [1] * 1 + [1] * 5 + [0] * 3
    r = mcnemar(a, b)
    assert (r.only_a, r.only_b, r.both, r.neither) == (9, 1, 5, 3)
    assert r.p == 22 / 1024
    assert mcnemar(b, a).p == r.p


def test_mcnemar_no_discordant_pair():
    r = mcnemar([True, False, True], [True, False, True])
    assert r.discordant == 0 and r.p == 1.0


def test_mcnemar_pooled_sums_discordant_counts():
    s1 = ([1] * 9 + [0], [0] * 9 + [1])  # 9 vs 1
    s2 = ([1, 1, 1, 0], [0, 0, 0, 0])  # 3 vs 0
    r = mcnemar_pooled([s1, s2])
    assert (r.only_a, r.only_b) == (12, 1)
    # 2·P(Bin(13, ½) ≤ 1) = 2·(1 + 13)/2^13.
    assert r.p == pytest.approx(2 * 14 / 2**13, rel=1e-12)
    assert r.p == pytest.approx(sum(math.comb(13, k) for k in (0, 1, 12, 13)) / 2**13, rel=1e-12)


@pytest.mark.parametrize(
    "a, b, match",
    [
        ([1, 0], [1, 0, 1], "got 2 and 3"),
        ([1, 2], [1, 0], "booleans or 0/1"),
        ([], [], "at least one"),
    ],
)
def test_mcnemar_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        mcnemar(a, b)


def test_mcnemar_pooled_needs_seeds():
    with pytest.raises(ValueError, match="at least one seed"):
        mcnemar_pooled([])


# --------------------------------------------------------------------------- Holm
def test_holm_by_hand():
    # Sorted 0.005, 0.01, 0.03, 0.04 -> ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> running max.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_skips_undefined_and_caps_at_one():
    out = holm([0.2, None, float("nan"), 0.6])
    assert out[1] is None and out[2] is None
    assert out[0] == pytest.approx(0.4) and out[3] == pytest.approx(0.6)
    assert holm([0.5, 0.7]) == [1.0, 1.0]
    assert holm([0.03]) == [0.03]


def test_holm_rejects_impossible_p():
    with pytest.raises(ValueError, match="outside"):
        holm([0.1, 1.5])
