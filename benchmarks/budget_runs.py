"""Shared by the budget benchmarks: one `cifarbench train ... --budget S --json` process, and a markdown table
written into a docs page between markers."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "results.md"


def train(model: str, recipe: str, budget: float, seed: int, runs_dir: str, data_dir: str | None,
          device: str = "cpu") -> dict:
    """Run one budgeted training in its own process; its `--json` record plus the process's wall seconds."""
    cmd = [sys.executable, "-m", "cifarbench", "train", model, "--recipe", recipe, "--budget", str(budget),
           "--seed", str(seed), "--no-verify", "--device", device, "--runs-dir", runs_dir, "--json"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    b = out.get("budget") or {}
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    return {"model": model, "recipe": recipe, "budget_seconds": budget, "seed": seed,
            "test_accuracy": out["test_accuracy"], "steps": out["steps"], "epochs": len(out["history"]),
            "used_seconds": b.get("used_seconds", out["wall_seconds"]), "process_seconds": wall,
            "train_pflops": (out.get("train_flops") or 0) / 1e15, "widths": out["config"]["model_kwargs"].get("widths"),
            "batch": out["config"]["batch_size"], "threads": b.get("threads"), "cuts": b.get("cuts", []),
            "tta_used": b.get("tta_used"), "images_per_second": b.get("images_per_second"),
            "probe": b.get("probe"), "shape": b.get("shape"), "notes": notes,
            "precision": (b.get("precision") or {}).get("chosen", out["config"].get("precision")),
            "precision_choice": b.get("precision"), "thread_changes": b.get("thread_changes", [])}


def arguments(description: str) -> argparse.ArgumentParser:
    """The flags the side-by-side benchmarks share: --budgets, --data-dir, --docs, --no-docs."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--budgets", type=float, nargs="+", default=[30, 60, 120])
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    ap.add_argument("--docs", type=Path, default=DOCS, help="page to write the table into")
    ap.add_argument("--no-docs", action="store_true", help="print the JSON only")
    return ap


def publish(benchmark: str, args: argparse.Namespace, rows: list[dict], table: Callable[[list[dict], str], str],
            marker: str | None = None, **extra: object) -> None:
    """Name the processor, write `table(rows, cpu)` into the docs page between the markers of `marker` (default
    the benchmark's name; unless --no-docs), and print the JSON object: benchmark, cpu, `extra`, results."""
    from cifarbench.provenance import cpu_description

    cpu = cpu_description()
    if not args.no_docs:
        write_table((marker or benchmark).replace("_", "-"), table(rows, cpu), args.docs)
    print(json.dumps({"benchmark": benchmark, "cpu": cpu, **extra, "results": rows}, indent=2))


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (what else was running)."""
    return [round(x, 2) for x in os.getloadavg()]


def write_table(name: str, markdown: str, path: Path = DOCS) -> None:
    """Put `markdown` between `<!-- NAME:start -->` and `<!-- NAME:end -->` in `path` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
