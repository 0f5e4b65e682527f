"""Total-energy drift of NVE MD (ASE VelocityVerlet) with the DEQ's conservative and direct forces.

Runs the machinery of tests/test_nve.py (a random float64 DEQ on a small free molecule,
tight solver tolerances) for longer, for several seeds, and reports the drift (slope of a
linear fit of the total energy, per atom, in eV/atom/ps) and the largest deviation from
the initial total energy, over the part of the run before any atom pair leaves the
model's cutoff (a changed graph makes the energy jump).

    python scripts/measure_nve_drift.py --steps 800 --dt 0.25 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))
import ocp_deq  # noqa: E402,F401  (before fairchem)
import torch  # noqa: E402
from test_nve import WIDTH, nve_run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--dt", type=float, default=0.25, help="time step in fs")
    parser.add_argument("--seeds", default="0,1,2", help="model and velocity seeds (comma separated)")
    parser.add_argument("--energy-scale", type=float, default=5.0, help="factor on the untrained model's energy and forces")
    parser.add_argument("--molecule", default="CH3OH", help="an ase.build.molecule name")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: extra threads only cost

    rows = []
    print(f"{args.molecule}, {args.steps} steps of {args.dt} fs, energy scale {args.energy_scale}")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in ("conservative", "direct"):
            start = time.time()
            run = nve_run(mode, steps=args.steps, dt_fs=args.dt, energy_scale=args.energy_scale,
                          name=args.molecule, seed=seed)
            row = {key: value for key, value in run.items() if key != "total"} | {"seed": seed}
            rows.append(row)
            cut = "" if run["graph_intact"] else f" (a pair left the {WIDTH['max_radius']} A cutoff: first {run['duration_fs']:.0f} fs)"
            print(f"seed {seed} {mode:>12}: drift {row['drift_per_atom_per_ps']:+.3e} eV/atom/ps, "
                  f"max |E - E0| {row['max_deviation']:.3e} eV, E_pot range {row['potential_range']:.3e} eV, "
                  f"{row['mean_solver_steps']:.1f} solver steps/call ({time.time() - start:.0f} s){cut}", flush=True)
    for mode in ("conservative", "direct"):
        drifts = [abs(r["drift_per_atom_per_ps"]) for r in rows if r["force_mode"] == mode]
        print(f"{mode}: mean |drift| {sum(drifts) / len(drifts):.3e} eV/atom/ps over {len(drifts)} seeds")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
