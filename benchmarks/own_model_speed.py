"""Own models' training images/s before and after the precision and layout choice, beside the registered built-in
of the same architecture (the notebook's CNN as a file model against `cnn`).

    python benchmarks/own_model_speed.py [--models examples/notebook_models.py:CNNModel cnn ...]
        [--batch-size 100] [--steps 5] [--rounds 3] [--threads N]

"before": the precision and layout the run's config gives (the seed recipe: fp32, channels-last, or the standard
layout for a model that cannot take it, as `running.preflight` falls back). "after": what a budgeted run's probe
chooses by timing (`shape.choose_kernels`, precision auto). Both are timed on the same random batches in
alternated rounds (the fastest round counts), plain SGD steps, on one process. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cifarbench.device import cpu_bf16_native, keep_cpu_memory
from cifarbench.evaluation.analysis import cost_of
from cifarbench.models import build_model
from cifarbench.provenance import cpu_description
from cifarbench.training.recipes import make_config
from cifarbench.training.shape import candidate, choose_kernels, training_steps

DEFAULT_MODELS = ["examples/notebook_models.py:CNNModel", "cnn"]


def takes_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's forward pass runs on a channels-last batch (a `.view` on a feature map does not)."""
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            model.to(memory_format=torch.channels_last)(x)
        return True
    except RuntimeError:
        return False
    finally:
        model.to(memory_format=torch.contiguous_format)


def rate(step, batch: int, steps: int, dtype: torch.dtype | None, channels_last: bool) -> float:
    """Training images/s of `steps` steps of `batch` images, after one untimed step."""
    step(batch, dtype, channels_last)
    t = time.perf_counter()
    for _ in range(steps):
        step(batch, dtype, channels_last)
    return batch * steps / (time.perf_counter() - t)


def measure(ref: str, batch: int, steps: int, rounds: int) -> dict:
    config = make_config(ref, "seed", device="cpu")
    torch.manual_seed(0)
    model = build_model(ref, code_sha256=config.model_sha256)
    cost = cost_of(model, (3, 32, 32))
    before = ("bf16" if config.precision == "bf16" else "fp32", config.channels_last and takes_channels_last(model))
    step = training_steps(model)
    kernels = choose_kernels(step, "auto", native_bf16=cpu_bf16_native())
    after = (kernels.precision, kernels.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16}
    best = {"before": 0.0, "after": 0.0}
    for _ in range(rounds):  # alternated, so a change of load on a shared machine hits both alike
        for name, (precision, layout) in (("before", before), ("after", after)):
            best[name] = max(best[name], rate(step, batch, steps, dtype[precision], layout))
    return {"model": ref, "params": cost.params, "flops_per_image": cost.flops_per_image,
            "before": {"trains_in": candidate(*before), "images_per_second": round(best["before"], 1)},
            "after": {"trains_in": candidate(*after), "images_per_second": round(best["after"], 1)},
            "speedup": round(best["after"] / best["before"], 3), "choice": kernels.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch-size", type=int, default=100, help="the seed recipe's batch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_cpu_memory()  # as the training loop does
    results = [measure(ref, args.batch_size, args.steps, args.rounds) for ref in args.models]
    print(json.dumps({"benchmark": "own_model_speed", "cpu": cpu_description(),
                      "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "torch": str(torch.__version__), "batch_size": args.batch_size, "steps": args.steps,
                      "rounds": args.rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
