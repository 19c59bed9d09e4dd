"""The notebook's own code against cifarbench's `seed` recipe, one after the other on this machine.

    python benchmarks/seed_vs_notebook.py [--data-dir DIR] [--seed 0]

Prints one JSON object: per model, accuracy and training seconds of both (evaluation excluded from both),
and the speed-up. Both read the same data copy; cifarbench runs with --no-verify so the JPEG-q75 copy works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])}... failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", default=None, help="run history for cifarbench's runs (default: a temp folder)")
    args = ap.parse_args()
    if not args.data_dir:
        sys.exit("seed_vs_notebook: give --data-dir or set $CIFARBENCH_DATA")
    import tempfile

    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="cifarbench-bench-")
    notebook = run_json([sys.executable, str(HERE / "notebook_reference.py"), "--data-dir", args.data_dir,
                         "--seed", str(args.seed)])
    ours = run_json([sys.executable, "-m", "cifarbench", "compare", "fnn", "cnn", "--recipe", "seed", "--no-verify",
                     "--data-dir", args.data_dir, "--runs-dir", runs_dir, "--json"])
    rows = []
    for nb in notebook["results"]:
        cb = next(r for r in ours["results"] if r["model"] == nb["model"])
        rows.append({"model": nb["model"], "epochs": nb["epochs"],
                     "notebook_accuracy": nb["test_accuracy"], "cifarbench_accuracy": cb["test_accuracy_mean"],
                     "notebook_train_seconds": nb["train_seconds"],
                     "cifarbench_train_seconds": cb["train_seconds_mean"],
                     "speedup": nb["train_seconds"] / cb["train_seconds_mean"]})
    print(json.dumps({"benchmark": "seed_vs_notebook", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "torch": notebook["torch"], "threads": notebook["threads"], "dataset": ours["dataset"],
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
