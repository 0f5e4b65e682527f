"""``--distributed`` / ``--submit``: flag checks, and a submitted two-task job (submitit's
local executor, gloo) that is preempted after its first checkpoint, requeues itself and
resumes to the end."""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cluster_helpers import ENV, cluster_config, main_command, small_data, training_steps
from ocp_deq.cli import main
from ocp_deq.cluster import Runner
from submitit.helpers import DelayedSubmission

TRAIN, BATCH, EPOCHS, TASKS = 16, 4, 3, 2
STEPS = EPOCHS * TRAIN // (BATCH * TASKS)


@pytest.mark.parametrize("flags, message", [
    (["--distributed"], "--distributed needs more than one process"),
    (["--num-nodes", "2", "--num-gpus", "8"], "--num-nodes 2 needs --submit"),
    (["--submitit-cluster", "local"], "--submitit-cluster applies only with --submit"),
    (["--submit", "--submitit-cluster", "local", "--num-nodes", "2"], "submitit's local executor (--submitit-cluster local, or no SLURM found) runs on one node"),
])
def test_contradictory_flags_are_clear_errors(flags, message, capsys, keep_log_handlers):
    with pytest.raises(SystemExit) as exit_:
        main(["--mode", "train", "--config-yml", "unused.yml", "--cpu", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def keep_log_handlers():
    """main() installs root log handlers on the current (captured) stdout; drop them after."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    yield
    root.handlers[:] = handlers


@pytest.mark.parametrize("cpu", [False, True])
def test_slurm_submission_carries_the_resources(toy_root, tmp_path, monkeypatch, keep_log_handlers, cpu):
    """What --distributed --submit hands to sbatch (a stand-in that keeps the script), and
    the pickled job: our Runner (so the job imports ocp_deq), with the run's config."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that SLURM is installed
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = cluster_config(tmp_path, small_data(toy_root, tmp_path / "data", 4), "c.yml", val=False)
    main(["--mode", "train", "--config-yml", str(config), *(["--cpu"] if cpu else []), "--distributed", "--submit",
          "--submitit-cluster", "slurm", "--num-nodes", "2", "--num-gpus", "8", "--identifier", "deq",
          "--timestamp-id", "deq", "--run-dir", str(tmp_path / "run"), "--logdir", str(tmp_path / "logs"),
          "--slurm-partition", "gpu", "--slurm-account", "acct", "--slurm-qos", "high", "--slurm-mem", "400",
          "--slurm-timeout", "48", "slurm.constraint=a100"])
    sbatch = (tmp_path / "sbatch.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--partition=gpu", "--account=acct", "--qos=high",
                 "--mem=400GB", f"--time={48 * 60}", "--constraint=a100", "--signal=USR2@90", "--job-name=deq"):
        assert f"#SBATCH {line}\n" in sbatch, (line, sbatch)
    assert ("--gpus-per-node" in sbatch) == (not cpu)
    if not cpu:
        assert "#SBATCH --gpus-per-node=8\n" in sbatch
    submission = DelayedSubmission.load(tmp_path / "logs" / "4242" / "4242_submitted.pkl")
    assert type(submission.function) is Runner
    assert submission.args[0]["world_size"] == 16 and submission.args[0]["submit"]
    assert submission.args[0]["distributed_backend"] == ("gloo" if cpu else "nccl")


def alive(pid: int) -> bool:
    """``pid`` runs (the job's controller is not our child: it may linger as a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(condition, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_submitted_job_is_preempted_requeued_and_resumes(toy_root, tmp_path):
    data = small_data(toy_root, tmp_path / "data", TRAIN)
    config = cluster_config(tmp_path, data, "c.yml", val=False, batch_size=BATCH, max_epochs=EPOCHS,
                            checkpoint_every=1)
    # to a file: the job's controller inherits the CLI's stdout, and a pipe would stay open till the job ends
    with open(tmp_path / "submit.log", "w") as log:
        cli = subprocess.run(
            main_command("--mode", "train", "--config-yml", config, "--cpu", "--distributed", "--submit",
                         "--submitit-cluster", "local", "--num-gpus", TASKS, "--run-dir", tmp_path / "run",
                         "--timestamp-id", "sub", "--logdir", tmp_path / "logs", "--print-every", 1),
            cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT, timeout=600,
        )
    submitted = (tmp_path / "submit.log").read_text()
    assert cli.returncode == 0, submitted[-3000:]
    job = int(re.search(r"Submitted jobs: (\d+)", submitted).group(1))  # the local job id is its controller's pid
    checkpoint = tmp_path / "run" / "checkpoints" / "sub" / "checkpoint.pt"
    folder = tmp_path / "logs" / str(job)
    try:
        wait_for(lambda: checkpoint.exists(), "the first checkpoint")
        tasks = children(job)
        assert len(tasks) == TASKS
        for task in tasks:  # as SLURM signals every task of a job it preempts
            os.kill(task, signal.SIGUSR2)
        wait_for(lambda: not alive(job), "the requeued job to finish")
    finally:
        if alive(job):
            os.kill(job, signal.SIGINT)  # submitit's cancel: the controller stops its tasks
    rank0 = (folder / f"{job}_0_log.out").read_text()  # both attempts' logs, in order
    with open(folder / f"{job}_0_result.pkl", "rb") as handle:
        assert pickle.load(handle)[0] == "success", rank0[-3000:]

    assert "submitted task rank 0/2" in rank0 and "this job is preempted" in rank0
    requeued = re.search(rf"requeues run sub from {re.escape(str(checkpoint))} \(step (\d+)\)", rank0)
    assert requeued, rank0[-3000:]
    step = int(requeued.group(1))
    first, second = rank0.split(f"ocp_deq: restored from {checkpoint}: step {step},")
    # every step ran once: the first attempt up to the saved step, the requeued one after it
    assert sorted(training_steps(first)) == list(range(1, step + 1))
    assert sorted(training_steps(second)) == list(range(step + 1, STEPS + 1))
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert final["step"] == STEPS
    assert {int(state["step"]) for state in final["optimizer"]["state"].values()} == {STEPS}
    assert final["scheduler"]["last_epoch"] == STEPS - 1
