"""Toy MD17-style data: one Langevin MD trajectory of a small molecule with ASE's EMT.

The user workflow in miniature: the trajectory is written as an sGDML ``.npz`` (as MD17
ships) and converted by :func:`ocp_deq.data.converters.convert_trajectory`, so the LMDBs
hold exactly what a converted MD17 file holds: non-periodic frames, ``sid`` 0 for the
trajectory and ``fid`` = frame index, train / val / test by a split mode of
:mod:`ocp_deq.data.splits`. The MD starts from the EMT-relaxed molecule (EMT's minimum
differs from the real geometry; started elsewhere the molecule can break apart) and is
thermalised before recording. Seeded: the same spec always gives the same data, also on
another CPU: the MD is chaotic (a 1e-14 A change of the start grows to 1e-3 A in 2000 steps
and to a different trajectory by the end), and CPUs differ in the last bits of numpy's
``exp`` (SIMD code paths), so the state is rounded to a grid (``state_grid``) after the
relaxation and every MD step: last-bit differences vanish instead of growing. The relaxation
runs to fmax 1e-5 eV/A, where last-bit differences leave its end within ~1e-10 A.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from ase import units
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.optimize import BFGS

from ocp_deq.data.converters import convert_trajectory
from ocp_deq.data.lmdb_io import staged_outputs

SPEC_FILE = "toy_molecule.json"
SOURCE_FILE = "trajectory.npz"


@dataclass
class MoleculeSpec:
    """What to generate; stored next to the data so a rerun can tell if it matches."""

    seed: int = 0
    molecule: str = "CH3CH2OH"  # any ase.build.molecule name made of H, C, N, O
    frames: int = 400
    interval: int = 10  # MD steps between recorded frames
    timestep_fs: float = 0.5
    temperature_K: float = 500.0
    equilibration_steps: int = 200
    split: str = "random"  # random | ordered | overlapping (ocp_deq.data.splits)
    n_train: int = 300
    n_val: int = 50
    n_test: int | None = None  # None: the rest
    state_grid: float = 1e-6  # positions (A) and momenta rounded to this every MD step (see above)

    @classmethod
    def from_config(cls, values: dict) -> "MoleculeSpec":
        """From a config's ``toy_data`` entries; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"toy_data: unknown key(s) {unknown} for kind 'molecule'; known: {sorted(known)}")
        return cls(**values)


def simulate(spec: MoleculeSpec) -> dict:
    """The MD trajectory as sGDML arrays (``R``, ``z``, ``E``, ``F``; eV and Angstrom)."""
    rng = np.random.default_rng(spec.seed)
    atoms = molecule(spec.molecule)
    atoms.calc = EMT()
    BFGS(atoms, logfile=None).run(fmax=1e-5, steps=500)
    MaxwellBoltzmannDistribution(atoms, temperature_K=spec.temperature_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    md = Langevin(atoms, spec.timestep_fs * units.fs, temperature_K=spec.temperature_K,
                  friction=0.01 / units.fs, rng=rng, logfile=None)

    def round_state():
        atoms.set_positions(np.round(atoms.positions / spec.state_grid) * spec.state_grid)
        atoms.set_momenta(np.round(atoms.get_momenta() / spec.state_grid) * spec.state_grid)

    round_state()
    md.attach(round_state, interval=1)
    md.run(spec.equilibration_steps)
    positions, energies, forces = [], [], []
    for _ in range(spec.frames):
        md.run(spec.interval)
        positions.append(atoms.get_positions())
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    return {"R": np.stack(positions), "z": atoms.numbers.astype(np.uint8), "E": np.array(energies)[:, None],
            "F": np.stack(forces), "e_unit": np.array("eV"), "r_unit": np.array("Ang")}


def generate_molecule_data(root: str | Path, spec: MoleculeSpec | None = None) -> Path:
    """Write ``root/trajectory.npz``, ``root/{train,val,test}/data.lmdb`` (via the converter),
    ``root/conversion.json`` and the spec."""
    spec = spec or MoleculeSpec()
    root = Path(root)
    outputs = [SOURCE_FILE, SPEC_FILE, "train", "val", "test", "conversion.json"]
    with staged_outputs(root, outputs) as stage:  # old data stays whole until all is written
        source = stage / SOURCE_FILE
        np.savez(source, **simulate(spec))
        record = convert_trajectory(source, stage, split=spec.split, n_train=spec.n_train, n_val=spec.n_val,
                                    n_test=spec.n_test, seed=spec.seed, sid=0, overwrite=True)
        (stage / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=1))
    sizes = {name: entry["frames"] for name, entry in record["written"].items()}
    logging.info(f"toy molecule: {spec.molecule} EMT MD, {spec.frames} frames -> {root} {sizes}")
    return root


def ensure_molecule_data(root: str | Path, spec: MoleculeSpec | None = None) -> Path:
    """Generate the toy molecule data at ``root`` unless the same spec was already written there."""
    spec = spec or MoleculeSpec()
    spec_file = Path(root) / SPEC_FILE
    if spec_file.exists() and json.loads(spec_file.read_text()) == json.loads(json.dumps(asdict(spec))):
        return Path(root)
    logging.info(f"toy molecule data missing at {root}: generating it (seed {spec.seed}) ...")
    return generate_molecule_data(root, spec)
