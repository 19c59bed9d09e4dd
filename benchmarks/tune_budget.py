"""Choose speedrun settings for a CPU budget on a validation split (never the test set).

    python benchmarks/tune_budget.py [--budget 120] [--val-split 5000] [--variant NAME ...] [--seed S]
                                     [--set FIELD=VALUE ...]

Variant "recipe" is the recipe's own choice for the budget; `--set` changes a config field in every variant
(as `cifarbench train --set` does), e.g. `--variant recipe --set label_smoothing=0.1`. Each variant trains on
the training set minus `--val-split` held-out images and is scored on those (per-epoch validation is plain,
without TTA); the test set is not used for selection (its final number is printed only for the record).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# name -> widths, batch size (the per-example learning rate is kept, as --batch-size does), other model
# arguments ("model") and other changes by dotted config field (as `--set`).
VARIANTS = {
    "recipe": {},
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
    # Longer budgets: cheaper first blocks buy epochs, wider last blocks capacity (~0.6x and ~0.8x the
    # multiply-adds of 64-256-256), or the same net at a smaller batch (more steps).
    "w32-128-512 b512 muon 0.15": {"widths": [32, 128, 512], "batch": 512,
                                   "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
    "w48-192-384 b512 muon 0.15": {"widths": [48, 192, 384], "batch": 512,
                                   "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
    "w64-256-256 b512 muon 0.15": {"widths": [64, 256, 256], "batch": 512,
                                   "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
    # SiLU instead of GELU: GELU was 8% of a 120 s step in a profile, and SiLU's forward + backward took
    # 55-70% of GELU's time at the net's shapes.
    "w32-64-256 b512 muon 0.15 silu": {"widths": [32, 64, 256], "batch": 512, "model": {"act": "silu"},
                                       "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
    "w48-192-384 b512 muon 0.15 silu": {"widths": [48, 192, 384], "batch": 512, "model": {"act": "silu"},
                                        "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
    "w64-256-256 b1024 muon 0.2 silu": {"widths": [64, 256, 256], "batch": 1024, "model": {"act": "silu"},
                                        "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.2}},
    # Short budgets (30-60 s, 2-4 epochs): a cheaper last block, or smaller batches for more steps.
    "w32-64-128 b512 muon 0.15 silu": {"widths": [32, 64, 128], "batch": 512, "model": {"act": "silu"},
                                       "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
    "w32-64-256 b256 muon 0.1 silu": {"widths": [32, 64, 256], "batch": 256, "model": {"act": "silu"},
                                      "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.1}},
    "w24-48-192 b512 muon 0.15 silu": {"widths": [24, 48, 192], "batch": 512, "model": {"act": "silu"},
                                       "set": {"optimizer.name": "muon", "optimizer.muon_lr": 0.15}},
}


def recorded(config: dict, field: str) -> object:
    """A dotted field as the run recorded it in its config (proof that a change was applied)."""
    for part in field.split("."):
        config = config[part]
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--val-split", type=int, default=5000)
    ap.add_argument("--variant", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a config change applied to every variant (repeatable)")
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    args = ap.parse_args()
    import tempfile

    from cifarbench.config import DataConfig, parse_changes
    from cifarbench.data import load_dataset
    from cifarbench.errors import CifarbenchError
    from cifarbench.running import train_run
    from cifarbench.training.recipes import make_config

    try:  # a typo in --set ends here, not after the data set has loaded
        extra = parse_changes(args.set)
        make_config("speedrun", device="cpu").with_changes(extra)
    except CifarbenchError as e:
        ap.error(str(e))
    dataset = load_dataset(DataConfig(data_dir=args.data_dir, verify=False))
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-tune-")
    rows = []
    for name in args.variant:
        v = VARIANTS[name]
        model = {"widths": v["widths"], **v.get("model", {})} if v else {}
        shape = {"model_kwargs": model, "batch_size": v["batch"]} if v else {}
        changes = {**v.get("set", {}), **extra}
        config = make_config("speedrun", budget_seconds=args.budget, val_split=args.val_split, device="cpu",
                             data_dir=args.data_dir, verify=False, seed=args.seed, **shape).with_changes(changes)
        out = train_run(config, runs_dir=runs_dir, dataset=dataset, progress=False).to_dict()
        val = out["history"][-1]["val_accuracy"]
        rows.append({"variant": name, **v, "recorded": {k: recorded(out["config"], k) for k in changes},
                     "val_accuracy": val, "epochs": len(out["history"]), "steps": out["steps"],
                     "wall_seconds": out["wall_seconds"], "train_pflops": (out.get("train_flops") or 0) / 1e15,
                     "probe_images_per_second": ((out.get("budget") or {}).get("probe") or {}).get("images_per_second"),
                     "test_accuracy_for_the_record": out["test_accuracy"]})
        print(f"{name}: val {100 * val:.2f}% ({len(out['history'])} epochs, {out['wall_seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "tune_budget", "budget_seconds": args.budget, "val_split": args.val_split,
                      "seed": args.seed, "set": extra, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
