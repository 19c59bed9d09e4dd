"""Same budget, three recipes: the fast recipe, airbench94's published recipe and the notebook's CNN, each trained
under the same `--budget` on this machine, one after the other.

    python benchmarks/same_budget.py [--budgets 30 60 120] [--seeds 1] [--data-dir DIR] [--docs PATH | --no-docs]

Each run is a separate `cifarbench train MODEL --recipe R --budget S --no-verify --json` process. Prints one JSON
object (per budget: each recipe's accuracy mean and runs, and the fast recipe's lead over the others) and writes
the table into docs/results.md between the `same-budget` markers.
"""

from __future__ import annotations

import statistics
import sys
import tempfile

import budget_runs

RECIPES = (("speedrun", "fast"), ("speedrun", "airbench94"), ("cnn", "seed"))


def table(rows: list[dict], cpu: str) -> str:
    lines = [f"Machine: {cpu}.", "",
             "| budget | fast (speedrun) | airbench94 (speedrun) | notebook CNN (seed) | fast - airbench94 | "
             "fast - CNN | steps fast / airbench94 / CNN | seconds used (max) | load average |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = {x["recipe"]: x for x in row["recipes"]}
        acc = [f"{100 * r[k]['test_accuracy_mean']:.2f}%" for k in ("fast", "airbench94", "seed")]
        steps = " / ".join("-".join(str(s) for s in sorted({x["steps"] for x in r[k]["runs"]}))
                           for k in ("fast", "airbench94", "seed"))
        used = max(x["used_seconds"] for k in r for x in r[k]["runs"])
        lines.append(f"| {row['budget_seconds']:g} s | {' | '.join(acc)} | {100 * row['fast_minus_airbench94']:+.2f} "
                     f"| {100 * row['fast_minus_cnn']:+.2f} | {steps} | {used:.1f} s | {row['load_average']} |")
    return "\n".join(lines)


def main() -> None:
    ap = budget_runs.arguments(__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="cifarbench-same-budget-")
    rows = []
    for budget in args.budgets:
        load = budget_runs.load_average()
        per_recipe = []
        for model, recipe in RECIPES:
            runs = [budget_runs.train(model, recipe, budget, seed, runs_dir, args.data_dir)
                    for seed in range(args.seeds)]
            for r in runs:
                print(f"budget {budget:g}s {recipe}: {100 * r['test_accuracy']:.2f}% in {r['steps']} steps, "
                      f"{r['used_seconds']:.1f}s", file=sys.stderr, flush=True)
            per_recipe.append({"model": model, "recipe": recipe,
                               "test_accuracy_mean": statistics.fmean(r["test_accuracy"] for r in runs), "runs": runs})
        acc = {r["recipe"]: r["test_accuracy_mean"] for r in per_recipe}
        rows.append({"budget_seconds": budget, "load_average": load, "recipes": per_recipe,
                     "fast_minus_airbench94": acc["fast"] - acc["airbench94"],
                     "fast_minus_cnn": acc["fast"] - acc["seed"]})
    budget_runs.publish("same_budget", args, rows, table, seeds=args.seeds)


if __name__ == "__main__":
    main()
