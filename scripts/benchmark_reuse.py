"""Fixed-point reuse benchmark: solver evaluations and wall time per step, cold vs warm starts.

On a trained ocp_deq checkpoint, with the ASE calculator: BFGS relaxations of the toy relax
systems and one Langevin MD run, each with cold starts, plain reuse and extrapolated starts;
a trained explicit EquiformerV2 checkpoint (same width) runs the same relaxations and MD
through fairchem's OCPCalculator. ``--repeats N`` runs every configuration N times, round
robin, and reports the median step time and the median of the per-repeat ratios to the
explicit step (steps take tens of ms: one run's ratios move by ~0.1). A last MD pass with
timers on the model's parts splits a step into blocks (f for the DEQ), heads, the rest of
the model (graph, encoder, solver) and what happens outside the model (calculator, ASE).
Every DEQ configuration's relaxation endpoints are judged by cold solves (energy, fmax).
Writes reuse.json, reuse.md and reuse.png to --out.

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
from ocp_deq.models.distance_expansion import band_gaussians

STRATEGIES = {"cold": None, "reuse": "plain", "extrapolate": "extrapolate"}
EXPLICIT = "explicit"
# fairchem's deprecated ``equiformer_v2`` class has no ``direct_forces`` attribute, so its
# conditional_grad decorator turns autograd on in every forward, although its forces come
# from the direct head: setting the attribute skips that work, same predictions (checked).
# This fair baseline also gets the DEQ's banded Gaussian distance expansion.
EXPLICIT_NO_AUTOGRAD = "explicit, no autograd"


# warm solves cut at one evaluation whatever their residual: the floor of a DEQ step's cost
# (encoder + one f + heads), not an accurate setting
ONE_EVALUATION = "reuse, 1 evaluation (cost floor)"


EXPLICITS = (EXPLICIT, EXPLICIT_NO_AUTOGRAD)


def same_predictions(checkpoint, system) -> dict:
    """Max |difference| of energy and forces, explicit model with vs without autograd: the
    faster baseline must predict the same (else the benchmark stops)."""
    out = []
    for start in EXPLICITS:
        atoms = system.copy()
        atoms.calc = calculator(checkpoint, start)
        out.append((atoms.get_potential_energy(), atoms.get_forces()))
    diff = {"energy_eV": float(abs(out[0][0] - out[1][0])), "forces_eV_per_A": float(np.abs(out[0][1] - out[1][1]).max())}
    if diff["energy_eV"] > 1e-4 or diff["forces_eV_per_A"] > 1e-4:
        raise RuntimeError(f"the explicit model without autograd predicts differently: {diff}")
    return diff


def warm_tol_name(tol: float) -> str:
    """Loose warm solves (refined to the cold tolerance where forces fall below
    ``--refine-fmax``, by default the relaxations' ``--fmax``)."""
    return f"reuse, warm tol {tol:g}"


def slab(frame, supercell=(1, 1, 1)) -> Atoms:
    """The frame as ASE Atoms with its fixed atoms, repeated ``supercell`` times along its
    cell vectors (e.g. 2,2,1 for OC20-sized slabs of ~50 atoms)."""
    atoms = Atoms(numbers=frame.atomic_numbers.long().numpy(), positions=frame.pos.numpy(),
                  cell=frame.cell[0].numpy(), pbc=True)
    atoms.set_constraint(FixAtoms(mask=frame.fixed.bool().numpy()))
    return atoms.repeat(supercell)


def calculator(checkpoint: str, start: str | None, warm: dict | None = None):
    """The DEQ calculator with the given start strategy (``warm``: changes to the cold
    solver for the warm solves, e.g. its tolerance; ``max_iter`` there also turns the
    fallback to a cold-tolerance solve off); ``start=EXPLICIT``: fairchem's OCPCalculator
    for an explicit-model checkpoint (``EXPLICIT_NO_AUTOGRAD``: without the autograd graph and
    with the DEQ's banded Gaussian distance expansion)."""
    if start in (EXPLICIT, EXPLICIT_NO_AUTOGRAD):
        calc = OCPCalculator(checkpoint_path=checkpoint, cpu=True, seed=0)
        if start == EXPLICIT_NO_AUTOGRAD:
            model = calc.trainer._unwrapped_model
            for part in (model, getattr(model, "backbone", None)):  # hydra: the backbone decides
                if part is not None:
                    part.direct_forces = True
            band_gaussians(model)
        return calc
    calc = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, reuse=start is not None)
    if start is not None:
        settings = calc.model.backbone.deq_settings
        settings.reuse.start = start
        if warm:
            warm = dict(warm)
            if "refine_fmax" in warm:
                settings.reuse.refine_fmax = warm.pop("refine_fmax")
            floor = "max_iter" in warm  # exactly one evaluation: no fallback, no refinement
            settings.reuse.solver = dataclasses.replace(settings.eval_solver, **warm)
            settings.reuse.fallback = not floor
            if floor:
                settings.reuse.refine_fmax = 0.0
    return calc


def follow(dynamics, atoms, calc, steps: int, **run_kwargs) -> dict:
    """Run an ASE optimiser / integrator; solver evaluations and wall time of every step."""
    nstep, refined, times, positions, energies = [], [], [], [], []
    clock = [time.perf_counter()]

    def record():
        now = time.perf_counter()
        times.append(now - clock[0])
        clock[0] = now
        nstep.append(calc.last_nstep[0] if isinstance(calc, DEQCalculator) else None)
        refined.append(bool(calc.last_refined[0]) if isinstance(calc, DEQCalculator) else False)
        positions.append(atoms.get_positions().copy())
        energies.append(float(calc.results["energy"]))

    dynamics.attach(record)
    dynamics.run(steps=steps, **run_kwargs)
    return {"nstep": nstep, "refined": refined, "time": times[1:], "positions": positions, "energy": energies}


def run_relaxations(checkpoint, systems, start, steps, fmax, warm=None):
    calc = calculator(checkpoint, start, warm)
    runs = []
    for system in tqdm(systems, desc=f"relaxations ({start or 'cold'})"):
        atoms = system.copy()
        atoms.calc = calc
        if isinstance(calc, DEQCalculator):
            calc.reset_fixed_point()  # another system: never start from the last one's state
        runs.append(follow(BFGS(atoms, logfile=None, maxstep=0.04), atoms, calc, steps, fmax=fmax))
    return runs


def run_md(checkpoint, system, start, steps, temperature, warm=None, calc=None):
    calc = calc or calculator(checkpoint, start, warm)
    if isinstance(calc, DEQCalculator):
        calc.reset_fixed_point()
    atoms = system.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    with tqdm(total=steps, desc=f"MD ({start or 'cold'})") as bar:
        dyn.attach(lambda: bar.update(1))
        return follow(dyn, atoms, calc, steps)


def median_of_known(values: list) -> float | None:
    """The median of the values that were measured (None: nothing to time)."""
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def shown(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(repeats: list[list[dict]]) -> dict:
    """Solver evaluations on the first (cold) call and per later step; wall time per step
    (the first call, which builds the model's caches, excluded) and per run: the median over
    the repeats (each a list of runs), with every repeat's step time kept. A repeat whose
    relaxations all stop at the first call (already below fmax) has no step to time: None."""
    runs = [run for repeat in repeats for run in repeat]
    step = [float(np.mean(times)) if (times := [t for run in repeat for t in run["time"]]) else None
            for repeat in repeats]
    per_run = [float(np.sum([t for run in repeat for t in run["time"]]) / len(repeat)) for repeat in repeats]
    result = {
        "runs": len(repeats[0]),
        "repeats": len(repeats),
        "steps": sum(len(run["nstep"]) for run in repeats[0]),
        "wall_time_per_step_s": median_of_known(step),
        "wall_time_per_run_s": float(np.median(per_run)),
        "wall_time_per_step_s_each_repeat": step,
    }
    if runs[0]["nstep"][0] is not None:
        result["mean_nstep_first"] = float(np.mean([run["nstep"][0] for run in runs]))
        result["mean_nstep_per_step"] = float(np.mean([n for run in runs for n in run["nstep"][1:]]))
        result["refined_fraction"] = float(np.mean([r for run in runs for r in run["refined"][1:]]))
    return result


def relaxation_endpoints(checkpoint, systems, relaxations: dict, fmax: float) -> dict:
    """Where each DEQ configuration's relaxations ended (first repeat), judged by cold
    solves: energy and max force on the free atoms there. A looser warm solve can stop
    BFGS where its own forces are below ``fmax`` but the cold ones are not, and any change
    of solver start can lead BFGS to another minimum."""
    calc = calculator(checkpoint, None)
    out = {}
    for name, repeats in relaxations.items():
        if name in EXPLICITS:
            continue
        energy, force = [], []
        for system, run in zip(systems, repeats[0]):
            atoms = system.copy()
            atoms.set_positions(run["positions"][-1])
            atoms.calc = calc
            energy.append(float(atoms.get_potential_energy()))
            free = np.ones(len(atoms), dtype=bool)
            for constraint in atoms.constraints:
                free[constraint.get_indices()] = False
            force.append(float(np.linalg.norm(atoms.get_forces()[free], axis=1).max()))
        out[name] = {"steps": [len(run["nstep"]) - 1 for run in repeats[0]],
                     "refined_steps": [int(sum(run["refined"])) for run in repeats[0]], "cold_energy_eV": energy,
                     "cold_fmax_eV_per_A": force, "own_last_energy_eV": [run["energy"][-1] for run in repeats[0]],
                     "above_fmax": int(sum(f > fmax for f in force))}
    for name, ends in out.items():
        ends["max_abs_energy_vs_cold_run_eV"] = float(np.max(np.abs(np.subtract(ends["cold_energy_eV"],
                                                                                out["cold"]["cold_energy_eV"]))))
    return out


FORCE_AGREEMENT = 0.02  # warm and cold forces of the same structure should agree to this fraction


def reuse_vs_cold(checkpoint, system, steps, temperature, every, warm_tol=None) -> dict:
    """Energies and forces of a warm-started MD run vs cold solves at the same positions
    (every ``every`` steps, the first call left out: it is cold in both runs): max |dE|,
    max |dF|, the mean relative force difference against FORCE_AGREEMENT, and the
    contraction of f at the cold fixed points."""
    calc = calculator(checkpoint, "plain", None if warm_tol is None else {"tol": warm_tol})
    atoms = system.copy()
    atoms.calc = calc
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=np.random.default_rng(1))
    warm = []
    def record():
        if dyn.nsteps:  # step 0 is the first call: cold in both runs
            warm.append((atoms.get_positions().copy(), atoms.get_potential_energy(), atoms.get_forces().copy()))

    dyn.attach(record, interval=every)
    dyn.run(steps)
    cold_atoms = system.copy()
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


def model_parts(calc) -> dict[str, list[torch.nn.Module]]:
    """The modules whose time the breakdown reports: the transformer blocks (each f
    evaluation of the DEQ runs its one block), the force and the energy head."""
    model = calc.trainer._unwrapped_model
    if hasattr(model, "output_heads"):  # hydra layout: the DEQ, explicit backbone-and-heads models
        return {"blocks": list(model.backbone.blocks), "force head": [model.output_heads["forces"]],
                "energy head": [model.output_heads["energy"]]}
    return {"blocks": list(model.blocks), "force head": [model.force_block], "energy head": [model.energy_block]}


def breakdown(checkpoint, system, start, steps, temperature, warm=None) -> dict:
    """Milliseconds per MD step in each part of the step: ``model_parts``, the rest of the
    model's forward (graph, encoder, the solver's own work), and outside the model (ASE,
    the calculator's conversion, fairchem's predict loop). Timers on module hooks: a
    separate pass, so they do not touch the timings above."""
    calc = calculator(checkpoint, start, warm)
    spent, started, counted = {}, {}, {}

    def timed(name, module):
        def done(*_):
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]
            counted[name] = counted.get(name, 0) + 1

        module.register_forward_pre_hook(lambda *_: started.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(done)

    for name, modules in model_parts(calc).items():
        for module in modules:
            timed(name, module)
    timed("model", calc.trainer._unwrapped_model)
    run_md(checkpoint, system, start, steps, temperature, warm, calc=calc)  # builds the caches
    spent.clear()
    counted.clear()
    total = time.perf_counter()
    calls = len(run_md(checkpoint, system, start, steps, temperature, warm, calc=calc)["nstep"])
    total = 1e3 * (time.perf_counter() - total) / calls
    model = 1e3 * spent["model"] / calls
    parts = {name: 1e3 * spent.get(name, 0.0) / calls for name in model_parts(calc)}
    parts["rest of the model (graph, encoder, solver)"] = model - sum(parts.values())
    parts["outside the model (ASE, calculator)"] = total - model
    return {"ms_per_step": parts, "total_ms_per_step": total,
            "calls_per_step": {name: counted.get(name, 0) / calls for name in model_parts(calc)}}


DEQ_MODELS = ("deq_equiformer_v2",)
EXPLICIT_MODELS = ("equiformer_v2", "equiformer_v2_backbone_and_heads", "equiformer_v2_node_head")


def checkpoint_model(path, allowed: tuple, parser) -> dict:
    """The model a checkpoint holds (name, blocks), refused unless it is one of ``allowed``."""
    from ocp_deq.trainers.checkpointing import CheckpointError, load_checkpoint_file

    try:
        model = (load_checkpoint_file(path).get("config") or {}).get("model", {})
    except CheckpointError as error:
        parser.error(str(error))
    if model.get("name") not in allowed:
        parser.error(f"{path} holds a '{model.get('name')}' model; expected one of {allowed}")
    out = {"path": str(path), "model": model["name"], "num_layers": model.get("num_layers"),
           "force_head": "node" if model["name"] == "equiformer_v2_node_head" else model.get("force_head", "attention")}
    if model["name"] in DEQ_MODELS:
        from ocp_deq.deq.settings import DEQSettings

        out["reuse_refine_fmax"] = DEQSettings.from_config(model.get("deq")).reuse.refine_fmax
    return out


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
    parser.add_argument("--refine-fmax", type=float,
                        help="with --warm-tol: model.deq.reuse.refine_fmax (eV/A) for those runs "
                             "(default: --fmax, where BFGS can stop; 0: off)")
    parser.add_argument("--supercell", default="1,1,1", metavar="A,B,C",
                        help="repeat every slab this many times along its cell vectors (atoms x A*B*C)")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats of every configuration")
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    try:
        supercell = tuple(int(n) for n in args.supercell.split(","))
        assert len(supercell) == 3 and min(supercell) >= 1
    except (ValueError, AssertionError):
        parser.error(f"--supercell needs three whole numbers >= 1 like 2,2,1, got {args.supercell!r}")

    checkpoints = {"deq": checkpoint_model(args.checkpoint, DEQ_MODELS, parser)}
    if args.explicit_checkpoint:
        checkpoints["explicit"] = checkpoint_model(args.explicit_checkpoint, EXPLICIT_MODELS, parser)
    systems = [slab(frame, supercell) for frame in read_lmdb(Path(args.data) / "relax")[: args.relax_systems]]
    result = {"checkpoint": str(args.checkpoint), "checkpoints": checkpoints, "relaxations": {}, "md": {},
              "threads": torch.get_num_threads(), "supercell": list(supercell),
              "atoms": [len(atoms) for atoms in systems]}
    runs = {name: (start, None) for name, start in STRATEGIES.items()}
    if args.warm_tol is not None:
        refine_fmax = args.fmax if args.refine_fmax is None else args.refine_fmax
        runs[warm_tol_name(args.warm_tol)] = ("plain", {"tol": args.warm_tol, "refine_fmax": refine_fmax})
        result["warm_tol_refine_fmax"] = refine_fmax
    runs[ONE_EVALUATION] = ("plain", {"max_iter": 1})
    if args.explicit_checkpoint:
        runs[EXPLICIT] = (EXPLICIT, None)
        runs[EXPLICIT_NO_AUTOGRAD] = (EXPLICIT_NO_AUTOGRAD, None)
        result["explicit_no_autograd_max_abs_diff"] = same_predictions(args.explicit_checkpoint, systems[0])
    relaxations, md_runs = {name: [] for name in runs}, {name: [] for name in runs}
    for repeat in range(args.repeats):  # round robin: a slow spell of the machine hits every configuration
        for name, (start, warm) in runs.items():
            checkpoint = args.explicit_checkpoint if start in EXPLICITS else args.checkpoint
            relaxations[name].append(run_relaxations(checkpoint, systems, start, args.relax_steps, args.fmax, warm))
            md_runs[name].append([run_md(checkpoint, systems[0], start, args.md_steps, args.temperature, warm)])
            print(f"repeat {repeat + 1}/{args.repeats}", name, summary(relaxations[name][-1:]),
                  summary(md_runs[name][-1:]), flush=True)
    for name in runs:
        result["relaxations"][name], result["md"][name] = summary(relaxations[name]), summary(md_runs[name])
    if args.explicit_checkpoint:
        for key, baseline in (("step_ratio_to_explicit", EXPLICIT),
                              ("step_ratio_to_explicit_no_autograd", EXPLICIT_NO_AUTOGRAD)):
            result[key] = {
                name: {part: median_of_known([None if None in pair else pair[0] / pair[1] for pair in zip(
                    result[part][name]["wall_time_per_step_s_each_repeat"],
                    result[part][baseline]["wall_time_per_step_s_each_repeat"])])
                       for part in ("relaxations", "md")} for name in runs if name not in EXPLICITS}
    result["breakdown_md"] = {
        name: breakdown(args.explicit_checkpoint if start in EXPLICITS else args.checkpoint, systems[0], start,
                        min(args.md_steps, 100), args.temperature, warm)
        for name, (start, warm) in runs.items() if name in ("cold", ONE_EVALUATION, *EXPLICITS)}
    result["relaxation_endpoints"] = relaxation_endpoints(args.checkpoint, systems, relaxations, args.fmax)
    agreement = [None] + ([args.warm_tol] if args.warm_tol is not None else [])
    steps = min(args.md_steps, 100)
    result["reuse_vs_cold"], *loose = [reuse_vs_cold(args.checkpoint, systems[0], steps, args.temperature,
                                                     max(1, steps // 10), tol) for tol in agreement]
    if loose:
        result["reuse_vs_cold_warm_tol"] = loose[0]
    result["md_nstep_trace"] = {name: md_runs[name][0][0]["nstep"] for name in runs if name not in EXPLICITS}

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
        if name in EXPLICITS:
            explicit = result["checkpoints"]["explicit"]
            label = f"explicit EquiformerV2 ({explicit['num_layers']} blocks"
            label += ", node force head)" if explicit.get("force_head") == "node" else ")"
            label += ", no autograd, banded Gaussians" if name == EXPLICIT_NO_AUTOGRAD else ""
        else:
            label = f"DEQ {name}"
            if result["checkpoints"]["deq"].get("force_head") == "node":
                label = label.replace("DEQ", "DEQ (node force head)", 1)
        r, m = relax[name], md[name]
        lines.append(f"| {label} | {' | '.join(evals(relax, name))} | {shown(r['wall_time_per_step_s'], 3)} | "
                     f"{r['wall_time_per_run_s']:.2f} | {' | '.join(evals(md, name))} | {shown(m['wall_time_per_step_s'], 3)} |")
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
    if "relaxation_endpoints" in result:
        lines += ["", "Relaxation endpoints judged by cold solves (first repeat; fmax on the free atoms):", "",
                  "| start | BFGS steps per system | of them refined | max cold fmax (eV/A) | endpoints above fmax | "
                  "max abs energy vs the cold run's endpoint (eV) |", "| --- | --- | --- | --- | --- | --- |"]
        for name, ends in result["relaxation_endpoints"].items():
            lines.append(f"| {name} | {', '.join(map(str, ends['steps']))} | "
                         f"{', '.join(map(str, ends.get('refined_steps', ['-'])))} | {max(ends['cold_fmax_eV_per_A']):.3f} | "
                         f"{ends['above_fmax']} of {len(ends['steps'])} | {ends['max_abs_energy_vs_cold_run_eV']:.4f} |")
    repeats = relax[next(iter(relax))].get("repeats", 1)
    for key, baseline in (("step_ratio_to_explicit", "explicit step"),
                          ("step_ratio_to_explicit_no_autograd", "explicit step without autograd")):
        for name, ratio in result.get(key, {}).items():
            if name not in ("cold", "extrapolate"):
                lines += ["", f"DEQ {name} step / {baseline}: {shown(ratio['relaxations'], 2)} (relaxations), "
                          f"{shown(ratio['md'], 2)} (MD); median of {repeats} round-robin repeats."]
    if "breakdown_md" in result:
        names = list(result["breakdown_md"])
        parts = list(result["breakdown_md"][names[0]]["ms_per_step"])
        lines += ["", "Where an MD step's time goes (ms per step, timers on the model's modules, a separate pass):", "",
                  "| part | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        lines += [f"| {part} | " + " | ".join(f"{result['breakdown_md'][n]['ms_per_step'][part]:.1f}" for n in names)
                  + " |" for part in parts]
        lines.append("| total | " + " | ".join(f"{result['breakdown_md'][n]['total_ms_per_step']:.1f}" for n in names) + " |")
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
