"""The race: the DEQ and explicit EquiformerV2 (1, 4, 8 blocks, same width) each trained for
the same wall-clock budget through the real trainer (``python main.py --mode train``), on
the toy S2EF data and the toy molecule, validated at fixed training-time intervals.

Each run gets ``optim.max_train_seconds`` (its cosine schedule ends with the budget, so
every model anneals whatever its step cost) and ``optim.eval_every_seconds`` (validation
time does not count); see ``ocp_deq/trainers/wall_clock.py``. Runs go one after another
on this machine, each with all its threads. The baselines are what a model that learnt
nothing scores on the same validation frames: zero forces, and the training mean energy.

    python scripts/benchmark_race.py --budget 240 --interval 30 --out docs/benchmarks/race

``--variant NAME=key=value,key=value`` adds DEQ runs with config overrides (recipe studies).
Writes ``<out>.json`` (every validation of every run), ``<out>.md`` (final table) and
``<out>.png`` (validation force and energy MAE vs training time, one curve per model).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import ocp_deq  # noqa: E402,F401  (before fairchem)
from fairchem.core.common.utils import create_dict_from_args, load_config, merge_dicts  # noqa: E402

from ocp_deq.cli import prepare_data  # noqa: E402
from ocp_deq.data import read_lmdb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = {  # name -> (DEQ config, explicit config)
    "s2ef": ("configs/s2ef/toy/deq_equiformer_v2_toy.yml", "configs/s2ef/toy/equiformer_v2_toy.yml"),
    "molecule": ("configs/molecules/toy/deq_equiformer_v2_molecule_toy.yml",
                 "configs/molecules/toy/equiformer_v2_molecule_toy.yml"),
}
MODELS = {  # name -> (DEQ or explicit config, overrides); the DEQ iterates 1 block
    "DEQ": ("deq", []),
    "explicit-1": ("explicit", ["model.num_layers=1"]),
    "explicit-4": ("explicit", ["model.num_layers=4"]),
    "explicit-8": ("explicit", ["model.num_layers=8"]),
    # the per-atom force head (ocp_deq.models.node_force_head) on both sides
    "DEQ-node-head": ("deq", ["model.force_head=node"]),
    "explicit-4-node-head": ("explicit", ["model.name=equiformer_v2_node_head", "model.num_layers=4"]),
}
DEFAULT_MODELS = ("DEQ", "explicit-1", "explicit-4", "explicit-8")


def resolved_config(path: str, overrides: list[str]) -> dict:
    """The yml with includes and command-line style overrides, as fairchem's CLI builds it."""
    config, _, _ = load_config(str(REPO / path))
    config, _ = merge_dicts(config, create_dict_from_args(overrides))
    return config


def baselines(config: dict) -> dict:
    """Scores of models that learnt nothing about geometry, with fairchem's metric conventions:
    zero forces (mean |component| over the atoms evaluated), the training mean energy, and a
    linear fit of the energy on the element counts (what fitted element references alone give)."""
    free_only = config["outputs"]["forces"].get("eval_on_free_atoms", True)

    def frames(split):
        src = Path(REPO, config["dataset"][split]["src"])
        return [frame for lmdb in sorted(src.glob("*.lmdb")) for frame in read_lmdb(lmdb)]

    train, val = frames("train"), frames("val")
    energy = {split: np.array([float(f.energy) for f in data]) for split, data in (("train", train), ("val", val))}
    mean_energy = float(energy["train"].mean())
    forces = np.concatenate([
        (f.forces[f.fixed == 0] if free_only and hasattr(f, "fixed") else f.forces).numpy() for f in val])

    def counts(data):  # atoms of each element per frame
        return np.stack([np.bincount(f.atomic_numbers.long().numpy(), minlength=120) for f in data]).astype(float)

    weights = np.linalg.lstsq(counts(train), energy["train"], rcond=None)[0]
    return {"zero_forces_mae": float(np.abs(forces).mean()),
            "mean_energy_mae": float(np.mean(np.abs(energy["val"] - mean_energy))),
            "composition_energy_mae": float(np.mean(np.abs(counts(val) @ weights - energy["val"])))}


def train(config_path: str, overrides: list[str], run_dir: Path, budget: float, interval: float,
          threads: int | None = None) -> dict:
    """One budgeted training run through the CLI (``threads``: its torch threads); its validations."""
    command = [sys.executable, str(REPO / "main.py"), "--mode", "train", "--config-yml", str(REPO / config_path),
               "--cpu", "--run-dir", str(run_dir), "--identifier", "race",
               f"optim.max_train_seconds={budget}", f"optim.eval_every_seconds={interval}",
               "optim.max_epochs=100000", "optim.eval_every=1000000000", "logger=tensorboard", *overrides]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(command)}):\n{proc.stderr[-3000:]}")
    found = glob.glob(str(run_dir / "results" / "*" / "validation_clock.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one validation_clock.json under {run_dir}/results, found {found}")
    # 1-minute load averages: a run alone on the machine ends near its own thread count; more
    # means other work shared the cores and its step times (and steps in the budget) suffered
    return {"command": " ".join(command[1:]), "process_seconds": round(time.perf_counter() - started, 1),
            "load_average": {"before": round(load_before, 2), "at_end": round(load_after, 2)},
            "validations": json.loads(Path(found[0]).read_text())}


def cpu_model() -> str:
    """What the runs ran on: step times are comparable only on the same CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(result: dict) -> str:
    jobs = result.get("jobs", 1)
    side = "one run at a time" if jobs == 1 else f"{jobs} runs side by side, each with 1/{jobs} of the threads"
    lines = [f"Training budget {result['budget_s']:.0f} s per model, validation every {result['interval_s']:.0f} s "
             f"of training time, {side}" + (f", on {result['cpu']}" if "cpu" in result else "")
             + f" (`{result['command']}`).", ""]
    for dataset, part in result["datasets"].items():
        base = part["baselines"]
        lines += [f"**{dataset}** (baselines on the same validation frames: zero forces "
                  f"{base['zero_forces_mae']:.4f} eV/A, training-mean energy {base['mean_energy_mae']:.4f} eV, "
                  f"energy linear in the element counts {base['composition_energy_mae']:.4f} eV)"
                  + (f"; carried over from an earlier run (`{part['command']}`)"
                     if part.get("command", result["command"]) != result["command"] else ""), "",
                  "| model | steps | s / step | val force MAE | / zero-force baseline | val energy MAE "
                  "| / mean-energy baseline | best val force MAE | train solver evals | train unconverged "
                  "| val solver evals | val unconverged | contraction | load at end |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, run in part["models"].items():
            last = run["validations"][-1]
            best = min(v["forces_mae"] for v in run["validations"])

            def opt(key, fmt):
                return fmt.format(last[key]) if key in last else "-"
            lines.append(f"| {name} | {last['step']} | {last['train_seconds'] / max(last['step'], 1):.3f} | "
                         f"{last['forces_mae']:.4f} | {last['forces_mae'] / base['zero_forces_mae']:.2f} | "
                         f"{last['energy_mae']:.4f} | {last['energy_mae'] / base['mean_energy_mae']:.2f} | {best:.4f} | "
                         f"{opt('train_deq_nstep', '{:.1f}')} | {opt('train_deq_unconverged', '{:.0%}')} | "
                         f"{opt('deq_nstep', '{:.1f}')} | {opt('deq_unconverged', '{:.0%}')} | {opt('deq_contraction', '{:.2f}')} | "
                         f"{run['load_average']['at_end'] if 'load_average' in run else '-'} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["datasets"])
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7), squeeze=False)
    for col, dataset in enumerate(datasets):
        part = result["datasets"][dataset]
        for row, (key, base, unit) in enumerate((("forces_mae", "zero_forces_mae", "eV/A"),
                                                 ("energy_mae", "mean_energy_mae", "eV"))):
            ax = axes[row][col]
            if key == "energy_mae" and "composition_energy_mae" in part["baselines"]:
                ax.axhline(part["baselines"]["composition_energy_mae"], color="grey", ls=":", lw=1,
                           label="energy linear in element counts")
            validation_curves(ax, part["models"], key, part["baselines"][base], "train_seconds",
                              f"toy {dataset}: validation {key.replace('_', ' ')}", "training time (s)", unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def validation_curves(ax, runs: dict, key: str, baseline: float, x: str, title: str, xlabel: str, unit: str) -> None:
    """One curve per run (validation ``key`` against ``x``), the learnt-nothing line, log scale."""
    for name, run in runs.items():
        vals = run["validations"]
        ax.plot([v[x] for v in vals], [v[key] for v in vals], marker="o", ms=3, label=name)
    ax.axhline(baseline, color="grey", ls="--", lw=1, label="learnt nothing")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per model")
    parser.add_argument("--interval", type=float, default=30.0, help="validate every this many training seconds")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {list(DATASETS)}")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="extra DEQ run: NAME=key=value,key=value (repeatable)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (e.g. toy data paths)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings side by side, each with cpu_count/jobs threads (recipe studies; "
                             "the race itself runs one at a time)")
    parser.add_argument("--keep", default="", metavar="DATASETS",
                        help="comma-separated datasets not rerun: carried over from the existing --out .json "
                             "with the command that measured them (when only another dataset changed)")
    parser.add_argument("--work-dir", default="runs/race", help="where the runs write checkpoints and logs")
    parser.add_argument("--out", default="docs/benchmarks/race", help="output prefix (.json, .md, .png)")
    args = parser.parse_args(argv)

    models = {}
    for name in filter(None, args.models.split(",")):  # empty: variants only
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {list(MODELS)}")
        models[name] = MODELS[name]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        if not name or not overrides:
            parser.error(f"--variant {spec!r}: expected NAME=key=value[,key=value]")
        models[name] = ("deq", overrides.split(","))
    result = {"command": "python scripts/benchmark_race.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "budget_s": args.budget, "interval_s": args.interval, "cpu_threads": os.cpu_count(), "cpu": cpu_model(), "datasets": {}}
    work = Path(args.work_dir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    threads = max((os.cpu_count() or 1) // args.jobs, 1) if args.jobs > 1 else None
    result["jobs"] = args.jobs
    keep = [name for name in args.keep.split(",") if name]
    if keep:
        previous_file = Path(args.out).with_suffix(".json")
        previous = json.loads(previous_file.read_text()) if previous_file.exists() else {"datasets": {}}
        for dataset in keep:
            if dataset not in previous["datasets"]:
                parser.error(f"--keep {dataset}: no '{dataset}' results in {previous_file}")
            result["datasets"][dataset] = {"command": previous["command"], **previous["datasets"][dataset]}
    for dataset in args.datasets.split(","):
        if dataset in keep:
            continue
        if dataset not in DATASETS:
            parser.error(f"unknown dataset {dataset!r}; choose from {list(DATASETS)}")
        part = result["datasets"][dataset] = {"command": result["command"], "models": {}}

        def run_one(index, name, kind, overrides):
            config_path = DATASETS[dataset][0 if kind == "deq" else 1]
            print(f"[{dataset}] {name}: training for {args.budget:.0f} s ...", flush=True)
            run = train(config_path, [*args.override, *overrides], work / dataset / f"model{index}",
                        args.budget, args.interval, threads)
            last = run["validations"][-1]
            print(f"[{dataset}] {name}: {last['step']} steps, val force MAE {last['forces_mae']:.4f}, "
                  f"energy MAE {last['energy_mae']:.4f}", flush=True)
            return {**run, "config": config_path, "overrides": overrides}

        with contextlib.chdir(REPO):  # the data, generated once before runs go side by side
            prepare_data(resolved_config(DATASETS[dataset][1], args.override))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_one, index, name, kind, overrides)
                       for index, (name, (kind, overrides)) in enumerate(models.items())]
            runs = [future.result() for future in futures]
        part["models"] = dict(zip(models, runs))
        part["baselines"] = baselines(resolved_config(DATASETS[dataset][1], args.override))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
