"""Ray against the local process pool for the same `compare`, timed in one process: the local pool first, then a
local Ray (its start timed apart), then the local pool again, each with a fresh runs folder.

    python benchmarks/ray_overhead.py [--models fnn] [--seeds 8] [--jobs 2] [--epochs 1] [--data-dir DIR]

Prints one JSON object: each wall time, Ray's start, the ratio of Ray's wall time to the local pool's (the mean of
the two local runs, so drift in the machine's load counts against neither), and whether every seed's accuracy is
the same under both (it must be: the same threads per run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def timed_compare(models: list[str], seeds: int, jobs: int, epochs: int, data_dir: str | None,
                  executor: str) -> tuple[float, dict[str, float]]:
    from cifarbench.comparing import compare
    from cifarbench.training.recipes import make_config

    def make(model: str, seed: int):
        return make_config(model, data_dir=data_dir, verify=False, epochs=epochs, seed=seed, device="cpu")

    runs = tempfile.mkdtemp(prefix=f"cifarbench-{executor}-")
    start = time.perf_counter()
    out = compare(models, make, seeds=seeds, jobs=jobs, runs_dir=runs, executor=executor, progress=False)
    wall = time.perf_counter() - start
    if out.failures:
        raise SystemExit(f"{executor}: {out.failures}")
    return wall, {f"{r.model} seed {r.seed}": r.test_accuracy for r in out.runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fnn"])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    args = ap.parse_args()

    import ray
    import torch

    from cifarbench import runtime
    from cifarbench.data import load_dataset
    from cifarbench.training.recipes import make_config

    runtime.configure()
    load_dataset(make_config(args.models[0], data_dir=args.data_dir, verify=False).data, progress=False)  # cached
    spec = (args.models, args.seeds, args.jobs, args.epochs, args.data_dir)
    local_first, accuracy_local = timed_compare(*spec, "local")
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - start
    on_ray, accuracy_ray = timed_compare(*spec, "ray")
    ray.shutdown()
    local_again, _ = timed_compare(*spec, "local")
    local = (local_first + local_again) / 2
    print(json.dumps({"benchmark": "ray_overhead", "models": args.models, "seeds": args.seeds, "jobs": args.jobs,
                      "epochs": args.epochs, "cores": os.cpu_count(), "load_average": os.getloadavg(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "local_wall_seconds": [local_first, local_again], "ray_wall_seconds": on_ray,
                      "ray_start_seconds": ray_start, "ray_over_local": on_ray / local,
                      "ray_with_start_over_local": (on_ray + ray_start) / local,
                      "same_per_seed_accuracy": accuracy_local == accuracy_ray}, indent=2))


if __name__ == "__main__":
    main()
