"""scripts/benchmark_reuse.py end to end on the test suite's trained DEQ, at a few steps:
sane JSON (warm starts cost fewer solver evaluations), the table and the plot."""

from __future__ import annotations

import json

import pytest

from conftest import load_script


def explicit_checkpoint(deq_checkpoint, path, layers: int = 2):
    """An (untrained) explicit EquiformerV2 of the DEQ's width, in the DEQ run's checkpoint
    layout: what fairchem's OCPCalculator loads for the baseline."""
    import torch
    from fairchem.core.common.registry import registry

    checkpoint = torch.load(deq_checkpoint, map_location="cpu", weights_only=True)
    model = {k: v for k, v in checkpoint["config"]["model"].items() if k not in ("deq", "force_mode", "force_head")}
    model.update(name="equiformer_v2", num_layers=layers)
    torch.manual_seed(0)
    explicit = registry.get_model_class("equiformer_v2")(**{k: v for k, v in model.items() if k != "name"})
    for key in ("optimizer", "ema", "scheduler"):
        checkpoint.pop(key, None)
    checkpoint["state_dict"] = {f"module.{k}": v for k, v in explicit.state_dict().items()}
    checkpoint["config"] = {**checkpoint["config"], "model": model}
    torch.save(checkpoint, path)
    return path


def test_benchmark_reports_cold_reuse_extrapolate_and_baseline(trained_deq, toy_root, tmp_path, capsys, monkeypatch):
    work, _, _, checkpoint = trained_deq
    explicit = explicit_checkpoint(checkpoint, tmp_path / "explicit.pt")
    # each checkpoint must hold the model its flag names (checked first: in this process)
    with pytest.raises(SystemExit) as wrong:
        load_script("benchmark_reuse").main(["--checkpoint", str(checkpoint), "--explicit-checkpoint", str(checkpoint)])
    assert wrong.value.code == 2
    assert "holds a 'deq_equiformer_v2' model; expected one of ('equiformer_v2'" in capsys.readouterr().err
    monkeypatch.chdir(work)
    load_script("benchmark_reuse").main(  # in this process: no second start-up of torch and fairchem
        ["--checkpoint", str(checkpoint), "--explicit-checkpoint", str(explicit), "--data", str(toy_root),
         "--relax-systems", "2", "--relax-steps", "3", "--md-steps", "5", "--warm-tol", "0.05", "--repeats", "2",
         "--supercell", "2,1,1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "reuse.json").read_text())
    assert set(result["md"]) == set(result["relaxations"]) == {"cold", "reuse", "extrapolate", "reuse, warm tol 0.05",
                                                                   "reuse, 1 evaluation (cost floor)", "explicit",
                                                                   "explicit, no autograd"}
    md = result["md"]
    assert md["reuse"]["mean_nstep_first"] == md["cold"]["mean_nstep_first"]  # the first call is cold
    assert md["reuse"]["mean_nstep_per_step"] < md["cold"]["mean_nstep_per_step"]
    assert "mean_nstep_per_step" not in md["explicit"] and md["explicit"]["wall_time_per_step_s"] > 0
    assert result["relaxations"]["cold"]["runs"] == 2 and md["cold"]["steps"] == 6
    assert result["supercell"] == [2, 1, 1] and result["atoms"] == [2 * 13, 2 * 13]  # toy slabs: 13 atoms
    for name, part in md.items():  # round robin: every configuration timed in each repeat, the median reported
        assert part["repeats"] == 2 and len(part["wall_time_per_step_s_each_repeat"]) == 2
        assert min(part["wall_time_per_step_s_each_repeat"]) <= part["wall_time_per_step_s"] \
            <= max(part["wall_time_per_step_s_each_repeat"])
    assert set(result["step_ratio_to_explicit"]) == set(md) - {"explicit", "explicit, no autograd"}
    assert set(result["step_ratio_to_explicit_no_autograd"]) == set(result["step_ratio_to_explicit"])
    # the untrained explicit baseline's relaxations stop at their first call (forces below fmax):
    # no step to time, so no relaxation ratio (None, '-' in the table), never NaN
    assert result["relaxations"]["explicit"]["steps"] == 2 and result["relaxations"]["explicit"]["wall_time_per_step_s"] is None
    assert all(r["relaxations"] is None and r["md"] > 0 for r in result["step_ratio_to_explicit"].values())
    assert "NaN" not in (tmp_path / "reuse.json").read_text() and "nan" not in (tmp_path / "reuse.md").read_text()
    assert max(result["explicit_no_autograd_max_abs_diff"].values()) <= 1e-4  # same predictions, less work
    # the breakdown times the blocks: a cold DEQ step runs its one block once per evaluation, the
    # one-evaluation step once, the 2-block explicit model twice
    parts = {name: b["ms_per_step"] for name, b in result["breakdown_md"].items()}
    assert set(parts) == {"cold", "reuse, 1 evaluation (cost floor)", "explicit",
                                                                   "explicit, no autograd"}
    assert all(ms > 0 for part in parts.values() for ms in part.values())
    calls = {name: b["calls_per_step"]["blocks"] for name, b in result["breakdown_md"].items()}
    assert calls["explicit"] == calls["explicit, no autograd"] == 2.0
    assert calls["cold"] > calls["reuse, 1 evaluation (cost floor)"] >= 1.0
    assert len(result["md_nstep_trace"]["reuse"]) == 6
    assert result["checkpoints"]["deq"] == {"path": str(checkpoint), "model": "deq_equiformer_v2", "num_layers": 1,
                                            "force_head": "attention", "reuse_refine_fmax": None}
    assert result["warm_tol_refine_fmax"] == 0.03  # the warm-tol run refines at BFGS's --fmax by default
    assert result["checkpoints"]["explicit"] == {"path": str(explicit), "model": "equiformer_v2", "num_layers": 2,
                                                 "force_head": "attention"}
    diff = result["reuse_vs_cold"]
    assert diff["frames"] == 5 and diff["mean_relative_force"] < 0.25  # same model, solves to the same tolerance
    assert diff["warm_tol"] == 0.01 and result["reuse_vs_cold_warm_tol"]["warm_tol"] == 0.05
    assert md["reuse, 1 evaluation (cost floor)"]["mean_nstep_per_step"] == 1.0
    assert result["relaxations"]["reuse, 1 evaluation (cost floor)"]["refined_fraction"] == 0.0  # never refined
    assert result["relaxations"]["reuse"]["refined_fraction"] == 0.0  # warm solves at eval tolerance: nothing to refine
    assert md["reuse, warm tol 0.05"]["mean_nstep_first"] == md["cold"]["mean_nstep_first"]  # cold first call
    # relaxation endpoints re-evaluated cold: the cold run's own last energies come back (the
    # final positions, not the first), every DEQ configuration is judged
    ends = result["relaxation_endpoints"]
    assert set(ends) == set(md) - {"explicit", "explicit, no autograd"}
    assert all(len(e["steps"]) == 2 and 1 <= min(e["steps"]) and max(e["steps"]) <= 3 for e in ends.values())
    assert all(0 <= r <= s for e in ends.values() for r, s in zip(e["refined_steps"], e["steps"]))
    for own, cold in zip(ends["cold"]["own_last_energy_eV"], ends["cold"]["cold_energy_eV"]):
        assert abs(own - cold) < 1e-3
    assert max(ends["reuse, 1 evaluation (cost floor)"]["cold_fmax_eV_per_A"]) > 0  # real forces, not a default
    table = (tmp_path / "reuse.md").read_text()
    assert "Relaxation endpoints judged by cold solves" in table
    assert "| DEQ reuse |" in table and "DEQ reuse, warm tol 0.05 step / explicit step" in table
    assert "| explicit EquiformerV2 (2 blocks), no autograd, banded Gaussians | - | - |" in table
    assert "median of 2 round-robin repeats" in table and "| force head |" in table
    assert "Reuse (warm tol 0.05) vs cold" in table and "Reuse (warm tol 0.01) vs cold" in table
    assert "| DEQ reuse |" in table and "| explicit EquiformerV2 (2 blocks) | - | - |" in table
    assert (tmp_path / "reuse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deq_fair_baseline_and_our_trainer_use_the_banded_expansion(trained_deq, tmp_path):
    """The speed comparisons are fair: our trainer (training, the race, DEQCalculator) and the
    benchmark's fair baseline band the Gaussians of explicit models too; fairchem's own
    OCPCalculator (the "explicit" row) stays as fairchem ships it."""
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator
    from fairchem.core.models.scn.smearing import GaussianSmearing

    from ocp_deq.models.distance_expansion import BandedGaussianSmearing

    _, _, _, checkpoint = trained_deq
    explicit = explicit_checkpoint(checkpoint, tmp_path / "explicit.pt")
    bench = load_script("benchmark_reuse")

    def expansions(calc):
        return [type(m) for m in calc.trainer._unwrapped_model.modules() if isinstance(m, GaussianSmearing)]

    assert expansions(bench.calculator(explicit, bench.EXPLICIT)) == [GaussianSmearing]
    assert expansions(bench.calculator(explicit, bench.EXPLICIT_NO_AUTOGRAD)) == [BandedGaussianSmearing]
    assert expansions(OCPCalculator(checkpoint_path=str(explicit), cpu=True, seed=0, trainer="deq")) == [BandedGaussianSmearing]
    assert expansions(bench.calculator(checkpoint, None)) == [BandedGaussianSmearing]
