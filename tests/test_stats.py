"""Statistics over seeds: spread text, Student-t intervals (against scipy and by hand), exact McNemar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cifarbench.evaluation.stats import (
    betainc,
    mcnemar_exact,
    mean_spread,
    paired_by_seed,
    paired_difference,
    pairwise_comparisons,
    t_quantile,
    training_warnings,
)


def test_spread_of_three_seeds_prints_mean_and_sample_std_in_points():
    spread = mean_spread([0.4581, 0.4612, 0.4643])
    assert spread.std == pytest.approx(0.0031)
    assert (spread.min, spread.max) == (0.4581, 0.4643)
    assert spread.format_percent() == "46.12% ± 0.31 (3 seeds)"


def test_one_seed_says_spread_unknown_never_plus_minus_zero():
    spread = mean_spread([0.4612])
    assert spread.std is None
    assert spread.format_percent() == "46.12% (1 seed: spread unknown)"
    assert "±" not in spread.format_percent()


def test_mean_spread_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        mean_spread([])


def test_betainc_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(0.5, 0.5, 0.3), (30, 0.5, 0.97), (2, 3, 0.9), (0.5, 10, 0.01), (100, 100, 0.5)]:
        assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-14)


def test_t_quantiles_match_scipy_for_df_1_to_60():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 61):
        for confidence in (0.9, 0.95, 0.99):
            p = 0.5 + confidence / 2
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-6)
            assert t_quantile(1 - p, df) == pytest.approx(stats.t.ppf(1 - p, df), rel=1e-6)


def test_paired_intervals_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10, 30, 61):
        a = rng.uniform(0.4, 0.5, n)
        b = a + rng.normal(0.08, 0.01, n)
        d = b - a
        for confidence in (0.9, 0.95, 0.99):
            result = paired_difference(a.tolist(), b.tolist(), confidence)
            low, high = stats.t.interval(confidence, n - 1, loc=d.mean(), scale=stats.sem(d))
            assert result.mean_difference == pytest.approx(d.mean(), rel=1e-12)
            assert (result.low, result.high) == (pytest.approx(low, rel=1e-6), pytest.approx(high, rel=1e-6))


def test_paired_interval_against_hand_value():
    """Differences 0.05, 0.04, 0.06: mean 0.05, sample std 0.01 (squared deviations 0 + 1e-4 + 1e-4 over 2).

    With 2 degrees of freedom the t quantile has a closed form, t_p = (2p - 1) / sqrt(2 p (1 - p)); at
    p = 0.975 that is 0.95 / sqrt(0.04875) = 4.302653. Half-width 4.302653 * 0.01 / sqrt(3) = 0.024841, so
    the 95% interval is [0.025159, 0.074841].
    """
    result = paired_difference([0.50, 0.52, 0.54], [0.55, 0.56, 0.60])
    assert result.n == 3
    assert result.mean_difference == pytest.approx(0.05)
    assert result.low == pytest.approx(0.025159, abs=1e-6)
    assert result.high == pytest.approx(0.074841, abs=1e-6)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(0.04875), rel=1e-9)
    assert result.format_percent() == "+5.00 points [+2.52, +7.48] (95%, 3 seeds)"


def test_paired_difference_of_one_seed_has_no_interval():
    result = paired_difference([0.46], [0.55])
    assert result.mean_difference == pytest.approx(0.09)
    assert (result.low, result.high) == (None, None)
    assert "no interval" in result.format_percent()


def test_paired_difference_refuses_unpaired_values():
    with pytest.raises(ValueError):
        paired_difference([0.4, 0.5], [0.6])


def test_paired_by_seed_keeps_only_common_seeds_in_order():
    seeds, a, b = paired_by_seed({2: 0.42, 0: 0.40, 1: 0.41}, {1: 0.51, 0: 0.50, 3: 0.53})
    assert (seeds, a, b) == ([0, 1], [0.40, 0.41], [0.50, 0.51])


def test_mcnemar_against_hand_value():
    """A right and B wrong on 6 examples (b = 6), A wrong and B right on 1 (c = 1), 3 concordant.

    Under the null each of the n = b + c = 7 disagreements is a fair coin, so the two-sided p is
    2 * P(X <= 1) for X ~ Binomial(7, 1/2) = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * (1 + 7) / 128 = 0.125.
    """
    a = [1, 1, 1, 1, 1, 1, 0, 1, 1, 0]
    b = [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    result = mcnemar_exact(a, b)
    assert (result.b, result.c) == (6, 1)
    assert result.p_value == pytest.approx(0.125, rel=1e-12)


def test_mcnemar_without_disagreements_is_one_and_balanced_is_capped_at_one():
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0
    assert mcnemar_exact([1, 0], [0, 1]).p_value == 1.0


def _exact_two_sided(b: int, c: int) -> float:
    """2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c) in exact integers (Python's int division rounds once)."""
    n, term, total = b + c, 1, 1
    for k in range(min(b, c)):
        term = term * (n - k) // (k + 1)
        total += term
    return min(1.0, 2 * total / 2**n)


def test_mcnemar_is_accurate_for_ten_thousand_disagreements():
    for b, c in [(4850, 5150), (5150, 4850), (700, 100)]:
        result = mcnemar_exact([True] * b + [False] * c, [False] * b + [True] * c)
        assert (result.b, result.c) == (b, c)
        assert result.p_value == pytest.approx(_exact_two_sided(b, c), rel=1e-9)
    assert 0 < mcnemar_exact([True] * 700 + [False] * 100, [False] * 700 + [True] * 100).p_value < 1e-100


def test_pairwise_comparisons_pair_by_seed_and_test_each_seed():
    accuracy = {"fnn": {0: 0.46, 1: 0.47}, "cnn": {0: 0.55, 1: 0.57, 2: 0.56}}
    correct = {"fnn": {0: [1, 1, 1, 1, 1, 1, 0, 1, 1, 0], 1: [1, 0]},
               "cnn": {0: [0, 0, 0, 0, 0, 0, 1, 1, 1, 0], 1: [0, 1]}}
    [pair] = pairwise_comparisons(accuracy, correct)
    assert (pair.a, pair.b, pair.seeds) == ("fnn", "cnn", [0, 1])
    assert pair.difference.mean_difference == pytest.approx(0.095)
    assert pair.mcnemar[0].p_value == pytest.approx(0.125)
    assert pair.p_value_max == 1.0
    assert pair.to_dict()["mcnemar"]["0"]["b"] == 6


def _history(losses, accuracy):
    return [{"epoch": i + 1, "train_loss": loss, "test_accuracy": accuracy if i == len(losses) - 1 else None}
            for i, loss in enumerate(losses)]


def test_training_warnings_flag_a_loss_still_falling_steeply():
    [warning] = training_warnings(_history([2.0, 1.6, 1.4], 0.5), 10)
    assert warning.startswith("under-trained") and "12.5%" in warning


def test_training_warnings_quiet_for_a_flat_loss_and_good_accuracy():
    assert training_warnings(_history([2.0, 1.2, 1.19], 0.55), 10) == []
    assert training_warnings(_history([2.0], 0.55), 10) == []  # one epoch: no slope to judge


def test_training_warnings_flag_near_chance_accuracy():
    [warning] = training_warnings(_history([2.303, 2.302], 0.11), 10)
    assert warning.startswith("near chance")
    assert training_warnings(_history([2.303, 2.302], 0.16), 10) == []


def test_training_warnings_flag_divergence():
    [warning] = training_warnings(_history([2.3, float("nan")], 0.5), 10)
    assert warning.startswith("training diverged")


def test_pairwise_rows_read_as_a_table():
    from cifarbench.reporting.tables import PAIRWISE_HEADERS, format_table, pairwise_rows

    accuracy = {"fnn": {0: 0.50, 1: 0.52, 2: 0.54}, "cnn": {0: 0.55, 1: 0.56, 2: 0.60}}
    correct = {"fnn": {s: [1, 1, 1, 1, 1, 1, 0, 1, 1, 0] for s in range(3)},
               "cnn": {s: [0, 0, 0, 0, 0, 0, 1, 1, 1, 0] for s in range(3)}}
    [row] = pairwise_rows(pairwise_comparisons(accuracy, correct))
    assert row == ["cnn vs fnn", "3", "+5.00 points [+2.52, +7.48] (95%, 3 seeds)", "0.125", "6 / 1 ; 6 / 1 ; 6 / 1"]
    assert "McNemar" in format_table(PAIRWISE_HEADERS, [row])
