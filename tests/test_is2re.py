"""IS2RE from relaxations: run-relaxations -> trajectories -> EvalAI file -> local metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

import ocp_deq  # noqa: F401  (before fairchem)
from conftest import load_script, run_cli
from fairchem.core.datasets import LmdbDataset
from fairchem.core.scripts import make_submission_file as fairchem_merge
from ocp_deq import leaderboard as lb


@pytest.fixture(scope="module")
def relaxed(trained_deq, toy_root, tmp_path_factory):
    """One CLI relaxation of the toy relax split (5 LBFGS steps) as split 'id', plus copies of
    its trajectories as the other three splits (sids offset, energies shifted: distinct splits)."""
    work, config, _, checkpoint = trained_deq
    run = tmp_path_factory.mktemp("is2re") / "relax"
    run_cli("--mode", "run-relaxations", "--config-yml", config, "--cpu", "--checkpoint", checkpoint,
            "--run-dir", run, "--timestamp-id", "id", "--identifier", "relax_id",
            "task.relaxation_steps=5", f"task.relax_opt.traj_dir={run}/results/id/trajectories", cwd=work)
    results = run / "results"
    for k, split in enumerate(lb.SPLITS[1:], start=1):
        folder = results / split / "trajectories"
        folder.mkdir(parents=True)
        for path in (results / "id" / "trajectories").glob("*.traj"):
            frames = ase.io.read(path, ":")
            for atoms in frames:
                atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy() + 0.1 * k,
                                                   forces=atoms.get_forces())
            ase.io.write(folder / f"{1000 * k + int(path.stem)}.traj", frames)
    return results, toy_root / "relax"


@pytest.fixture(scope="module")
def submission(relaxed, tmp_path_factory) -> Path:
    results, _ = relaxed
    return lb.merge_is2re_relaxations({s: results / s / "trajectories" for s in lb.SPLITS},
                                      tmp_path_factory.mktemp("sub") / "is2re.npz")


def arrays(path) -> dict:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def test_relaxation_writes_the_relaxed_energies(relaxed):
    """One trajectory per sid whose last frame is the relaxed structure of relaxed_positions.npz."""
    results, relax_lmdb = relaxed
    positions = np.load(results / "id" / "relaxed_positions.npz")
    sids = sorted(str(frame.sid) for frame in LmdbDataset({"src": str(relax_lmdb)}))
    assert sorted(p.stem for p in (results / "id" / "trajectories").glob("*.traj")) == sids
    for sid, pos in zip(positions["ids"], np.split(positions["pos"], positions["chunk_idx"])):
        last = ase.io.read(results / "id" / "trajectories" / f"{sid}.traj", -1)
        assert len(ase.io.read(results / "id" / "trajectories" / f"{sid}.traj", ":")) == 6  # initial + 5 steps
        shift = np.linalg.solve(last.cell.T, (last.positions - pos).T).T  # the trajectory wraps into the cell
        np.testing.assert_allclose(shift - np.round(shift), 0, atol=1e-5)
        assert np.isfinite(last.get_potential_energy())


def test_submission_layout_and_fairchems_merge_agree(relaxed, submission, tmp_path):
    results, _ = relaxed
    ours = arrays(submission)
    assert set(ours) == {f"{s}_{f}" for s in lb.SPLITS for f in lb.IS2RE_FIELDS}
    assert lb.validate_is2re_submission(submission) == []
    for k, split in enumerate(lb.SPLITS):
        folder = results / split / "trajectories"
        expected = {p.stem: ase.io.read(p, -1).get_potential_energy() for p in folder.glob("*.traj")}
        assert dict(zip(ours[f"{split}_ids"], ours[f"{split}_energy"])) == expected
        assert ours[f"{split}_energy"].dtype == np.float64
    np.testing.assert_allclose(ours["ood_both_energy"] - ours["id_energy"], 0.3)

    out = tmp_path / "fairchem_is2re.npz"
    fairchem_merge.main(argparse.Namespace(dataset="OC20", out_path=str(out), is2re_relaxations=True, hybrid=False,
                                           **{s: str(results / s / "trajectories") for s in lb.SPLITS}))
    assert lb.validate_is2re_submission(out) == []
    theirs = arrays(out)
    for split in lb.SPLITS:
        assert dict(zip(theirs[f"{split}_ids"], theirs[f"{split}_energy"])) == \
            dict(zip(ours[f"{split}_ids"], ours[f"{split}_energy"]))


def test_command_lines_merge_validate_and_evaluate(relaxed, tmp_path, capsys):
    results, relax_lmdb = relaxed
    make, evaluate = load_script("make_submission_file").main, load_script("evaluate_s2ef").main
    out, metrics_json = tmp_path / "is2re.npz", tmp_path / "metrics.json"
    assert make(["--is2re", "--results-dir", str(results), "--out", str(out)]) == 0
    assert f"ood_cat: {results / 'ood_cat' / 'trajectories'}" in capsys.readouterr().out
    assert make(["--is2re", "--validate", str(out)]) == 0
    assert "valid IS2RE submission" in capsys.readouterr().out
    assert make(["--validate", str(out)]) == 2  # not an S2EF file
    assert "split 'id': missing key(s) id_forces" in capsys.readouterr().err

    trajectories = results / "id" / "trajectories"
    command = ["--is2re", "--split", "relax", str(trajectories), str(relax_lmdb), "--json", str(metrics_json)]
    assert evaluate(command) == 0
    assert capsys.readouterr().out.startswith("| split | energy MAE [eV] | energy MSE [eV²] | EwT |")
    metrics = json.loads(metrics_json.read_text())["relax"]

    # independently: the submission's energies against fairchem's own LMDB reader
    sub = arrays(out)
    labels = {str(frame.sid): float(frame.y_relaxed) for frame in LmdbDataset({"src": str(relax_lmdb)})}
    error = sub["id_energy"] - np.array([labels[i] for i in sub["id_ids"]])
    assert metrics["n_systems"] == len(labels) == len(error)
    assert metrics["energy_mae"] == pytest.approx(np.abs(error).mean(), rel=1e-12)
    assert metrics["energy_mse"] == pytest.approx((error ** 2).mean(), rel=1e-12)
    assert metrics["ewt"] == pytest.approx((np.abs(error) < 0.02).mean())

    # the same numbers from an npz of ids and energies
    npz = tmp_path / "id_energies.npz"
    np.savez(npz, ids=sub["id_ids"], energy=sub["id_energy"])
    assert lb.evaluate_is2re(npz, relax_lmdb) == metrics


def test_ewt_against_fairchem_thresholds(relaxed, tmp_path):
    _, relax_lmdb = relaxed
    labels = {str(frame.sid): float(frame.y_relaxed) for frame in LmdbDataset({"src": str(relax_lmdb)})}
    ids = np.array(sorted(labels))
    offsets = np.where(np.arange(len(ids)) % 2, 0.0201, -0.0199)  # just outside / inside the 0.02 eV threshold
    metrics = lb.evaluate_is2re({"ids": ids, "energy": np.array([labels[i] for i in ids]) + offsets}, relax_lmdb)
    assert metrics["ewt"] == pytest.approx(np.ceil(len(ids) / 2) / len(ids))
    assert metrics["energy_mae"] == pytest.approx(np.abs(offsets).mean())


# ----------------------------------------------------------------------------- errors


def test_merge_errors_name_split_and_file(relaxed, tmp_path, capsys):
    results, _ = relaxed
    dirs = {s: results / s / "trajectories" for s in lb.SPLITS}
    out = tmp_path / "x.npz"
    with pytest.raises(lb.SubmissionError, match=r"missing \['ood_both'\]"):
        lb.merge_is2re_relaxations({s: d for s, d in dirs.items() if s != "ood_both"}, out)
    with pytest.raises(lb.SubmissionError, match=r"split 'ood_cat', trajectories .*nowhere.*no <sid>.traj"):
        lb.merge_is2re_relaxations({**dirs, "ood_cat": tmp_path / "nowhere"}, out)

    broken = tmp_path / "broken"
    broken.mkdir()
    ase.io.Trajectory(broken / "5.traj", "w").close()  # what fairchem leaves for a system converged at step 0
    with pytest.raises(lb.SubmissionError, match=r"split 'ood_ads', .*5\.traj: holds no frames"):
        lb.merge_is2re_relaxations({**dirs, "ood_ads": broken}, out)
    atoms = ase.io.read(next(dirs["id"].glob("*.traj")), -1)
    atoms.calc = SinglePointCalculator(atoms, energy=float("nan"))
    ase.io.write(broken / "5.traj", atoms)
    with pytest.raises(lb.SubmissionError, match=r"split 'ood_ads', .*5\.traj: last frame's energy is nan"):
        lb.merge_is2re_relaxations({**dirs, "ood_ads": broken}, out)
    atoms.calc = None
    ase.io.write(broken / "5.traj", atoms)
    with pytest.raises(lb.SubmissionError, match=r"5\.traj: unreadable last frame or energy"):
        lb.merge_is2re_relaxations({**dirs, "ood_ads": broken}, out)
    assert not out.exists()

    make = load_script("make_submission_file").main
    lonely = tmp_path / "results"
    (lonely / "id" / "trajectories").mkdir(parents=True)
    assert make(["--is2re", "--results-dir", str(lonely), "--out", str(out)]) == 2
    assert "split 'ood_ads': need exactly one" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one track at a time
        make(["--is2re", "--is2rs", "--validate", str(out)])


def _nan(energy):
    energy = energy.copy()
    energy[-1] = np.nan
    return energy


BROKEN = {  # key -> new value (None: dropped), message
    "missing split": ({"ood_both_ids": None, "ood_both_energy": None}, "split 'ood_both' is missing"),
    "missing ids": ({"id_ids": None}, r"split 'id': missing key\(s\) id_ids"),
    "NaN energy": ({"ood_ads_energy": _nan}, "split 'ood_ads', key 'ood_ads_energy': contains NaN"),
    "integer energy": ({"ood_cat_energy": lambda e: e.astype(np.int64)}, "key 'ood_cat_energy': dtype int64"),
    "energy too short": ({"id_energy": lambda e: e[:-1]}, "key 'id_energy': must hold one value per id"),
    "duplicate id": ({"id_ids": lambda ids: np.repeat(ids[:1], len(ids))}, "key 'id_ids': 1 duplicate"),
    "S2EF key": ({"id_chunk_idx": lambda _: np.array([1])}, r"unexpected key\(s\) id_chunk_idx"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_validation_rejects(submission, case):
    changes, message = BROKEN[case]
    sub = arrays(submission)
    for key, change in changes.items():
        if change is None:
            del sub[key]
        else:
            sub[key] = change(sub.get(key))
    with pytest.raises(lb.SubmissionError, match=message):
        lb.validate_is2re_submission(sub)


def test_identical_splits_and_float16_are_warned(submission):
    sub = arrays(submission)
    sub["ood_both_energy"] = sub["id_energy"]
    assert lb.validate_is2re_submission(sub) == ["splits 'id' and 'ood_both' hold identical 'energy' predictions"]
    sub["ood_cat_energy"] = sub["ood_cat_energy"].astype(np.float16)
    assert "split(s) ood_cat: float16 energies" in lb.validate_is2re_submission(sub)[-1]


def test_fairchems_hybrid_merge_is_valid(tmp_path):
    """fairchem's --is2re-relaxations --hybrid takes S2EF predictions ("sid_fid" ids, float16
    energies from predict): valid, with the float16 warning only."""
    files = {}
    for k, split in enumerate(lb.SPLITS):
        files[split] = tmp_path / f"{split}.npz"
        np.savez(files[split], ids=np.array([f"{100 * k + i}_7" for i in range(3)]),
                 energy=np.arange(3, dtype=np.float16) + k)
    out = tmp_path / "hybrid.npz"
    fairchem_merge.main(argparse.Namespace(dataset="OC20", out_path=str(out), is2re_relaxations=True, hybrid=True,
                                           **{s: str(f) for s, f in files.items()}))
    warnings = lb.validate_is2re_submission(out)
    assert len(warnings) == 1 and "float16" in warnings[0]
    assert list(arrays(out)["ood_cat_ids"]) == ["200", "201", "202"]


def test_evaluation_names_file_and_missing_ids(relaxed, toy_root, tmp_path, capsys):
    results, relax_lmdb = relaxed
    trajectories = results / "id" / "trajectories"
    energies = lb.read_relaxed_energies(trajectories)
    partial = tmp_path / "partial.npz"
    np.savez(partial, ids=energies["ids"][:1], energy=energies["energy"][:1])
    with pytest.raises(lb.SubmissionError,
                       match=rf"1 id\(s\) in {relax_lmdb} but not in predictions {partial}, e.g. {energies['ids'][1]}"):
        lb.evaluate_is2re(partial, relax_lmdb)
    with pytest.raises(lb.SubmissionError, match=r"in trajectories .*ood_ads/trajectories but not in .*, e.g. 10"):
        lb.evaluate_is2re(results / "ood_ads" / "trajectories", relax_lmdb)
    with pytest.raises(lb.SubmissionError, match=r"frame 0 has no 'y_relaxed'"):
        lb.evaluate_is2re(trajectories, toy_root / "val")

    evaluate = load_script("evaluate_s2ef").main
    assert evaluate(["--is2re", "--predictions", str(partial), "--lmdb", str(relax_lmdb)]) == 2
    err = capsys.readouterr().err
    assert str(partial) in err and "but not in predictions" in err
