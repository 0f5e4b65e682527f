"""Trajectory converters (sGDML npz, extxyz, ASE traj / db) -> OCP LMDBs, split modes,
malformed inputs, and the converted molecules through fairchem's collater and graph code."""

import importlib.util
import json
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms, units
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

import ocp_deq  # noqa: F401  (before fairchem)
from fairchem.core.datasets import LmdbDataset
from fairchem.core.datasets.lmdb_dataset import data_list_collater
from fairchem.core.models.base import GraphModelMixin
from ocp_deq.data import read_lmdb
from ocp_deq.data.converters import (ConversionError, convert_trajectory, frame_to_data, make_periodic, read_frames,
                                     unit_factors)
from ocp_deq.data.splits import split_indices

REPO = Path(__file__).resolve().parents[1]
N_FRAMES = 40
KCAL = units.kcal / units.mol  # eV per kcal/mol
SPLIT = dict(split="random", n_train=24, n_val=6, n_test=None, seed=3)


@pytest.fixture(scope="module")
def md_frames():
    """40 frames of 700 K velocity-Verlet MD of ethylamine (C, N, H) with EMT."""
    atoms = molecule("CH3CH2NH2")
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=700, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    frames = []
    for _ in range(N_FRAMES):
        dyn.run(1)
        frame = Atoms(atoms.numbers, atoms.positions)
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames


def write_npz(path, frames, unit_keys=True, **override):
    """sGDML layout, energies in kcal/mol (E as [F, 1], like MD17)."""
    arrays = {
        "R": np.stack([f.positions for f in frames]),
        "z": frames[0].numbers.astype(np.uint8),
        "E": np.array([[f.get_potential_energy() / KCAL] for f in frames]),
        "F": np.stack([f.get_forces() / KCAL for f in frames]),
    }
    if unit_keys:
        arrays.update(e_unit=np.array("kcal/mol"), r_unit=np.array("Ang"))
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_db(path, frames):
    with ase.db.connect(str(path), append=False) as db:
        for frame in frames:
            db.write(frame)
    return path


@pytest.fixture(scope="module")
def sources(md_frames, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    ase.io.write(root / "md.xyz", md_frames, format="extxyz")
    ase.io.write(root / "md.traj", md_frames, format="traj")
    return {
        "npz": write_npz(root / "md.npz", md_frames),
        "extxyz": root / "md.xyz",
        "traj": root / "md.traj",
        "db": write_db(root / "md.db", md_frames),
    }


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    return {fmt: convert_trajectory(path, out / fmt, sid=7, **SPLIT) for fmt, path in sources.items()}


def lmdb_files(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if "lmdb" in p.name)


# ----------------------------------------------------------------------------- content

def test_every_source_gives_the_same_lmdbs(converted):
    reference = {split: read_lmdb(entry["path"]) for split, entry in converted["npz"]["written"].items()}
    assert [len(reference[s]) for s in ("train", "val", "test")] == [24, 6, 10]
    for fmt in ("extxyz", "traj", "db"):
        for split, entry in converted[fmt]["written"].items():
            frames = read_lmdb(entry["path"])
            assert [(d.sid, d.fid) for d in frames] == [(d.sid, d.fid) for d in reference[split]], fmt
            for got, want in zip(frames, reference[split]):
                assert torch.equal(got.atomic_numbers, want.atomic_numbers)
                torch.testing.assert_close(got.pos, want.pos, rtol=0, atol=2e-6)
                torch.testing.assert_close(got.forces, want.forces, rtol=1e-6, atol=2e-6)
                assert got.energy == pytest.approx(want.energy, rel=1e-7, abs=1e-7)
                for field in ("cell", "pbc", "tags", "fixed"):
                    assert torch.equal(got[field], want[field]), (fmt, field)


def test_lmdb_holds_the_md_frames_in_ev(converted, md_frames):
    for split, entry in converted["npz"]["written"].items():
        frames = read_lmdb(entry["path"])
        assert [d.fid for d in frames] == entry["fids"]
        for data in frames:
            source = md_frames[data.fid]
            assert data.sid == 7 and data.natoms == len(source)
            assert data.pos.dtype == torch.float32 and data.pos.shape == (10, 3)
            torch.testing.assert_close(data.pos, torch.tensor(source.positions, dtype=torch.float32))
            torch.testing.assert_close(data.forces, torch.tensor(source.get_forces(), dtype=torch.float32))
            assert isinstance(data.energy, float)
            assert data.energy == pytest.approx(source.get_potential_energy(), rel=1e-9)  # kcal/mol -> eV
            assert torch.equal(data.atomic_numbers, torch.tensor(source.numbers, dtype=torch.float32))
            assert data.cell.shape == (1, 3, 3) and not data.cell.any()
            assert data.pbc.tolist() == [[False, False, False]]
            assert data.tags.dtype == torch.long and not data.tags.any()
            assert data.fixed.dtype == torch.float32 and not data.fixed.any()
    record = converted["npz"]
    assert record["units"]["energy"] == "kcal/mol"  # read from the file's e_unit
    assert (Path(record["written"]["train"]["path"]).parents[1] / "conversion.json").is_file()


def test_fairchem_lmdb_dataset_reads_it(converted):
    dataset = LmdbDataset({"src": str(Path(converted["db"]["written"]["val"]["path"]).parent)})
    assert len(dataset) == 6
    assert [int(dataset[i].fid) for i in range(6)] == converted["db"]["written"]["val"]["fids"]


def test_units_explicit_and_key_names(md_frames, tmp_path):
    assert unit_factors("kcal/mol")[0] == pytest.approx(0.0433641, rel=1e-5)
    assert unit_factors("Hartree", "Bohr")[2] == pytest.approx(51.42208, rel=1e-5)  # Ha/Bohr in eV/A
    assert unit_factors("eV", "Ang", "kcal/mol/Ang")[2] == pytest.approx(KCAL)
    # rMD17-style keys, no unit entries in the file: units given explicitly
    npz = write_npz(tmp_path / "rmd17.npz", md_frames, unit_keys=False)
    data = np.load(npz)
    renamed = tmp_path / "renamed.npz"
    np.savez(renamed, coords=data["R"], nuclear_charges=data["z"], energies=data["E"][:, 0], forces=data["F"])
    keys = {"positions": "coords", "numbers": "nuclear_charges", "energy": "energies", "forces": "forces"}
    record = convert_trajectory(renamed, tmp_path / "out", keys=keys, energy_unit="kcal/mol", split="ordered",
                                n_train=30, n_val=5, n_test=5)
    train = read_lmdb(record["written"]["train"]["path"])
    assert [d.fid for d in train] == list(range(30))
    assert train[3].energy == pytest.approx(md_frames[3].get_potential_energy(), rel=1e-9)
    torch.testing.assert_close(train[3].forces, torch.tensor(md_frames[3].get_forces(), dtype=torch.float32))
    with pytest.raises(ConversionError, match="unknown energy unit 'kcal'"):
        convert_trajectory(renamed, tmp_path / "bad", keys=keys, energy_unit="kcal")
    assert lmdb_files(tmp_path / "bad") == []


def test_periodic_frames_are_wrapped_and_flagged(md_frames, tmp_path):
    frames = []
    for frame in md_frames[:6]:
        periodic = frame.copy()
        periodic.calc = SinglePointCalculator(periodic, **frame.calc.results)
        periodic.set_cell([8.0, 9.0, 10.0])
        periodic.pbc = True
        periodic.positions += [7.0, 0.0, -1.0]  # partly outside the cell
        frames.append(periodic)
    ase.io.write(tmp_path / "box.xyz", frames, format="extxyz")
    record = convert_trajectory(tmp_path / "box.xyz", tmp_path / "out", split="ordered", n_train=4, n_val=1)
    data = read_lmdb(record["written"]["train"]["path"])[2]
    assert data.pbc.tolist() == [[True, True, True]]
    torch.testing.assert_close(data.cell[0], torch.diag(torch.tensor([8.0, 9.0, 10.0])))
    cell_lengths = torch.tensor([8.0, 9.0, 10.0])
    assert ((data.pos >= 0) & (data.pos < cell_lengths)).all()
    shift = (data.pos.double() - torch.tensor(frames[2].positions)) / cell_lengths.double()
    torch.testing.assert_close(shift, shift.round(), atol=1e-5, rtol=0)  # moved by whole cell vectors only


# ----------------------------------------------------------------------------- splits

def test_split_modes_give_the_documented_index_sets():
    ordered = split_indices(20, "ordered", n_train=10, n_val=5, n_test=3)
    assert {k: v.tolist() for k, v in ordered.items()} == {
        "train": list(range(10)), "val": list(range(10, 15)), "test": [15, 16, 17]}

    random = split_indices(20, "random", n_train=10, n_val=5, seed=4)
    perm = np.random.default_rng(4).permutation(20)
    assert random["train"].tolist() == sorted(perm[:10]) and random["val"].tolist() == sorted(perm[10:15])
    assert random["test"].tolist() == sorted(perm[15:])  # n_test=None: the rest
    assert split_indices(20, "random", 10, 5, seed=4)["train"].tolist() == random["train"].tolist()
    assert split_indices(20, "random", 10, 5, seed=5)["train"].tolist() != random["train"].tolist()

    overlapping = split_indices(20, "overlapping", n_train=8, n_val=4, n_test=5, seed=1)
    assert overlapping["test"].tolist() == list(range(15, 20))
    region = np.random.default_rng(1).permutation(15)
    assert overlapping["train"].tolist() == sorted(region[:8]) and overlapping["val"].tolist() == sorted(region[8:12])
    rest = split_indices(20, "overlapping", n_train=8, n_val=4)  # test: the last 20 - 12 frames
    assert rest["test"].tolist() == list(range(12, 20))
    assert sorted(rest["train"].tolist() + rest["val"].tolist()) == list(range(12))

    for splits in (ordered, random, overlapping, rest):
        every = np.concatenate(list(splits.values()))
        assert len(set(every.tolist())) == len(every)  # disjoint
    with pytest.raises(ValueError, match="need more than the 20 frames"):
        split_indices(20, "random", n_train=15, n_val=5, n_test=1)
    with pytest.raises(ValueError, match="unknown split mode"):
        split_indices(20, "shuffled")


@pytest.mark.parametrize("mode", ["ordered", "overlapping"])
def test_converter_writes_the_split_index_sets(sources, tmp_path, mode):
    convert_trajectory(sources["traj"], tmp_path, split=mode, n_train=20, n_val=5, n_test=10, seed=2)
    expected = split_indices(N_FRAMES, mode, 20, 5, 10, seed=2)
    for split in ("train", "val", "test"):
        assert [d.fid for d in read_lmdb(tmp_path / split / "data.lmdb")] == expected[split].tolist()


def test_command_line(sources, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_trajectory", REPO / "scripts" / "convert_trajectory.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "md17"
    argv = [str(sources["npz"]), "-o", str(out), "--split", "overlapping", "--train", "20", "--val", "5",
            "--test", "10", "--seed", "1", "--sid", "aspirin"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "read 40 frames" in printed and "kcal/mol" in printed and str(out / "test" / "data.lmdb") in printed
    test = read_lmdb(out / "test" / "data.lmdb")
    assert [d.fid for d in test] == list(range(30, 40)) and {d.sid for d in test} == {"aspirin"}
    assert cli.main(argv) == 2  # exists: refuses without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--split", "ordered"]) == 0
    assert [d.fid for d in read_lmdb(out / "val" / "data.lmdb")] == list(range(20, 25))
    assert cli.main([str(sources["npz"]), "-o", str(tmp_path / "x"), "--forces-key", "G"]) == 2
    assert "missing key 'G'" in capsys.readouterr().err
    assert lmdb_files(tmp_path / "x") == []


# ----------------------------------------------------------------------------- malformed

def _npz(**override):
    return lambda frames, path: write_npz(path.with_suffix(".npz"), frames, **override)


def _with_nan_position(frames, path):
    R = np.stack([f.positions for f in frames])
    R[7, 2, 1] = np.nan
    return write_npz(path.with_suffix(".npz"), frames, R=R)


def _xyz_without_forces_in_frame_5(frames, path):
    frames = [f.copy() for f in frames[:8]]
    for i, frame in enumerate(frames):
        results = {"energy": 1.0} if i == 5 else {"energy": 1.0, "forces": np.zeros((len(frame), 3))}
        frame.calc = SinglePointCalculator(frame, **results)
    ase.io.write(path.with_suffix(".xyz"), frames, format="extxyz")
    return path.with_suffix(".xyz")


def _db_without_energy_in_frame_3(frames, path):
    frames = [f.copy() for f in frames[:6]]
    for i, frame in enumerate(frames):
        results = {"forces": np.zeros((len(frame), 3))} if i == 3 else {"energy": 1.0, "forces": np.zeros((len(frame), 3))}
        frame.calc = SinglePointCalculator(frame, **results)
    return write_db(path.with_suffix(".db"), frames)


def _xyz_with_nan_energy_in_frame_2(frames, path):
    frames = [f.copy() for f in frames[:6]]
    for i, frame in enumerate(frames):
        frame.calc = SinglePointCalculator(frame, energy=np.nan if i == 2 else 1.0, forces=np.zeros((len(frame), 3)))
    ase.io.write(path.with_suffix(".xyz"), frames, format="extxyz")
    return path.with_suffix(".xyz")


def _garbage_traj(frames, path):
    path.with_suffix(".traj").write_bytes(b"this is not a trajectory")
    return path.with_suffix(".traj")


MALFORMED = {
    "missing key": (_npz(F=None), ["missing key 'F'"]),
    "energy length": (lambda fr, p: write_npz(p.with_suffix(".npz"), fr, E=np.zeros((N_FRAMES - 1, 1))),
                      ["key 'E'", "shape [39, 1]", "expected [40, 1]"]),
    "force shape": (lambda fr, p: write_npz(p.with_suffix(".npz"), fr, F=np.zeros((N_FRAMES, 10, 2))),
                    ["key 'F'", "expected [40, 10, 3]"]),
    "numbers length": (_npz(z=np.array([6, 6, 7])), ["key 'z'", "expected [10]"]),
    "atomic number 0": (_npz(z=np.array([0, 6, 7, 1, 1, 1, 1, 1, 1, 1])), ["key 'z'", "frame 0", "1..118"]),
    "NaN coordinate": (_with_nan_position, ["key 'R'", "frame 7", "non-finite"]),
    "frame without forces": (_xyz_without_forces_in_frame_5, ["key 'forces'", "frame 5", "missing"]),
    "frame without energy": (_db_without_energy_in_frame_3, ["key 'energy'", "frame 3", "missing"]),
    "NaN energy": (_xyz_with_nan_energy_in_frame_2, ["key 'energy'", "frame 2", "non-finite"]),
    "unreadable": (_garbage_traj, ["cannot read as traj"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_names_file_key_frame_and_writes_nothing(case, md_frames, tmp_path):
    make, expected = MALFORMED[case]
    source = make(md_frames, tmp_path / "bad")
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert_trajectory(source, out, split="ordered", n_train=2, n_val=1, n_test=1)
    message = str(err.value)
    assert str(source) in message
    for part in expected:
        assert part in message, message
    assert lmdb_files(out) == [] and not (out / "conversion.json").exists()


# ----------------------------------------------------------------------------- fairchem

class _Graph(GraphModelMixin):
    cutoff, max_neighbors, use_pbc, use_pbc_single, otf_graph = 3.0, 50, False, False, True


def test_molecules_go_through_fairchem_collater_and_generate_graph(converted):
    frames = read_lmdb(converted["extxyz"]["written"]["train"]["path"])[:5]
    batch = data_list_collater(frames, otf_graph=True)
    assert batch.pos.shape == (50, 3) and batch.natoms.tolist() == [10] * 5 and batch.pbc.shape == (5, 3)
    graph = _Graph().generate_graph(batch, use_pbc=False, otf_graph=True)
    j, i = graph.edge_index
    pos = batch.pos.double()
    dist = (pos[:, None] - pos[None]).norm(dim=-1)
    same = batch.batch[:, None] == batch.batch[None]
    expected = {(a, b) for a, b in (((dist < 3.0) & same).nonzero().tolist()) if a != b}
    assert set(zip(j.tolist(), i.tolist())) == expected and len(j) == len(expected)
    torch.testing.assert_close(graph.edge_distance_vec, batch.pos[j] - batch.pos[i])
    torch.testing.assert_close(graph.edge_distance, dist[j, i].float())
    per_graph = torch.bincount(batch.batch[i], minlength=5)
    assert graph.neighbors.tolist() == per_graph.tolist() and (per_graph > 0).all()


def test_foreign_lmdb_files_are_refused_or_replaced_and_metadata_is_written(sources, tmp_path):
    """A training run reads every *.lmdb in a split folder: a stranger's file there is refused
    (or, with overwrite, removed), and each split gets fairchem's metadata.npz."""
    import shutil

    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    record = convert_trajectory(sources["npz"], tmp_path / "other", split="ordered", n_train=3, n_val=2, n_test=2)
    shutil.copy(record["written"]["train"]["path"], out / "train" / "old.lmdb")
    with pytest.raises(FileExistsError, match="old.lmdb"):
        convert_trajectory(sources["npz"], out, split="ordered", n_train=10, n_val=5, n_test=5)
    record = convert_trajectory(sources["npz"], out, split="ordered", n_train=10, n_val=5, n_test=5, overwrite=True)
    assert lmdb_files(out / "train") == ["data.lmdb"]
    frames = read_lmdb(out / "train")  # what a run reads: every *.lmdb of the folder
    assert len(frames) == record["written"]["train"]["frames"] == 10
    natoms = np.load(out / "train" / "metadata.npz")["natoms"]
    assert natoms.tolist() == [int(d.natoms) for d in frames]
    assert json.loads((out / "conversion.json").read_text())["written"]["val"]["path"] == "val/data.lmdb"


def test_overwrite_failing_half_way_keeps_the_previous_conversion(sources, tmp_path, monkeypatch):
    from ocp_deq.data import converters

    out = tmp_path / "out"
    convert_trajectory(sources["npz"], out, split="ordered", n_train=10, n_val=5, n_test=5)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls, original = [], converters.write_split

    def failing(folder, frames):  # the second split's write fails
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(folder, frames)

    monkeypatch.setattr(converters, "write_split", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_trajectory(sources["npz"], out, split="ordered", n_train=20, n_val=2, n_test=2, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # old splits, metadata and conversion.json untouched, no staging left
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- multi-system DFT sets

DFT_SYSTEMS = {  # name -> (structure, periodic directions); bulk, slabs and molecules, 1-13 atoms
    "Cu_bulk": lambda: bulk("Cu", cubic=True),
    "AuCu3_bulk": lambda: bulk("Cu", cubic=True),
    "Al_bulk": lambda: bulk("Al", cubic=True),
    "Pt111": lambda: fcc111("Pt", (2, 2, 2), vacuum=5.0),
    "O_on_Ni111": lambda: fcc111("Ni", (2, 2, 2), vacuum=5.0),
    "CH4": lambda: molecule("CH4"),
    "NH3": lambda: molecule("NH3"),
    "H2O": lambda: molecule("H2O"),
}
FRAMES_PER_SYSTEM = 3


def dft_frames(seed=0):
    """3 rattled EMT-labelled frames of each system, ``info["system_id"]`` = its name."""
    rng = np.random.default_rng(seed)
    frames = []
    for name, build in DFT_SYSTEMS.items():
        atoms = build()
        if name == "AuCu3_bulk":
            atoms.numbers[0] = 79
        if name == "O_on_Ni111":
            add_adsorbate(atoms, "O", 1.2, "fcc")
        for _ in range(FRAMES_PER_SYSTEM):
            frame = atoms.copy()
            frame.info = {"system_id": name}
            frame.positions += rng.normal(0.0, 0.05, frame.positions.shape)
            frame.calc = EMT()
            frame.calc = SinglePointCalculator(frame, energy=frame.get_potential_energy(), forces=frame.get_forces())
            frames.append(frame)
    return frames


def write_dft_db(path, frames):
    with ase.db.connect(str(path), append=False) as db:
        for frame in frames:
            db.write(frame, **frame.info)
    return path


@pytest.fixture(scope="module")
def dft_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("dft")
    frames = dft_frames()
    ase.io.write(root / "dft.xyz", frames, format="extxyz")
    return frames, {"db": write_dft_db(root / "dft.db", frames), "extxyz": root / "dft.xyz"}


MULTI = dict(split="random", n_train=5, n_val=2, n_test=1, seed=1, periodic_vacuum=6.0)


@pytest.mark.parametrize("fmt", ["db", "extxyz"])
def test_sid_per_system_key_splits_by_system(dft_set, tmp_path, fmt):
    frames, sources = dft_set
    record = convert_trajectory(sources[fmt], tmp_path, sid_key="system_id", **MULTI)
    first_row = 1 if fmt == "db" else 0  # db rows are named by id
    seen = {}
    for split, entry in record["written"].items():
        data = read_lmdb(tmp_path / split)
        assert [d.sid for d in data] == entry["sids"] and [d.fid for d in data] == entry["fids"]
        for d, row in zip(data, entry["rows"]):
            source = frames[row - first_row]
            assert d.sid == source.info["system_id"] and d.natoms == len(source)
            assert d.fid == (row - first_row) % FRAMES_PER_SYSTEM  # frame index within its system
            assert d.energy == pytest.approx(source.get_potential_energy())
            seen.setdefault(d.sid, set()).add(split)
        # fairchem's metadata.npz: the atom count of every frame, in LMDB order
        assert np.load(tmp_path / split / "metadata.npz")["natoms"].tolist() == [int(d.natoms) for d in data]
    assert all(len(splits) == 1 for splits in seen.values())  # no system in two splits
    assert len(seen) == record["systems"] == len(DFT_SYSTEMS)
    assert [record["written"][s]["systems"] for s in ("train", "val", "test")] == [5, 2, 1]
    assert sum(e["frames"] for e in record["written"].values()) == len(frames)
    assert json.loads((tmp_path / "conversion.json").read_text())["written"]["val"]["sids"] == record["written"]["val"]["sids"]


def test_sid_per_row_and_per_frame_splits(dft_set, tmp_path):
    frames, sources = dft_set
    by_row = convert_trajectory(sources["db"], tmp_path / "row", sid_per="row", n_train=16, n_val=4, n_test=4,
                                periodic_vacuum=6.0)
    data = [d for split in ("train", "val", "test") for d in read_lmdb(tmp_path / "row" / split)]
    assert sorted(d.sid for d in data) == list(range(1, len(frames) + 1)) and {d.fid for d in data} == {0}
    by_frame = convert_trajectory(sources["extxyz"], tmp_path / "frame", sid_key="system_id", split_by="frame",
                                  n_train=16, n_val=4, n_test=4, seed=0, periodic_vacuum=6.0)
    assert by_frame["split"]["by"] == "frame"
    splits_of = {}
    for split, entry in by_frame["written"].items():
        for sid in entry["sids"]:
            splits_of.setdefault(sid, set()).add(split)
    assert max(len(s) for s in splits_of.values()) > 1  # frames drawn independently of their system


def test_periodic_vacuum_keeps_every_neighbour(dft_set, tmp_path):
    """Bulk, slab (pbc TTF) and molecule rows keep their own cell and pbc; periodic_vacuum
    makes them periodic without adding a neighbour within the cutoff (fairchem's graph)."""
    frames, sources = dft_set
    kept, _ = read_frames(sources["extxyz"])
    assert {tuple(f["pbc"].tolist()) for f in kept} == {(True,) * 3, (True, True, False), (False,) * 3}

    class Graph(GraphModelMixin):
        cutoff, max_neighbors, use_pbc, use_pbc_single, otf_graph = 5.0, 1000, True, False, True

    def edges(frame):
        batch = data_list_collater([frame_to_data(frame, 0, 0)], otf_graph=True)
        graph = Graph().generate_graph(batch, use_pbc=bool(frame["pbc"].any()), otf_graph=True)
        return sorted(zip(*graph.edge_index.tolist(), graph.edge_distance.round(decimals=4).tolist()))

    for frame in (kept[0], kept[9], kept[15]):  # Cu bulk, Pt(111) slab, CH4
        padded = make_periodic(frame, 6.0)
        assert padded["pbc"].all() and edges(padded) == edges(frame)
        same = frame["pbc"]
        np.testing.assert_allclose(padded["cell"][same], frame["cell"][same])  # periodic directions untouched
        np.testing.assert_allclose(padded["forces"], frame["forces"])


def _drop_sid_on_row(frames, path):
    frames = dft_frames()
    del frames[4].info["system_id"]
    return write_dft_db(path.with_suffix(".db"), frames)


def _mixed_energy_units(frames, path):
    frames = dft_frames()
    for i, frame in enumerate(frames):
        frame.info["energy_unit"] = "kcal/mol" if i == 7 else "eV"
    ase.io.write(path.with_suffix(".xyz"), frames, format="extxyz")
    return path.with_suffix(".xyz")


def _no_forces_on_row(frames, path):
    frames = dft_frames()
    frames[10].calc = SinglePointCalculator(frames[10], energy=frames[10].get_potential_energy())
    return write_dft_db(path.with_suffix(".db"), frames)


MULTI_MALFORMED = {  # (source, convert options, expected message parts)
    "sid key missing on a row": (_drop_sid_on_row, {}, ["key 'system_id' (sid)", "frame 4 (db id 5)", "missing"]),
    "mixed units": (_mixed_energy_units, {}, ["key 'energy_unit'", "frame 7", "'kcal/mol'", "mixed units"]),
    "forces missing on a row": (_no_forces_on_row, {}, ["key 'forces'", "frame 10 (db id 11)", "missing"]),
    "mixed pbc": (lambda frames, path: write_dft_db(path.with_suffix(".db"), frames), {"periodic_vacuum": None},
                  ["different periodic boundary conditions", "[False, False, False] first at frame 15 (db id 16)",
                   "--periodic-vacuum"]),
}


@pytest.mark.parametrize("case", MULTI_MALFORMED)
def test_malformed_multi_system_set_names_file_row_key_and_writes_nothing(case, dft_set, tmp_path):
    make, options, expected = MULTI_MALFORMED[case]
    source = make(dft_set[0], tmp_path / "bad")
    with pytest.raises(ConversionError) as err:
        convert_trajectory(source, tmp_path / "out", sid_key="system_id", **{**MULTI, **options})
    message = str(err.value)
    assert message.startswith(str(source)) and all(part in message for part in expected), message
    assert lmdb_files(tmp_path / "out") == [] and not (tmp_path / "out" / "conversion.json").exists()


def test_custom_template_trains_on_a_converted_dft_set(dft_set, tmp_path, capsys):
    """The README's "Your own DFT set": convert through the CLI, train the template (tiny
    width) for 1 epoch; fairchem fits the element references on the training split."""
    from conftest import TINY_MODEL, run_cli
    from fairchem.core.common.utils import load_config

    spec = importlib.util.spec_from_file_location("convert_trajectory", REPO / "scripts" / "convert_trajectory.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    data = tmp_path / "data" / "custom"
    assert cli.main([str(dft_set[1]["db"]), "-o", str(data), "--sid-key", "system_id", "--train", "6", "--val", "1",
                     "--test", "1", "--periodic-vacuum", "6"]) == 0
    assert "8 system(s), sid from key 'system_id'" in capsys.readouterr().out

    config, _, _ = load_config(str(REPO / "configs" / "s2ef" / "custom" / "deq_equiformer_v2_custom.yml"))
    assert config["model"]["use_pbc"] is True and config["task"]["prediction_dtype"] == "float32"
    assert [config["dataset"][s]["src"] for s in ("train", "val", "test")] == [f"data/custom/{s}" for s in ("train", "val", "test")]
    config["model"].update(TINY_MODEL, num_layers=1)
    config["optim"].update(batch_size=6, eval_batch_size=6, max_epochs=1)
    (tmp_path / "custom.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = run_cli("--mode", "train", "--config-yml", "custom.yml", "--cpu", "--run-dir", "run", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "Training accuracy metrics for fitted linear element references" in log
    [checkpoint] = (tmp_path / "run" / "checkpoints").glob("*/checkpoint.pt")
    refs = torch.load(checkpoint, map_location="cpu", weights_only=False)["elementrefs"]["energy"]["element_references"]
    train = read_lmdb(data / "train")  # fitted on the training split only, as a least-squares fit here
    counts = np.array([np.bincount(d.atomic_numbers.long(), minlength=len(refs)) for d in train], dtype=float)
    used = counts.sum(0) > 0
    expected = np.linalg.lstsq(counts[:, used], [d.energy for d in train], rcond=None)[0]
    np.testing.assert_allclose(refs[used].numpy(), expected, rtol=1e-4, atol=1e-4)
    assert not refs[~used].any()
    [predictions] = (tmp_path / "run" / "results").glob("*/ocp_predictions.npz")
    assert np.load(predictions)["energy"].dtype == np.float32
