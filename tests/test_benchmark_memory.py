"""scripts/benchmark_memory.py end to end at a tiny width: one process per configuration,
sane JSON, the table and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_measures_each_configuration(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_memory.py"), "--sizes", "1,2", "--gradients", "phantom",
         "--model-sizes", "8:1:1,8:2:1", "--batch", "1", "--steps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[6/6] width 8, lmax 2, mmax 1: phantom, 1 block(s) ..." in proc.stdout  # progress
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert [(r["lmax"], r["model"], r["gradient"], r["blocks"]) for r in rows] == [
        (lmax, *model) for lmax in (1, 2) for model in
        (("equiformer_v2", None, 1), ("equiformer_v2", None, 2), ("deq_equiformer_v2", "phantom", 1))]
    assert all(r["time_per_step_s"] > 0 and r["mmax"] == 1 for r in rows)
    rows = rows[:3]
    for row in rows:
        assert row["peak_memory_mb"] > 0 and row["time_per_step_s"] > 0
        assert 60 <= row["atoms"] <= 100 and row["systems"] == 1
    explicit_1, explicit_2, deq = rows
    assert explicit_2["peak_memory_mb"] > explicit_1["peak_memory_mb"]  # activations grow with depth
    assert explicit_1["effective_depth"] == 1 and explicit_1["mean_solver_evals"] is None
    assert deq["mean_solver_evals"] >= 1
    assert deq["effective_depth"] == deq["mean_solver_evals"] * deq["blocks"]
    table = (tmp_path / "memory.md").read_text()
    assert "| width 8, lmax 2, mmax 1 | DEQ phantom, 1 block in f |" in table and "| explicit, 2 blocks |" in table
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
