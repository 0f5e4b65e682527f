"""No lost work: checkpoints are never left truncated, and a killed training run, started
again with the same command, resumes at its last checkpoint with the optimiser, LR
scheduler, EMA and normaliser state."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cluster_helpers import ENV, cluster_config, main_command, run_main, small_data, training_steps
from fairchem.core.common import distutils
from fairchem.core.common.flags import Flags
from fairchem.core.common.utils import build_config, new_trainer_context
from ocp_deq.cluster import warn_if_unresumable

TRAIN, BATCH, EPOCHS = 16, 4, 2
STEPS = EPOCHS * TRAIN // BATCH


@contextlib.contextmanager
def trainer_context(config, run_dir, timestamp_id, *overrides):
    """fairchem's trainer and task for ``main.py --mode train ... --cpu`` in this process."""
    args, rest = Flags().get_parser().parse_known_args(
        ["--mode", "train", "--config-yml", str(config), "--cpu", "--run-dir", str(run_dir),
         "--timestamp-id", timestamp_id, *overrides]
    )
    environ = dict(os.environ)
    distutils.setup_env_local()
    try:
        with new_trainer_context(config=build_config(args, rest)) as ctx:
            yield ctx
    finally:
        distutils.cleanup()
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture
def data(toy_root, tmp_path):
    """Per test: lmdb refuses to open one environment twice in a process, and the
    in-process trainers of both tests open the training set."""
    return small_data(toy_root, tmp_path / "data", TRAIN)


def test_failed_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    config = cluster_config(tmp_path, data, "c.yml", val=False)
    with trainer_context(config, tmp_path / "run", "atomic") as ctx:
        trainer = ctx.trainer
        path = trainer.save()
        good = open(path, "rb").read()
        name, parameter = next(iter(trainer.model.named_parameters()))
        original = parameter.detach().clone()
        with torch.no_grad():
            parameter.add_(1.0)

        written = []

        def dies_midway(obj, f, *args, **kwargs):  # a full disk (or a kill) during the write
            written.append(Path(f))
            with open(f, "wb") as handle:
                handle.write(good[: len(good) // 2])
            raise OSError(28, "No space left on device")

        real_save = torch.save
        monkeypatch.setattr(torch, "save", dies_midway)
        with pytest.raises(OSError, match="No space left"):
            trainer.save()
        directory = tmp_path / "run" / "checkpoints" / "atomic"
        assert [p.parent for p in written] == [directory] and written[0].name != "checkpoint.pt"
        assert open(path, "rb").read() == good
        assert torch.equal(torch.load(path, map_location="cpu", weights_only=False)["state_dict"][name], original)
        assert not list(directory.glob(".checkpoint.pt.*"))  # the failed temporary is removed

        # a temporary left by a killed writer does not hinder the next save and is cleaned up
        (directory / ".checkpoint.pt.0123abcd.tmp").write_bytes(good[:100])
        monkeypatch.setattr(torch, "save", real_save)
        trainer.save()
        saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"][name]
        assert torch.equal(saved, original + 1.0)
        assert not list(directory.glob(".checkpoint.pt.*"))


def test_killed_run_resumes_with_the_same_command(data, tmp_path):
    config = cluster_config(tmp_path, data, "c.yml", val=False, batch_size=BATCH, max_epochs=EPOCHS,
                            checkpoint_every=1, ema_decay=0.5)
    command = main_command("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", tmp_path / "run",
                           "--timestamp-id", "kill", "--print-every", 1)
    checkpoint = tmp_path / "run" / "checkpoints" / "kill" / "checkpoint.pt"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None:
                # checkpoint.pt is replaced atomically: whenever it exists it loads
                if checkpoint.exists() and torch.load(checkpoint, map_location="cpu", weights_only=False)["step"] >= 2:
                    break
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    killed = torch.load(checkpoint, map_location="cpu", weights_only=False)
    step = killed["step"]
    assert 2 <= step < STEPS, (step, (tmp_path / "killed.log").read_text()[-3000:])
    # fairchem wrote it after step k's optimizer step, before its scheduler step
    assert killed["scheduler"]["last_epoch"] == step - 1

    # what the rerun restores: the killed run's state, not a fresh one (a normaliser changed
    # in the config would be overridden by the checkpoint's)
    with trainer_context(config, tmp_path / "run", "kill", "dataset.train.transforms.normalizer.forces.rmsd=0.5") as ctx:
        ctx.task.setup(ctx.trainer)
        trainer = ctx.trainer
        assert (trainer.step, trainer.epoch) == (step, killed["epoch"])
        loaded = trainer.optimizer.state_dict()["state"]
        assert loaded.keys() == killed["optimizer"]["state"].keys()
        for key, state in killed["optimizer"]["state"].items():
            assert all(torch.equal(loaded[key][name], value) for name, value in state.items())
        assert trainer.scheduler.scheduler.last_epoch == step  # caught up
        for ema, saved in zip(trainer.ema.shadow_params, killed["ema"]["shadow_params"]):
            assert torch.equal(ema, saved)
        assert trainer.normalizers["forces"].rmsd.item() == pytest.approx(killed["normalizers"]["forces"]["rmsd"].item())
        assert trainer.normalizers["forces"].rmsd.item() != pytest.approx(0.5)

    rerun = run_main(*command[2:], cwd=tmp_path)
    assert f"Previous checkpoint found at {checkpoint}" in rerun
    assert f"restored from {checkpoint}: step {step}, epoch {killed['epoch']:.3f}" in rerun
    assert sorted(training_steps(rerun)) == list(range(step + 1, STEPS + 1))
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert (final["step"], final["epoch"]) == (STEPS, float(EPOCHS))
    # one optimizer step per training step across both processes, and the LR schedule in step
    assert {int(state["step"]) for state in final["optimizer"]["state"].values()} == {STEPS}
    assert final["scheduler"]["last_epoch"] == STEPS - 1


def test_rerun_without_timestamp_id_points_at_earlier_checkpoints(tmp_path, caplog):
    """Without --timestamp-id a rerun starts a new run; the CLI names the earlier one to resume."""
    earlier = tmp_path / "checkpoints" / "2026-01-02-03-04-05-deq" / "checkpoint.pt"
    earlier.parent.mkdir(parents=True)
    earlier.touch()
    args = Flags().get_parser().parse_args(["--mode", "train", "--config-yml", "c.yml", "--identifier", "deq",
                                            "--run-dir", str(tmp_path)])
    with caplog.at_level(logging.WARNING):
        warn_if_unresumable(args)
    assert "pass --timestamp-id 2026-01-02-03-04-05-deq" in caplog.text
    caplog.clear()
    args.timestamp_id = "2026-01-02-03-04-05-deq"  # the resuming command line: nothing to say
    warn_if_unresumable(args)
    assert not caplog.text


def test_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    """A pickle that runs code when unpickled, passed as a checkpoint: refused by name."""
    import pickle

    from ocp_deq.trainers.checkpointing import CheckpointError, load_checkpoint_file

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "checkpoint.pt"
    with open(crafted, "wb") as handle:
        pickle.dump({"state_dict": {}, "x": Payload()}, handle)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint .*checkpoint.pt"):
        load_checkpoint_file(crafted)
    assert not marker.exists()
    (tmp_path / "noise.pt").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(CheckpointError, match="noise.pt"):
        load_checkpoint_file(tmp_path / "noise.pt")
    # torch's own zip format, through the ASE calculator (fairchem's OCPCalculator reads the
    # config with a bare torch.load, unrestricted before torch 2.6: ours checks first)
    from ocp_deq.calculator import DEQCalculator

    zipped = tmp_path / "zipped.pt"
    torch.save({"config": {}, "x": Payload()}, zipped)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint .*zipped.pt"):
        DEQCalculator(checkpoint_path=str(zipped), cpu=True)
    assert not marker.exists()
