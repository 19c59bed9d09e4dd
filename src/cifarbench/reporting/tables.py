"""Plain-text tables for the terminal: aligned columns, no dependency."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table whose columns also line up in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def percent(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def comparison_table(results: Sequence[dict[str, Any]]) -> str:
    """The compare command's table: accuracy mean ± std over seeds, parameters, training seconds."""
    rows = [(r["model"], r["recipe"], len(r["seeds"]), percent(r["test_accuracy_mean"], r["test_accuracy_std"]),
             f"{r['params']:,}", f"{r['train_seconds_mean']:.1f}") for r in results]
    return format_table(["model", "recipe", "seeds", "test accuracy (mean ± std)", "params", "train s"], rows)


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    """One line per stored run."""
    rows = [(r["id"], r["status"], r["model"], r["recipe"], r["seed"], r["epochs"], percent(r["test_accuracy"]),
             "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}",
             "yes" if (r["dataset"] or {}).get("verified") else "no", r["device"] or "-") for r in runs]
    return format_table(["run", "status", "model", "recipe", "seed", "epochs", "test acc", "train s", "official data",
                         "device"], rows)


def evaluation_table(result: dict[str, Any]) -> str:
    """Per-class accuracy and the confusion matrix of one evaluation."""
    classes = result["classes"]
    short = [c[:5] for c in classes]
    rows = [(name, percent(acc), *row) for name, acc, row in
            zip(classes, result["per_class_accuracy"], result["confusion"])]
    return format_table(["true \\ predicted", "accuracy", *short], rows)
