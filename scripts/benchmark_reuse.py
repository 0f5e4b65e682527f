"""Fixed-point reuse benchmark: solver evaluations and wall time per step, cold vs warm starts.

On a trained ocp_deq checkpoint, with the ASE calculator: BFGS relaxations of the toy relax
systems and one Langevin MD run, each with cold starts, plain reuse and extrapolated starts;
a trained explicit EquiformerV2 checkpoint (same width) runs the same relaxations and MD
through fairchem's OCPCalculator. Writes reuse.json, reuse.md and reuse.png to --out.

    python scripts/benchmark_reuse.py --checkpoint runs/checkpoints/<deq>/checkpoint.pt \
        --explicit-checkpoint runs/checkpoints/<explicit>/checkpoint.pt
"""

from __future__ import annotations

import argparse
import dataclasses
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
from fairchem.core.common.relaxation.ase_utils import OCPCalculator
from tqdm import tqdm

from ocp_deq.calculator import DEQCalculator
from ocp_deq.data import read_lmdb

STRATEGIES = {"cold": None, "reuse": "plain", "extrapolate": "extrapolate"}
EXPLICIT = "explicit"


# warm solves cut at one evaluation whatever their residual: the floor of a DEQ step's cost
# (encoder + one f + heads), not an accurate setting
ONE_EVALUATION = "reuse, 1 evaluation (cost floor)"


def warm_tol_name(tol: float) -> str:
    return f"reuse, warm tol {tol:g}"


def slab(frame) -> Atoms:
    atoms = Atoms(numbers=frame.atomic_numbers.long().numpy(), positions=frame.pos.numpy(),
                  cell=frame.cell[0].numpy(), pbc=True)
    atoms.set_constraint(FixAtoms(mask=frame.fixed.bool().numpy()))
    return atoms


def calculator(checkpoint: str, start: str | None, warm: dict | None = None):
    """The DEQ calculator with the given start strategy (``warm``: changes to the cold
    solver for the warm solves, e.g. its tolerance; ``max_iter`` there also turns the
    fallback to a cold-tolerance solve off); ``start=EXPLICIT``: fairchem's OCPCalculator
    for an explicit-model checkpoint."""
    if start == EXPLICIT:
        return OCPCalculator(checkpoint_path=checkpoint, cpu=True, seed=0)
    calc = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, reuse=start is not None)
    if start is not None:
        settings = calc.model.backbone.deq_settings
        settings.reuse.start = start
        if warm:
            settings.reuse.solver = dataclasses.replace(settings.eval_solver, **warm)
            settings.reuse.fallback = "max_iter" not in warm
    return calc


def follow(dynamics, atoms, calc, steps: int, **run_kwargs) -> dict:
    """Run an ASE optimiser / integrator; solver evaluations and wall time of every step."""
    nstep, times, positions = [], [], []
    clock = [time.perf_counter()]

    def record():
        now = time.perf_counter()
        times.append(now - clock[0])
        clock[0] = now
        nstep.append(calc.last_nstep[0] if isinstance(calc, DEQCalculator) else None)
        positions.append(atoms.get_positions().copy())

    dynamics.attach(record)
    dynamics.run(steps=steps, **run_kwargs)
    return {"nstep": nstep, "time": times[1:], "positions": positions}


def run_relaxations(checkpoint, frames, start, steps, fmax, warm=None):
    calc = calculator(checkpoint, start, warm)
    runs = []
    for frame in tqdm(frames, desc=f"relaxations ({start or 'cold'})"):
        atoms = slab(frame)
        atoms.calc = calc
        if isinstance(calc, DEQCalculator):
            calc.reset_fixed_point()  # another system: never start from the last one's state
        runs.append(follow(BFGS(atoms, logfile=None, maxstep=0.04), atoms, calc, steps, fmax=fmax))
    return runs


def run_md(checkpoint, frame, start, steps, temperature, warm=None):
    calc = calculator(checkpoint, start, warm)
    atoms = slab(frame)
    atoms.calc = calc
    rng = np.random.default_rng(0)
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    with tqdm(total=steps, desc=f"MD ({start or 'cold'})") as bar:
        dyn.attach(lambda: bar.update(1))
        return follow(dyn, atoms, calc, steps)


def summary(runs: list[dict]) -> dict:
    """Solver evaluations on the first (cold) call and per later step; wall time per step
    (the first call, which builds the model's caches, excluded) and per run."""
    times = [t for run in runs for t in run["time"]]
    result = {
        "runs": len(runs),
        "steps": sum(len(run["nstep"]) for run in runs),
        "wall_time_per_step_s": float(np.mean(times)),
        "wall_time_per_run_s": float(np.sum(times) / len(runs)),
    }
    if runs[0]["nstep"][0] is not None:
        result["mean_nstep_first"] = float(np.mean([run["nstep"][0] for run in runs]))
        result["mean_nstep_per_step"] = float(np.mean([n for run in runs for n in run["nstep"][1:]]))
    return result


FORCE_AGREEMENT = 0.02  # warm and cold forces of the same structure should agree to this fraction


def reuse_vs_cold(checkpoint, frame, steps, temperature, every, warm_tol=None) -> dict:
    """Energies and forces of a warm-started MD run vs cold solves at the same positions
    (every ``every`` steps): max |dE|, max |dF|, the mean relative force difference against
    FORCE_AGREEMENT, and the contraction of f at the cold fixed points."""
    calc = calculator(checkpoint, "plain", None if warm_tol is None else {"tol": warm_tol})
    atoms = slab(frame)
    atoms.calc = calc
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=np.random.default_rng(1))
    warm = []
    dyn.attach(lambda: warm.append((atoms.get_positions().copy(), atoms.get_potential_energy(),
                                    atoms.get_forces().copy())), interval=every)
    dyn.run(steps)
    cold_atoms = slab(frame)
    cold_atoms.calc = cold = calculator(checkpoint, None)
    cold.model.backbone.estimate_contraction = True
    energy, force, relative, contraction = [], [], [], []
    for pos, e_warm, f_warm in warm:
        cold_atoms.set_positions(pos, apply_constraint=False)
        f_cold = cold_atoms.get_forces()
        energy.append(abs(cold_atoms.get_potential_energy() - e_warm))
        force.append(float(np.abs(f_cold - f_warm).max()))
        relative.append(float(np.linalg.norm(f_cold - f_warm) / np.linalg.norm(f_cold)))
        contraction.append(float(cold.trainer.last_model_output["deq_contraction"][0]))
    tol = cold.model.backbone.deq_settings.eval_solver
    return {"frames": len(warm), "eval_solver": f"{tol.solver}, {tol.stop_mode} tol {tol.tol:g}",
            "warm_tol": warm_tol if warm_tol is not None else tol.tol,
            "max_abs_energy_eV": float(max(energy)), "max_abs_force_eV_per_A": max(force),
            "mean_max_abs_force_eV_per_A": float(np.mean(force)), "mean_relative_force": float(np.mean(relative)),
            "max_relative_force": float(np.max(relative)), "stated_agreement": FORCE_AGREEMENT,
            "within_stated_agreement": bool(np.mean(relative) <= FORCE_AGREEMENT),
            "mean_contraction": float(np.mean(contraction))}


DEQ_MODELS = ("deq_equiformer_v2",)
EXPLICIT_MODELS = ("equiformer_v2", "equiformer_v2_backbone_and_heads")


def checkpoint_model(path, allowed: tuple, parser) -> dict:
    """The model a checkpoint holds (name, blocks), refused unless it is one of ``allowed``."""
    from ocp_deq.trainers.checkpointing import CheckpointError, load_checkpoint_file

    try:
        model = (load_checkpoint_file(path).get("config") or {}).get("model", {})
    except CheckpointError as error:
        parser.error(str(error))
    if model.get("name") not in allowed:
        parser.error(f"{path} holds a '{model.get('name')}' model; expected one of {allowed}")
    return {"path": str(path), "model": model["name"], "num_layers": model.get("num_layers")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="trained ocp_deq checkpoint")
    parser.add_argument("--explicit-checkpoint", help="trained explicit EquiformerV2 checkpoint (baseline)")
    parser.add_argument("--data", default="data/toy_s2ef", help="toy S2EF root (its relax split is used)")
    parser.add_argument("--relax-systems", type=int, default=4)
    parser.add_argument("--relax-steps", type=int, default=40)
    parser.add_argument("--fmax", type=float, default=0.03)
    parser.add_argument("--md-steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=600.0)
    parser.add_argument("--warm-tol", type=float,
                        help="also run plain reuse with this tolerance for the warm solves (the trade: fewer "
                             "evaluations against warm/cold agreement, both reported)")
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)

    checkpoints = {"deq": checkpoint_model(args.checkpoint, DEQ_MODELS, parser)}
    if args.explicit_checkpoint:
        checkpoints["explicit"] = checkpoint_model(args.explicit_checkpoint, EXPLICIT_MODELS, parser)
    frames = read_lmdb(Path(args.data) / "relax")[: args.relax_systems]
    result = {"checkpoint": str(args.checkpoint), "checkpoints": checkpoints, "relaxations": {}, "md": {},
              "threads": torch.get_num_threads()}
    md_runs = {}
    runs = {name: (start, None) for name, start in STRATEGIES.items()}
    if args.warm_tol is not None:
        runs[warm_tol_name(args.warm_tol)] = ("plain", {"tol": args.warm_tol})
    runs[ONE_EVALUATION] = ("plain", {"max_iter": 1})
    if args.explicit_checkpoint:
        runs[EXPLICIT] = (EXPLICIT, None)
    for name, (start, warm) in runs.items():
        checkpoint = args.explicit_checkpoint if start == EXPLICIT else args.checkpoint
        result["relaxations"][name] = summary(run_relaxations(checkpoint, frames, start, args.relax_steps, args.fmax, warm))
        md_runs[name] = run_md(checkpoint, frames[0], start, args.md_steps, args.temperature, warm)
        result["md"][name] = summary([md_runs[name]])
        print(name, result["relaxations"][name], result["md"][name], flush=True)
    agreement = [None] + ([args.warm_tol] if args.warm_tol is not None else [])
    result["reuse_vs_cold"], *loose = [reuse_vs_cold(args.checkpoint, frames[0], min(args.md_steps, 100),
                                                     args.temperature, 10, tol) for tol in agreement]
    if loose:
        result["reuse_vs_cold_warm_tol"] = loose[0]
    result["md_nstep_trace"] = {name: md_runs[name]["nstep"] for name in runs if name != EXPLICIT}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reuse.json").write_text(json.dumps(result, indent=1))
    (out / "reuse.md").write_text(markdown(result))
    plot(result, out / "reuse.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    relax, md = result["relaxations"], result["md"]
    lines = [
        "| model / start | relaxation: solver evals / step | ratio to cold | s / step | s / relaxation "
        "| MD: solver evals / step | ratio to cold | s / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def evals(part, name):
        if "mean_nstep_per_step" not in part[name]:
            return "-", "-"
        n = part[name]["mean_nstep_per_step"]
        return f"{n:.2f}", f"{n / part['cold']['mean_nstep_per_step']:.2f}"

    for name in relax:
        if name == EXPLICIT:
            label = f"explicit EquiformerV2 ({result['checkpoints']['explicit']['num_layers']} blocks)"
        else:
            label = f"DEQ {name}"
        r, m = relax[name], md[name]
        lines.append(f"| {label} | {' | '.join(evals(relax, name))} | {r['wall_time_per_step_s']:.3f} | "
                     f"{r['wall_time_per_run_s']:.2f} | {' | '.join(evals(md, name))} | {m['wall_time_per_step_s']:.3f} |")
    for key in ("reuse_vs_cold", "reuse_vs_cold_warm_tol"):
        if key not in result:
            continue
        diff = result[key]
        lines += ["", f"Reuse (warm tol {diff['warm_tol']:g}) vs cold solves at the same positions "
                  f"({diff['frames']} MD frames, cold: {diff['eval_solver']}): "
                  f"max |dE| {diff['max_abs_energy_eV']:.4f} eV, max |dF| {diff['max_abs_force_eV_per_A']:.4f} eV/A, "
                  f"mean relative force difference {diff['mean_relative_force']:.4f} (max {diff['max_relative_force']:.4f}; "
                  f"stated agreement {diff['stated_agreement']:.0%}: {'met' if diff['within_stated_agreement'] else 'NOT met'}); "
                  f"contraction of f at the cold fixed points {diff['mean_contraction']:.2f}."]
    if EXPLICIT in relax:
        for name in relax:
            if name not in (EXPLICIT, "cold", "extrapolate"):
                ratio = [part[name]["wall_time_per_step_s"] / part[EXPLICIT]["wall_time_per_step_s"] for part in (relax, md)]
                lines += ["", f"DEQ {name} step / explicit step: {ratio[0]:.2f} (relaxations), {ratio[1]:.2f} (MD)."]
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
