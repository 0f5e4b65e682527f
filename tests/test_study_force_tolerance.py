"""scripts/study_force_tolerance.py on the test suite's trained DEQ, at a few MD steps: a
tighter tolerance costs evaluations and brings warm, cold and reference forces together."""

from __future__ import annotations

import json

from conftest import load_script


def test_tighter_tolerance_costs_evaluations_and_buys_agreement(trained_deq, toy_root, tmp_path):
    _, _, _, checkpoint = trained_deq
    out = tmp_path / "study"
    load_script("study_force_tolerance").main(
        ["--checkpoint", str(checkpoint), "--data", str(toy_root), "--tols", "0.1,1e-3", "--md-steps", "12",
         "--every", "4", "--out", str(out)])
    result = json.loads((out / "force_tolerance.json").read_text())
    loose, tight = result["runs"]
    assert loose["frames"] == tight["frames"] == 3  # steps 4, 8, 12
    assert tight["mean"]["cold_nstep"] > loose["mean"]["cold_nstep"]
    assert tight["warm_nstep_per_md_step"] > loose["warm_nstep_per_md_step"]
    for key in ("warm_vs_cold", "cold_error", "warm_error"):
        assert tight["mean"][key] < loose["mean"][key], key
    # the residuals are the accepted cold states': the whole state's residual (below tol) is a
    # norm-weighted mean over the degrees, so the smallest is below tol; a small block (l = 1,
    # l = 2) can lag by a few times tol, never by the orders of magnitude of a first iterate
    for run in (loose, tight):
        degrees = run["mean_cold_degree_residuals"]
        assert len(degrees) == 3 and min(degrees) < run["tol"] and max(degrees) < 10 * run["tol"], degrees
    assert "| 0.001 |" in (out / "force_tolerance.md").read_text()
    import ocp_deq.deq.solvers as solvers
    assert solvers._Run.check.__name__ == "check"  # the recording wrapper is gone again
