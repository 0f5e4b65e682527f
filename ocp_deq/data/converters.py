"""Trajectories and multi-system DFT sets -> OCP S2EF LMDBs (``OUT/{train,val,test}/data.lmdb``).

Sources (``fmt``, or from the extension):

* ``npz`` (``.npz``): sGDML layout as MD17 / MD22 ship it: ``R`` [F, n, 3] positions,
  ``z`` [n] (or [F, n]) atomic numbers, ``E`` [F] or [F, 1] energies, ``F`` [F, n, 3] forces,
  optional ``lattice`` [3, 3] (or [F, 3, 3]) making the frames periodic in all directions.
  Key names are configurable (``keys={"positions": "coords", ...}`` for rMD17-style files).
  Units: ``e_unit`` / ``r_unit`` entries of the file (sGDML writes them) unless given.
* ``extxyz`` (``.xyz``, ``.extxyz``), ``traj`` (``.traj``): read with ``ase.io``;
  ``db`` (``.db``): ``ase.db`` rows in id order. Energy / forces come from the frame's
  calculator results, else ``atoms.info`` / ``atoms.arrays`` (db: key-value pairs / data)
  under ``keys["energy"]`` / ``keys["forces"]``. Units default to eV and Angstrom, or to
  what the rows name under ``energy_unit`` / ``length_unit`` (``atoms.info`` / db columns;
  rows that disagree are an error).

System ids (``sid_per`` / ``sid_key``):

* ``sid_per="file"`` (default): the file is one trajectory: every frame gets the same ``sid``
  and ``fid`` = its index in the file, so the order survives any split; splits by frame.
* ``sid_per="row"``: every row (frame) is its own system: ``sid`` = its index in the file
  (db: its row id), ``fid`` 0.
* ``sid_key=NAME``: a DFT set of many systems: ``sid`` = the row's value under NAME
  (``atoms.info`` / db column, npz: an array [F]; an integer or a string), ``fid`` numbers
  the frames of each system in file order.

With several systems, splits are drawn by system (sizes count systems, no system in two
splits) unless ``split_by="frame"``. ``conversion.json`` maps every written frame to its
source row (``rows``: index in the file, db: row id) and its ``sid`` / ``fid``.

Periodic and non-periodic rows keep their own cell and pbc; fairchem cannot batch frames
with different pbc, so a set mixing them is an error unless ``periodic_vacuum`` makes every
row periodic (:func:`make_periodic`).

Frame fields (the layout fairchem's ``LmdbDataset`` / OCP trainer read):
``pos`` [n, 3] float32 (periodic frames wrapped into the cell, as fairchem's
``AtomsToGraphs`` does), ``cell`` [1, 3, 3] float32 (zeros for molecules),
``pbc`` [1, 3] bool (one row per frame, so a batch holds [B, 3] and fairchem's
``radius_graph_pbc`` checks every frame; ``AtomsToGraphs`` writes [3]),
``atomic_numbers`` [n] float32, ``natoms`` int, ``tags`` [n] long (0, OC20's "subsurface",
for every atom of a molecule; ASE sources keep their tags), ``fixed`` [n] float32 (0 = free;
ASE ``FixAtoms`` constraints set 1), ``energy`` float (eV, as given: no referencing),
``forces`` [n, 3] float32 (eV/A), ``sid``, ``fid``.

Every frame is checked before anything is written (shapes, lengths, finite values, atomic
numbers); a problem raises :class:`ConversionError` naming the file, key and frame, and no
LMDB is written. All splits (each with the ``metadata.npz`` of atom counts that fairchem's
load-balancing sampler reads) and ``conversion.json`` are written into a staging folder and
swapped in together (``staged_outputs``): a failure leaves the previous conversion whole.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import torch
from ase import Atoms, units
from ase.constraints import FixAtoms
from ase.geometry import wrap_positions
from torch_geometric.data import Data

from ocp_deq.data.lmdb_io import staged_outputs, write_split
from ocp_deq.data.splits import SPLIT_BY, split_groups, split_indices

FORMATS = ("npz", "extxyz", "traj", "db")
EXTENSIONS = {".npz": "npz", ".xyz": "extxyz", ".extxyz": "extxyz", ".traj": "traj", ".db": "db"}
NPZ_KEYS = {"positions": "R", "numbers": "z", "energy": "E", "forces": "F", "cell": "lattice"}
ASE_KEYS = {"energy": "energy", "forces": "forces"}
ROW_UNIT_KEYS = {"energy": "energy_unit", "length": "length_unit"}  # per-row unit names (ASE sources)
SID_PER = ("file", "row")
ENERGY_UNITS = {  # in eV
    "ev": 1.0, "mev": 1e-3, "kcal/mol": units.kcal / units.mol, "kj/mol": units.kJ / units.mol,
    "hartree": units.Hartree, "ha": units.Hartree, "ry": units.Rydberg, "rydberg": units.Rydberg,
}
LENGTH_UNITS = {"a": 1.0, "å": 1.0, "ang": 1.0, "angstrom": 1.0, "bohr": units.Bohr, "nm": 10.0}
SPLITS = ("train", "val", "test")


class ConversionError(ValueError):
    """A malformed input: the message names the file, the key and the frame."""


# --------------------------------------------------------------------------- units

def _norm(name: str) -> str:
    return "".join(str(name).split()).lower().replace("angstroms", "angstrom")


def unit_factors(energy_unit: str = "eV", length_unit: str = "Ang", force_unit: str | None = None):
    """Factors to eV, Angstrom and eV/Angstrom. ``force_unit`` ("<energy>/<length>") defaults
    to ``energy_unit / length_unit``."""
    def lookup(table, name, what):
        if _norm(name) not in table:
            raise ValueError(f"unknown {what} unit '{name}' (known: {', '.join(table)})")
        return table[_norm(name)]

    energy = lookup(ENERGY_UNITS, energy_unit, "energy")
    length = lookup(LENGTH_UNITS, length_unit, "length")
    if force_unit is None:
        force = energy / length
    else:
        e_name, sep, l_name = _norm(force_unit).rpartition("/")
        if not sep or e_name not in ENERGY_UNITS or l_name not in LENGTH_UNITS:
            raise ValueError(f"force unit '{force_unit}' is not '<energy unit>/<length unit>', e.g. kcal/mol/Ang")
        force = ENERGY_UNITS[e_name] / LENGTH_UNITS[l_name]
    return energy, length, force


# --------------------------------------------------------------------------- reading

def detect_format(path: str | Path) -> str:
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConversionError(f"{path}: cannot tell the format from the extension; give one of {', '.join(FORMATS)}")
    return fmt


def read_frames(path: str | Path, fmt: str | None = None, keys: dict | None = None,
                energy_unit: str | None = None, force_unit: str | None = None,
                length_unit: str | None = None, sid_key: str | None = None) -> tuple[list[dict], dict]:
    """Checked frames in eV / Angstrom, and a description of what was read.

    Each frame is a dict: ``numbers`` [n] int, ``positions`` [n, 3], ``energy`` float,
    ``forces`` [n, 3], ``cell`` [3, 3], ``pbc`` [3] bool, ``tags`` [n], ``fixed`` [n],
    ``row`` (index in the file; db: row id), ``where`` (how errors name the row) and, with
    ``sid_key``, ``sid``.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ConversionError(f"{path}: unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    unknown = set(keys or {}) - set(NPZ_KEYS if fmt == "npz" else ASE_KEYS)
    if unknown:
        raise ValueError(f"unknown key names {sorted(unknown)} for format {fmt}")
    if fmt == "npz":
        keys = {**NPZ_KEYS, **(keys or {})}
        raw, file_units = _read_npz(path, keys, sid_key)
    else:
        keys = {**ASE_KEYS, **(keys or {})}
        raw = _read_ase(path, fmt, keys, sid_key)
        file_units = {name: _row_unit(path, raw, name, given)
                      for name, given in (("energy", energy_unit), ("length", length_unit))}
    energy_unit = energy_unit or file_units.get("energy") or "eV"
    length_unit = length_unit or file_units.get("length") or "Ang"
    try:
        e_factor, l_factor, f_factor = unit_factors(energy_unit, length_unit, force_unit)
    except ValueError as err:
        raise ConversionError(f"{path}: {err}") from None
    frames = [_checked_frame(path, frame, keys, e_factor, l_factor, f_factor, sid_key) for frame in raw]
    if not frames:
        raise ConversionError(f"{path}: no frames")
    info = {
        "source": str(path), "format": fmt, "keys": keys, "frames": len(frames),
        "units": {"energy": energy_unit, "length": length_unit,
                  "forces": force_unit or f"{energy_unit}/{length_unit}"},
        "factors_to_eV_A": {"energy": e_factor, "length": l_factor, "forces": f_factor},
    }
    return frames, info


def _row_unit(path: Path, frames: list[dict], name: str, given: str | None) -> str | None:
    """The unit the rows name under ``ROW_UNIT_KEYS[name]`` (None if none does). Rows that
    disagree, or name it on some rows only, or contradict an explicit unit, are an error:
    one factor cannot convert mixed units."""
    key = ROW_UNIT_KEYS[name]
    table = ENERGY_UNITS if name == "energy" else LENGTH_UNITS
    named = [(frame["where"], frame["units"].get(key)) for frame in frames]
    present = [(where, unit) for where, unit in named if unit is not None]
    if not present:
        return None
    reference = (f"--{name}-unit", given) if given is not None else present[0]
    for where, unit in named:
        if unit is None or table.get(_norm(unit), unit) != table.get(_norm(reference[1]), reference[1]):
            raise ConversionError(f"{path}: key '{key}', {where}: {unit!r}, but {reference[0]} says "
                                  f"{reference[1]!r}: mixed units (convert the parts separately)")
    return present[0][1]


def _read_npz(path: Path, keys: dict, sid_key: str | None) -> tuple[list[dict], dict]:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001  (any unreadable file)
        raise ConversionError(f"{path}: cannot read as npz: {err}") from None
    with npz:
        def get(name, required=True):
            key = keys[name]
            if key not in npz.files:
                if not required:
                    return None
                raise ConversionError(f"{path}: missing key '{key}' ({name}); keys in the file: {', '.join(npz.files)}")
            return npz[key]

        pos, numbers, energy, forces = get("positions"), get("numbers"), get("energy"), get("forces")
        cell = get("cell", required=False)
        if sid_key is not None and sid_key not in npz.files:
            raise ConversionError(f"{path}: missing key '{sid_key}' (sid); keys in the file: {', '.join(npz.files)}")
        sids = npz[sid_key] if sid_key is not None else None
        file_units = {name: str(npz[key]) for name, key in (("energy", "e_unit"), ("length", "r_unit")) if key in npz.files}

    def expect(array, name, shape):
        """``shape`` entries: int, or None = any size."""
        if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ConversionError(f"{path}: key '{keys[name]}' ({name}) has shape {list(array.shape)}, expected {want}")

    expect(pos, "positions", (None, None, 3))
    n_frames, n_atoms = pos.shape[:2]
    if energy.ndim == 2:
        expect(energy, "energy", (n_frames, 1))
        energy = energy[:, 0]
    expect(energy, "energy", (n_frames,))
    expect(forces, "forces", (n_frames, n_atoms, 3))
    if numbers.ndim == 1:
        expect(numbers, "numbers", (n_atoms,))
        numbers = np.broadcast_to(numbers, (n_frames, n_atoms))
    expect(numbers, "numbers", (n_frames, n_atoms))
    periodic = cell is not None
    if periodic:
        if cell.ndim == 2:
            expect(cell, "cell", (3, 3))
            cell = np.broadcast_to(cell, (n_frames, 3, 3))
        expect(cell, "cell", (n_frames, 3, 3))
    if sids is not None and sids.shape != (n_frames,):
        raise ConversionError(f"{path}: key '{sid_key}' (sid) has shape {list(sids.shape)}, expected [{n_frames}]")
    frames = [
        {"numbers": numbers[i], "positions": pos[i], "energy": energy[i], "forces": forces[i],
         "cell": cell[i] if periodic else np.zeros((3, 3)), "pbc": np.full(3, periodic),
         "row": i, "where": f"frame {i}", "sid": None if sids is None else sids[i].item()}
        for i in range(n_frames)
    ]
    return frames, file_units


def _read_ase(path: Path, fmt: str, keys: dict, sid_key: str | None) -> list[dict]:
    try:
        if fmt == "db":
            with ase.db.connect(str(path), type="db") as db:
                rows = list(db.select(sort="id"))
            items, row_ids = [], [row.id for row in rows]
            for row in rows:
                atoms = row.toatoms()
                atoms.info.update(row.key_value_pairs)
                atoms.info.update(row.data)
                items.append(atoms)
        else:
            items = ase.io.read(str(path), index=":", format=fmt)
            row_ids = list(range(len(items)))
    except Exception as err:  # noqa: BLE001  (any unreadable file)
        raise ConversionError(f"{path}: cannot read as {fmt}: {err}") from None

    def label(atoms, key):
        results = atoms.calc.results if atoms.calc is not None else {}
        for source in (results, atoms.info, atoms.arrays):
            if key in source:
                return source[key]
        return None

    frames = []
    for i, (atoms, row) in enumerate(zip(items, row_ids)):
        fixed = np.zeros(len(atoms))
        for constraint in atoms.constraints:
            if isinstance(constraint, FixAtoms):
                fixed[constraint.index] = 1.0
        frames.append({
            "numbers": atoms.numbers, "positions": atoms.positions,
            "energy": label(atoms, keys["energy"]), "forces": label(atoms, keys["forces"]),
            "cell": atoms.cell.array, "pbc": atoms.pbc, "tags": atoms.get_tags(), "fixed": fixed,
            "row": row, "where": f"frame {i} (db id {row})" if fmt == "db" else f"frame {i}",
            "sid": atoms.info.get(sid_key) if sid_key is not None else None,
            "units": {key: atoms.info.get(key) for key in ROW_UNIT_KEYS.values()},
        })
    return frames


def _checked_frame(path, frame, keys, e_factor, l_factor, f_factor, sid_key=None) -> dict:
    def fail(name, problem):
        key = sid_key if name == "sid" else keys.get(name, name)
        raise ConversionError(f"{path}: key '{key}' ({name}), {frame['where']}: {problem}")

    def array(name, value, shape, dtype=np.float64):
        if value is None:
            fail(name, "missing")
        try:
            value = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as err:
            fail(name, f"not numeric ({err})")
        if value.shape != shape:
            fail(name, f"shape {list(value.shape)}, expected {list(shape)}")
        if not np.isfinite(value).all():
            bad = np.argwhere(~np.isfinite(value))[0].tolist()
            fail(name, f"non-finite value {value[tuple(bad)]} at index {bad}")
        return value

    numbers = np.asarray(frame["numbers"])
    n = len(numbers)
    if n == 0:
        fail("numbers", "no atoms")
    numbers = array("numbers", numbers, (n,))
    if (numbers != np.round(numbers)).any() or numbers.min() < 1 or numbers.max() > 118:
        fail("numbers", f"atomic numbers must be integers in 1..118 (got {numbers.tolist()})")
    positions = array("positions", frame["positions"], (n, 3)) * l_factor
    energy = float(array("energy", frame["energy"], ())) * e_factor
    forces = array("forces", frame["forces"], (n, 3)) * f_factor
    cell = array("cell", frame["cell"], (3, 3)) * l_factor
    pbc = np.asarray(frame["pbc"], dtype=bool).reshape(3)
    if pbc.any():
        if (np.linalg.norm(cell[pbc], axis=1) == 0).any():
            fail("cell", f"periodic direction(s) {np.flatnonzero(pbc).tolist()} without a cell vector")
        positions = wrap_positions(positions, cell, pbc=pbc, eps=0)
    sid = frame["sid"]
    if sid_key is not None:
        if sid is None:
            fail("sid", "missing (with a sid key, every row needs one)")
        sid = sid.item() if isinstance(sid, np.generic) else sid
        if isinstance(sid, bool) or not isinstance(sid, (int, str)) or sid == "":
            fail("sid", f"{sid!r} is not an integer or a non-empty string")
    return {
        "numbers": numbers.astype(np.int64), "positions": positions, "energy": energy, "forces": forces,
        "cell": cell, "pbc": pbc,
        "tags": np.asarray(frame.get("tags", np.zeros(n)), dtype=np.int64),
        "fixed": np.asarray(frame.get("fixed", np.zeros(n)), dtype=np.float32),
        "row": frame["row"], "where": frame["where"], "sid": sid,
    }


def make_periodic(frame: dict, vacuum: float) -> dict:
    """``frame`` periodic in every direction: each non-periodic direction gets ``vacuum`` A of
    empty space (ASE's ``Atoms.center``; a missing cell vector is created), so with
    ``vacuum`` >= the model cutoff no atom sees a periodic image there. Lets one fairchem
    batch hold bulk, slabs and molecules (it refuses frames with different pbc)."""
    axes = np.flatnonzero(~frame["pbc"]).tolist()
    if not axes:
        return frame
    atoms = Atoms(frame["numbers"], frame["positions"], cell=frame["cell"], pbc=frame["pbc"])
    atoms.center(vacuum=vacuum / 2, axis=axes)
    cell = atoms.cell.array
    positions = wrap_positions(atoms.positions, cell, pbc=True, eps=0)
    return {**frame, "positions": positions, "cell": cell, "pbc": np.ones(3, dtype=bool)}


# --------------------------------------------------------------------------- writing

def frame_to_data(frame: dict, sid, fid: int) -> Data:
    """One checked frame as the ``Data`` object stored in the LMDB (fields in the module doc)."""
    n = len(frame["numbers"])
    return Data(
        pos=torch.tensor(frame["positions"], dtype=torch.float32),
        cell=torch.tensor(frame["cell"], dtype=torch.float32).view(1, 3, 3),
        pbc=torch.tensor(frame["pbc"], dtype=torch.bool).view(1, 3),
        atomic_numbers=torch.tensor(frame["numbers"], dtype=torch.float32),
        natoms=n,
        tags=torch.tensor(frame["tags"], dtype=torch.long),
        fixed=torch.tensor(frame["fixed"], dtype=torch.float32),
        energy=float(frame["energy"]),
        forces=torch.tensor(frame["forces"], dtype=torch.float32),
        sid=sid,
        fid=int(fid),
    )


def assign_ids(frames: list[dict], sid_per: str = "file", sid_key: str | None = None,
               sid: int | str | None = None) -> tuple[list, list[int]]:
    """``(sids, fids)``, one per frame, as the module doc describes for each mode."""
    if sid_key is None and sid_per == "file":
        return [0 if sid is None else sid] * len(frames), list(range(len(frames)))
    sids = [frame["sid"] if sid_key is not None else frame["row"] for frame in frames]
    seen = Counter()
    fids = []
    for value in sids:
        fids.append(seen[value])
        seen[value] += 1
    return sids, fids


def _check_one_pbc(path, frames: list[dict]) -> None:
    """fairchem's ``radius_graph_pbc`` refuses a batch whose frames differ in pbc: a set
    mixing them would fail mid-epoch, so it fails here, naming a row of each kind."""
    first: dict = {}
    for frame in frames:
        first.setdefault(tuple(frame["pbc"].tolist()), frame["where"])
    if len(first) > 1:
        found = "; ".join(f"pbc {list(pbc)} first at {where}" for pbc, where in first.items())
        raise ConversionError(f"{path}: rows with different periodic boundary conditions ({found}); fairchem "
                              "cannot batch them: pass periodic_vacuum (--periodic-vacuum A, at least the model's "
                              "cutoff) to make every row periodic, or convert the kinds separately")


def _check_distinct_names(path, frames: list[dict], sids: list) -> None:
    """fairchem names predictions ``f"{sid}_{fid}"``: sids 1 and "1" would collide."""
    names: dict = {}
    for frame, value in zip(frames, sids):
        other = names.setdefault(str(value), (value, frame["where"]))
        if other[0] != value:
            raise ConversionError(f"{path}: sid {value!r} ({frame['where']}) and sid {other[0]!r} ({other[1]}) "
                                  "print alike; fairchem's prediction ids would mix them")


def convert_trajectory(path: str | Path, out_dir: str | Path, fmt: str | None = None,
                       split: str = "random", n_train: int = 950, n_val: int = 50,
                       n_test: int | None = None, seed: int = 0, sid: int | str | None = None,
                       sid_per: str = "file", sid_key: str | None = None, split_by: str | None = None,
                       periodic_vacuum: float | None = None,
                       keys: dict | None = None, energy_unit: str | None = None,
                       force_unit: str | None = None, length_unit: str | None = None,
                       overwrite: bool = False) -> dict:
    """Read, check and split one trajectory or multi-system set (sids: module doc); write
    ``out_dir/{train,val,test}/{data.lmdb,metadata.npz}`` (empty splits are not written) and
    ``out_dir/conversion.json`` (settings, and each split's source rows, sids and fids).
    ``split_by``: "system" (default with several systems) or "frame". Returns that record."""
    if sid_per not in SID_PER:
        raise ValueError(f"unknown sid_per '{sid_per}' (known: {', '.join(SID_PER)})")
    if sid_key is not None and sid_per != "file":
        raise ValueError("give either sid_per='row' or sid_key, not both")
    multi = sid_key is not None or sid_per == "row"
    if sid is not None and multi:
        raise ValueError("sid names the one system of a trajectory file; with sid_per='row' or sid_key the rows give the sids")
    split_by = split_by or ("system" if multi else "frame")
    if split_by not in SPLIT_BY:
        raise ValueError(f"unknown split_by '{split_by}' (known: {', '.join(SPLIT_BY)})")
    if split_by == "system" and not multi:
        raise ValueError("the file is one system (sid_per='file'): split by frame, or give sids per row or by key")
    out_dir = Path(out_dir)
    if not overwrite:
        existing = [str(out_dir / "conversion.json")] if (out_dir / "conversion.json").exists() else []
        existing += [str(p) for name in SPLITS if (out_dir / name).is_dir() for p in sorted((out_dir / name).iterdir())]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} exist(s) in the output folder (a training run would read "
                                  "every *.lmdb there); pass overwrite=True (--overwrite) to replace them")
    frames, info = read_frames(path, fmt, keys, energy_unit, force_unit, length_unit, sid_key)
    if periodic_vacuum is not None:
        frames = [make_periodic(frame, periodic_vacuum) for frame in frames]
    _check_one_pbc(path, frames)
    sids, fids = assign_ids(frames, sid_per, sid_key, sid)
    _check_distinct_names(path, frames, sids)
    if split_by == "system":
        indices = split_groups(sids, split, n_train, n_val, n_test, seed)
    else:
        indices = split_indices(len(frames), split, n_train, n_val, n_test, seed)
    record = {**info, "sid_per": "key" if sid_key is not None else sid_per, "sid_key": sid_key,
              "sid": None if multi else sids[0], "systems": len(set(sids)), "periodic_vacuum": periodic_vacuum,
              "pbc": dict(Counter("".join("T" if p else "F" for p in frame["pbc"]) for frame in frames)),
              "split": {"mode": split, "by": split_by, "seed": seed, "n_train": n_train, "n_val": n_val,
                        "n_test": n_test}, "written": {}}
    # every split and conversion.json are written aside and swapped in together: a failure
    # leaves the previous conversion whole, and old split folders (foreign files too) go
    with staged_outputs(out_dir, [*SPLITS, "conversion.json"]) as stage:
        for name in SPLITS:
            chosen = indices[name].tolist()
            if chosen:
                write_split(stage / name, [frame_to_data(frames[i], sids[i], fids[i]) for i in chosen])
            target = out_dir / name / "data.lmdb"
            record["written"][name] = {
                "path": str(target) if chosen else None, "frames": len(chosen),
                "systems": len({sids[i] for i in chosen}), "rows": [frames[i]["row"] for i in chosen],
                "sids": [sids[i] for i in chosen], "fids": [fids[i] for i in chosen],
            }
        portable = {**record, "written": {name: {**entry, "path": entry["path"] and f"{name}/data.lmdb"}
                                          for name, entry in record["written"].items()}}
        (stage / "conversion.json").write_text(json.dumps(portable, indent=1))  # paths relative to it
    return record
