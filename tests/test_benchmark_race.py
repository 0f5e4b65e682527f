"""The race script end to end on tiny models: budgeted training through the CLI, validation on
the training clock, baselines, outputs."""

from __future__ import annotations

import json

import numpy as np

from conftest import REPO, TINY_MODEL, run_command
from ocp_deq.data import read_lmdb

BUDGET, INTERVAL = 5.0, 2.0
CHEAP_DEQ = ["model.deq.train_start.enabled=True", "model.deq.train_solver.max_iter=6",
             "model.deq.eval_solver.max_iter=6", "model.deq.contraction_iters=2",
             # the contraction penalty through the real trainer (its loss and training metric)
             "model.deq.jacobian.weight=1", "model.deq.jacobian.kind=spectral", "model.deq.jacobian.target=0.01"]


def test_race_trains_each_model_for_the_budget_and_records_validations(toy_root, tmp_path):
    overrides = ["toy_data=None", "optim.batch_size=4", "optim.eval_batch_size=4",
                 *(f"dataset.{split}.src={toy_root / split}" for split in ("train", "val", "test", "relax")),
                 *(f"model.{key}={value}" for key, value in TINY_MODEL.items())]
    out = tmp_path / "race"
    command = ["--budget", str(BUDGET),
               "--interval", str(INTERVAL), "--jobs", "2", "--datasets", "s2ef", "--models", "explicit-1",
               "--variant", f"DEQ-warm={','.join(CHEAP_DEQ)}",
               "--work-dir", str(tmp_path / "runs"), "--out", str(out), *(f"--override={o}" for o in overrides)]
    proc = run_command(REPO / "scripts" / "benchmark_race.py", *command, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    part = result["datasets"]["s2ef"]
    assert list(part["models"]) == ["explicit-1", "DEQ-warm"]
    for name, run in part["models"].items():
        validations = run["validations"]
        seconds = [v["train_seconds"] for v in validations]
        assert len(validations) >= 2 and seconds == sorted(seconds), (name, seconds)
        assert seconds[0] >= INTERVAL and seconds[-2] < BUDGET <= seconds[-1], (name, seconds)  # stopped at the budget
        assert [v["step"] for v in validations] == sorted(v["step"] for v in validations)
        assert all(np.isfinite(v["forces_mae"]) and np.isfinite(v["energy_mae"]) for v in validations)
        if name.startswith("DEQ"):
            assert all(0 < v["deq_contraction"] < 10 and v["deq_nstep"] >= 1 for v in validations)
        else:
            assert "deq_nstep" not in validations[-1]
    assert part["models"]["DEQ-warm"]["overrides"] == CHEAP_DEQ
    # baselines: what predicting zero forces / the training mean energy scores on val
    val = read_lmdb(toy_root / "val" / "data.lmdb")
    train = read_lmdb(toy_root / "train" / "data.lmdb")
    zero = np.concatenate([f.forces[f.fixed == 0].numpy() for f in val])
    assert abs(part["baselines"]["zero_forces_mae"] - np.abs(zero).mean()) < 1e-6
    mean_energy = np.mean([float(f.energy) for f in train])
    assert abs(part["baselines"]["mean_energy_mae"] - np.mean([abs(float(f.energy) - mean_energy) for f in val])) < 1e-6
    assert np.isfinite(part["baselines"]["composition_energy_mae"]) and part["baselines"]["composition_energy_mae"] > 0
    assert result["jobs"] == 2 and result["cpu"]
    assert all(run["load_average"]["at_end"] >= 0 for run in part["models"].values())
    table = out.with_suffix(".md").read_text()
    assert "| DEQ-warm |" in table and "| explicit-1 |" in table and out.with_suffix(".png").stat().st_size > 10000
    # --keep: a dataset not rerun is carried over whole, naming the command that measured it
    from conftest import load_script

    load_script("benchmark_race").main(["--keep", "s2ef", "--datasets", "s2ef", "--out", str(out)])
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["datasets"]["s2ef"]["models"] == part["models"]
    assert again["datasets"]["s2ef"]["command"] == result["command"] != again["command"]
    assert "carried over from an earlier run" in out.with_suffix(".md").read_text()
