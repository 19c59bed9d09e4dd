"""How results look in a notebook: a compact HTML summary (a table and an inline figure) for each result's
`_repr_html_`, and matplotlib figures that display themselves when a cell returns them.

Nothing here runs outside a notebook unless asked: the records call these builders only when Jupyter (or a
caller) asks for their HTML or a plot.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from cifarbench import display_hooks
from cifarbench.classroom import Grading
from cifarbench.explaining import ExperimentReport, Explanation, PermutationReport
from cifarbench.exploring import DataOverview
from cifarbench.inference import Evaluation, ImageScore, Predictions
from cifarbench.models.reference import label
from cifarbench.reporting import html, plots
from cifarbench.reporting.tables import (
    PAIRWISE_HEADERS,
    PERMUTATION_HEADERS,
    comparison_headers,
    comparison_rows,
    experiment_table,
    flops,
    pairwise_rows,
    percent,
    permutation_rows,
)
from cifarbench.runs.records import Comparison, RunRecord, short_labels

KINDS = ("accuracy", "loss")
TABLE_STYLE = "font-size:0.9em;border-collapse:collapse"
IMAGE_STYLE = "max-width:100%;height:auto"


_PENDING: list[Any] = []
"""Figures made in the notebook cell running now: shown when it ends, unless the cell returned them."""


def inline(fig):
    """`fig`, made to show as an image in a notebook, whether the cell returns it or assigns it (`fig = x.plot()`),
    as pyplot's figures do.

    A figure built without pyplot (as every figure here is, so nothing piles up in pyplot's global state)
    displays as text in Jupyter until a PNG formatter is registered for the Figure type; pyplot's inline
    backend registers one, and this does the same when it has not. Pyplot shows its figures when the cell ends;
    this does the same for a figure the cell did not return (Jupyter shows that one itself)."""
    shell = _ipython()
    if shell is not None:
        from matplotlib.figure import Figure

        formatter = shell.display_formatter.formatters["image/png"]
        try:
            formatter.lookup_by_type(Figure)
        except KeyError:
            formatter.for_type(Figure, plots.png_bytes)
        if getattr(shell, "kernel", None) is not None:  # a notebook, not a terminal IPython
            if _show_pending not in shell.events.callbacks["post_run_cell"]:
                shell.events.register("post_run_cell", _show_pending)
            _PENDING.append(fig)
    return fig


def _show_pending(result: Any) -> None:
    """At the end of a cell: display the figures it made and did not return (nor put in an HTML summary)."""
    from IPython.display import display

    pending, _PENDING[:] = list(_PENDING), []
    for fig in pending:
        if fig is not getattr(result, "result", None):
            display(fig)


def _shown(fig) -> None:
    """`fig` is part of an HTML summary: the cell's end must not show it again."""
    _PENDING[:] = [f for f in _PENDING if f is not fig]


def _ipython():
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def _check_kind(kind: str) -> None:
    from cifarbench.errors import CifarbenchError

    if kind not in KINDS:
        raise CifarbenchError(f"unknown plot kind {kind!r}; choose one of: {', '.join(KINDS)}")


def curves_figure(histories: Mapping[str, Sequence[Sequence[Mapping]]], kind: str = "accuracy",
                  target: float | None = None):
    """Learning curves of models over seeds: test accuracy per epoch and second, or the losses per epoch."""
    _check_kind(kind)
    fig = (plots.learning_curves_figure(histories, target=target) if kind == "accuracy"
           else plots.loss_curves_figure(histories))
    return inline(fig)


def run_figure(run: RunRecord, kind: str = "accuracy"):
    """One run's learning curve."""
    return curves_figure({label(run.model): [[h.to_dict() for h in run.history]]}, kind)


def comparison_figure(comparison: Comparison, kind: str = "accuracy"):
    """The compared models' learning curves (mean over seeds, band = min-max)."""
    from cifarbench.runs.records import group_runs

    groups = group_runs(comparison.runs)
    # Short names (`Net`, not `__main__:Net`): matplotlib leaves labels that start with "_" out of legends.
    names = short_labels(groups)
    curves = {names[name]: [[h.to_dict() for h in r.history] for r in rs] for name, rs in groups.items()}
    return curves_figure(curves, kind, comparison.target)


def _block(title: str, table: str, figure=None, notes: Sequence[str] = (), more: Sequence[str] = ()) -> str:
    """A title, a table, notes, an optional figure and `more` (HTML: further tables, images) as one `<div>`
    (figures as inline data: PNGs)."""
    style = f'<table style="{TABLE_STYLE}">'
    parts = [f"<div class=\"cifarbench\"><p><b>{html.esc(title)}</b></p>", table.replace("<table>", style, 1)]
    parts += [f"<p style=\"color:#666\">{html.esc(n)}</p>" for n in notes]
    if figure is not None:
        parts.append(_image(plots.png_bytes(figure), title))
        _shown(figure)
    parts += [m.replace("<table>", style) for m in more]
    return "".join(parts) + "</div>"


def _image(png: bytes, alt: str) -> str:
    return f'<img src="{html.png_data_uri(png)}" style="{IMAGE_STYLE}" alt="{html.esc(alt)}">'


def _pairs_html(pairs: Sequence[Any], heading: str) -> str:
    """The pairwise table (difference with its interval, McNemar) under a heading; empty without pairs."""
    if not pairs:
        return ""
    names = short_labels(name for p in pairs for name in (p.a, p.b))
    rows = [[f"{names[p.b]} vs {names[p.a]}", *row[1:]] for p, row in zip(pairs, pairwise_rows(pairs), strict=True)]
    return f"<p><b>{html.esc(heading)}</b></p>" + html.table(PAIRWISE_HEADERS, rows)


def _has_points(histories: Sequence[Any], key: str = "test_accuracy") -> bool:
    return any(getattr(h, key, None) is not None for h in histories)


def _data_note(dataset: Mapping[str, Any]) -> str:
    if not dataset:
        return ""
    sha = str(dataset.get("sha256") or "-")[:12]
    verified = "official files" if dataset.get("verified") else "not the official files (verify=False)"
    return f"data: {dataset.get('name', '?')}, {dataset.get('train_size', '?')} train / " \
           f"{dataset.get('test_size', '?')} test images, fingerprint {sha}, {verified}"


def run_html(run: RunRecord) -> str:
    """A run's summary row (accuracy, loss, cost) and its learning curve."""
    secs = "-" if run.train_seconds is None else f"{run.train_seconds:.1f}"
    loss = "-" if run.test_loss is None else f"{run.test_loss:.4f}"
    params = "-" if run.params is None else f"{run.params:,}"
    table = html.table(["model", "recipe", "seed", "epochs", "test accuracy", "test loss", "params", "FLOPs/image",
                        "train s", "status"],
                       [[label(run.model), run.recipe, run.seed, len(run.history), percent(run.test_accuracy), loss,
                         params, flops(run.flops_per_image), secs, run.status]])
    notes = [f"run {run.run_id}", _data_note(run.dataset)] + ([f"error: {run.error}"] if run.error else [])
    figure = run_figure(run) if _has_points(run.history) else None
    return _block(f"Run of {label(run.model)}", table, figure, [n for n in notes if n])


def comparison_html(comparison: Comparison) -> str:
    """The comparison table (mean ± std over seeds, cost) and the learning curves of every model."""
    names = short_labels(r.model for r in comparison.results)
    rows = [[names[r.model], *row[1:]] for r, row in zip(comparison.results, comparison_rows(comparison.results),
                                                         strict=True)]
    table = html.table(comparison_headers(comparison.results), rows)
    notes = [f"{f.get('model', '?')} seed {f.get('seed', '?')} failed: {f.get('error', '')}"
             for f in comparison.failures]
    notes += [f"report: {comparison.report}"] if comparison.report else []
    notes.append(_data_note(comparison.dataset or (comparison.runs[0].dataset if comparison.runs else {})))
    notes += [f"warning: {w}" for w in comparison.warnings]
    with_points = any(_has_points(r.history) for r in comparison.runs)
    figure = comparison_figure(comparison) if with_points else None
    return _block(f"Comparison of {', '.join(names.values())}", table, figure,
                  [n for n in notes if n], [_pairs_html(comparison.pairs, "Is the difference real? (pairs of models)")])


def evaluation_figure(evaluation: Evaluation, kind: str = "per_class"):
    """One evaluation's per-class accuracy (`per_class`) or confusion matrix (`confusion`)."""
    import numpy as np

    from cifarbench.errors import CifarbenchError

    if kind == "per_class":
        return inline(plots.per_class_figure({label(evaluation.model): [evaluation.result.per_class_accuracy]},
                                             evaluation.classes))
    if kind == "confusion":
        return inline(plots.confusion_figure({label(evaluation.model): np.asarray(evaluation.result.confusion)},
                                             evaluation.classes))
    raise CifarbenchError(f"unknown plot kind {kind!r}; choose one of: per_class, confusion")


def evaluation_html(evaluation: Evaluation) -> str:
    """An evaluation's accuracy row and its per-class accuracy as a bar chart."""
    r = evaluation.result
    table = html.table(["model", "test accuracy", "test loss", "images", "TTA level"],
                       [[label(evaluation.model), percent(r.accuracy), f"{r.loss:.4f}", f"{r.n:,}", evaluation.tta]])
    notes = [f"run {evaluation.run_id}", _data_note(evaluation.dataset)]
    if not evaluation.dataset_matches_training:
        notes.append("this test set is not the copy the model was trained with (another fingerprint)")
    return _block(f"Evaluation of {label(evaluation.model)}", table, evaluation_figure(evaluation),
                  [n for n in notes if n])


def score_html(score: ImageScore) -> str:
    """Labelled image files scored as the CLI prints them: accuracy, per-class accuracy with the confusion
    matrix (rows true, columns predicted), and the images the model got wrong."""
    r = score.result
    table = html.table(["model", "accuracy", "images", "labels file"],
                       [[label(score.model), percent(r.accuracy), f"{r.n:,}", score.labels_file]])
    short = [c[:5] for c in score.classes]
    rows = [[name, percent(acc), *row] for name, acc, row in
            zip(score.classes, r.per_class_accuracy, r.confusion, strict=True)]
    more = ["<p><b>per class (rows: true class, columns: predicted)</b></p>"
            + html.table(["true \\ predicted", "accuracy", *short], rows)]
    wrong = score.wrong()
    if wrong:
        shown = [[image, truth, predicted] for image, truth, predicted in wrong[:SHOWN_MISTAKES]]
        rest = f" (first {SHOWN_MISTAKES} of {len(wrong)}; .to_dict() lists every image)" if len(wrong) > len(shown) \
            else ""
        more.append(f"<p><b>wrong{html.esc(rest)}</b></p>" + html.table(["image", "label", "predicted"], shown))
    notes = [f"run {score.run_id}"] + [f"warning: {w}" for w in score.warnings]
    return _block(f"{label(score.model)} on {r.n:,} labelled images", table, None, notes, more)


SHOWN_MISTAKES = 20
"""Wrong images listed in a summary (the CLI lists as many)."""
SHOWN_PREDICTIONS = 50
"""Images listed in a predictions summary (`.get("predictions")` holds them all)."""


def predictions_html(result: Mapping[str, Any]) -> str:
    """Classified image files: each image's top classes with their probabilities, as `cifarbench predict` prints."""
    predictions = result.get("predictions", [])
    rows = [[p["image"], ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in p["top"])]
            for p in predictions[:SHOWN_PREDICTIONS]]
    notes = [f"run {result.get('run_id')}"] + [f"warning: {w}" for w in result.get("warnings", [])]
    if len(predictions) > len(rows):
        notes.append(f"first {len(rows)} of {len(predictions)} images; ['predictions'] holds every one")
    return _block(f"{label(str(result.get('model')))} on {len(predictions):,} images",
                  html.table(["image", "top classes"], rows), None, notes)


def overview_html(overview: DataOverview) -> str:
    """A data set's images per class (train and test) and a grid of examples of each class."""
    rows = [[c, overview.counts["train"][i], overview.counts["test"][i]] for i, c in enumerate(overview.classes)]
    rows.append(["total", sum(overview.counts["train"]), sum(overview.counts["test"])])
    table = html.table(["class", "train", "test"], rows)
    return _block(f"{overview.name}: images per class", table, overview.plot(), [_data_note(overview.info)])


def explanation_html(explanation: Explanation) -> str:
    """Each explained run's accuracy and the figures drawn for it (templates or filters and feature maps,
    saliency), then the capacity and robustness figures."""
    from pathlib import Path

    rows = [[r.label, r.seed, percent(r.accuracy), ", ".join(Path(f).stem for f in r.files)]
            for r in explanation.runs]
    table = html.table(["model", "seed", "test accuracy (plain)", "figures"], rows)
    captions = {f: f"{r.label} seed {r.seed}: {Path(f).stem}" for r in explanation.runs for f in r.files}
    more, gone = [], []
    for file in explanation.files:
        caption = captions.get(file, Path(file).stem)
        try:
            more.append(f"<p>{html.esc(caption)}</p>" + _image(Path(file).read_bytes(), caption))
        except OSError:  # deleted or moved since: the rest still shows
            gone.append(f"{caption}: {file} can no longer be read")
    return _block(f"What the models learnt (figures in {explanation.out})", table, None,
                  sorted(set(explanation.notes)) + gone, more)


def experiment_figure(report: ExperimentReport):
    """Accuracy against the shift or the severity, one line per model (mean over seeds, whiskers min-max)."""
    names = short_labels(report.runs_by_model)
    return inline(plots.robustness_figure({names[m]: [{report.name: report.results[r]} for r in runs]
                                           for m, runs in report.runs_by_model.items()}))


def experiment_html(report: ExperimentReport) -> str:
    """The experiment's table (a row per condition, a column per model) and its figure."""
    title = {"translation": "Shifted and mirrored test images", "corruption": "Corrupted test images"}[report.name]
    notes = ["kept in each run's experiments.json"] + ([f"figure: {report.figure}"] if report.figure else [])
    figure = experiment_figure(report) if report.runs_by_model else None
    names = short_labels(report.models)
    rows = [replace(r, accuracy={names.get(m, m): v for m, v in r.accuracy.items()}) for r in report.rows]
    return _block(title, html.table(*experiment_table([names[m] for m in report.models], rows)), figure, notes)


def _short_rows(rows: Sequence[Any]) -> list[Any]:
    """Permutation rows with each model as the tables show it (`Net`, not `__main__:Net`)."""
    names = short_labels(r.model for r in rows)
    return [replace(r, model=names[r.model]) for r in rows]


def permutation_figure(report: PermutationReport):
    """Each model's accuracy on plain and on permuted pixels (mean over seeds, whiskers min-max)."""
    return inline(plots.permutation_figure(_short_rows(report.rows)))


def permutation_html(report: PermutationReport) -> str:
    """Each model's accuracy plain and permuted, the change with its interval, and the pairs in each condition."""
    table = html.table(PERMUTATION_HEADERS, permutation_rows(_short_rows(report.rows)))
    notes = [f"permutation seed {report.permutation_seed}; {len(report.runs)} runs, {len(report.reused)} reused "
             "from the store"] + [f"warning: {w}" for w in report.warnings]
    more = [_pairs_html(report.plain_pairs, "plain pixels: pairs of models"),
            _pairs_html(report.permuted_pairs, "permuted pixels: pairs of models")]
    return _block("Scrambled pixels: plain against permuted", table, permutation_figure(report), notes, more)


def grading_html(grading: Grading) -> str:
    """The leaderboard, then every flag and every submission not graded, each with its reason."""
    from cifarbench.reporting import leaderboard as board

    hidden = grading.hidden is not None
    table = (html.table(board.leaderboard_headers(hidden), board.leaderboard_rows(grading.leaderboard, hidden))
             if grading.leaderboard else "<p>no submission could be graded</p>")
    more = []
    if any(r.flags for r in grading.runs):
        more.append("<p><b>flags</b></p>" + html.table(["student", "run", "severity", "flag", "why"],
                                                       board.flag_rows(grading)))
    if grading.not_graded:
        more.append("<p><b>not graded</b></p>" + html.table(["archive", "student", "run", "why"],
                                                            board.not_graded_rows(grading)))
    notes = [f"written: {path}" for path in (grading.html, grading.csv) if path]
    return _block(f"Leaderboard of {grading.inbox}", table, None, notes, more)


def overview_figure(overview: DataOverview, per_class: int | None = None, split: str | None = None,
                    seed: int | None = None):
    """A row of random example images per class, shown inline."""
    return inline(overview.grid(per_class, split, seed))


# Each record's notebook view, registered from here (above the records): see `display_hooks`.
for _type, _html in ((RunRecord, run_html), (Comparison, comparison_html), (Evaluation, evaluation_html),
                     (ImageScore, score_html), (Predictions, predictions_html), (DataOverview, overview_html),
                     (Explanation, explanation_html), (ExperimentReport, experiment_html),
                     (PermutationReport, permutation_html), (Grading, grading_html)):
    display_hooks.html.register(_type, _html)
for _type, _figure in ((RunRecord, run_figure), (Comparison, comparison_figure), (Evaluation, evaluation_figure),
                       (ImageScore, evaluation_figure), (DataOverview, overview_figure),
                       (ExperimentReport, experiment_figure), (PermutationReport, permutation_figure)):
    display_hooks.figure.register(_type, _figure)
