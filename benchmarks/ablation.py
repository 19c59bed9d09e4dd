"""What each ingredient of the fast recipe buys: turn each off in turn at one budget (default 120 s on CPU).

    python benchmarks/ablation.py [--budget 120] [--seeds 1] [--data-dir DIR] [--device cpu] [--only NAME ...]

Prints one JSON object: accuracy of the full recipe and of each ablation, and the difference. Every run is
`cifarbench train speedrun --budget S` through the Python API, with one config field changed (as `--set` does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ABLATIONS = {
    "full recipe": {},
    "no whitening init (patch layer left at its random init, frozen)": {"whiten": False},
    "no lookahead": {"lookahead.enabled": False},
    "no label smoothing": {"label_smoothing": 0.0},
    "no TTA": {"tta": 0},
    "no flip": {"augment.flip": False},
    "no translate": {"augment.translate": 0},
    "random (not alternating) flip": {"augment.alternate_flip": False},
    "constant lr": {"schedule.kind": "constant"},
    "no BatchNorm-bias lr boost": {"optimizer.bias_lr_scale": 1.0},
    "fp32 instead of bf16": {"precision": "fp32"},
    "SGD for the filters too (no Muon; same batch)": {"optimizer.name": "sgd"},
    "GELU instead of SiLU": {"model_kwargs.act": "gelu"},
    "TTA on every image (not selective)": {"tta_threshold": 0.0},
    "plus progressive resizing (first half of the steps on 20x20; not in the recipe)": {"low_res": 20},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the fast recipe's settings differ by device)")
    ap.add_argument("--only", nargs="*", help="ablation names to run (default: all)")
    args = ap.parse_args()
    import tempfile

    import torch

    from cifarbench.config import DataConfig
    from cifarbench.data import load_dataset
    from cifarbench.running import train_run
    from cifarbench.training.recipes import make_config

    dataset = load_dataset(DataConfig(data_dir=args.data_dir, verify=False))
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-ablation-")
    rows = []
    for name, changes in ABLATIONS.items():
        if args.only and name not in args.only and name != "full recipe":
            continue
        accs = []
        for seed in range(args.seeds):
            config = make_config("speedrun", budget_seconds=args.budget, seed=seed, device=args.device,
                                 data_dir=args.data_dir, verify=False).with_changes(changes)
            out = train_run(config, runs_dir=runs_dir, dataset=dataset, progress=False).to_dict()
            accs.append(out["test_accuracy"])
            print(f"{name} seed {seed}: {100 * out['test_accuracy']:.2f}% ({out['wall_seconds']:.0f} s, "
                  f"{len(out['history'])} epochs)", file=sys.stderr, flush=True)
        rows.append({"ablation": name, "changes": changes, "test_accuracy_mean": statistics.fmean(accs),
                     "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accuracies": accs})
    full = rows[0]["test_accuracy_mean"]
    for r in rows:
        r["delta_vs_full"] = r["test_accuracy_mean"] - full
    print(json.dumps({"benchmark": "ablation", "budget_seconds": args.budget, "device": args.device,
                      "torch": str(torch.__version__), "dataset": dataset.info(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
