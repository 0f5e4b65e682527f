"""EvalAI submission files (merge / validate) and local S2EF evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

import ocp_deq  # noqa: F401  (before fairchem)
from fairchem.core.modules.evaluator import Evaluator
from ocp_deq import leaderboard as lb
from conftest import REPO, load_script, run_command
from ocp_deq.data import write_lmdb


def fairchem_predictions(rng, n: int, sid0: int, energy_column: bool = False) -> dict:
    """Arrays in the layout fairchem's ``OCPTrainer.predict`` / ``save_results`` writes."""
    counts = rng.integers(0, 6, size=n)  # free atoms per system (0 happens: all fixed)
    ids = np.array([f"{sid0 + i}_{i % 3}" for i in range(n)])
    energy = rng.normal(size=(n, 1) if energy_column else n).astype(np.float16)
    forces = rng.normal(size=(counts.sum(), 3)).astype(np.float16)
    return {"ids": ids, "energy": energy, "forces": forces, "chunk_idx": np.cumsum(counts)[:-1]}


def relaxed_positions(rng, n: int, sid0: int) -> dict:
    """Arrays as fairchem's ``run_relaxations`` writes them (all atoms, float64)."""
    counts = rng.integers(1, 6, size=n)
    return {"ids": np.array([str(sid0 + i) for i in range(n)]), "pos": rng.uniform(0, 20, size=(counts.sum(), 3)),
            "chunk_idx": np.cumsum(counts)[:-1]}


@pytest.fixture
def s2ef_files(tmp_path):
    rng = np.random.default_rng(0)
    files, arrays = {}, {}
    for k, split in enumerate(lb.SPLITS):
        arrays[split] = fairchem_predictions(rng, 5 + k, 1000 * k, energy_column=(split == "ood_cat"))
        files[split] = tmp_path / "results" / f"2024-01-02-03-04-05-{split}" / "ocp_predictions.npz"
        files[split].parent.mkdir(parents=True)
        np.savez_compressed(files[split], **arrays[split])
    return files, arrays


@pytest.fixture
def good_submission(s2ef_files, tmp_path) -> dict:
    out = lb.merge_s2ef_predictions(s2ef_files[0], tmp_path / "s2ef.npz")
    with np.load(out) as npz:
        return {key: npz[key] for key in npz.files}


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_merge_s2ef_layout_and_contents(s2ef_files, tmp_path, dtype):
    files, arrays = s2ef_files
    out = lb.merge_s2ef_predictions(files, tmp_path / "sub.npz", dtype=dtype)
    with np.load(out, allow_pickle=False) as npz:
        merged = {key: npz[key] for key in npz.files}
    assert set(merged) == {f"{s}_{f}" for s in lb.SPLITS for f in ("ids", "energy", "forces", "chunk_idx")}
    for split, src in arrays.items():
        n, m = len(src["ids"]), len(src["forces"])
        assert merged[f"{split}_ids"].dtype.kind == "U"
        np.testing.assert_array_equal(merged[f"{split}_ids"], src["ids"])
        assert merged[f"{split}_energy"].dtype == dtype and merged[f"{split}_energy"].shape == (n,)
        np.testing.assert_array_equal(merged[f"{split}_energy"], src["energy"].reshape(-1).astype(dtype))
        assert merged[f"{split}_forces"].dtype == dtype and merged[f"{split}_forces"].shape == (m, 3)
        np.testing.assert_array_equal(merged[f"{split}_forces"], src["forces"].astype(dtype))
        np.testing.assert_array_equal(merged[f"{split}_chunk_idx"], src["chunk_idx"])
    assert arrays["ood_cat"]["energy"].shape[1] == 1  # an [N, 1] input was flattened


def test_merge_is2rs_layout(tmp_path):
    rng = np.random.default_rng(1)
    files, arrays = {}, {}
    for k, split in enumerate(lb.SPLITS):
        arrays[split] = relaxed_positions(rng, 3 + k, 100 * k)
        files[split] = tmp_path / f"{split}.npz"
        np.savez_compressed(files[split], **arrays[split])
    out = lb.merge_is2rs_predictions(files, tmp_path / "is2rs.npz")
    with np.load(out, allow_pickle=False) as npz:
        assert set(npz.files) == {f"{s}_{f}" for s in lb.SPLITS for f in ("ids", "pos", "chunk_idx")}
        for split, src in arrays.items():
            assert npz[f"{split}_pos"].dtype == np.float32
            np.testing.assert_allclose(npz[f"{split}_pos"], src["pos"], rtol=1e-6)
            np.testing.assert_array_equal(npz[f"{split}_ids"], src["ids"])
            np.testing.assert_array_equal(npz[f"{split}_chunk_idx"], src["chunk_idx"])
    lb.validate_is2rs_submission(out)
    with pytest.raises(lb.SubmissionError, match="unexpected key"):
        lb.validate_s2ef_submission(out)  # an IS2RS file is not an S2EF one


def test_merge_rejects_bad_split_sets(s2ef_files, tmp_path):
    files, _ = s2ef_files
    with pytest.raises(lb.SubmissionError, match="ood_both"):
        lb.merge_s2ef_predictions({k: v for k, v in files.items() if k != "ood_both"}, tmp_path / "x.npz")
    with pytest.raises(lb.SubmissionError, match="same file"):
        lb.merge_s2ef_predictions({**files, "ood_cat": files["id"]}, tmp_path / "x.npz")
    np.savez(files["ood_ads"], ids=np.array(["1_0"]), energy=np.zeros(1, np.float16))
    with pytest.raises(lb.SubmissionError, match=r"split 'ood_ads'.*missing key\(s\) forces, chunk_idx"):
        lb.merge_s2ef_predictions(files, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- validation


def _set(key, make):
    def mutate(sub):
        sub[key] = make(sub[key])
    return mutate


def _drop(*keys):
    def mutate(sub):
        for key in keys:
            del sub[key]
    return mutate


def _object_forces(sub):
    forces, chunk = sub["ood_cat_forces"], sub["ood_cat_chunk_idx"]
    sub["ood_cat_forces"] = np.array(np.split(forces, chunk) + [None], dtype=object)[:-1]


def _duplicate_id(sub):
    sub["ood_ads_ids"] = sub["ood_ads_ids"].copy()
    sub["ood_ads_ids"][2] = sub["ood_ads_ids"][0]


def _decreasing_chunk(sub):
    chunk = sub["id_chunk_idx"].copy()
    chunk[[0, -1]] = chunk[-1] + 1, 0
    sub["id_chunk_idx"] = chunk


def _short_forces(sub):
    sub["ood_both_forces"] = sub["ood_both_forces"][: sub["ood_both_chunk_idx"][-1] - 1]


def _extra_key(sub):
    sub["val_ids"] = sub["id_ids"]


def _nan_energy(sub):
    sub["ood_both_energy"] = sub["ood_both_energy"].copy()
    sub["ood_both_energy"][1] = np.nan


def _inf_forces(sub):
    sub["id_forces"] = sub["id_forces"].copy()
    sub["id_forces"][0, 2] = np.inf


BROKEN = {
    "object forces": (_object_forces, "split 'ood_cat', key 'ood_cat_forces'", "object"),
    "missing split": (_drop(*(f"ood_both_{f}" for f in lb.S2EF_FIELDS)), "split 'ood_both'", "missing"),
    "missing key": (_drop("ood_ads_chunk_idx"), "split 'ood_ads'", "ood_ads_chunk_idx"),
    "energy too short": (_set("ood_ads_energy", lambda a: a[:-1]), "key 'ood_ads_energy'", "one value per id"),
    "energy two columns": (_set("id_energy", lambda a: np.stack([a, a], 1)), "key 'id_energy'", "one value per id"),
    "ids too long": (_set("ood_cat_ids", lambda a: np.append(a, "99_9")), "key 'ood_cat_energy'", "one value per id"),
    "chunk_idx length N": (_set("id_chunk_idx", lambda a: np.append(a, a[-1])), "key 'id_chunk_idx'", "len(ids) - 1"),
    "chunk_idx beyond forces": (_short_forces, "key 'ood_both_chunk_idx'", "exceeds"),
    "chunk_idx decreasing": (_decreasing_chunk, "key 'id_chunk_idx'", "non-decreasing"),
    "chunk_idx float": (_set("id_chunk_idx", lambda a: a.astype(np.float32)), "key 'id_chunk_idx'", "integers"),
    "forces flat": (_set("ood_ads_forces", lambda a: a.reshape(-1)), "key 'ood_ads_forces'", "[M, 3]"),
    "forces [M, 2]": (_set("ood_ads_forces", lambda a: a[:, :2]), "key 'ood_ads_forces'", "[M, 3]"),
    "duplicate id": (_duplicate_id, "key 'ood_ads_ids'", "duplicate"),
    "NaN energy": (_nan_energy, "key 'ood_both_energy'", "NaN"),
    "inf forces": (_inf_forces, "key 'id_forces'", "inf"),
    "float64 forces": (_set("ood_cat_forces", lambda a: a.astype(np.float64)), "key 'ood_cat_forces'", "float64"),
    "integer energy": (_set("id_energy", lambda a: a.astype(np.int32)), "key 'id_energy'", "int32"),
    "integer ids": (_set("id_ids", lambda a: np.arange(len(a))), "key 'id_ids'", "strings"),
    "bytes ids": (_set("id_ids", lambda a: a.astype("S")), "key 'id_ids'", "strings"),
    "unexpected key": (_extra_key, "unexpected key(s) val_ids", ""),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_validation_rejects(good_submission, tmp_path, case):
    mutate, where, what = BROKEN[case]
    lb.validate_s2ef_submission(good_submission)  # the unbroken one passes
    sub = dict(good_submission)
    mutate(sub)
    with pytest.raises(lb.SubmissionError) as err:
        lb.validate_s2ef_submission(sub)
    assert where in str(err.value) and what in str(err.value), str(err.value)
    # the same on disk (object arrays come back as an unreadable pickled key)
    path = tmp_path / "broken.npz"
    np.savez(path, **sub)
    with pytest.raises(lb.SubmissionError) as err:
        lb.validate_s2ef_submission(path)
    key = where.split("key ")[-1].strip("'") if "key '" in where else where
    assert key in str(err.value), str(err.value)


def test_is2rs_validation_rejects():
    rng = np.random.default_rng(2)
    good = {f"{s}_{k}": v for s in lb.SPLITS for k, v in relaxed_positions(rng, 4, 0).items()}
    lb.validate_is2rs_submission(good)
    cases = {
        "key 'ood_ads_pos'": {"ood_ads_pos": good["ood_ads_pos"].astype(np.float16)},  # too coarse for ADwT
        "key 'id_chunk_idx'": {"id_chunk_idx": good["id_chunk_idx"][:-1]},
        "key 'ood_cat_pos'": {"ood_cat_pos": good["ood_cat_pos"][:, :2]},
        "key 'ood_both_ids'": {"ood_both_ids": np.array(["1", "1", "2", "3"])},
    }
    for message, change in cases.items():
        with pytest.raises(lb.SubmissionError, match=message):
            lb.validate_is2rs_submission({**good, **change})
    with pytest.raises(lb.SubmissionError, match="split 'ood_both' is missing"):
        lb.validate_is2rs_submission({k: v for k, v in good.items() if not k.startswith("ood_both")})


def test_float16_overflow_names_the_fix(s2ef_files, tmp_path):
    files, arrays = s2ef_files
    big = {**arrays["ood_ads"], "energy": np.full(len(arrays["ood_ads"]["ids"]), 1e5, np.float32)}  # raw total energies
    np.savez(files["ood_ads"], **big)
    with pytest.raises(lb.SubmissionError, match=r"key 'ood_ads_energy'.*inf.*float32"):
        lb.merge_s2ef_predictions(files, tmp_path / "x.npz")
    out = lb.merge_s2ef_predictions(files, tmp_path / "x.npz", dtype="float32")
    with np.load(out) as npz:
        assert (npz["ood_ads_energy"] == 1e5).all()


# ----------------------------------------------------------------------------- atomic write


def test_failed_merge_keeps_previous_file(s2ef_files, tmp_path, monkeypatch):
    files, arrays = s2ef_files
    out = tmp_path / "out" / "s2ef.npz"
    lb.merge_s2ef_predictions(files, out)
    before = out.read_bytes()

    broken = {**arrays["id"], "forces": arrays["id"]["forces"].copy()}
    broken["forces"][0, 0] = np.nan
    np.savez(files["id"], **broken)
    with pytest.raises(lb.SubmissionError, match="key 'id_forces'"):
        lb.merge_s2ef_predictions(files, out)
    assert out.read_bytes() == before

    # a failure half-way through writing: nothing replaced, no temporary file left behind
    np.savez(files["id"], **arrays["id"])

    def partial_write(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(lb.np, "savez_compressed", partial_write)
    with pytest.raises(OSError, match="disk full"):
        lb.merge_s2ef_predictions(files, out, dtype="float32")
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["s2ef.npz"]


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_fairchem_evaluator():
    rng = np.random.default_rng(3)
    n_systems = 60
    natoms = rng.integers(2, 9, size=n_systems)
    # some atoms fixed, at least one free per system (fairchem's EFwT fails on an all-fixed one)
    free = np.array([max(1, int((rng.random(n) >= 0.4).sum())) for n in natoms])
    forces_true = rng.normal(size=(free.sum(), 3))
    # errors straddling the thresholds: on half of the atoms up to 0.04 eV/Å, energies up to 0.03 eV
    forces_pred = forces_true + rng.uniform(-0.04, 0.04, size=forces_true.shape) * (rng.random((free.sum(), 1)) < 0.5)
    energy_true = rng.normal(size=n_systems)
    energy_pred = energy_true + rng.uniform(-0.03, 0.03, size=n_systems)
    ours = lb.s2ef_metrics(energy_pred, energy_true, forces_pred, forces_true, free)

    t = torch.from_numpy
    natoms = t(free)  # fairchem's natoms here: FREE atoms per system (its EFwT asserts sum == len(forces))
    theirs = Evaluator(task="s2ef").eval(
        {"energy": t(energy_pred), "forces": t(forces_pred), "natoms": natoms},
        {"energy": t(energy_true), "forces": t(forces_true), "natoms": natoms},
    )
    assert 0 < ours["efwt"] < 1  # the threshold test is actually exercised
    assert ours["efwt"] == theirs["energy_forces_within_threshold"]["metric"]
    assert ours["energy_mae"] == pytest.approx(theirs["energy_mae"]["metric"], rel=1e-12)
    assert ours["forces_mae"] == pytest.approx(theirs["forces_mae"]["metric"], rel=1e-12)
    # fairchem casts to float32 for the cosine
    assert ours["forces_cos"] == pytest.approx(theirs["forces_cosine_similarity"]["metric"], abs=1e-6)
    assert ours["n_systems"] == len(free) and ours["n_free_atoms"] == free.sum()

    total = t(free + 1)  # all-atom counts do not fit fairchem's free-atom forces
    with pytest.raises(AssertionError):
        Evaluator(task="s2ef").eval({"energy": t(energy_pred), "forces": t(forces_pred), "natoms": total},
                                    {"energy": t(energy_true), "forces": t(forces_true), "natoms": total})


def test_efwt_by_hand_with_an_all_fixed_system():
    # system 0: within both; 1: force error 0.03 (not < 0.03); 2: energy error 0.02; 3: no free atoms, energy ok
    energy_true = np.zeros(4)
    energy_pred = np.array([0.019, 0.0, 0.02, 0.01])
    forces_true = np.zeros((4, 3))
    forces_pred = np.array([[0.029, 0, 0], [0, 0, 0], [0, -0.03, 0], [0, 0, 0]])
    m = lb.s2ef_metrics(energy_pred, energy_true, forces_pred, forces_true, [1, 2, 1, 0])
    assert m["efwt"] == pytest.approx(2 / 4)
    assert m["energy_mae"] == pytest.approx(0.049 / 4)
    assert m["forces_mae"] == pytest.approx((0.029 + 0.03) / 12)


def _frame(sid, fid, energy, forces, fixed):
    forces = torch.tensor(forces, dtype=torch.float32)
    n = len(forces)
    return Data(pos=torch.rand(n, 3), atomic_numbers=torch.full((n,), 29.0), natoms=n, energy=energy, forces=forces,
                fixed=torch.tensor(fixed, dtype=torch.float32), tags=torch.ones(n, dtype=torch.long), sid=sid, fid=fid)


@pytest.fixture
def labelled(tmp_path):
    """A tiny labelled LMDB and float16 predictions (fairchem's layout) in another order."""
    frames = [
        _frame(7, 0, 1.0, [[9, 9, 9], [1, 0, 0], [0, 1, 0]], [1, 0, 0]),
        _frame(7, 3, -2.0, [[0, 0, 1], [1, 1, 0]], [0, 0]),
        _frame(9, 1, 0.5, [[0, 2, 0], [5, 5, 5]], [0, 1]),
    ]
    lmdb = tmp_path / "val" / "data.lmdb"
    write_lmdb(lmdb, frames)
    pred = {
        "ids": np.array(["9_1", "7_0", "7_3"]),
        "energy": np.array([0.75, 1.0 + 1 / 128, -2.0], np.float16),
        "forces": np.array([[0, 2, 0], [1, 0, 0], [0, 1, 1 / 64], [0, 0, -1], [1, 1, 0]], np.float16),
        "chunk_idx": np.array([1, 3]),
    }
    pred_path = tmp_path / "ocp_predictions.npz"
    np.savez_compressed(pred_path, **pred)
    return pred_path, lmdb, pred


EXPECTED = {
    "energy_mae": (0.25 + 1 / 128) / 3,
    "forces_mae": (1 / 64 + 2) / 15,            # 5 free atoms, 15 components
    "forces_cos": (2 + 1 / np.sqrt(1 + (1 / 64) ** 2)) / 5,  # 1, 1, c, -1, 1
    "efwt": 1 / 3,                              # only 7_0 is within both thresholds
    "n_systems": 3,
}


def test_evaluate_s2ef_end_to_end(labelled):
    pred_path, lmdb, pred = labelled
    metrics = lb.evaluate_s2ef(pred_path, lmdb.parent)
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9), key
    assert metrics["n_free_atoms"] == 5


def test_evaluate_s2ef_mismatches(labelled):
    _, lmdb, pred = labelled
    with pytest.raises(lb.SubmissionError, match=r"1 id\(s\) in .* but not in the predictions, e.g. 7_3"):
        lb.evaluate_s2ef({"ids": pred["ids"][:2], "energy": pred["energy"][:2], "forces": pred["forces"][:3],
                          "chunk_idx": pred["chunk_idx"][:1]}, lmdb)
    extra = {**pred, "ids": np.array(["9_1", "7_0", "8_8"])}
    with pytest.raises(lb.SubmissionError, match=r"1 id\(s\) in the predictions but not in .*e.g. 8_8"):
        lb.evaluate_s2ef(extra, lmdb)
    shifted = {**pred, "chunk_idx": np.array([2, 3])}  # 9_1 gets 2 rows but has 1 free atom
    with pytest.raises(lb.SubmissionError, match="id '9_1': 2 predicted force rows, but the frame has 1 free atoms"):
        lb.evaluate_s2ef(shifted, lmdb)


# ----------------------------------------------------------------------------- command lines


def test_scripts_command_line(s2ef_files, labelled, tmp_path):
    files, _ = s2ef_files
    pred_path, lmdb, _ = labelled
    broken = tmp_path / "broken.npz"
    with np.load(lb.merge_s2ef_predictions(files, tmp_path / "good.npz")) as npz:
        np.savez(broken, **{k: (npz[k][:-1] if k == "ood_cat_energy" else npz[k]) for k in npz.files})
    out, metrics_json = tmp_path / "sub" / "s2ef.npz", tmp_path / "metrics.json"
    commands = {
        "merge": ["make_submission_file.py", "--results-dir", files["id"].parents[1], "--out", out, "--float32"],
        "reject": ["make_submission_file.py", "--validate", broken],
        "evaluate": ["evaluate_s2ef.py", "--split", "val_id", pred_path, lmdb, "--json", metrics_json],
    }
    done = {}
    for name, (script, *args) in commands.items():
        proc = run_command(REPO / "scripts" / script, *args, cwd=REPO, timeout=300)
        done[name] = proc.stdout, proc.stderr, proc.returncode

    stdout, stderr, code = done["merge"]
    assert code == 0, stderr
    lb.validate_s2ef_submission(out)
    with np.load(out) as npz:
        assert npz["id_forces"].dtype == np.float32
    assert "2024-01-02-03-04-05-ood_both" in stdout

    stdout, stderr, code = done["reject"]
    assert code == 2 and stderr.strip().count("\n") == 0
    assert "split 'ood_cat', key 'ood_cat_energy'" in stderr

    stdout, stderr, code = done["evaluate"]
    assert code == 0, stderr
    assert stdout.splitlines()[0].startswith("| split | energy MAE")
    row = next(line for line in stdout.splitlines() if line.startswith("| val_id |"))
    assert row.split("|")[4].strip() == f"{EXPECTED['forces_cos']:.4f}"
    saved = json.loads(metrics_json.read_text())["val_id"]
    for key, value in EXPECTED.items():
        assert saved[key] == pytest.approx(value, rel=1e-9), key


def test_scripts_argument_errors(s2ef_files, labelled, tmp_path, capsys):
    make = load_script("make_submission_file").main
    evaluate = load_script("evaluate_s2ef").main
    files, _ = s2ef_files
    results = files["id"].parents[1]
    args = [f"--{s.replace('_', '-')}={files[s]}" for s in lb.SPLITS]

    assert make([*args[:3], "--out", str(tmp_path / "a.npz")]) == 2
    assert "missing --ood-both" in capsys.readouterr().err
    assert make([*args, "--results-dir", str(results), "--out", str(tmp_path / "a.npz")]) == 2
    assert "either --results-dir" in capsys.readouterr().err
    (results / "2024-05-05-05-05-05-ood_ads").mkdir()
    np.savez(results / "2024-05-05-05-05-05-ood_ads" / "ocp_predictions.npz", ids=np.array(["1_1"]))
    assert make(["--results-dir", str(results), "--out", str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err
    assert "split 'ood_ads': need exactly one" in err and "2024-05-05-05-05-05-ood_ads" in err
    assert not (tmp_path / "a.npz").exists()

    assert make([*args, "--out", str(tmp_path / "a.npz")]) == 0
    assert make(["--validate", str(tmp_path / "a.npz")]) == 0
    assert "valid S2EF submission" in capsys.readouterr().out
    assert make(["--validate", str(tmp_path / "a.npz"), "--is2rs"]) == 2
    assert "unexpected key" in capsys.readouterr().err

    pred_path, lmdb, _ = labelled
    assert evaluate(["--predictions", str(pred_path)]) == 2
    assert "give them in pairs" in capsys.readouterr().err
    both = ["--predictions", str(pred_path), "--lmdb", str(lmdb), "--split", "x", str(pred_path), str(lmdb)]
    assert evaluate(both) == 0
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["x", "data", "mean"]
    assert rows[2][1:5] == rows[0][1:5] and rows[2][5] == "6"  # mean of two equal splits; systems summed
    # a truncated labels file (reading it would die of SIGBUS) and a text file: one line naming the file
    truncated = tmp_path / "truncated.lmdb"
    truncated.write_bytes(lmdb.read_bytes()[: lmdb.stat().st_size // 3])
    (tmp_path / "text.lmdb").write_text("not a database\n")
    for bad, message in ((truncated, f"LMDB file '{truncated}' is truncated"),
                         (tmp_path / "text.lmdb", f"'{tmp_path / 'text.lmdb'}' is not a readable LMDB file")):
        assert evaluate(["--predictions", str(pred_path), "--lmdb", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_fairchems_own_merged_file_is_valid(s2ef_files, tmp_path):
    """fairchem's make_submission_file (energies as written by predict, [N, 1] float16 from
    some heads) produces a file our validator accepts, without warnings."""
    import argparse

    from fairchem.core.scripts import make_submission_file as fairchem_merge

    files, _ = s2ef_files
    out = tmp_path / "fairchem_submission.npz"
    args = argparse.Namespace(dataset="OC20", out_path=str(out), is2re_relaxations=False, hybrid=False,
                              **{split.replace("-", "_"): str(files[split]) for split in lb.SPLITS})
    fairchem_merge.main(args)
    with np.load(out) as npz:
        assert npz["ood_cat_energy"].shape[1:] == (1,)  # the [N, 1] layout
    assert lb.validate_s2ef_submission(out) == []


def test_copied_splits_and_shared_ids_are_warned(good_submission):
    copied = dict(good_submission)
    for field in lb.S2EF_FIELDS:
        copied[f"ood_both_{field}"] = good_submission[f"id_{field}"]
    warnings = lb.validate_s2ef_submission(copied)
    assert any("splits 'id' and 'ood_both' share" in w for w in warnings)
    assert any("splits 'id' and 'ood_both' hold identical 'forces' predictions" in w for w in warnings)
    assert lb.validate_s2ef_submission(good_submission) == []
