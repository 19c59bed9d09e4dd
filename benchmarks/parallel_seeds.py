"""Wall time of `compare --seeds N` with one job against J parallel jobs, and their per-seed accuracies.

    python benchmarks/parallel_seeds.py [--models fnn] [--seeds 4] [--jobs 2] [--deterministic] [--data-dir DIR]

Prints one JSON object: wall seconds of each, the speed-up, and each seed's accuracy under both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run(models: list[str], seeds: int, jobs: int, data_dir: str | None, epochs: int | None,
        deterministic: bool) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "cifarbench", "compare", *models, "--seeds", str(seeds), "--jobs", str(jobs),
           "--no-verify", "--runs-dir", tempfile.mkdtemp(prefix="cifarbench-jobs-"), "--json"]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if deterministic:
        cmd.append("--deterministic")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    return json.loads(proc.stdout), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fnn"])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (shorter benchmark)")
    ap.add_argument("--deterministic", action="store_true",
                    help="thread-count-independent kernels, so both settings must give the same bits per seed")
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    args = ap.parse_args()
    out = {}
    for jobs in (1, args.jobs):
        report, wall = run(args.models, args.seeds, jobs, args.data_dir, args.epochs, args.deterministic)
        out[f"jobs_{jobs}"] = {"wall_seconds": wall, "failures": report["failures"],
                               "results": [{"model": r["model"], "seeds": r["seeds"],
                                            "test_accuracy_mean": r["test_accuracy_mean"],
                                            "test_accuracy_std": r["test_accuracy_std"]} for r in report["results"]],
                               "per_seed_accuracy": _per_seed(report)}
    one, many = out["jobs_1"], out[f"jobs_{args.jobs}"]
    print(json.dumps({"benchmark": "parallel_seeds", "models": args.models, "seeds": args.seeds, "epochs": args.epochs,
                      "deterministic": args.deterministic, "cores": os.cpu_count(),
                      **out, "speedup": one["wall_seconds"] / many["wall_seconds"],
                      "same_per_seed_accuracy": one["per_seed_accuracy"] == many["per_seed_accuracy"]}, indent=2))


def _per_seed(report: dict) -> dict:
    """model -> [accuracy of seed 0, seed 1, ...], read from each run's metrics.json."""
    from pathlib import Path

    out = {}
    for r in report["results"]:
        accs = []
        for run_id in r["run_ids"]:
            plot_dir = Path(report["plot"]).parent
            metrics = json.loads((plot_dir / run_id / "metrics.json").read_text())
            accs.append((metrics["seed"], metrics["test_accuracy"]))
        out[r["model"]] = [a for _, a in sorted(accs)]
    return out


if __name__ == "__main__":
    main()
