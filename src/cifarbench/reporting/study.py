"""A tuning study's report: one self-contained HTML page with the optimisation history, the parameter
importances and the best trial's validation curves (tuning.TuneResult is what it is handed)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cifarbench.reporting.html import CSP, STYLE, esc, png_data_uri, table, write_report
from cifarbench.reporting.plots import _epoch_axis, _figure, png_bytes


def history_figure(trials: Sequence[Any]):
    """Each trial's validation accuracy by trial number (pruned ones at their last epoch), and the best so far."""
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    best, so_far = [], None
    for state, colour in (("complete", "tab:blue"), ("pruned", "tab:gray")):
        shown = [t for t in trials if t.state == state and t.value is not None]
        ax.scatter([t.number for t in shown], [100 * t.value for t in shown], c=colour, s=18, label=state)
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == "complete" and t.value is not None:
            so_far = max(so_far or 0.0, t.value)
        best.append((t.number, so_far))
    ax.step([n for n, v in best if v is not None], [100 * v for _, v in best if v is not None], where="post",
            color="tab:orange", label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def importance_figure(importances: Mapping[str, float]):
    fig = _figure(7, 0.5 + 0.4 * max(1, len(importances)))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (Optuna's default evaluator, normalised to sum to 1)")
    return fig


def curves_figure(history: Sequence[Mapping[str, Any]]):
    fig = _figure(7, 3.2)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [100 * (h.get("val_accuracy") or 0) for h in history], marker="o", label="validation accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    _epoch_axis(ax)
    twin = ax.twinx()
    twin.plot(epochs, [h.get("train_loss") for h in history], color="tab:gray", linestyle="--", label="train loss")
    twin.set_ylabel("train loss")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    return fig


def write_study_report(result: Any, histories: Mapping[int, Sequence[Mapping[str, Any]]],
                       out: str | os.PathLike) -> Path:
    """The study's page at `out` (atomically)."""
    figures = [("Optimisation history", "validation accuracy of each trial; the test set played no part",
                png_bytes(history_figure(result.trials)))]
    notes = []
    if result.importances:
        figures.append(("Parameter importances", "optuna.importance.get_param_importances over the completed trials",
                        png_bytes(importance_figure(result.importances))))
    else:
        notes.append("parameter importances need at least two completed trials with different values")
    best = result.best
    if best is not None and histories.get(best.number):
        figures.append((f"Best trial ({best.number}): curves", f"run {best.run_id}",
                        png_bytes(curves_figure(histories[best.number]))))
    summary = [["study", result.study], ["storage", result.storage], ["searched", ", ".join(result.params)],
               ["trials", len(result.trials)],
               ["best trial", "-" if best is None else f"{best.number} (run {best.run_id})"],
               ["best validation accuracy", "-" if best is None else f"{100 * best.value:.2f}%"],
               ["its test accuracy (scored once)",
                "-" if result.test_accuracy is None else f"{100 * result.test_accuracy:.2f}%"]]
    rows = [[t.number, t.state, "-" if t.value is None else f"{100 * t.value:.2f}%", t.epochs, t.run_id or "-",
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())]
            for t in result.trials]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
             f"<title>{esc(result.study)}</title><style>{STYLE}</style></head><body>",
             f"<h1>Study {esc(result.study)}</h1>",
             f'<p class="meta">generated {esc(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}</p>',
             *(f'<p class="note">{esc(n)}</p>' for n in notes),
             table(["", ""], summary), "<h2>Trials</h2>",
             table(["trial", "state", "validation accuracy", "epochs", "run", "parameters"], rows)]
    for heading, caption, png in figures:
        parts += [f"<h2>{esc(heading)}</h2>", "<figure>", f'<img src="{png_data_uri(png)}" alt="{esc(heading)}">',
                  f"<figcaption>{esc(caption)}</figcaption></figure>"]
    parts.append("</body></html>")
    return write_report("\n".join(parts) + "\n", out)
