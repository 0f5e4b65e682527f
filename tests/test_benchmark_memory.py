"""scripts/benchmark_memory.py end to end at a tiny width: one process per configuration,
sane JSON, the table and the plot."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_command


def test_benchmark_measures_each_configuration(tmp_path):
    proc = run_command(REPO / "scripts" / "benchmark_memory.py", "--sizes", "1,2", "--gradients", "phantom",
                       "--model-sizes", "8:2:2", "--batch", "1", "--steps", "1", "--out", tmp_path, cwd=tmp_path,
                       timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[3/3] width 8, lmax 2, mmax 2: phantom, 1 block(s) ..." in proc.stdout  # progress
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert [(r["lmax"], r["mmax"], r["model"], r["gradient"], r["blocks"]) for r in rows] == [
        (2, 2, "equiformer_v2", None, 1), (2, 2, "equiformer_v2", None, 2), (2, 2, "deq_equiformer_v2", "phantom", 1)]
    for row in rows:
        assert row["peak_memory_mb"] > 0 and row["time_per_step_s"] > 0
        assert 60 <= row["atoms"] <= 100 and row["systems"] == 1
    explicit_1, explicit_2, deq = rows
    assert explicit_2["peak_memory_mb"] > explicit_1["peak_memory_mb"]  # activations grow with depth
    assert explicit_1["effective_depth"] == 1 and explicit_1["mean_solver_evals"] is None
    assert deq["mean_solver_evals"] >= 1
    assert deq["effective_depth"] == deq["mean_solver_evals"] * deq["blocks"]
    table = (tmp_path / "memory.md").read_text()
    assert "| width 8, lmax 2, mmax 2 | DEQ phantom, 1 block in f |" in table and "| explicit, 2 blocks |" in table
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_sizes_are_parsed_and_grouped():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_memory", REPO / "scripts" / "benchmark_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_sizes("32:2:2,64:3:2") == [(32, 2, 2), (64, 3, 2)]
    rows = [dict(width=w, lmax=l, mmax=2, gradient=g, blocks=b, peak_memory_mb=m, effective_depth=b, time_per_step_s=1.0,
                 mean_solver_evals=None if g is None else 10.0, max_solver_evals=None if g is None else 12.0,
                 systems=4, atoms=300, device="cpu", threads=1, steps=2)
            for w, l in ((32, 2), (64, 3)) for g, b, m in ((None, 1, 100.0), (None, 8, 330.0), ("ift", 1, 101.0))]
    table = bench.markdown(rows)
    assert "width 64, lmax 3, mmax 2: explicit 8-block peak / DEQ-IFT peak: 3.3x" in table
    assert "width 32, lmax 2, mmax 2: DEQ-IFT peak / explicit 1-block peak: 1.01x" in table
    with pytest.raises(SystemExit):
        bench.parse_sizes("32:2")
