"""Plain-text tables for the terminal: aligned columns, no dependency."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cifarbench.runs.records import ModelSummary, RunRecord

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    # Cc: C0/C1 controls (escape sequences, backspace); Cf: format characters such as bidi overrides
    # (U+202E), zero-width joiners, isolates; Zl/Zp: line and paragraph separators; Cs: lone surrogates.
    if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def printable(text: str) -> str:
    """`text` safe to print on one terminal line: newlines, tabs, control and bidi-format characters are
    escaped as in a Python literal (\\n, \\x1b, \\u202e); everything else, backslashes too, is kept."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape(ch) for ch in text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table whose columns also line up in a terminal (untrusted cells are escaped by `printable`)."""
    cells = [[printable(h) for h in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def percent(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def flops(n: int | None) -> str:
    """A FLOP count with an SI prefix (M, G)."""
    if n is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}"
    return str(n)


def time_to_target_cell(ttt: dict[str, Any] | None) -> str:
    """One run's time to the target ('epoch 3, 12.4 s' or 'not reached'), or a model's over its seeds: the
    means over the seeds that reached it, 'epoch 3, 12.4 s (2/3 seeds)'."""
    if ttt is None:
        return "not reached"
    if "reached" not in ttt:
        return f"epoch {ttt['epoch']}, {ttt['seconds']:.1f} s"
    if not ttt["reached"]:
        return f"not reached (0/{ttt['seeds']} seeds)" if ttt["seeds"] > 1 else "not reached"
    seeds = f" ({ttt['reached']}/{ttt['seeds']} seeds)" if ttt["seeds"] > 1 else ""
    return f"epoch {ttt['epoch_mean']:.3g}, {ttt['seconds_mean']:.1f} s{seeds}"


def accuracy_cell(mean: float | None, std: float | None, seeds: int) -> str:
    """Mean ± sample std over seeds; one seed says its spread is unknown rather than printing ± 0.00."""
    if mean is None:
        return "-"
    if seeds < 2 or std is None:
        return f"{100 * mean:.2f}% (1 seed: spread unknown)"
    return percent(mean, std)


def comparison_headers(results: Sequence[ModelSummary]) -> list[str]:
    """Column names of `comparison_rows` (the time-to-target column only when a target was given)."""
    headers = ["model", "recipe", "seeds", "test accuracy (mean ± std)", "params", "FLOPs/image", "train s"]
    target = next((r.time_to_target["target"] for r in results if r.time_to_target), None)
    return headers + ([f"time to {100 * target:g}% (mean)"] if target is not None else [])


def comparison_rows(results: Sequence[ModelSummary]) -> list[list[str]]:
    """One row per model of the comparison, as strings (shared by the terminal table and the HTML report)."""
    with_target = any(r.time_to_target for r in results)
    rows = []
    for r in results:
        std = r.train_seconds_std
        secs = "-" if r.train_seconds_mean is None else f"{r.train_seconds_mean:.1f}" + (f" ± {std:.1f}" if std else "")
        params = "-" if r.params is None else f"{r.params:,}"
        accuracy = accuracy_cell(r.test_accuracy_mean, r.test_accuracy_std, len(r.seeds))
        row = [r.model, r.recipe, str(len(r.seeds)), accuracy, params, flops(r.flops_per_image), secs]
        rows.append(row + ([time_to_target_cell(r.time_to_target) if r.time_to_target else "-"] if with_target else []))
    return rows


def wall_times(runs: Sequence[Any], command_seconds: float, reused: Sequence[str] = ()) -> str:
    """Each run's own wall time (with its estimate before training, when it had one), their sum over the runs this
    command trained, and the command's own wall time: what the gap between the two costs (loading, reports)."""
    from cifarbench.models.reference import label
    from cifarbench.progress import duration

    parts, total = [], 0.0
    for r in runs:
        wall = r.wall_seconds or 0.0
        estimate = getattr(r, "estimate", None)
        guess = f", estimated {duration(estimate.total_seconds)}" if estimate is not None else ""
        if r.run_id in reused:
            parts.append(f"{label(r.model)} seed {r.seed} reused")
            continue
        total += wall
        parts.append(f"{label(r.model)} seed {r.seed} {duration(wall)}{guess}")
    return (f"wall time: {'; '.join(parts)}. Runs trained: {duration(total)} together; this command: "
            f"{duration(command_seconds)}")


def comparison_table(results: Sequence[ModelSummary]) -> str:
    """The compare command's table: accuracy mean ± std over seeds, parameters, FLOPs per image, training
    seconds and, with a target, the time to reach it."""
    return format_table(comparison_headers(results), comparison_rows(results))


def history_table(history: Sequence[dict[str, Any]]) -> str:
    """One line per epoch of a run (evaluations that did not happen show as '-')."""
    val = any(h.get("val_accuracy") is not None or h.get("val_loss") is not None for h in history)
    num = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    rows = [(h["epoch"], num(h.get("train_loss"), ".4f"), num(h.get("test_loss"), ".4f"),
             percent(h.get("test_accuracy")),
             *((num(h.get("val_loss"), ".4f"), percent(h.get("val_accuracy"))) if val else ()),
             num(h.get("seconds"), ".1f"), num(h.get("eval_seconds"), ".1f")) for h in history]
    return format_table(["epoch", "train loss", "test loss", "test acc", *(("val loss", "val acc") if val else ()),
                         "train s (cumulative)", "eval s"], rows)


def runs_table(runs: Sequence[RunRecord]) -> str:
    """One line per stored run."""
    rows = [(r.run_id, r.status, r.model, r.recipe, r.seed, r.epochs, percent(r.test_accuracy),
             "-" if r.train_seconds is None else f"{r.train_seconds:.1f}",
             "yes" if r.dataset.get("verified") else "no", r.device or "-") for r in runs]
    return format_table(["run", "status", "model", "recipe", "seed", "epochs", "test acc", "train s", "official data",
                         "device"], rows)


def evaluation_table(result: dict[str, Any]) -> str:
    """Per-class accuracy and the confusion matrix of one evaluation."""
    classes = result["classes"]
    short = [c[:5] for c in classes]
    rows = [(name, percent(acc), *row) for name, acc, row in
            zip(classes, result["per_class_accuracy"], result["confusion"], strict=True)]
    return format_table(["true \\ predicted", "accuracy", *short], rows)


def p_value(p: float | None) -> str:
    """A p-value in 3 significant figures; one below the float range reads '< 1e-300', not 0."""
    if p is None:
        return "-"
    return "< 1e-300" if p < 1e-300 else f"{p:.3g}"


PAIRWISE_HEADERS = ["models (B vs A)", "seeds", "accuracy B - A (95% interval)", "McNemar p (largest over seeds)",
                    "only A right / only B right"]


def pairwise_rows(comparisons: Sequence[Any]) -> list[list[str]]:
    """One row per pair of models (evaluation.stats.PairComparison), as strings for the terminal and HTML."""
    rows = []
    for pair in comparisons:
        tests = list(pair.mcnemar.values())
        counts = " ; ".join(f"{m.b} / {m.c}" for m in tests) if tests else "-"
        rows.append([f"{pair.b} vs {pair.a}", str(len(pair.seeds)), pair.difference.format_percent(),
                     p_value(pair.p_value_max), counts])
    return rows


def spread_cell(spread: Any) -> str:
    """An accuracy over seeds (evaluation.stats.Spread): mean ± sample std, or the mean with '1 seed: spread
    unknown'."""
    if spread is None:
        return "-"
    return accuracy_cell(spread.mean, spread.std, spread.n)


def experiment_table(models: Sequence[str], rows: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of an experiment (explaining.ExperimentRow): a row per condition, a column per model
    with its accuracy mean ± std over the seeds."""
    seeds = {m: max((r.accuracy[m].n for r in rows if m in r.accuracy), default=0) for m in models}
    headers = ["condition", *(f"{m} ({seeds[m]} seed{'s' if seeds[m] != 1 else ''})" for m in models)]
    return headers, [[r.condition, *(spread_cell(r.accuracy.get(m)) for m in models)] for r in rows]


PERMUTATION_HEADERS = ["model", "seeds", "plain pixels (mean ± std)", "permuted pixels (mean ± std)",
                       "permuted - plain (95% interval)"]


def permutation_rows(rows: Sequence[Any]) -> list[list[str]]:
    """One row per model of the permuted-pixels experiment (explaining.PermutationRow)."""
    return [[r.model, str(r.plain.n if r.plain else 0), spread_cell(r.plain), spread_cell(r.permuted),
             r.change.format_percent() if r.change else "-"] for r in rows]


def precision_line(precision: dict[str, Any] | None) -> str | None:
    """A budgeted CPU run's precision choice in words: chosen, asked for, and the measured images/s of each."""
    if not isinstance(precision, dict) or not isinstance(precision.get("images_per_second"), dict):
        return None
    rates = ", ".join(f"{printable(str(k))} {v:,.0f}" for k, v in precision["images_per_second"].items()
                      if isinstance(v, (int, float)))
    native = "native bf16" if precision.get("native_bf16") else "no native bf16"
    return (f"precision {printable(str(precision.get('chosen')))} (asked: {printable(str(precision.get('requested')))}"
            f", {native}; measured images/s on one thread: {rates})")


def estimate_line(estimate: Any, wall_seconds: float | None) -> str:
    """The cost estimated before training against the run's real wall time."""
    from cifarbench.progress import duration

    took = f"; took {duration(wall_seconds)}" if wall_seconds else ""
    return (f"estimate before training: {duration(estimate.total_seconds)} ({duration(estimate.epoch_seconds)} per "
            f"epoch, {estimate.images_per_second:,.0f} images/s in {printable(str(estimate.trains_in))}){took}")


def budget_lines(budget: Any) -> str:
    """A budgeted run's budget in a few lines: seconds planned and used, steps, threads, precision, what it cut."""
    lines = [f"budget: {budget.budget_seconds:g} s, used {budget.used_seconds:.1f} s; {budget.steps} steps, "
             f"{budget.images_per_second:,.0f} images/s, {budget.threads} thread(s)"]
    line = precision_line(budget.precision)
    if line:
        lines.append(f"  {line}")
    lines += [f"  threads: {printable(str(change))}" for change in budget.thread_changes or []]
    lines += [f"  cut: {printable(str(cut))}" for cut in budget.cuts or []]
    return "\n".join(lines)
