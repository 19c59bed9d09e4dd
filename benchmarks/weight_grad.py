"""speedrun's training step with oneDNN's weight gradients against the matrix-product ones of its last block
(`model_kwargs.cpu_matmul_weight_grad`), alternated in one process so the machine's swings hit both alike.

    python benchmarks/weight_grad.py [--widths 32,64,256] [--batch-size 512] [--rounds 8] [--steps 3]

Synthetic inputs, bf16 autocast, channels-last, on the CPU. Each round times `--steps` steps of each kind
(after one untimed step); prints one JSON object with the median step times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from cifarbench.device import keep_cpu_memory
from cifarbench.models import create_model
from cifarbench.models.speedrun import DiracConv
from cifarbench.provenance import cpu_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="32,64,256")
    ap.add_argument("--act", default="silu")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    keep_cpu_memory()  # as the training loop does
    torch.manual_seed(0)
    widths = [int(w) for w in args.widths.split(",")]
    model = create_model("speedrun", widths=widths, act=args.act).to(memory_format=torch.channels_last)
    switched = [m for m in model.modules() if isinstance(m, DiracConv) and m.matmul_weight_grad]
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"onednn": [], "matmul": []}
    for _ in range(args.rounds):
        for kind in times:
            for conv in switched:
                conv.matmul_weight_grad = kind == "matmul"
            step()  # untimed: the first step after a switch builds the other kernels' state
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[kind].append((time.perf_counter() - start) / args.steps)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"benchmark": "weight_grad", "cpu": cpu_description(), "threads": torch.get_num_threads(),
                      "torch": str(torch.__version__), "widths": widths, "batch_size": args.batch_size,
                      "switched_convs": len(switched), "rounds": args.rounds, "steps_per_round": args.steps,
                      "onednn_step_ms": 1000 * median["onednn"], "matmul_step_ms": 1000 * median["matmul"],
                      "ratio": median["matmul"] / median["onednn"],
                      "per_round_ratio": [m / o for o, m in zip(times["onednn"], times["matmul"], strict=True)]},
                     indent=2))


if __name__ == "__main__":
    main()
