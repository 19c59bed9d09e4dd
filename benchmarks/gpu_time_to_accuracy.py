"""GPU time-to-accuracy of `speedrun` over many runs, timed with CUDA events, data loading excluded (as airbench
reports it): benchmark (c) of the fast issue.

    python benchmarks/gpu_time_to_accuracy.py [--runs 20] [--data-dir DIR] [--epochs 10] [--compile]
                                              [--set FIELD=VALUE ...]

The data set is loaded once and kept on the GPU; a warm-up run (not counted) pays for kernel selection and
compilation. Each counted run's seconds cover model creation, whitening init, training and the final TTA
evaluation. Prints one JSON object with torch version, device name, mean ± std accuracy and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=None, help="override the fast recipe's epochs")
    ap.add_argument("--widths", default=None, help="e.g. 64,256,256 (the recipe's default otherwise)")
    ap.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a config field, as `cifarbench train --set` (e.g. optimizer.name=muon)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_time_to_accuracy: no CUDA GPU here")
    from cifarbench.config import DataConfig, parse_changes
    from cifarbench.data import load_dataset
    from cifarbench.errors import CifarbenchError
    from cifarbench.training.loop import train
    from cifarbench.training.recipes import make_config

    kwargs = {"model_kwargs": {"widths": [int(w) for w in args.widths.split(",")]}} if args.widths else {}
    try:  # parsed once, and a typo in --set ends here, not after the data set is on the GPU
        changes = parse_changes(args.set)
        make_config("speedrun", device="cuda", epochs=args.epochs, **kwargs).with_changes(changes)
    except CifarbenchError as e:
        ap.error(str(e))
    dataset = load_dataset(DataConfig(data_dir=args.data_dir, verify=False))
    device = torch.device("cuda")
    results = []
    for run in range(args.runs + 1):  # run 0 warms up
        config = make_config("speedrun", seed=run, device="cuda", epochs=args.epochs, compile=args.compile or None,
                             eval_every_epoch=False, data_dir=args.data_dir, verify=False,
                             **kwargs).with_changes(changes)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = train(config, dataset, device, progress=False)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        if run:
            results.append({"seed": run, "test_accuracy": result.final.accuracy, "seconds": seconds,
                            "train_seconds": result.train_seconds})
            print(f"run {run}: {100 * result.final.accuracy:.2f}% in {seconds:.2f} s", file=sys.stderr, flush=True)
    acc = [r["test_accuracy"] for r in results]
    secs = [r["seconds"] for r in results]
    print(json.dumps({"benchmark": "gpu_time_to_accuracy", "torch": str(torch.__version__),
                      "device": torch.cuda.get_device_name(device), "dataset": dataset.info(),
                      "config": config.to_dict(), "runs": len(results),
                      "test_accuracy_mean": statistics.fmean(acc), "test_accuracy_std": statistics.stdev(acc),
                      "seconds_mean": statistics.fmean(secs), "seconds_std": statistics.stdev(secs),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
