"""Statistics over seeds, shared by comparing and reporting: spread, paired differences, McNemar's test.

Pure Python (no scipy at runtime): the Student-t quantile inverts a continued-fraction incomplete beta.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one quantity over seeds."""

    n: int
    mean: float
    std: float | None
    """Sample standard deviation (n - 1 in the denominator); None for one seed, where it is unknown."""
    min: float
    max: float

    def format_percent(self, digits: int = 2) -> str:
        """Fractions as percent: '46.12% ± 0.31 (3 seeds)', or '46.12% (1 seed: spread unknown)'."""
        mean = f"{100 * self.mean:.{digits}f}%"
        if self.std is None:
            return f"{mean} (1 seed: spread unknown)"
        return f"{mean} ± {100 * self.std:.{digits}f} ({self.n} seeds)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_spread(values: Sequence[float]) -> Spread:
    """Mean, sample std (None for one value), min and max of `values` (e.g. one model's accuracy per seed)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_spread needs at least one value")
    return Spread(n=len(xs), mean=statistics.fmean(xs), std=statistics.stdev(xs) if len(xs) > 1 else None,
                  min=min(xs), max=max(xs))


# --- Student's t quantile -------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only on the near side of the mean; the far side uses I_x(a,b) = 1 - I_1-x(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (relative accuracy far below 1e-6)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile needs df > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    # P(T > t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2), increasing in x: bisect for x, then solve for t.
    target = 2.0 * (1.0 - p)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if betainc(df / 2.0, 0.5, mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    x = 0.5 * (lo + hi)
    return math.sqrt(df * (1.0 - x) / x)


# --- Paired comparison of two models over seeds -----------------------------------------------------------

@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences b_i - a_i with a Student-t confidence interval."""

    n: int
    mean_difference: float
    low: float | None
    """Interval bounds; None with fewer than two pairs (no spread to build them from)."""
    high: float | None
    confidence: float

    def format_percent(self, digits: int = 2) -> str:
        """Fractions as percentage points: '+9.14 points [8.02, 10.26] (95%, 3 seeds)'."""
        mean = f"{100 * self.mean_difference:+.{digits}f} points"
        if self.low is None or self.high is None:
            return f"{mean} ({self.n} seed{'s' if self.n != 1 else ''}: no interval)"
        return (f"{mean} [{100 * self.low:+.{digits}f}, {100 * self.high:+.{digits}f}] "
                f"({100 * self.confidence:g}%, {self.n} seeds)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of b_i - a_i over pairs (the same seed for both models) with a two-sided Student-t interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs pairs: {len(a)} values against {len(b)}")
    if not a:
        raise ValueError("paired_difference needs at least one pair")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [float(y) - float(x) for x, y in zip(a, b, strict=False)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, None, None, confidence)
    half = t_quantile(0.5 + confidence / 2.0, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, mean - half, mean + half, confidence)


def paired_by_seed(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[int], list[float], list[float]]:
    """The seeds both models ran, sorted, and each model's values at those seeds (for `paired_difference`)."""
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s] for s in seeds], [b[s] for s in seeds]


# --- McNemar's exact test on per-example correctness ------------------------------------------------------

@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of two classifiers on the same examples."""

    b: int
    """Examples model A got right and model B got wrong."""
    c: int
    """Examples model A got wrong and model B got right."""
    p_value: float
    """Two-sided: how often a split of the b + c disagreements at least this lopsided happens by chance."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log_add(x: float, y: float) -> float:
    hi, lo = max(x, y), min(x, y)
    return hi + math.log1p(math.exp(lo - hi)) if lo > -math.inf else hi


def mcnemar_exact(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> McNemar:
    """Exact two-sided McNemar test: p = min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)."""
    ca = np.asarray(correct_a, dtype=bool).ravel()
    cb = np.asarray(correct_b, dtype=bool).ravel()
    if ca.shape != cb.shape:
        raise ValueError(f"mcnemar_exact needs the same examples: {ca.size} against {cb.size}")
    b, c = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    n, k = b + c, min(b, c)
    if n == 0:
        return McNemar(b, c, 1.0)
    # In log space: C(n, k) / 2^n underflows a float long before n reaches a test set's size.
    log_tail = -math.inf
    for i in range(k + 1):
        log_tail = _log_add(log_tail, math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1))
    log_p = math.log(2.0) + log_tail - n * math.log(2.0)
    return McNemar(b, c, min(1.0, math.exp(log_p)))


@dataclass(frozen=True)
class PairComparison:
    """Model `b` against model `a`: the accuracy difference b - a over their common seeds, and McNemar's test
    on each common seed's test predictions."""

    a: str
    b: str
    seeds: list[int]
    difference: PairedDifference
    mcnemar: dict[int, McNemar]
    """Per seed; empty when no per-example correctness was given."""

    @property
    def p_value_max(self) -> float | None:
        """The largest McNemar p over the seeds: the difference is significant at level alpha on every seed
        when this is below alpha (a conservative summary; seeds share the test images, so they are not pooled)."""
        return max((m.p_value for m in self.mcnemar.values()), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "seeds": list(self.seeds), "difference": self.difference.to_dict(),
                "mcnemar": {str(s): m.to_dict() for s, m in self.mcnemar.items()}, "p_value_max": self.p_value_max}


def pairwise_comparisons(accuracy: Mapping[str, Mapping[int, float]],
                         correct: Mapping[str, Mapping[int, Sequence[bool] | np.ndarray]] | None = None, *,
                         confidence: float = 0.95) -> list[PairComparison]:
    """Every pair of models in the given order (later minus earlier), paired by seed; `accuracy[model][seed]`
    is a fraction, `correct[model][seed]` the per-test-example correctness (same order for every model)."""
    names = list(accuracy)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds, acc_a, acc_b = paired_by_seed(accuracy[a], accuracy[b])
            if not seeds:
                continue
            tests = {}
            if correct is not None:
                for s in seeds:
                    if s in correct.get(a, {}) and s in correct.get(b, {}):
                        tests[s] = mcnemar_exact(correct[a][s], correct[b][s])
            out.append(PairComparison(a, b, seeds, paired_difference(acc_a, acc_b, confidence), tests))
    return out


# --- Sanity checks on a training history ------------------------------------------------------------------

UNDERTRAINED_DROP = 0.05
"""A last epoch that still cut the training loss by more than this fraction of the previous epoch's loss means
the loss curve has not flattened: more epochs would very likely still help."""
CHANCE_FACTOR = 1.5
"""A final accuracy under this many times chance (1 / classes) is near chance: the model learnt little or
nothing (a too-high learning rate, a broken input pipeline, or far too little training)."""


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)


def training_warnings(history: Sequence[Any], num_classes: int) -> list[str]:
    """Plain-language warnings about a run's history (EpochMetrics or their dicts), empty when none apply.

    Rules: under-trained when the last epoch's training loss fell by more than UNDERTRAINED_DROP (5%) of the
    epoch before's (needs two epochs); near chance when the final accuracy (test, else validation) is below
    CHANCE_FACTOR / num_classes; diverged when the final training loss is not finite.
    """
    warnings: list[str] = []
    losses = [_field(h, "train_loss") for h in history]
    losses = [float(v) for v in losses if v is not None]
    if losses and not math.isfinite(losses[-1]):
        warnings.append(f"training diverged: the final training loss is {losses[-1]}")
    elif len(losses) >= 2 and losses[-2] > 0:
        drop = (losses[-2] - losses[-1]) / losses[-2]
        if drop > UNDERTRAINED_DROP:
            warnings.append(f"under-trained: the training loss still fell {100 * drop:.1f}% in the last epoch "
                            f"({losses[-2]:.4f} -> {losses[-1]:.4f}; over {100 * UNDERTRAINED_DROP:g}% means the "
                            "curve has not flattened), so more epochs would likely raise the accuracy")
    final = None
    for h in reversed(history):
        final = _field(h, "test_accuracy")
        if final is None:
            final = _field(h, "val_accuracy")
        if final is not None:
            break
    if final is not None and num_classes > 0 and final < CHANCE_FACTOR / num_classes:
        warnings.append(f"near chance: the final accuracy {100 * final:.2f}% is below "
                        f"{100 * CHANCE_FACTOR / num_classes:.1f}% ({CHANCE_FACTOR:g} x chance for {num_classes} "
                        "classes); the model has learnt little or nothing")
    return warnings
