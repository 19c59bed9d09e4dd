"""The classroom leaderboard as a terminal table, a CSV file and one self-contained HTML page."""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifarbench.errors import CifarbenchError, Keyword
from cifarbench.fsutil import atomic_write_text
from cifarbench.reporting.html import CSP, STYLE, esc, table
from cifarbench.reporting.tables import format_table

if TYPE_CHECKING:
    from cifarbench.classroom import Grading, LeaderboardEntry
    from cifarbench.evaluation.stats import Spread

def rules() -> list[str]:
    """How the leaderboard was made, in a few sentences (from the rules' own constants)."""
    from cifarbench.classroom import CLAIM_TOLERANCE, CLAIM_TOLERANCE_IMAGES, TIE_Z

    return [
        "Re-scored: the submitted weights rebuilt here and evaluated on the whole test set with the run's own "
        "test-time augmentation. Rank: by the hidden set's accuracy when one was given, else by the re-scored one.",
        f"Ties: entries whose scores differ by less than {TIE_Z:g} standard errors of the difference share a rank "
        "(shown as 1=). The standard error is binomial over the images scored, plus the seed spread for several "
        "seeds.",
        "claim-mismatch: the claimed accuracy is further from the re-scored one than evaluation noise allows "
        f"({100 * CLAIM_TOLERANCE:g} points, and at least {CLAIM_TOLERANCE_IMAGES} images). claim-from-epoch: the "
        "claim is an earlier epoch's test accuracy, not the final model's.",
        "test-selection (a warning, not proof): the epoch count differs from the recipe's default, no "
        "validation split was held out and the test accuracy was shown after earlier epochs, so it may have been "
        "chosen on the test set (not for a shorter run whose test accuracy was still rising past noise at its "
        "end).",
        "Parameters are counted from the submitted weights; training compute and seconds are as each run reports "
        "them.",
        "Ran: in-process for cifarbench's own models (no student code); bubblewrap or process for student code run "
        "with --trust-code, each submission in its own sandboxed process that sees images, never labels.",
        "duplicate: the same weights (by content) as another student's. look-alike, mixed-script, not-on-roster: "
        "names compared after Unicode NFKC normalisation, with look-alike letters mapped to one.",
    ]


def spread_cell(spread: Spread | None) -> str:
    """'45.12%' for one run, '45.12% ± 0.31 (3 seeds)' for several."""
    if spread is None:
        return "-"
    if spread.n < 2 or spread.std is None:
        return f"{100 * spread.mean:.2f}%"
    return f"{100 * spread.mean:.2f}% ± {100 * spread.std:.2f} ({spread.n} seeds)"


def compute_cell(flops: float | None) -> str:
    """Training compute with an SI prefix: '0.12 TFLOP'."""
    if flops is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.2f} {prefix}FLOP"
    return f"{flops:.0f} FLOP"


def seconds_cell(spread: Spread | None) -> str:
    if spread is None:
        return "-"
    return f"{spread.mean:.1f}" + (f" ± {spread.std:.1f}" if spread.std is not None else "")


def leaderboard_headers(hidden: bool) -> list[str]:
    return ["rank", "student", "model", "seeds", "params", "training compute", "train s", "claimed",
            "re-scored", *(["hidden set"] if hidden else []), "flags", "ran"]


def leaderboard_rows(entries: Sequence[LeaderboardEntry], hidden: bool) -> list[list[str]]:
    """One row of strings per entry (shared by the terminal table and the HTML page)."""
    return [[e.rank_label, e.student, e.model, str(len(e.run_ids)), "-" if e.params is None else f"{e.params:,}",
             compute_cell(e.train_flops), seconds_cell(e.train_seconds), spread_cell(e.claimed),
             spread_cell(e.rescored), *([spread_cell(e.hidden)] if hidden else []), ", ".join(e.flags) or "-",
             e.isolation]
            for e in entries]


def flag_rows(grading: Grading) -> list[list[str]]:
    return [[r.student or "-", r.run_id or "-", f.severity, f.kind, f.message] for r in grading.runs for f in r.flags]


def not_graded_rows(grading: Grading) -> list[list[str]]:
    return [[r.archive, r.student or "-", r.run_id or "-", r.error or "-"] for r in grading.not_graded]


def leaderboard_text(grading: Grading) -> str:
    """The terminal rendering: the table, then every flag and every run not graded, each with its reason."""
    hidden = grading.hidden is not None
    parts = [format_table(leaderboard_headers(hidden), leaderboard_rows(grading.leaderboard, hidden))
             if grading.leaderboard else "no submission could be graded"]
    if any(r.flags for r in grading.runs):
        parts.append("flags:\n" + format_table(["student", "run", "severity", "flag", "why"], flag_rows(grading)))
    if grading.not_graded:
        parts.append("not graded:\n" + format_table(["archive", "student", "run", "why"], not_graded_rows(grading)))
    return "\n\n".join(parts)


def _csv_cell(value: Any) -> Any:
    """Text a spreadsheet would run as a formula (=, +, -, @ first) gets a leading quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


CSV_HEADERS = ["rank", "tied", "student", "model", "recipe", "seeds", "run_ids", "params", "train_flops",
               "train_seconds_mean", "claimed_mean", "claimed_std", "rescored_mean", "rescored_std", "hidden_mean",
               "hidden_std", "flags", "isolation", "error"]


def leaderboard_csv(grading: Grading) -> str:
    """One row per leaderboard entry (accuracies as fractions; std empty for one seed), then one per run that
    was not graded (no rank, its reason under `error`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADERS)
    get = lambda s, k: "" if s is None or getattr(s, k) is None else getattr(s, k)  # noqa: E731
    for e in grading.leaderboard:
        writer.writerow(map(_csv_cell, [
            e.rank, e.tied, e.student, e.model, e.recipe, len(e.run_ids), " ".join(e.run_ids),
            "" if e.params is None else e.params, "" if e.train_flops is None else e.train_flops,
            get(e.train_seconds, "mean"), get(e.claimed, "mean"), get(e.claimed, "std"), e.rescored.mean,
            get(e.rescored, "std"), get(e.hidden, "mean"), get(e.hidden, "std"), ";".join(e.flags), e.isolation, ""]))
    for r in grading.not_graded:
        writer.writerow(map(_csv_cell, ["", "", r.student or "", r.model or "", r.recipe or "", "", r.run_id or "",
                                        "", "", "", "" if r.claimed_accuracy is None else r.claimed_accuracy, "", "",
                                        "", "", "", "", r.isolation or "", r.error or ""]))
    return out.getvalue()


def leaderboard_html(grading: Grading) -> str:
    """One self-contained page (no script, no network; every string escaped)."""
    hidden = grading.hidden is not None
    data = grading.dataset
    meta = [f"generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"test set: {data.get('name')} ({data.get('test_size')} images, sha256 {str(data.get('sha256'))[:12]}…"
            f"{'' if data.get('verified') else ', not the official files'})"]
    if grading.hidden:
        meta.append(f"hidden set: {grading.hidden['images']} images")
    meta.append("student code " + ("run (--trust-code): " + grading.isolation if grading.trust_code else "not run"))
    if grading.missing:
        meta.append("on the roster, no submission: " + ", ".join(grading.missing))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>Leaderboard</title><style>{STYLE}</style></head><body>", "<h1>Leaderboard</h1>",
             f'<p class="meta">{" · ".join(esc(m) for m in meta)}</p>',
             table(leaderboard_headers(hidden), leaderboard_rows(grading.leaderboard, hidden),
                   css_class="leaderboard")]
    if any(r.flags for r in grading.runs):
        parts += ["<h2>Flags</h2>", table(["student", "run", "severity", "flag", "why"], flag_rows(grading),
                                          css_class="flags")]
    if grading.not_graded:
        parts += ["<h2>Not graded</h2>", table(["archive", "student", "run", "why"], not_graded_rows(grading),
                                               css_class="not-graded")]
    parts += ["<h2>How this was graded</h2>", "<ul>", *(f"<li>{esc(rule)}</li>" for rule in rules()), "</ul>",
              "</body></html>"]
    return "\n".join(parts) + "\n"


def write_csv(grading: Grading, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, leaderboard_csv(grading), mode=0o644)


def write_html(grading: Grading, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, leaderboard_html(grading), mode=0o644)


LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard.html")


def check_leaderboard_folder(folder: str | os.PathLike) -> Path:
    """`folder` if the leaderboard files can be written there (checked before hours of grading, not after)."""
    target = Path(folder).expanduser()
    for name in LEADERBOARD_FILES:
        if (target / name).is_symlink() or ((target / name).exists() and not (target / name).is_file()):
            raise CifarbenchError("{path} is not a plain file; remove it or choose {option}", path=target / name,
                                  option=Keyword("out", ...))
    return target


def write_leaderboard(grading: Grading, folder: str | os.PathLike) -> Grading:
    """Write `leaderboard.csv` and `leaderboard.html` into `folder`; `grading` records where."""
    target = check_leaderboard_folder(folder)
    target.mkdir(parents=True, exist_ok=True)
    grading.csv = str(write_csv(grading, target / "leaderboard.csv"))
    grading.html = str(write_html(grading, target / "leaderboard.html"))
    return grading
