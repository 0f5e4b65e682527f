"""Toy S2EF data: real ASE-EMT energies and forces of adsorbates on fcc(111) slabs.

Mirrors OC20's conventions so the whole OCP pipeline runs on it: tags (0 subsurface,
1 surface, 2 adsorbate), the bottom layers fixed, ``sid`` per trajectory and ``fid`` per
frame, referenced (adsorption-like) energies, train / val splits with labels, an
unlabelled test split, and an initial-structure set (with EMT-relaxed targets) for
``--mode run-relaxations``. Frames come from BFGS relaxations and short Langevin MD.
Everything is seeded: the same arguments always give the same data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import BFGS
from fairchem.core.preprocessing import AtomsToGraphs

from ocp_deq.data.lmdb_io import staged_outputs, write_split

METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
ADSORBATES = ("O", "H", "C", "N")
SITES = ("fcc", "hcp", "ontop", "bridge")
SPLITS = ("train", "val", "test")
SPEC_FILE = "toy_data.json"


@dataclass
class ToySpec:
    """What to generate; stored next to the data so a rerun can tell if it matches."""

    seed: int = 0
    version: int = 2  # generator version: 2 draws each split from its own random stream
    slab_size: tuple = (2, 2, 3)
    fixed_layers: int = 2
    systems: dict = None  # split -> number of systems (trajectories)
    relax_systems: int = 4
    relax_frames: int = 4
    md_frames: int = 4
    md_interval: int = 5
    md_temperature_K: float = 600.0

    def __post_init__(self):
        self.slab_size = tuple(self.slab_size)
        if self.systems is None:
            self.systems = {"train": 384, "val": 12, "test": 6}


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """One random stream per split: resizing one split leaves the others' systems unchanged."""
    return np.random.default_rng([seed, (*SPLITS, "relax").index(split)])


def _reference_energies() -> dict:
    """EMT energy of each isolated adsorbate atom (the gas-phase reference)."""
    refs = {}
    for symbol in ADSORBATES:
        atom = Atoms(symbol, calculator=EMT())
        refs[symbol] = atom.get_potential_energy()
    return refs


def _build_system(rng: np.random.Generator, spec: ToySpec):
    metal = METALS[rng.integers(len(METALS))]
    adsorbate = ADSORBATES[rng.integers(len(ADSORBATES))]
    site = SITES[rng.integers(len(SITES))]
    slab = fcc111(metal, size=spec.slab_size, vacuum=7.0, periodic=True)
    layers = spec.slab_size[2]
    # fcc111 tags layers 1 (top) .. layers (bottom)
    layer_of = slab.get_tags()
    slab.calc = EMT()
    e_slab = slab.get_potential_energy()
    add_adsorbate(slab, adsorbate, 1.5, site)
    atoms = slab
    n_slab = len(atoms) - 1
    atoms.calc = EMT()
    # start near the EMT-preferred height (a 1-D scan), then perturb: forces stay realistic
    base_z = atoms.positions[n_slab, 2] - 1.5
    heights = np.arange(0.6, 2.4, 0.1)
    energies = []
    for h in heights:
        atoms.positions[n_slab, 2] = base_z + h
        energies.append(atoms.get_potential_energy())
    atoms.positions[n_slab, 2] = base_z + heights[int(np.argmin(energies))]
    atoms.positions[n_slab] += rng.normal(0, 0.12, size=3)
    tags = np.zeros(len(atoms), dtype=int)
    tags[:n_slab][layer_of == 1] = 1
    tags[n_slab:] = 2
    fixed = np.zeros(len(atoms), dtype=int)
    fixed[:n_slab][layer_of > layers - spec.fixed_layers] = 1
    atoms.set_tags(tags)
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(fixed)))
    atoms.calc = EMT()
    return atoms, fixed, e_slab, f"{metal}111+{adsorbate}@{site}"


def _snapshot(atoms: Atoms, reference: float) -> Atoms:
    frame = atoms.copy()
    energy = atoms.get_potential_energy(apply_constraint=False)
    forces = atoms.get_forces(apply_constraint=False)
    frame.calc = SinglePointCalculator(frame, energy=energy - reference, forces=forces)
    return frame


def _trajectory(atoms: Atoms, reference: float, spec: ToySpec, rng) -> list[Atoms]:
    """Frames of a BFGS relaxation followed by Langevin MD from the relaxed structure."""
    frames = [_snapshot(atoms, reference)]
    opt = BFGS(atoms, logfile=None, maxstep=0.1)
    for _ in range(spec.relax_frames - 1):
        opt.run(fmax=0.01, steps=1)
        frames.append(_snapshot(atoms, reference))
    MaxwellBoltzmannDistribution(atoms, temperature_K=spec.md_temperature_K, rng=rng)
    md = Langevin(atoms, 2.0 * units.fs, temperature_K=spec.md_temperature_K, friction=0.02, rng=rng, logfile=None)
    for _ in range(spec.md_frames):
        md.run(spec.md_interval)
        frames.append(_snapshot(atoms, reference))
    return frames


def _to_data(a2g: AtomsToGraphs, atoms: Atoms, fixed, sid: int, fid: int, labelled: bool):
    data = a2g.convert(atoms)
    data.tags = torch.as_tensor(atoms.get_tags(), dtype=torch.long)
    data.fixed = torch.as_tensor(fixed, dtype=torch.float32)
    data.sid = sid
    data.fid = fid
    if labelled:
        data.energy = float(data.energy)
    return data


def generate_toy_data(root: str | Path, spec: ToySpec | None = None) -> Path:
    """Write ``root/{train,val,test}/data.lmdb``, ``root/relax/data.lmdb`` and the spec."""
    spec = spec or ToySpec()
    root = Path(root)
    refs = _reference_energies()
    labelled_a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=False, r_pbc=True, r_edges=False)
    unlabelled_a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_fixed=False, r_pbc=True, r_edges=False)
    with staged_outputs(root, [*SPLITS, "relax", SPEC_FILE]) as stage:  # old data stays whole until done
        sid = 0
        for split in SPLITS:
            rng = _split_rng(spec.seed, split)
            labelled = split != "test"
            data = []
            for _ in range(spec.systems[split]):
                atoms, fixed, e_slab, name = _build_system(rng, spec)
                reference = e_slab + refs[atoms.get_chemical_symbols()[-1]]
                for fid, frame in enumerate(_trajectory(atoms, reference, spec, rng)):
                    a2g = labelled_a2g if labelled else unlabelled_a2g
                    data.append(_to_data(a2g, frame, fixed, sid, fid, labelled))
                sid += 1
            write_split(stage / split, data)
            logging.info(f"toy S2EF: wrote {len(data)} {split} frames to {root / split}")
        relax = []
        rng = _split_rng(spec.seed, "relax")
        for _ in range(spec.relax_systems):
            atoms, fixed, e_slab, name = _build_system(rng, spec)
            reference = e_slab + refs[atoms.get_chemical_symbols()[-1]]
            initial = _to_data(unlabelled_a2g, atoms, fixed, sid, 0, False)
            relaxed = atoms.copy()
            relaxed.calc = EMT()
            BFGS(relaxed, logfile=None).run(fmax=0.02, steps=200)
            initial.pos_relaxed = torch.as_tensor(relaxed.positions, dtype=torch.float32)
            initial.y_relaxed = float(relaxed.get_potential_energy() - reference)
            initial.y_init = float(atoms.get_potential_energy() - reference)
            relax.append(initial)
            sid += 1
        write_split(stage / "relax", relax)
        (stage / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=1))
    return root


def ensure_toy_data(root: str | Path, spec: ToySpec | None = None) -> Path:
    """Generate the toy data at ``root`` unless the same spec was already written there."""
    spec = spec or ToySpec()
    root = Path(root)
    spec_file = root / SPEC_FILE
    if spec_file.exists() and json.loads(spec_file.read_text()) == json.loads(json.dumps(asdict(spec))):
        return root
    logging.info(f"toy S2EF data missing at {root}: generating it (seed {spec.seed}) ...")
    return generate_toy_data(root, spec)
