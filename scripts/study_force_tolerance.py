#!/usr/bin/env python
"""How the solver tolerance sets the accuracy of DEQ forces, and what each tolerance costs.

Along one warm-started Langevin MD run of a toy slab (as in benchmark_reuse.py), at several
tolerances of the evaluation solver (``model.deq.eval_solver.tol``, used for warm and cold
solves alike): solver evaluations per warm step and per cold solve, warm-vs-cold force
agreement (the quantity the reuse benchmark states at 2 %), and the force error of both
against a tight reference solve. It also reports the relative residual of each degree l of
z at the accepted iterates: the residual is checked on all of z, so a head that reads
forces from one degree (``force_head: node`` reads l = 1) sees that degree's error, which can
be larger than the whole state's.

    python scripts/study_force_tolerance.py --checkpoint <deq checkpoint.pt> --supercell 2,2,1 \\
        --out docs/benchmarks/force_tolerance
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_reuse import calculator, slab  # noqa: E402

from ase import units  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402

import ocp_deq.deq.solvers as solvers  # noqa: E402
from ocp_deq.data import read_lmdb  # noqa: E402

_last_degree_residuals: list[float] = []


@contextlib.contextmanager
def recording_degree_residuals():
    """Inside: every residual check of the solvers also keeps the per-degree relative
    residuals of its (one-graph, ASE) problem in ``_last_degree_residuals``."""
    check = solvers._Run.check

    def recording(self, x, fx, state, evaluation):
        if fx.dim() == 3:
            lmax, seg = math.isqrt(fx.shape[1]) - 1, self.segments
            _last_degree_residuals[:] = [
                float((seg.norm((fx - x)[:, l * l:(l + 1) ** 2]) / (seg.norm(fx[:, l * l:(l + 1) ** 2]) + 1e-9)).max())
                for l in range(lmax + 1)]
        return check(self, x, fx, state, evaluation)

    solvers._Run.check = recording
    try:
        yield
    finally:
        solvers._Run.check = check


def set_tol(calc, tol: float) -> None:
    settings = calc.model.backbone.deq_settings
    settings.eval_solver.tol = tol
    settings.reuse.solver = None  # warm solves use eval_solver too


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def measure(checkpoint: str, system, tol: float, reference_tol: float, steps: int, every: int,
            temperature: float) -> dict:
    calc = calculator(checkpoint, "plain")
    set_tol(calc, tol)
    atoms = system.copy()
    atoms.calc = calc
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=np.random.default_rng(1))
    warm_nstep, frames = [], []

    def record():
        if dyn.nsteps:  # step 0 is cold in both runs
            warm_nstep.append(calc.last_nstep[0])
            if dyn.nsteps % every == 0:
                frames.append((atoms.get_positions().copy(), atoms.get_forces().copy(),
                               list(_last_degree_residuals)))

    dyn.attach(record, interval=1)
    dyn.run(steps)
    cold = calculator(checkpoint, None)
    set_tol(cold, tol)
    tight = calculator(checkpoint, None)
    set_tol(tight, reference_tol)
    probe = system.copy()
    rows = []
    for positions, f_warm, warm_degrees in frames:
        probe.set_positions(positions, apply_constraint=False)
        probe.calc = cold
        f_cold = probe.get_forces()
        cold_nstep, cold_degrees = cold.last_nstep[0], list(_last_degree_residuals)
        probe.calc = tight
        f_ref = probe.get_forces()
        rows.append({"warm_vs_cold": relative(f_warm, f_cold), "cold_error": relative(f_cold, f_ref),
                     "warm_error": relative(f_warm, f_ref), "cold_nstep": cold_nstep,
                     "warm_degree_residuals": warm_degrees, "cold_degree_residuals": cold_degrees})
    mean = {key: float(np.mean([row[key] for row in rows])) for key in
            ("warm_vs_cold", "cold_error", "warm_error", "cold_nstep")}
    return {"tol": tol, "frames": len(rows), "warm_nstep_per_md_step": float(np.mean(warm_nstep)),
            "mean": mean, "max_warm_vs_cold": max(row["warm_vs_cold"] for row in rows),
            "mean_cold_degree_residuals": np.mean([r["cold_degree_residuals"] for r in rows], axis=0).tolist(),
            "mean_warm_degree_residuals": np.mean([r["warm_degree_residuals"] for r in rows], axis=0).tolist(),
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` ({result['atoms']} atoms, {result['md_steps']} MD steps at "
             f"{result['temperature_K']:g} K; reference: cold solves at tol {result['reference_tol']:g})", "",
             "| tol | evals / warm MD step | evals / cold solve | warm vs cold (mean, max) | cold vs reference | "
             "warm vs reference | rel. residual by degree l at cold solves |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in result["runs"]:
        m = run["mean"]
        degrees = ", ".join(f"l={l}: {r:.1e}" for l, r in enumerate(run["mean_cold_degree_residuals"]))
        lines.append(f"| {run['tol']:g} | {run['warm_nstep_per_md_step']:.2f} | {m['cold_nstep']:.2f} | "
                     f"{m['warm_vs_cold']:.2%}, {run['max_warm_vs_cold']:.2%} | {m['cold_error']:.2%} | "
                     f"{m['warm_error']:.2%} | {degrees} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="trained ocp_deq checkpoint")
    parser.add_argument("--data", default="data/toy_s2ef", help="toy S2EF root (its first relax system is used)")
    parser.add_argument("--supercell", default="1,1,1", metavar="A,B,C")
    parser.add_argument("--tols", default="1e-2,3e-3,1e-3", help="comma-separated eval_solver tolerances")
    parser.add_argument("--reference-tol", type=float, default=1e-5)
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10, help="compare every this many MD steps")
    parser.add_argument("--temperature", type=float, default=600.0)
    parser.add_argument("--out", default="docs/benchmarks/force_tolerance")
    args = parser.parse_args(argv)
    supercell = tuple(int(n) for n in args.supercell.split(","))
    system = slab(read_lmdb(Path(args.data) / "relax")[0], supercell)
    result = {"command": "python scripts/study_force_tolerance.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "checkpoint": args.checkpoint, "atoms": len(system), "md_steps": args.md_steps,
              "temperature_K": args.temperature, "reference_tol": args.reference_tol, "runs": []}
    with recording_degree_residuals():
        for tol in (float(t) for t in args.tols.split(",")):
            result["runs"].append(measure(args.checkpoint, system, tol, args.reference_tol, args.md_steps,
                                          args.every, args.temperature))
            print(markdown(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "force_tolerance.json").write_text(json.dumps(result, indent=1))
    (out / "force_tolerance.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
