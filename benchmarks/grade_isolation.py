"""What `grade --trust-code`'s sandbox costs: one inbox graded in-process (no student code runs) and with each
submission in its own boxed process (bubblewrap where it works, and plain rlimits).

    python benchmarks/grade_isolation.py [--bundles 20] [--trainings 4] [--model cnn] [--epochs 1]
                                         [--data-dir DIR] [--no-verify]

Trains `--trainings` short runs (seeds 0..N-1) and submits them round-robin as `--bundles` students, so the inbox
holds that many bundles (copies are flagged as duplicates but graded all the same: the grading cost is per
bundle). Prints one JSON object: wall seconds of each grading, and the isolation's overhead per bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cli(*args: str, data: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "cifarbench", *args, *data], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", type=int, default=20)
    ap.add_argument("--trainings", type=int, default=4)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--data-dir")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    data = [*(["--data-dir", args.data_dir] if args.data_dir else []), *(["--no-verify"] if args.no_verify else [])]
    root = Path(tempfile.mkdtemp(prefix="cifarbench-grade-bench-"))
    runs, inbox = root / "runs", root / "inbox"
    ids = []
    for seed in range(args.trainings):
        out = json.loads(cli("train", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                             "--seed", str(seed), "--device", "cpu", "--runs-dir", str(runs), "--json", data=data))
        ids.append(out["run_id"])
    for i in range(args.bundles):
        cli("submit", ids[i % len(ids)], "--student", f"Student {i:02d}", "--out", str(inbox), "--runs-dir", str(runs),
            data=[])
    timings, load = {}, round(os.getloadavg()[0], 2)
    for name, flags in (("in-process", []), ("bubblewrap", ["--trust-code", "--isolation", "bubblewrap"]),
                        ("process", ["--trust-code", "--isolation", "process"])):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cifarbench", "grade", str(inbox), "--device", "cpu", "--json",
                               "--out", str(root / name), *flags, *data], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            timings[name] = {"error": proc.stderr.strip().splitlines()[-1][:300]}
            continue
        result = json.loads(proc.stdout)
        graded = sum(r["graded"] for r in result["runs"])
        timings[name] = {"seconds": round(seconds, 1), "graded": graded, "isolation": result["isolation"][:40]}
    base = timings["in-process"].get("seconds")
    for name in ("bubblewrap", "process"):
        if base and "seconds" in timings[name]:
            timings[name]["overhead_per_bundle_s"] = round((timings[name]["seconds"] - base) / args.bundles, 2)
    from cifarbench.provenance import cpu_description

    print(json.dumps({"bundles": args.bundles, "trainings": args.trainings, "model": args.model,
                      "epochs": args.epochs, "cpu": cpu_description(), "load_before_grading": load,
                      "grading": timings}, indent=2))


if __name__ == "__main__":
    main()
