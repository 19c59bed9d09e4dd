"""Training and inference throughput (images/s) of registered models on one device.

    python benchmarks/throughput.py [--models speedrun cnn ...] [--device auto] [--precision auto]
        [--batch-size 1024] [--steps 8] [--widths 64,256,256]

Synthetic inputs (throughput does not depend on pixel values). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from cifarbench.device import describe_device, keep_cpu_memory, resolve_device
from cifarbench.evaluation.analysis import TRAIN_FLOPS_PER_FORWARD, model_cost
from cifarbench.models import count_parameters, create_model, list_models
from cifarbench.provenance import cpu_description


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, batch: int, steps: int) -> dict:
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)  # noqa: E731

    def train_step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer_step() -> None:
        with autocast():
            model(x)

    out = {}
    for name, fn, mode in (("train", train_step, True), ("inference", infer_step, False)):
        model.train(mode)
        for _ in range(2):  # warm-up: allocations, kernel choice
            fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        out[f"{name}_images_per_second"] = batch * steps / (time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list_models())
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--widths", action="append", default=[], help="speedrun widths to try, e.g. 64,256,256")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        keep_cpu_memory()  # as the training loop does: without it glibc hands every large buffer back each step
    dtype = None if args.precision == "fp32" or (args.precision == "auto" and device.type == "mps") else torch.bfloat16
    rows = []
    variants = [(m, {}) for m in args.models]
    variants += [("speedrun", {"widths": [int(w) for w in ws.split(",")]}) for ws in args.widths]
    for name, kwargs in variants:
        torch.manual_seed(0)
        model = create_model(name, **kwargs)
        speed = measure(model, device, dtype, args.batch_size, args.steps)
        flops = model_cost(name, (3, 32, 32), model_kwargs=kwargs).flops_per_image
        # Achieved rate of the matrix products (the FLOPs airbench counts): how close a model runs to the device's peak.
        rows.append({"model": name, **kwargs, "params": count_parameters(model), "flops_per_image": flops, **speed,
                     "train_tflops_per_second":
                         speed["train_images_per_second"] * TRAIN_FLOPS_PER_FORWARD * flops / 1e12,
                     "inference_tflops_per_second": speed["inference_images_per_second"] * flops / 1e12})
    print(json.dumps({"benchmark": "throughput", "device": describe_device(device), "cpu": cpu_description(),
                      "torch": str(torch.__version__),
                      "precision": args.precision, "batch_size": args.batch_size, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
