"""Two gloo processes (``--cpu --num-gpus 2``) train the DEQ, and their logged training and
validation metrics are global: they match one process seeing the same frames.

Tolerances. Two processes compute the same numbers as one up to two effects:
EquiformerV2 turns each edge frame by a random angle in every forward (the ranks draw
different angles than a single process), and the solver stops each graph at the first
iterate under its tolerance (rel 1e-2 here), so such a perturbation can move a graph's
stopping iteration and its fixed point within that tolerance. Batch composition alone
does not matter: the DEQ is solved per graph. Measured: the MAEs agree to the 3-4 digits
logged, the mean solver evaluations by up to 1.0 (one of 8 graphs reaching max_iter in one
run only). We allow 1e-2 relative for the MAEs and 4 evaluations for the mean (one graph
flipping from ~13 evaluations to max_iter=40 moves the mean of 8 by 3.4). A rank-local
log fails this (checked by disabling the all-reduce: step 1's MAEs are rank 0's 4 frames).
Counts are exact: the validation covers all 8 frames once.
"""

from __future__ import annotations

import json

import pytest
import torch

from cluster_helpers import cluster_config, run_main, small_data, training_steps, validations
from ocp_deq.data import read_lmdb

TRAIN, VAL, BATCH = 16, 8, 4  # two ranks x 4 frames = one step of the 8-frame single process
COMPARED = ("energy_mae", "forces_mae", "deq_nstep")
RTOL, NSTEP_ATOL = 1e-2, 4.0


@pytest.fixture(scope="module")
def runs(toy_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("distributed")
    data = small_data(toy_root, work / "data", TRAIN, VAL)
    config = cluster_config(work, data, "two.yml", batch_size=BATCH, eval_batch_size=BATCH, ema_decay=0.5)
    two = run_main("--mode", "train", "--config-yml", config, "--cpu", "--num-gpus", 2, "--distributed",
                   "--run-dir", work / "two", "--timestamp-id", "two", "--print-every", 1, cwd=work)
    checkpoint = work / "two" / "checkpoints" / "two" / "checkpoint.pt"
    # one process, the same frames per step: the global batch of the two ranks
    reference = cluster_config(work, data, "one.yml", val=False, batch_size=2 * BATCH, ema_decay=0.5)
    one_train = run_main("--mode", "train", "--config-yml", reference, "--cpu", "--run-dir", work / "one",
                         "--timestamp-id", "one", "--print-every", 1, cwd=work)
    one_validate = run_main("--mode", "validate", "--config-yml", config, "--cpu", "--checkpoint", checkpoint,
                            "--run-dir", work / "val", "--timestamp-id", "val", cwd=work)
    return two, checkpoint, one_train, one_validate


def close(a: dict, b: dict) -> bool:
    return all(
        abs(a[key] - b[key]) <= (NSTEP_ATOL if key == "deq_nstep" else RTOL * abs(b[key])) for key in COMPARED
    )


def test_two_processes_train_to_a_checkpoint(runs):
    two, checkpoint, _, _ = runs
    assert "data-parallel over 1 node(s) x 2 process(es) = 2 ranks (gloo)" in two
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["step"] == TRAIN // (2 * BATCH) and state["epoch"] == 1.0
    assert sorted(training_steps(two)) == [1, 2]


def test_training_log_is_global(runs):
    """Each step's console line averages both ranks' graphs: it matches one process that
    sees the same 8 frames in one batch (same seed, same initial weights; step 2 after the
    same averaged gradient), and not rank 0's 4 frames."""
    two, _, one_train, _ = runs
    two_steps, one_steps = training_steps(two), training_steps(one_train)
    for step in (1, 2):
        assert close(two_steps[step], one_steps[step]), (step, two_steps[step], one_steps[step])


def test_validation_matches_one_process_and_counts_every_frame(runs):
    two, _, _, one_validate = runs
    # the two-process run validates after its last step, on the state it saved as checkpoint.pt
    [two_val], [one_val] = validations(two), validations(one_validate)
    assert close(two_val, one_val), (two_val, one_val)
    assert f"DEQ solver: {VAL} graphs on 2 rank(s)" in two
    assert f"DEQ solver: {VAL} graphs on 1 rank(s)" in one_validate


def test_ordered_evaluation_reports_every_ranks_trajectories(runs, tmp_path):
    """Trajectory-ordered validation with reuse on two ranks: each rank walks its own
    trajectories, and the solver report gathers both ranks' systems and frames."""
    _, checkpoint, _, _ = runs
    work = checkpoint.parents[3]
    run_main("--mode", "validate", "--config-yml", work / "two.yml", "--cpu", "--num-gpus", 2, "--distributed",
             "--checkpoint", checkpoint, "--run-dir", tmp_path, "--timestamp-id", "ordered",
             "task.ordered_evaluation=true", cwd=work)
    report = json.loads((tmp_path / "results" / "ordered" / "solver_ordered_val.json").read_text())
    frames = read_lmdb(work / "data" / "val")
    assert report["ranks"] == 2 and report["reuse"]
    assert report["graph_evaluations"] == VAL
    assert report["systems"] == len({int(frame.sid) for frame in frames})
