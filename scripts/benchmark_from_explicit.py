"""A DEQ started from a trained explicit EquiformerV2 against a DEQ from scratch, on the toy S2EF data.

1. trains the explicit 4-block toy model for ``--explicit-budget`` seconds (as in the race);
2. writes a DEQ start from it (``scripts/deq_from_explicit.py``: encoder, norm, heads and the
   explicit block ``--block`` for f);
3. trains the DEQ from that start (``task.finetune_from``) and the DEQ from scratch for
   ``--budget`` seconds each, validated every ``--interval`` seconds, side by side (``--jobs``).

    python scripts/benchmark_from_explicit.py --explicit-budget 240 --budget 240 --interval 30 --jobs 2

Writes ``<out>.json`` (every validation), ``<out>.md`` (table) and ``<out>.png`` (validation
force and energy MAE vs training steps, one curve per run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_race import DATASETS, REPO, baselines, resolved_config, train, validation_curves  # noqa: E402

from ocp_deq.cli import prepare_data  # noqa: E402

DEQ_CONFIG, EXPLICIT_CONFIG = DATASETS["s2ef"]


def markdown(result: dict) -> str:
    base = result["baselines"]
    lines = [f"`{result['command']}`: explicit 4-block model trained {result['explicit_budget_s']:.0f} s "
             f"(val force MAE {result['explicit']['validations'][-1]['forces_mae']:.4f}); then each DEQ run "
             f"{result['budget_s']:.0f} s of training, {result['jobs']} side by side. Zero-force baseline "
             f"{base['zero_forces_mae']:.4f} eV/A, training-mean energy {base['mean_energy_mae']:.4f} eV.", "",
             "| run | first validation (step) | force MAE there | final step | final force MAE | final energy MAE "
             "| best force MAE | val solver evals | contraction |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in result["runs"].items():
        first, last = run["validations"][0], run["validations"][-1]
        best = min(v["forces_mae"] for v in run["validations"])
        lines.append(f"| {name} | {first['step']} | {first['forces_mae']:.4f} | {last['step']} | "
                     f"{last['forces_mae']:.4f} | {last['energy_mae']:.4f} | {best:.4f} | "
                     f"{last.get('deq_nstep', float('nan')):.1f} | {last.get('deq_contraction', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, base, unit) in zip(axes, (("forces_mae", "zero_forces_mae", "eV/A"),
                                            ("energy_mae", "mean_energy_mae", "eV"))):
        runs = {"explicit 4 blocks (the source)": result["explicit"], **result["runs"]}
        validation_curves(ax, runs, key, result["baselines"][base], "step",
                          f"toy S2EF: validation {key.replace('_', ' ')}", "training steps", unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--explicit-budget", type=float, default=240.0, help="training seconds of the explicit model")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds of each DEQ run")
    parser.add_argument("--interval", type=float, default=30.0, help="validate every this many training seconds")
    parser.add_argument("--block", default="-1", help="explicit block(s) for f (deq_from_explicit.py --blocks)")
    parser.add_argument("--jobs", type=int, default=2, help="DEQ runs side by side")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument("--work-dir", default="runs/from_explicit")
    parser.add_argument("--out", default="docs/benchmarks/from_explicit")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    os.chdir(REPO)
    prepare_data(resolved_config(EXPLICIT_CONFIG, args.override))

    print(f"explicit 4 blocks: training for {args.explicit_budget:.0f} s ...", flush=True)
    explicit = train(EXPLICIT_CONFIG, [*args.override, "model.num_layers=4"], work / "explicit",
                     args.explicit_budget, args.interval)
    [checkpoint] = glob.glob(str(work / "explicit" / "checkpoints" / "*" / "checkpoint.pt"))
    start = work / "deq_start.pt"
    mapping = subprocess.run([sys.executable, str(REPO / "scripts" / "deq_from_explicit.py"), checkpoint,
                              "--config-yml", DEQ_CONFIG, "--blocks", args.block, "-o", str(start), *args.override],
                             capture_output=True, text=True, check=True).stdout
    print(mapping, flush=True)

    runs = {"DEQ from the explicit weights": [f"task.finetune_from={start}"], "DEQ from scratch": []}
    threads = max((os.cpu_count() or 1) // args.jobs, 1) if args.jobs > 1 else None

    def run_one(index, name, overrides):
        print(f"{name}: training for {args.budget:.0f} s ...", flush=True)
        return train(DEQ_CONFIG, [*args.override, *overrides], work / f"deq{index}", args.budget, args.interval, threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, i, name, overrides) for i, (name, overrides) in enumerate(runs.items())]
        results = dict(zip(runs, (future.result() for future in futures)))
    result = {"command": "python scripts/benchmark_from_explicit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "explicit_budget_s": args.explicit_budget, "budget_s": args.budget, "interval_s": args.interval,
              "jobs": args.jobs, "block": args.block, "mapping": mapping.splitlines(), "explicit": explicit,
              "runs": results, "baselines": baselines(resolved_config(EXPLICIT_CONFIG, args.override))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
