"""End to end through main.py: train, checkpoint, predict, validate, and clear errors."""

from __future__ import annotations

import re
import numpy as np
import pytest
import torch
import yaml

from conftest import TRAINED_EPOCHS as EPOCHS, make_config, run_cli
from ocp_deq.cli import ConfigError, resolve_config
from ocp_deq.data import read_lmdb, write_lmdb


@pytest.fixture(scope="module")
def trained(trained_deq):
    work, config, proc, checkpoint = trained_deq
    return work, config, proc, [checkpoint]


def test_train_writes_checkpoint_and_logs_solver_statistics(trained):
    work, _, proc, checkpoints = trained
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    assert any(key.endswith("backbone.deq_update_gain") for key in state["state_dict"])
    log = proc.stdout + proc.stderr
    assert re.search(r"deq_nstep: [0-9.e+-]+, deq_residual: [0-9.e+-]+, deq_unconverged", log)
    # validation after the run also reports solver statistics
    assert re.search(r"forces_mae: [0-9.]+.*deq_nstep: [0-9.]+", log)


def test_training_loss_decreases(trained):
    _, _, proc, _ = trained
    log = proc.stdout + proc.stderr
    steps = [(float(epoch), float(loss)) for loss, epoch in
             re.findall(r"loss: ([0-9.e+-]+), lr: [0-9.e+-]+, epoch: ([0-9.e+-]+)", log)]
    first = [loss for epoch, loss in steps if epoch <= 1.0]
    last = [loss for epoch, loss in steps if epoch > EPOCHS - 1]
    assert first and last, log[-2000:]
    assert np.mean(last) < 0.8 * np.mean(first), (np.mean(first), np.mean(last))


def test_predict_writes_s2ef_predictions(trained, toy_root):
    work, config, _, checkpoints = trained
    run_cli("--mode", "predict", "--config-yml", config, "--cpu", "--run-dir", work / "pred",
            "--identifier", "p", "--checkpoint", checkpoints[0], cwd=work)
    [npz] = list((work / "pred" / "results").glob("*/ocp_predictions.npz"))
    pred = np.load(npz)
    assert {"ids", "energy", "forces", "chunk_idx"} <= set(pred.files)
    frames = read_lmdb(toy_root / "test")
    free_atoms = [int((f.fixed == 0).sum()) for f in frames]
    assert sorted(pred["ids"]) == sorted(f"{f.sid}_{f.fid}" for f in frames)
    assert pred["energy"].reshape(-1).shape == (len(frames),)
    assert pred["forces"].shape == (sum(free_atoms), 3)
    assert len(pred["chunk_idx"]) == len(frames) - 1
    assert np.isfinite(pred["forces"]).all()
    assert pred["energy"].dtype == pred["forces"].dtype == np.float32  # the toy base: float16 is too coarse


def test_validate_reports_metrics(trained):
    work, config, _, checkpoints = trained
    proc = run_cli("--mode", "validate", "--config-yml", config, "--cpu", "--run-dir", work / "val",
                   "--identifier", "v", "--checkpoint", checkpoints[0], cwd=work)
    log = proc.stdout + proc.stderr
    assert re.search(r"energy_mae: [0-9.]+, .*forces_mae: [0-9.]+, .*deq_nstep: [0-9.]+", log)


def test_config_names_resolve_under_configs():
    assert resolve_config("deq_equiformer_v2_toy.yml").parts[-3:] == ("s2ef", "toy", "deq_equiformer_v2_toy.yml")
    assert resolve_config("2M/deq_equiformer_v2_small_l3.yml").parts[-2:] == ("2M", "deq_equiformer_v2_small_l3.yml")
    with pytest.raises(ConfigError, match=r"ambiguous(.|\n)*200k/deq_equiformer_v2_small_l3.yml(.|\n)*2M/"):
        resolve_config("deq_equiformer_v2_small_l3.yml")


def cli_error(args, capsys) -> str:
    """Exit status 2 and stderr of a CLI mistake caught before fairchem starts (in this
    process: main.py calls the same main; one mistake goes through main.py below)."""
    from ocp_deq.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_config_name_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stderr = cli_error(["--mode", "train", "--config-yml", "no_such_model.yml", "--cpu"], capsys)
    assert "config 'no_such_model.yml' is neither a file nor a config name" in stderr
    assert "toy/deq_equiformer_v2_toy.yml" in stderr  # lists the candidates


def test_missing_lmdb_path_is_a_clear_error(toy_root, tmp_path, capsys):
    config = make_config(tmp_path, toy_root)
    data = yaml.safe_load(config.read_text())
    data["dataset"]["val"]["src"] = str(tmp_path / "nowhere")
    config.write_text(yaml.safe_dump(data))
    stderr = cli_error(["--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "run"], capsys)
    assert f"dataset.val.src: LMDB path '{tmp_path / 'nowhere'}' does not exist" in stderr


def _broken_setups(tmp_path, toy_root):
    """(name, config edit, extra CLI args, message) for mistakes a user makes."""
    import pickle
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(toy_root / "val", truncated)
    data_file = next(truncated.glob("*.lmdb"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 3])
    text = tmp_path / "text"
    text.mkdir()
    (text / "data.lmdb").write_text("not a database\n")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"random bytes")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "payload_ran"), "w"))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload()}))
    left = tmp_path / "run_left" / "checkpoints" / "old-run" / "checkpoint.pt"  # resumed by fairchem unasked
    left.parent.mkdir(parents=True)
    shutil.copy(crafted, left)
    return [
        ("typo", {"model": {"deq": {"eval_solvr": {}}}}, [], "unknown DEQ option(s) ['eval_solvr'] in 'model.deq'"),
        ("tol0", {"model": {"deq": {"eval_solver": {"tol": 0}}}}, [], "model.deq.eval_solver.tol must be > 0"),
        ("max_iter", {"model": {"deq": {"train_solver": {"max_iter": -5}}}}, [], "model.deq.train_solver.max_iter must be >= 1"),
        ("truncated", {"dataset": {"val": {"src": str(truncated)}}}, [], f"LMDB file '{data_file}' is truncated"),
        ("text", {"dataset": {"val": {"src": str(text)}}}, [], f"'{text / 'data.lmdb'}' is not a readable LMDB file"),
        ("noise", {}, ["--checkpoint", str(noise)], f"checkpoint {noise} is not a readable torch checkpoint"),
        ("crafted", {}, ["--checkpoint", str(crafted)], f"--checkpoint: refusing to load checkpoint {crafted}"),
        ("left", {}, ["--timestamp-id", "old-run"], f"--timestamp-id old-run (resuming): refusing to load checkpoint {left}"),
        ("predict", {}, ["--mode", "predict"], "--mode predict needs --checkpoint"),
    ]


def test_configuration_data_and_checkpoint_mistakes_are_one_line_errors(toy_root, tmp_path, capsys):
    """Each mistake: exit status 2, one message naming the key / file, nothing written, no
    payload run. The checks run before fairchem starts: in this process (main.py calls the same
    main), and once through main.py for the real command line."""
    for name, edit, extra, message in _broken_setups(tmp_path, toy_root):
        config = make_config(tmp_path, toy_root, model=edit.get("model"))
        data = yaml.safe_load(config.read_text())
        for split, entry in edit.get("dataset", {}).items():
            data["dataset"][split].update(entry)
        config.write_text(yaml.safe_dump(data))
        run_dir = tmp_path / f"run_{name}"
        existed = run_dir.exists()
        args = ["--mode", "train", "--config-yml", str(config), "--cpu", "--run-dir", str(run_dir), *extra]
        if "--mode" in extra:
            args = args[2:]
        if name == "typo":
            proc = run_cli(*args, cwd=tmp_path, check=False)
            code, stderr = proc.returncode, proc.stderr
            assert "Traceback" not in stderr, name
        else:
            code, stderr = 2, cli_error(args, capsys)
        assert code == 2, (name, stderr[-2000:])
        assert message in stderr and stderr.count("\n") == 1, (name, stderr[-2000:])
        if existed:
            assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoint.pt", "checkpoints", "old-run"], name
        else:
            assert not run_dir.exists(), name
    assert not (tmp_path / "payload_ran").exists()


def test_frame_without_forces_is_a_clear_error(toy_root, tmp_path):
    frames = read_lmdb(toy_root / "train")[:8]
    del frames[5].forces
    write_lmdb(tmp_path / "broken" / "train" / "data.lmdb", frames)
    config = make_config(tmp_path, toy_root)
    data = yaml.safe_load(config.read_text())
    data["dataset"]["train"]["src"] = str(tmp_path / "broken" / "train")
    config.write_text(yaml.safe_dump(data))
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "run", cwd=tmp_path,
                   check=False)
    assert proc.returncode != 0
    expected = f"dataset.train ({tmp_path / 'broken' / 'train'}): frame sid={frames[5].sid} fid={frames[5].fid} has no ['forces']"
    assert expected in proc.stderr
    # with normalisers fitted on the training split (the toy recipe), fairchem reads the frames first
    data["dataset"]["train"]["transforms"] = {"normalizer": {"fit": {"targets": {"forces": {"mean": 0.0}}, "batch_size": 64}}}
    config.write_text(yaml.safe_dump(data))
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "run", cwd=tmp_path,
                   check=False)
    assert proc.returncode != 0
    assert f"dataset.train ({tmp_path / 'broken' / 'train'}): a training frame has no 'forces' label" in proc.stderr


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips_with_the_system_ids(toy_root, tmp_path, action):
    frames = read_lmdb(toy_root / "train")[:8]
    frames[2].energy = float("nan")
    write_lmdb(tmp_path / "nan" / "train" / "data.lmdb", frames)
    config = make_config(tmp_path, toy_root, model={"deq": {"on_nonfinite": action}})
    data = yaml.safe_load(config.read_text())
    data["dataset"]["train"]["src"] = str(tmp_path / "nan" / "train")
    data["optim"]["batch_size"] = 8
    config.write_text(yaml.safe_dump(data))
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "run", cwd=tmp_path,
                   check=False)
    log = proc.stdout + proc.stderr
    assert "non-finite loss (nan) at step 1" in log
    assert f"sid={[f.sid for f in frames]}" in log
    if action == "stop":
        assert proc.returncode != 0 and "NonFiniteError" in log
    else:
        assert proc.returncode == 0, log[-3000:]
        assert "batch skipped (model.deq.on_nonfinite=skip)" in log


def test_runs_started_together_get_distinct_folders(tmp_path):
    """fairchem's float32 timestamps put runs started within ~2 minutes in one folder."""
    from ocp_deq.cli import claim_run_id

    ids = [claim_run_id(str(tmp_path), "same") for _ in range(3)]
    assert len(set(ids)) == 3 and all(i.endswith("-same") for i in ids)
    assert all((tmp_path / "checkpoints" / i).is_dir() for i in ids)
