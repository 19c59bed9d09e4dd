"""A budget under load: each budgeted speedrun trained once on the machine as it is, then again beside one
CPU-bound process (a Python busy loop, stopped when the run ends).

    python benchmarks/under_load.py [--budgets 30 60 120] [--seed 0] [--data-dir DIR] [--docs PATH | --no-docs]

Prints one JSON object (per budget: wall seconds against the budget, steps loaded against idle, accuracy, what
the loaded run gave up) and writes the table into docs/results.md between the `under-load` markers.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

import budget_runs

BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def loaded(budget: float, seed: int, runs_dir: str, data_dir: str | None) -> dict:
    """The run with one busy-looping process beside it (bounded in time, killed when the run ends)."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(limit=3 * budget + 120)])
    try:
        return budget_runs.train("speedrun", "fast", budget, seed, runs_dir, data_dir)
    finally:
        busy.kill()
        busy.wait()


def table(rows: list[dict], cpu: str) -> str:
    lines = [f"Machine: {cpu}.", "",
             "| budget | idle: accuracy, steps, seconds used | loaded: accuracy, steps, seconds used | "
             "loaded / idle steps | loaded: within budget + 5% | threads idle / loaded | what the loaded run cut "
             "| load average before |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        i, lo = row["idle"], row["loaded"]
        lines.append(f"| {row['budget_seconds']:g} s | {100 * i['test_accuracy']:.2f}%, {i['steps']}, "
                     f"{i['used_seconds']:.1f} s | {100 * lo['test_accuracy']:.2f}%, {lo['steps']}, "
                     f"{lo['used_seconds']:.1f} s | {row['steps_ratio']:.2f} | {'yes' if row['within'] else 'NO'} | "
                     f"{i['threads']} / {lo['threads']} | {'; '.join(lo['cuts']) or '-'} | {row['load_average']} |")
    return "\n".join(lines)


def main() -> None:
    ap = budget_runs.arguments(__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-under-load-")
    rows = []
    for budget in args.budgets:
        load = budget_runs.load_average()
        idle = budget_runs.train("speedrun", "fast", budget, args.seed, runs_dir, args.data_dir)
        busy = loaded(budget, args.seed, runs_dir, args.data_dir)
        row = {"budget_seconds": budget, "load_average": load, "idle": idle, "loaded": busy,
               "steps_ratio": busy["steps"] / max(idle["steps"], 1),
               "wall_over_budget": busy["used_seconds"] / budget,
               "within": busy["used_seconds"] <= 1.05 * budget and idle["used_seconds"] <= 1.05 * budget}
        print(f"budget {budget:g}s: idle {100 * idle['test_accuracy']:.2f}% {idle['steps']} steps "
              f"{idle['used_seconds']:.1f}s; loaded {100 * busy['test_accuracy']:.2f}% {busy['steps']} steps "
              f"{busy['used_seconds']:.1f}s", file=sys.stderr, flush=True)
        rows.append(row)
    budget_runs.publish("under_load", args, rows, table)


if __name__ == "__main__":
    main()
