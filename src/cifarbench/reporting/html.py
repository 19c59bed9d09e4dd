"""One self-contained HTML report: inline CSS, figures as base64 PNG data URIs, no script, no network.

Every string that comes from a run (ids, configs, paths, class names) is escaped; a Content-Security-Policy
that allows only inline styles and data: images backs that up, so even a missed escape could not run code
or reach the network.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cifarbench.fsutil import atomic_write_text

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1180px;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: .9rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f5; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; }
pre { background: #f6f6f8; padding: .7rem; overflow-x: auto; font-size: .8rem; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: .4rem .8rem; margin: .4rem 0; }
details { margin: .3rem 0; } summary { cursor: pointer; font-family: monospace; }
"""


_BIDI = {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}
"""Directional controls, shown as escapes: in a name or reason from elsewhere they would reorder the text around
them on the page."""


def esc(value: Any) -> str:
    """Text for HTML content or a quoted attribute."""
    return html.escape(str(value).translate(_BIDI), quote=True)


def table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], *, css_class: str = "") -> str:
    """An escaped HTML table."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data_uri(png: bytes) -> str:
    """A PNG as a data: URI (what lets the report travel as one file)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_report(*, title: str, summary: tuple[Sequence[str], Sequence[Sequence[Any]]],
                  runs: tuple[Sequence[str], Sequence[Sequence[Any]]],
                  figures: Sequence[tuple[str, str, bytes]], configs: Mapping[str, Any],
                  datasets: Sequence[Mapping[str, Any]], environment: Mapping[str, Any] | None = None,
                  notes: Sequence[str] = (), tables: Sequence[Sequence[Any]] = ()) -> str:
    """The whole report as one HTML string. `figures` are (heading, caption, PNG bytes); `tables` are further
    tables after the comparison, each (heading, headers, rows) or (heading, headers, rows, caption)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">generated {esc(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}'
        + "".join(f" · {esc(k)} {esc(v)}" for k, v in (environment or {}).items()) + "</p>",
        *(f'<p class="note">{esc(n)}</p>' for n in notes),
        "<h2>Comparison</h2>",
        "<p>Test accuracy as mean ± sample standard deviation over seeds; FLOPs per image count each "
        "multiply-accumulate of the Conv2d and Linear layers as two; training seconds exclude evaluation.</p>",
        table(*summary, css_class="summary"),
    ]
    for heading, headers, rows, *caption in tables:
        parts += [f"<h2>{esc(heading)}</h2>", *(f"<p>{esc(c)}</p>" for c in caption),
                  table(headers, rows, css_class="extra")]
    parts += [
        "<h2>Runs</h2>",
        table(*runs, css_class="runs"),
    ]
    for heading, caption, png in figures:
        parts += [f"<h2>{esc(heading)}</h2>", "<figure>",
                  f'<img src="{png_data_uri(png)}" alt="{esc(heading)}">',
                  f"<figcaption>{esc(caption)}</figcaption></figure>"]
    parts.append("<h2>Data</h2>")
    keys = ["name", "sha256", "verified", "source", "layout", "train_size", "test_size"]
    parts.append(table(keys, [[d.get(k, "-") for k in keys] for d in datasets], css_class="datasets"))
    parts.append("<h2>Configs</h2>")
    for run_id, config in configs.items():
        parts.append(f"<details><summary>{esc(run_id)}</summary><pre>{esc(json.dumps(config, indent=2))}</pre>"
                     "</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(document: str, path: str | os.PathLike) -> Path:
    """Write the report atomically (temp file, fsync, rename), readable by others: it is meant to be shared."""
    return atomic_write_text(path, document, mode=0o644)
