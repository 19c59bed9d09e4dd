"""Accuracy of `speedrun` under wall-clock budgets: mean ± std over seeds (benchmark (a) of the fast issue).

    python benchmarks/cpu_budget.py [--budgets 30 60 120 300] [--seeds 3] [--data-dir DIR] [--device cpu]
        [--extra ARG ...]   # passed to `cifarbench train`, e.g. --extra=--widths=32,64,128

Each run is a separate `cifarbench train speedrun --budget S --no-verify --json` process, timed from the
outside too (`wall_seconds_process`: interpreter start, data load and all). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run(cmd: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[30, 60, 120, 300])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default="speedrun")
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", action="append", default=[], help="extra argument for cifarbench train")
    args = ap.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-budget-")
    rows = []
    for budget in args.budgets:
        runs = []
        for seed in range(args.seeds):
            cmd = [sys.executable, "-m", "cifarbench", "train", args.model, "--budget", str(budget),
                   "--seed", str(seed), "--no-verify", "--device", args.device, "--runs-dir", runs_dir, "--json",
                   *args.extra]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            out, wall = run(cmd)
            runs.append({"seed": seed, "test_accuracy": out["test_accuracy"], "wall_seconds_run": out["wall_seconds"],
                         "wall_seconds_process": wall, "train_seconds": out["train_seconds"],
                         "epochs": len(out["history"]),
                         "steps": out["steps"], "train_pflops": out["train_flops"] / 1e15,
                         "widths": out["config"]["model_kwargs"].get("widths")})
            print(f"budget {budget:g}s seed {seed}: {100 * out['test_accuracy']:.2f}% in {out['wall_seconds']:.1f}s "
                  f"(process {wall:.1f}s)", file=sys.stderr, flush=True)
        acc = [r["test_accuracy"] for r in runs]
        rows.append({"budget_seconds": budget, "test_accuracy_mean": statistics.fmean(acc),
                     "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "wall_seconds_max": max(r["wall_seconds_run"] for r in runs),
                     "process_seconds_max": max(r["wall_seconds_process"] for r in runs),
                     "train_pflops_mean": statistics.fmean(r["train_pflops"] for r in runs), "runs": runs})
    import torch

    from cifarbench.provenance import cpu_description

    print(json.dumps({"benchmark": "cpu_budget", "model": args.model, "device": args.device,
                      "threads": torch.get_num_threads(),
                      "torch": str(torch.__version__), "cores": os.cpu_count(), "cpu": cpu_description(),
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
