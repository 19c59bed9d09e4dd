"""Training images/s at each libgomp spin count, alone and beside a 2-thread cnn training: why cifarbench's entry
points set `GOMP_SPINCOUNT` (src/cifarbench/runtime.py).

    python benchmarks/openmp_spin.py [--spins 10000 300000] [--competitor-spins 10000 300000] [--threads 1 2]
        [--batch 512] [--seconds 5] [--rounds 2] [--settle 18] [--data-dir DIR]

Each measurement is its own process (libgomp reads the spin count when torch loads): plain SGD steps of the fast
recipe's 32-64-128 net, fp32 channels-last, `--batch` images a step, for `--seconds` after two untimed steps.
The spin counts and thread counts are alternated within each round. Phases: alone, then beside
`cifarbench train cnn` with two threads for each of `--competitor-spins` (300000 is libgomp's default, as a
training outside cifarbench has it). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from under_load import competitor

STEPS = r"""
import sys, time, torch
from cifarbench.models import build_model
from cifarbench.training.shape import training_steps

threads, batch, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(threads)
step = training_steps(build_model("speedrun", num_classes=10, in_shape=(3, 32, 32),
                                  kwargs={"widths": [32, 64, 128]}))
step(batch, None, True)
step(batch, None, True)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step(batch, None, True)
    n += batch
print(n / (time.perf_counter() - start))
"""


def rate(spin: int, threads: int, batch: int, seconds: float) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["GOMP_SPINCOUNT"] = str(spin)
    done = subprocess.run([sys.executable, "-c", STEPS, str(threads), str(batch), str(seconds)], env=env,
                          capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def phase(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {str(s): {str(t): [] for t in args.threads} for s in args.spins}
    for _ in range(args.rounds):
        for spin in args.spins:
            for threads in args.threads:
                out[str(spin)][str(threads)].append(rate(spin, threads, args.batch, args.seconds))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spins", type=int, nargs="+", default=[10000, 300000])
    ap.add_argument("--competitor-spins", type=int, nargs="*", default=[10000, 300000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=18.0)
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    args = ap.parse_args()

    from cifarbench.provenance import cpu_description

    results = {"alone": phase(args)}
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-openmp-spin-")
    for spin in args.competitor_spins:
        other = competitor("cnn", 0, runs_dir, args.data_dir, args.settle, {"GOMP_SPINCOUNT": str(spin)})
        try:
            if other.poll() is not None:
                sys.exit(f"the cnn competitor ended before the measurements (exit status {other.returncode})")
            results[f"beside cnn (its spin {spin})"] = phase(args)
        finally:
            other.kill()
            other.wait()
    print(json.dumps({"benchmark": "openmp_spin", "cpu": cpu_description(), "batch": args.batch,
                      "images_per_second": results}, indent=2))


if __name__ == "__main__":
    main()
