"""scripts/benchmark_reuse.py end to end on the test suite's trained DEQ, at a few steps:
sane JSON (warm starts cost fewer solver evaluations), the table and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_reports_cold_reuse_extrapolate_and_baseline(trained_deq, toy_root, tmp_path):
    work, _, _, checkpoint = trained_deq
    # the baseline path only needs a checkpoint fairchem's OCPCalculator loads; the DEQ's will do
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_reuse.py"), "--checkpoint", str(checkpoint),
         "--explicit-checkpoint", str(checkpoint), "--data", str(toy_root), "--relax-systems", "2",
         "--relax-steps", "4", "--md-steps", "12", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "reuse.json").read_text())
    assert set(result["md"]) == set(result["relaxations"]) == {"cold", "reuse", "extrapolate", "explicit"}
    md = result["md"]
    assert md["reuse"]["mean_nstep_first"] == md["cold"]["mean_nstep_first"]  # the first call is cold
    assert md["reuse"]["mean_nstep_per_step"] < md["cold"]["mean_nstep_per_step"]
    assert "mean_nstep_per_step" not in md["explicit"] and md["explicit"]["wall_time_per_step_s"] > 0
    assert result["relaxations"]["cold"]["runs"] == 2 and md["cold"]["steps"] == 13
    assert len(result["md_nstep_trace"]["reuse"]) == 13
    diff = result["reuse_vs_cold"]
    assert diff["frames"] == 2 and diff["mean_relative_force"] < 1  # same model, near-equal solves
    table = (tmp_path / "reuse.md").read_text()
    assert "| DEQ reuse |" in table and "| explicit EquiformerV2 (4 blocks) | - | - |" in table
    assert (tmp_path / "reuse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
