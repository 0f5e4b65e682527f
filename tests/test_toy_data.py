"""The generated toy S2EF data: fairchem reads it, OC20 conventions hold, it is reproducible."""

import numpy as np
import pytest
import torch
from fairchem.core.datasets import LmdbDataset

from conftest import SMALL_SPEC
from ocp_deq.data import read_lmdb
from ocp_deq.data.toy_s2ef import ToySpec, ensure_toy_data, generate_toy_data

FRAMES_PER_SYSTEM = SMALL_SPEC.relax_frames + SMALL_SPEC.md_frames


def test_fairchem_lmdb_dataset_reads_every_split(toy_root):
    for split, labelled in (("train", True), ("val", True), ("test", False)):
        dataset = LmdbDataset({"src": str(toy_root / split)})
        assert len(dataset) == SMALL_SPEC.systems[split] * FRAMES_PER_SYSTEM
        frame = dataset[0]
        for key in ("pos", "cell", "atomic_numbers", "natoms", "tags", "fixed", "sid", "fid"):
            assert key in frame, key
        assert ("energy" in frame and "forces" in frame) == labelled
    relax = LmdbDataset({"src": str(toy_root / "relax")})
    assert len(relax) == SMALL_SPEC.relax_systems
    assert relax[0].pos_relaxed.shape == relax[0].pos.shape


def test_oc20_conventions(toy_root):
    frames = read_lmdb(toy_root / "train")
    for frame in frames:
        n = int(frame.natoms)
        assert frame.pos.shape == frame.forces.shape == (n, 3)
        assert frame.cell.shape == (1, 3, 3)
        assert set(frame.tags.tolist()) == {0, 1, 2}
        assert frame.atomic_numbers[frame.tags == 2].tolist()[0] in (1, 6, 7, 8)  # H, C, N, O
        # fixed = the subsurface layers: all tag-0 atoms, never surface or adsorbate atoms
        assert torch.equal(frame.fixed.bool(), frame.tags == 0)
    # sid per trajectory, fid per frame in order
    sids = [f.sid for f in frames]
    assert len(set(sids)) == SMALL_SPEC.systems["train"]
    for sid in set(sids):
        assert [f.fid for f in frames if f.sid == sid] == list(range(FRAMES_PER_SYSTEM))


def test_labels_are_emt_energies_and_forces(toy_root):
    """Stored energies are EMT energies minus one constant per system (its reference), and
    stored forces are EMT forces = -dE/dx, checked by a finite difference of the energy."""
    from ase import Atoms
    from ase.calculators.emt import EMT

    frames = read_lmdb(toy_root / "train")
    frame = frames[2]

    def emt(f):
        return Atoms(numbers=f.atomic_numbers.numpy(), positions=f.pos.double().numpy(),
                     cell=f.cell[0].double().numpy(), pbc=True, calculator=EMT())

    offsets = [emt(f).get_potential_energy() - f.energy for f in frames if f.sid == frame.sid]
    assert len(offsets) == FRAMES_PER_SYSTEM and np.ptp(offsets) < 1e-3  # one reference per system
    # the reference: the clean slab (fid 0 holds its unrelaxed positions) plus the isolated adsorbate atom
    first = emt(next(f for f in frames if f.sid == frame.sid and f.fid == 0))
    slab, adsorbate = first[:-1], Atoms(first.get_chemical_symbols()[-1])
    slab.calc, adsorbate.calc = EMT(), EMT()
    assert np.mean(offsets) == pytest.approx(slab.get_potential_energy() + adsorbate.get_potential_energy(), abs=2e-3)
    atoms = emt(frame)
    np.testing.assert_allclose(atoms.get_forces(), frame.forces.numpy(), atol=2e-4)
    h, atom = 1e-4, int(frame.natoms) - 1
    energies = []
    for sign in (1, -1):
        shifted = atoms.copy()
        shifted.calc = EMT()
        shifted.positions[atom, 0] += sign * h
        energies.append(shifted.get_potential_energy())
    np.testing.assert_allclose(-(energies[0] - energies[1]) / (2 * h), frame.forces[atom, 0].item(), atol=2e-3)


def test_reproducible_and_not_regenerated(tmp_path, toy_root):
    """The same seed gives the same systems; one more training system changes no other split
    (each split has its own random stream), so resizing train keeps val comparable."""
    bigger = ToySpec(**{**SMALL_SPEC.__dict__, "systems": {**SMALL_SPEC.systems, "train": SMALL_SPEC.systems["train"] + 1}})
    again = generate_toy_data(tmp_path / "again", bigger)
    for split in ("train", "val", "relax"):
        a, b = read_lmdb(toy_root / split), read_lmdb(again / split)
        assert len(b) == len(a) + (FRAMES_PER_SYSTEM if split == "train" else 0)
        assert all(torch.equal(x.pos, y.pos) for x, y in zip(a, b)), split
        if split != "relax":
            assert [f.energy for f in a] == [f.energy for f in b[: len(a)]]
    stamp = (again / "val" / "data.lmdb").stat().st_mtime_ns
    ensure_toy_data(again, bigger)  # same spec: nothing rewritten
    assert (again / "val" / "data.lmdb").stat().st_mtime_ns == stamp


def _open_payload(marker):
    return open, (str(marker), "w")


def _pyg_makedirs_payload(marker):
    """Only PyG's Data classes are admitted, not every name under torch_geometric.data: its
    makedirs (or download_url, extract_zip) would run with the pickle's arguments."""
    from torch_geometric.data import makedirs

    return makedirs, (str(marker),)


@pytest.mark.parametrize("payload,refused", [(_open_payload, "io.open"),
                                             (_pyg_makedirs_payload, "torch_geometric.data.makedirs.makedirs")])
def test_crafted_lmdb_value_is_refused_and_never_runs(tmp_path, payload, refused):
    """read_lmdb (also behind the local evaluator) unpickles only what a PyG Data frame holds."""
    import pickle

    import lmdb

    from ocp_deq.data import read_lmdb
    from ocp_deq.data.lmdb_io import UnsafeFrameError

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return payload(marker)

    env = lmdb.open(str(tmp_path / "data.lmdb"), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Payload()))
        txn.put(b"length", pickle.dumps(1))
    env.close()
    with pytest.raises(UnsafeFrameError, match=rf"data.lmdb key '0': refusing to unpickle {refused}"):
        read_lmdb(tmp_path / "data.lmdb")
    assert not marker.exists()


def test_interrupted_regeneration_keeps_the_previous_data(tmp_path, monkeypatch):
    """A new seed's generation that fails half way leaves the old data and spec as they were."""
    import json

    import pytest

    from ocp_deq.data import toy_s2ef

    root = generate_toy_data(tmp_path / "toy", SMALL_SPEC)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    calls, original = [], toy_s2ef.write_split

    def failing(folder, frames):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(folder, frames)

    monkeypatch.setattr(toy_s2ef, "write_split", failing)
    other = toy_s2ef.ToySpec(**{**SMALL_SPEC.__dict__, "seed": 7})
    with pytest.raises(KeyboardInterrupt):
        ensure_toy_data(root, other)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before and json.loads((root / toy_s2ef.SPEC_FILE).read_text())["seed"] == SMALL_SPEC.seed
