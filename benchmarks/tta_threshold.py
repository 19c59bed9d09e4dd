"""Choose the selective-TTA threshold on a validation split (never the test set).

    python benchmarks/tta_threshold.py [--budget 120] [--seeds 3] [--val-split 5000]
                                       [--thresholds 0.5 0.6 0.7 0.8] [--data-dir DIR]

Trains one budgeted `speedrun` run per seed on the training set minus `--val-split` held-out images, then
scores each model on those images with plain evaluation, full TTA (threshold 0) and selective TTA at each
threshold, timing each. It also reports the share of held-out and of (seen) training images below each
threshold: the budget planner estimates the final evaluation's cost from the training images. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--val-split", type=int, default=5000)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    args = ap.parse_args()
    import tempfile

    import torch

    from cifarbench.config import DataConfig
    from cifarbench.data import load_dataset
    from cifarbench.data.loader import DeviceSplit
    from cifarbench.device import autocast, autocast_dtype
    from cifarbench.evaluation.metrics import confidence, evaluate
    from cifarbench.inference import load_trained_model
    from cifarbench.running import train_run
    from cifarbench.training.loop import split_validation
    from cifarbench.training.recipes import make_config

    dataset = load_dataset(DataConfig(data_dir=args.data_dir, verify=False))
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-tta-")
    rows = []
    for seed in range(args.seeds):
        config = make_config("speedrun", budget_seconds=args.budget, val_split=args.val_split, device="cpu",
                             data_dir=args.data_dir, verify=False, seed=seed)
        out = train_run(config, runs_dir=runs_dir, dataset=dataset, progress=False).to_dict()
        loaded = load_trained_model(out["run_id"], runs_dir=runs_dir, device="cpu")
        model, amp = loaded.model, autocast_dtype(config, loaded.device)
        train, val = split_validation(dataset.train, config.val_split)
        val_data, seen = (DeviceSplit(s, loaded.device, config.data.mean, config.data.std, config.channels_last)
                          for s in (val, train))
        classes = len(dataset.classes)
        # Confidence of the plain view on held-out and on seen training images (as many as held out).
        model.eval()
        top = {}  # top-class probability of the plain view
        with torch.no_grad(), autocast(loaded.device, amp):
            for name, data, n in (("val", val_data, len(val_data)), ("train", seen, len(val_data))):
                x = data.normalise(data.images[:n])
                top[name] = torch.cat([confidence(model(b)) for b in x.split(config.eval_batch_size)])
        row = {"seed": seed, "steps": out["steps"], "wall_seconds": out["wall_seconds"], "evaluations": []}
        for tta, threshold in [(0, 0.0), (config.tta, 0.0)] + [(config.tta, t) for t in args.thresholds]:
            start = time.perf_counter()
            ev = evaluate(model, val_data, num_classes=classes, batch_size=config.eval_batch_size,
                          autocast_dtype=amp, tta=tta, tta_threshold=threshold)
            entry = {"tta": tta, "threshold": threshold, "val_accuracy": ev.accuracy,
                     "seconds": time.perf_counter() - start}
            if threshold > 0:
                entry.update({f"unsure_{k}": float((c < threshold).float().mean()) for k, c in top.items()})
            row["evaluations"].append(entry)
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{'plain' if e['tta'] == 0 else e['threshold'] or 'full'} "
                                          f"{100 * e['val_accuracy']:.2f}% {e['seconds']:.2f} s"
                                          for e in row["evaluations"]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "tta_threshold", "budget_seconds": args.budget, "val_split": args.val_split,
                      "torch": torch.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
