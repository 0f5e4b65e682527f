"""Fixed-point reuse benchmark: solver evaluations and wall time per step, cold vs warm starts.

On a trained ocp_deq checkpoint, with the ASE calculator: BFGS relaxations of the toy relax
systems and one Langevin MD run, each with cold starts, plain reuse and extrapolated starts;
the explicit EquiformerV2 of the same width is timed on the same MD frames. Writes
reuse.json, reuse.md and reuse.png to --out.

    python scripts/benchmark_reuse.py --checkpoint runs/checkpoints/<ts>/checkpoint.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

import ocp_deq  # noqa: F401  (before fairchem)
from ase import Atoms, units
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.optimize import BFGS
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import load_config
from fairchem.core.datasets.lmdb_dataset import data_list_collater
from tqdm import tqdm

from ocp_deq.calculator import DEQCalculator
from ocp_deq.cli import resolve_config
from ocp_deq.data import read_lmdb

STRATEGIES = {"cold": None, "reuse": "plain", "extrapolate": "extrapolate"}


def slab(frame) -> Atoms:
    atoms = Atoms(numbers=frame.atomic_numbers.long().numpy(), positions=frame.pos.numpy(),
                  cell=frame.cell[0].numpy(), pbc=True)
    atoms.set_constraint(FixAtoms(mask=frame.fixed.bool().numpy()))
    return atoms


def calculator(checkpoint: str, start: str | None) -> DEQCalculator:
    calc = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, reuse=start is not None)
    if start is not None:
        calc.cache.settings.start = start
    return calc


def follow(dynamics, atoms, calc, steps: int, **run_kwargs) -> dict:
    """Run an ASE optimiser / integrator; solver evaluations and wall time of every step."""
    nstep, times, positions = [], [], []
    clock = [time.perf_counter()]

    def record():
        now = time.perf_counter()
        times.append(now - clock[0])
        clock[0] = now
        nstep.append(calc.last_nstep[0])
        positions.append(atoms.get_positions().copy())

    dynamics.attach(record)
    dynamics.run(steps=steps, **run_kwargs)
    return {"nstep": nstep, "time": times[1:], "positions": positions, "forces": atoms.get_forces().copy()}


def run_relaxations(checkpoint, frames, start, steps, fmax):
    calc = calculator(checkpoint, start)
    runs = []
    for frame in tqdm(frames, desc=f"relaxations ({start or 'cold'})"):
        atoms = slab(frame)
        atoms.calc = calc
        calc.reset_fixed_point()
        runs.append(follow(BFGS(atoms, logfile=None, maxstep=0.04), atoms, calc, steps, fmax=fmax))
    return runs


def run_md(checkpoint, frame, start, steps, temperature):
    calc = calculator(checkpoint, start)
    atoms = slab(frame)
    atoms.calc = calc
    rng = np.random.default_rng(0)
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    with tqdm(total=steps, desc=f"MD ({start or 'cold'})") as bar:
        dyn.attach(lambda: bar.update(1))
        return follow(dyn, atoms, calc, steps)


def time_explicit(config_name: str, frame, positions: list) -> float:
    """Seconds per energy+forces evaluation of the explicit EquiformerV2 on the MD frames."""
    config, _, _ = load_config(str(resolve_config(config_name)))
    model_config = copy.deepcopy(config["model"])
    model = registry.get_model_class(model_config.pop("name"))(**model_config).eval()
    times = []
    for pos in positions:
        data = copy.copy(frame)
        data.pos = torch.tensor(pos, dtype=torch.float32)
        batch = data_list_collater([data], otf_graph=True)
        start = time.perf_counter()
        with torch.no_grad():
            model(batch)
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


def summary(runs: list[dict]) -> dict:
    later = [n for run in runs for n in run["nstep"][1:]]
    first = [run["nstep"][0] for run in runs]
    times = [t for run in runs for t in run["time"]]
    return {
        "steps": len(later) + len(first),
        "mean_nstep_first": float(np.mean(first)),
        "mean_nstep_per_step": float(np.mean(later)),
        "wall_time_per_step_s": float(np.mean(times)),
    }


def force_difference(checkpoint, frame, positions: list, forces_warm: list) -> dict:
    """Warm-start forces vs cold solves at the same positions (max |dF| and relative norm)."""
    calc = calculator(checkpoint, None)
    atoms = slab(frame)
    atoms.calc = calc
    abs_diff, rel_diff = [], []
    for pos, warm in zip(positions, forces_warm):
        atoms.set_positions(pos)
        cold = atoms.get_forces()
        abs_diff.append(float(np.abs(cold - warm).max()))
        rel_diff.append(float(np.linalg.norm(cold - warm) / np.linalg.norm(cold)))
    return {"max_abs_eV_per_A": max(abs_diff), "mean_max_abs_eV_per_A": float(np.mean(abs_diff)),
            "mean_relative": float(np.mean(rel_diff))}


def md_forces(checkpoint, frame, start, steps, temperature, every):
    """MD with warm starts, keeping positions and forces every ``every`` steps."""
    calc = calculator(checkpoint, start)
    atoms = slab(frame)
    atoms.calc = calc
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=np.random.default_rng(1))
    kept = []
    dyn.attach(lambda: kept.append((atoms.get_positions().copy(), atoms.get_forces().copy())), interval=every)
    dyn.run(steps)
    return [p for p, _ in kept], [f for _, f in kept]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/toy_s2ef", help="toy S2EF root (its relax split is used)")
    parser.add_argument("--explicit-config", default="equiformer_v2_toy.yml")
    parser.add_argument("--relax-systems", type=int, default=4)
    parser.add_argument("--relax-steps", type=int, default=40)
    parser.add_argument("--fmax", type=float, default=0.03)
    parser.add_argument("--md-steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=600.0)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)

    frames = read_lmdb(Path(args.data) / "relax")[: args.relax_systems]
    result = {"checkpoint": str(args.checkpoint), "relaxations": {}, "md": {}, "threads": torch.get_num_threads()}
    md_runs = {}
    for name, start in STRATEGIES.items():
        result["relaxations"][name] = summary(run_relaxations(args.checkpoint, frames, start, args.relax_steps, args.fmax))
        md_runs[name] = run_md(args.checkpoint, frames[0], start, args.md_steps, args.temperature)
        result["md"][name] = summary([md_runs[name]])
        print(name, result["relaxations"][name], result["md"][name], flush=True)
    explicit = time_explicit(args.explicit_config, frames[0], md_runs["cold"]["positions"][:50])
    result["explicit_wall_time_per_step_s"] = explicit
    positions, forces = md_forces(args.checkpoint, frames[0], "plain", min(args.md_steps, 100), args.temperature, 10)
    result["reuse_vs_cold_forces"] = force_difference(args.checkpoint, frames[0], positions, forces)
    result["md_nstep_trace"] = {name: run["nstep"] for name, run in md_runs.items()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reuse.json").write_text(json.dumps(result, indent=1))
    (out / "reuse.md").write_text(markdown(result))
    plot(result, out / "reuse.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    relax, md = result["relaxations"], result["md"]
    cold_r, cold_m = relax["cold"]["mean_nstep_per_step"], md["cold"]["mean_nstep_per_step"]
    lines = [
        "| start | relaxation: solver evals / step | ratio to cold | s / step | MD: solver evals / step | ratio to cold | s / step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in STRATEGIES:
        r, m = relax[name], md[name]
        lines.append(
            f"| DEQ {name} | {r['mean_nstep_per_step']:.2f} | {r['mean_nstep_per_step'] / cold_r:.2f} | "
            f"{r['wall_time_per_step_s']:.3f} | {m['mean_nstep_per_step']:.2f} | "
            f"{m['mean_nstep_per_step'] / cold_m:.2f} | {m['wall_time_per_step_s']:.3f} |"
        )
    lines.append(f"| explicit EquiformerV2 (4 blocks) | - | - | - | - | - | {result['explicit_wall_time_per_step_s']:.3f} (forward only) |")
    diff = result["reuse_vs_cold_forces"]
    lines.append("")
    lines.append(
        f"Reuse vs cold forces at the same MD positions: mean relative difference {diff['mean_relative']:.3f}, "
        f"max |dF| {diff['max_abs_eV_per_A']:.4f} eV/A."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, trace in result["md_nstep_trace"].items():
        ax.plot(trace, label=name, lw=1)
    ax.set_xlabel("MD step")
    ax.set_ylabel("solver evaluations of f")
    ax.set_title("DEQ solver cost along a 600 K MD trajectory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
