"""OC20 S2EF preparation (scripts/prepare_oc20.py, ocp_deq/data/oc20.py) on a tiny raw set in
OC20's layout, labelled with ASE's EMT: frames, referencing, metadata, layout, errors."""

from __future__ import annotations

import importlib.util
import lzma
import tarfile
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

import ocp_deq  # noqa: F401  (before fairchem)
from fairchem.core.datasets import LmdbDataset
from fairchem.core.scripts import download_data
from ocp_deq.data import oc20
from ocp_deq.data.lmdb_io import write_lmdb

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_oc20", REPO / "scripts" / "prepare_oc20.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

FILES = {"a": [("Cu", (2, 2, 3), "O"), ("Cu", (2, 2, 3), "O"), ("Pt", (3, 2, 3), "H")],
         "b": [("Ni", (3, 2, 3), "C"), ("Ni", (3, 2, 3), "C"), ("Ag", (2, 2, 3), "N")]}


def write_raw(folder: Path, compress: bool = False) -> dict:
    """Raw S2EF files as OC20 ships them (tags, move_mask, EMT energy and forces in the extxyz; one
    'random<sid>,frame<fid>,<reference>' line per frame in the txt); returns the expected frames by
    (sid, fid): energy minus reference, forces, tags, fixed, numbers."""
    folder.mkdir(parents=True)
    expected, rng = {}, np.random.default_rng(0)
    for f, (name, frames) in enumerate(FILES.items()):
        images, lines = [], []
        for j, (metal, size, adsorbate) in enumerate(frames):
            atoms = fcc111(metal, size, vacuum=6.0)
            add_adsorbate(atoms, adsorbate, 1.8, "fcc")
            layer = atoms.get_tags()  # ase: 1 = top layer ... 3 = bottom, 0 = adsorbate
            atoms.set_tags(np.select([layer == 0, layer == 1], [2, 1], 0))  # OC20: 2 ads, 1 surface, 0 below
            atoms.set_constraint(FixAtoms(mask=layer >= 2))
            atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
            atoms.calc = EMT()
            energy, forces = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
            sid, fid, reference = 100 + 10 * f + j // 2, 7 * j, -3.0 * len(atoms) + 0.37 * j
            lines.append(f"random{sid},frame{fid},{reference!r}")
            images.append(atoms)
            expected[(sid, fid)] = dict(energy=energy - reference, forces=forces, tags=atoms.get_tags(),
                                        fixed=(layer >= 2).astype(int), numbers=atoms.numbers,
                                        pos=atoms.positions.copy(), cell=atoms.cell[:])
        for atoms in images:  # one call per frame: ase writes every frame's move_mask from the first's constraint
            ase.io.write(folder / f"{name}.extxyz", atoms, format="extxyz", append=True,
                         columns=["symbols", "positions", "move_mask", "tags", "forces"])
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
        if compress:
            for path in (folder / f"{name}.extxyz", folder / f"{name}.txt"):
                path.with_name(path.name + ".xz").write_bytes(lzma.compress(path.read_bytes()))
                path.unlink()
    return expected


def check_frames(folder: Path, expected: dict) -> None:
    dataset = LmdbDataset({"src": str(folder)})
    assert len(dataset) == len(expected)
    seen = set()
    for i in range(len(dataset)):
        frame = dataset[i]
        key = (frame.sid, frame.fid)
        ref = expected[key]
        seen.add(key)
        assert frame.energy == pytest.approx(ref["energy"], abs=1e-6)
        np.testing.assert_allclose(frame.forces.numpy(), ref["forces"], atol=1e-6)
        np.testing.assert_allclose(frame.cell[0].numpy(), ref["cell"], atol=1e-5)
        shift = (frame.pos.numpy() - ref["pos"]) @ np.linalg.inv(ref["cell"])  # stored wrapped into the cell
        np.testing.assert_allclose(shift, np.round(shift), atol=1e-5)
        np.testing.assert_array_equal(frame.tags.numpy(), ref["tags"])
        np.testing.assert_array_equal(frame.fixed.numpy(), ref["fixed"])
        np.testing.assert_array_equal(frame.atomic_numbers.numpy(), ref["numbers"])
    assert seen == set(expected)
    # metadata.npz as fairchem's load-balancing sampler reads it: atom counts in dataset order
    natoms = dataset.get_metadata("natoms", list(range(len(dataset))))
    assert natoms == [len(expected[(dataset[i].sid, dataset[i].fid)]["numbers"]) for i in range(len(dataset))]


def test_output_folders_are_what_the_configs_read():
    for folder in ("2M", "200k"):
        dataset = yaml.safe_load((REPO / "configs" / "s2ef" / folder / "base.yml").read_text())["dataset"]
        assert oc20.output_folders(folder) == [Path(dataset["train"]["src"])]
        assert Path(dataset["val"]["src"]) in oc20.output_folders("val_id")
        assert Path(dataset["test"]["src"]) in oc20.output_folders("test")


def test_raw_folder_to_lmdbs(tmp_path, capsys):
    expected = write_raw(tmp_path / "raw")
    data = tmp_path / "data"
    assert cli.main(["--split", "200k", "--raw", str(tmp_path / "raw"), "--data-dir", str(data), "--workers", "2"]) == 0
    out = data / "s2ef" / "200k" / "train"
    assert sorted(p.name for p in out.glob("*.lmdb")) == ["data.0000.lmdb", "data.0001.lmdb"]  # one per worker
    assert [p.name for p in out.parent.iterdir()] == ["train"]  # no staging leftovers
    check_frames(out, expected)
    assert "200k: 6 frames" in capsys.readouterr().out
    # a second run needs --overwrite, which replaces the folder
    args = ["--split", "200k", "--raw", str(tmp_path / "raw"), "--data-dir", str(data), "--workers", "1"]
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.lmdb")) == ["data.0000.lmdb"]
    check_frames(out, expected)


def _short_txt(raw):
    txt = raw / "a.txt"
    txt.write_text("\n".join(txt.read_text().splitlines()[:-1]) + "\n")
    return "a.txt has 2 lines but", "a.extxyz has 3 frames"


def _bad_line(raw):
    txt = raw / "b.txt"
    txt.write_text(txt.read_text().replace("frame7,", "7,"))
    return "b.txt line 2", "random<sid>,frame<fid>,<reference energy>"


def _truncated_extxyz(raw):
    xyz = raw / "b.extxyz"
    xyz.write_text("\n".join(xyz.read_text().splitlines()[:-3]) + "\n")
    return "b.extxyz: frame 2 is truncated", "10 of 13"


def _missing_extxyz(raw):
    (raw / "a.extxyz").unlink()
    return "extxyz file(s) missing", "a.extxyz"


def _no_txt(raw):
    for txt in raw.glob("*.txt"):
        txt.unlink()
    return "no *.txt or *.txt.xz files", str(raw)


@pytest.mark.parametrize("damage", [_short_txt, _bad_line, _truncated_extxyz, _missing_extxyz, _no_txt])
def test_broken_raw_folder_is_one_clear_error_and_writes_nothing(tmp_path, capsys, damage):
    write_raw(tmp_path / "raw")
    phrases = damage(tmp_path / "raw")
    assert cli.main(["--split", "2M", "--raw", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(p in err for p in phrases), err
    assert not (tmp_path / "data").exists()


def test_failure_after_preprocessing_leaves_nothing(tmp_path, monkeypatch):
    write_raw(tmp_path / "raw")
    (tmp_path / "data").mkdir()

    def fail(folder, workers):
        assert any(folder.glob("*.lmdb"))  # fairchem has written the staged LMDBs
        raise OSError("disk full")

    monkeypatch.setattr(oc20, "write_sizes", fail)
    with pytest.raises(OSError, match="disk full"):
        oc20.prepare("2M", data_dir=tmp_path / "data", raw=tmp_path / "raw")
    assert list((tmp_path / "data").iterdir()) == []


def test_download_val_and_test_splits(tmp_path, monkeypatch):
    """The download path on local archives in fairchem's layouts: .xz pairs nested as
    s2ef_val_id/s2ef_val_id/, the test LMDBs under s2ef_test_lmdbs/test_data/s2ef/all/."""
    archives = tmp_path / "archives"
    expected = write_raw(archives / "s2ef_val_id" / "s2ef_val_id", compress=True)
    with tarfile.open(archives / "s2ef_val_id.tar", "w") as tar:
        tar.add(archives / "s2ef_val_id", arcname="s2ef_val_id")
    links, counts = download_data.DOWNLOAD_LINKS_s2ef["s2ef"], download_data.S2EF_COUNTS["s2ef"]
    monkeypatch.setitem(links, "val_id", (archives / "s2ef_val_id.tar").as_uri())
    data, downloads = tmp_path / "data", tmp_path / "downloads"
    monkeypatch.setitem(counts, "val_id", len(expected) + 1)  # fairchem's split size is checked
    with pytest.raises(oc20.RawDataError, match="6 frames, but fairchem's split has 7"):
        oc20.prepare("val_id", data_dir=data, download_dir=downloads)
    assert not data.exists() and (downloads / "s2ef_val_id.tar").exists()  # kept for the next try
    monkeypatch.setitem(counts, "val_id", len(expected))
    assert oc20.prepare("val_id", data_dir=data, download_dir=downloads, workers=1) == [data / "s2ef/all/val_id"]
    check_frames(data / "s2ef/all/val_id", expected)

    frames = list(LmdbDataset({"src": str(data / "s2ef/all/val_id")}))
    for i, name in enumerate(oc20.TEST_SPLITS):  # unlabelled, no metadata.npz
        unlabelled = [frame.clone() for frame in frames[: i + 2]]
        for frame in unlabelled:
            del frame.energy, frame.forces
        write_lmdb(archives / "s2ef_test_lmdbs/test_data/s2ef/all" / name / "data.0000.lmdb", unlabelled)
    with tarfile.open(archives / "s2ef_test_lmdbs.tar.gz", "w:gz") as tar:
        tar.add(archives / "s2ef_test_lmdbs", arcname="s2ef_test_lmdbs")
    monkeypatch.setitem(links, "test", (archives / "s2ef_test_lmdbs.tar.gz").as_uri())
    assert list(downloads.iterdir()) == []  # val archive and extracted folder removed
    outputs = oc20.prepare("test", data_dir=data, download_dir=downloads, keep=True)
    assert sorted(p.name for p in downloads.iterdir()) == ["s2ef_test_lmdbs", "s2ef_test_lmdbs.tar.gz"]
    assert outputs == [data / "s2ef" / "all" / name for name in oc20.TEST_SPLITS]
    for i, out in enumerate(outputs):
        dataset = LmdbDataset({"src": str(out)})
        assert len(dataset) == i + 2 and "energy" not in dataset[0]
        assert dataset.get_metadata("natoms", list(range(i + 2))) == [len(f.pos) for f in frames[: i + 2]]
