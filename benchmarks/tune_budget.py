"""Choose speedrun settings for a CPU budget on a validation split (never the test set).

    python benchmarks/tune_budget.py [--budget 120] [--val-split 5000] [--variant NAME ...] [--seed S]

Each variant trains on the training set minus `--val-split` held-out images and is scored on those; the
test set is not evaluated for selection (its final number is printed only for the record, marked so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# name -> widths, batch size (the per-example learning rate is kept, as --batch-size does) and other changes
# by dotted config field (as `--set`).
VARIANTS = {
    "w32-64-128 b1024": {"widths": [32, 64, 128], "batch": 1024},
    "w32-64-128 b512": {"widths": [32, 64, 128], "batch": 512},
    "w32-128-128 b1024": {"widths": [32, 128, 128], "batch": 1024},
    "w24-64-128 b512": {"widths": [24, 64, 128], "batch": 512},
    "w32-64-256 b512": {"widths": [32, 64, 256], "batch": 512},
    "w32-64-256 b256": {"widths": [32, 64, 256], "batch": 256},
    "w32-96-256 b512": {"widths": [32, 96, 256], "batch": 512},
    "w32-64-384 b512": {"widths": [32, 64, 384], "batch": 512},
    "w32-64-256 b256 lr x2/3": {"widths": [32, 64, 256], "batch": 256, "set": {"optimizer.lr": 0.25}},
    "w32-64-256 b256 lr x4/3": {"widths": [32, 64, 256], "batch": 256, "set": {"optimizer.lr": 0.5}},
    "w32-64-256 b256 muon 0.1": {"widths": [32, 64, 256], "batch": 256,
                                 "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.1}},
    "w32-64-256 b512 muon 0.15": {"widths": [32, 64, 256], "batch": 512,
                                  "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
    "w64-256-256 b1024": {"widths": [64, 256, 256], "batch": 1024},
    "w64-256-256 b1024 muon 0.2": {"widths": [64, 256, 256], "batch": 1024,
                                   "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.2}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--val-split", type=int, default=5000)
    ap.add_argument("--variant", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    args = ap.parse_args()
    import tempfile

    from cifarbench.api import train_run
    from cifarbench.config import DataConfig
    from cifarbench.data import load_dataset
    from cifarbench.training.recipes import make_config

    dataset = load_dataset(DataConfig(data_dir=args.data_dir, verify=False))
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-tune-")
    rows = []
    for name in args.variant:
        v = VARIANTS[name]
        config = make_config("speedrun", budget_seconds=args.budget, val_split=args.val_split, device="cpu",
                             model_kwargs={"widths": v["widths"]}, batch_size=v["batch"], data_dir=args.data_dir,
                             verify=False, seed=args.seed).with_changes(v.get("set", {}))
        out = train_run(config, runs_dir=runs_dir, dataset=dataset, progress=False)
        val = out["history"][-1]["val_accuracy"]
        rows.append({"variant": name, **v, "val_accuracy": val, "epochs": len(out["history"]), "steps": out["steps"],
                     "wall_seconds": out["wall_seconds"], "test_accuracy_for_the_record": out["test_accuracy"]})
        print(f"{name}: val {100 * val:.2f}% ({len(out['history'])} epochs, {out['wall_seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "tune_budget", "budget_seconds": args.budget, "val_split": args.val_split,
                      "seed": args.seed, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
