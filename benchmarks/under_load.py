"""A budget under load: each budgeted speedrun trained once on the machine as it is, then again beside a
competing process: a Python busy loop (`busy`, one CPU-bound thread) and/or a notebook-CNN training with two
threads (`cnn`, the common case of two trainings on one laptop); each is stopped when the run ends.

    python benchmarks/under_load.py [--budgets 30 60 120] [--beside busy cnn] [--seed 0] [--data-dir DIR]
        [--settle 15] [--competitor-env NAME=VALUE ...] [--docs PATH | --no-docs]

`--competitor-env GOMP_SPINCOUNT=300000` gives the cnn competitor libgomp's default spin, as a training outside
cifarbench has it (cifarbench's entry points shorten it: src/cifarbench/runtime.py).

Prints one JSON object (per budget and competitor: wall seconds against the budget, steps loaded against idle,
accuracy, what the loaded run gave up, the precision it chose, whether the bar held: within budget + 5% and at
least 40% of the idle run's steps) and writes the table into docs/results.md between the `under-load` markers
(`under-load-beside-cnn` when a cnn competitor was measured).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import budget_runs

BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"
CNN_THREADS = 2
SETTLE_SECONDS = 15.0
"""How long the cnn competitor gets to load its data and start its steps before the measured run starts."""
BAR_STEPS = 0.4  # the maintainers' bar: at least this share of the idle run's steps, within budget + 5%
BAR_WALL = 1.05


def competitor(kind: str, budget: float, runs_dir: str, data_dir: str | None,
               settle: float = SETTLE_SECONDS, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the competing process: a busy loop, or a 2-thread cnn training (notebook recipe, bounded in time)."""
    if kind == "busy":
        return subprocess.Popen([sys.executable, "-c", BUSY.format(limit=3 * budget + 120)])
    cmd = [sys.executable, "-m", "cifarbench", "train", "cnn", "--recipe", "seed", "--epochs", "10000", "--no-verify",
           "--device", "cpu", "--runs-dir", os.path.join(runs_dir, "competitor")]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(CNN_THREADS), **(extra_env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(settle)
    return proc


def loaded(kind: str, budget: float, seed: int, runs_dir: str, data_dir: str | None,
           settle: float = SETTLE_SECONDS, extra_env: dict[str, str] | None = None) -> dict:
    """The run with the competitor beside it (killed when the run ends; whether it ran throughout is recorded)."""
    other = competitor(kind, budget, runs_dir, data_dir, settle, extra_env)
    try:
        if other.poll() is not None:
            sys.exit(f"the {kind} competitor ended before the run started (exit status {other.returncode})")
        run = budget_runs.train("speedrun", "fast", budget, seed, runs_dir, data_dir)
        run["competitor_ran_throughout"] = other.poll() is None
        return run
    finally:
        other.kill()
        other.wait()


def table(rows: list[dict], cpu: str) -> str:
    lines = [f"Machine: {cpu}.", "",
             "| budget | beside | idle: accuracy, steps, seconds used | loaded: accuracy, steps, seconds used | "
             "loaded / idle steps | bar (within budget + 5%, >= 40% of the steps) | threads idle / loaded | "
             "precision idle / loaded | what the loaded run cut | load average before |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        i, lo = row["idle"], row["loaded"]
        lines.append(f"| {row['budget_seconds']:g} s | {row['beside']} | {100 * i['test_accuracy']:.2f}%, "
                     f"{i['steps']}, {i['used_seconds']:.1f} s | {100 * lo['test_accuracy']:.2f}%, {lo['steps']}, "
                     f"{lo['used_seconds']:.1f} s | {row['steps_ratio']:.2f} | {'yes' if row['bar'] else 'NO'} | "
                     f"{i['threads']} / {lo['threads']} | {i['precision']} / {lo['precision']} | "
                     f"{'; '.join(lo['cuts']) or '-'} | {row['load_average']} |")
    return "\n".join(lines)


def main() -> None:
    ap = budget_runs.arguments(__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beside", nargs="+", choices=("busy", "cnn"), default=["busy"],
                    help="the competing processes, each measured in turn")
    ap.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                    help="seconds the cnn competitor runs before the measured run starts")
    ap.add_argument("--competitor-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the cnn competitor only (repeatable)")
    args = ap.parse_args()
    if any("=" not in item for item in args.competitor_env):
        ap.error("--competitor-env takes NAME=VALUE")
    extra_env = dict(item.split("=", 1) for item in args.competitor_env)
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-under-load-")
    rows = []
    for budget in args.budgets:
        load = budget_runs.load_average()
        idle = budget_runs.train("speedrun", "fast", budget, args.seed, runs_dir, args.data_dir)
        for kind in args.beside:
            busy = loaded(kind, budget, args.seed, runs_dir, args.data_dir, args.settle, extra_env)
            ratio = busy["steps"] / max(idle["steps"], 1)
            within = busy["used_seconds"] <= BAR_WALL * budget and idle["used_seconds"] <= BAR_WALL * budget
            row = {"budget_seconds": budget, "beside": kind, "competitor_env": extra_env if kind == "cnn" else {},
                   "load_average": load, "idle": idle, "loaded": busy,
                   "steps_ratio": ratio, "wall_over_budget": busy["used_seconds"] / budget, "within": within,
                   "bar": within and ratio >= BAR_STEPS}
            print(f"budget {budget:g}s beside {kind}: idle {100 * idle['test_accuracy']:.2f}% {idle['steps']} steps "
                  f"{idle['used_seconds']:.1f}s; loaded {100 * busy['test_accuracy']:.2f}% {busy['steps']} steps "
                  f"{busy['used_seconds']:.1f}s (process {busy['process_seconds']:.1f}s); ratio {ratio:.2f}",
                  file=sys.stderr, flush=True)
            rows.append(row)
    marker = "under_load_beside_cnn" if "cnn" in args.beside else "under_load"
    budget_runs.publish("under_load", args, rows, table, marker=marker, beside=args.beside)


if __name__ == "__main__":
    main()
