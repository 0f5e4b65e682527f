"""Fixed-point reuse: cache rules, warm starts along trajectories, relaxations, ASE calculator,
trajectory-ordered evaluation. Uses the tiny DEQ the test session trains (conftest)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms, units
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE, LBFGS

from conftest import run_cli
from ocp_deq.calculator import DEQCalculator
from ocp_deq.data import read_lmdb, write_lmdb
from ocp_deq.data.ordering import OrderingError, frame_ids, trajectory_batches
from ocp_deq.deq.reuse import FixedPointCache
from ocp_deq.deq.settings import DEQConfigError, DEQSettings, ReuseSettings
from ocp_deq.trainers.solver_report import summarise_solver_log

TOL = 1e-2  # the toy config's eval / warm-start relative tolerance


# -- the cache's rules ------------------------------------------------------------------
def test_cache_starts_only_the_same_system_and_stays_bounded():
    cache = FixedPointCache(ReuseSettings(max_systems=2))
    numbers = torch.tensor([1, 8, 8])
    z = torch.randn(3, 9, 4)
    assert cache.start("a", numbers) is None  # never seen: cold
    cache.store("a", numbers, z)
    assert torch.equal(cache.start("a", numbers), z)
    assert cache.start("a", torch.tensor([1, 8, 6])) is None  # other elements: cold, entry dropped
    assert cache.start("a", numbers) is None
    cache.store("a", numbers, z)
    assert cache.start("a", numbers[:2]) is None  # other atom count: cold
    for key in "abc":
        cache.store(key, numbers, z)
    assert len(cache) == 2 and cache.start("a", numbers) is None  # least recently used dropped


def test_extrapolated_start_is_linear_in_the_last_two_fixed_points():
    cache = FixedPointCache(ReuseSettings(start="extrapolate"))
    numbers = torch.tensor([6, 8])
    z1, z2 = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    cache.store("m", numbers, z1)
    assert torch.equal(cache.start("m", numbers), z1)  # one state: plain reuse
    cache.store("m", numbers, z2)
    torch.testing.assert_close(cache.start("m", numbers), 2 * z2 - z1)


def test_plain_reuse_keeps_one_state_per_system():
    cache = FixedPointCache(ReuseSettings(start="plain"))
    numbers = torch.tensor([6, 8])
    for _ in range(3):
        cache.store("m", numbers, torch.randn(2, 4, 3))
    assert len(cache._entries["m"].states) == 1


def test_cache_keys_come_from_sid_or_explicit_keys_with_clear_errors():
    from types import SimpleNamespace

    cache = FixedPointCache()
    data = SimpleNamespace(natoms=torch.tensor([2, 3]), sid=torch.tensor([7, 9]))
    assert cache.keys_for(data) == [7, 9]
    with cache.keys(["x", "y"]):
        assert cache.keys_for(data) == ["x", "y"]
    with pytest.raises(ValueError, match="appears twice"):
        cache.keys_for(SimpleNamespace(natoms=torch.tensor([2, 3]), sid=torch.tensor([7, 7])))
    with pytest.raises(KeyError, match="no 'sid'"):
        cache.keys_for(SimpleNamespace(natoms=torch.tensor([2]), sid=None))


def test_trajectory_batches_walk_trajectories_in_step_and_cover_every_frame_once():
    # three trajectories with shuffled frame order in the dataset
    ids = [(5, 1), (3, 0), (5, 0), (9, 2), (3, 1), (9, 0), (9, 1), (5, 2), (3, 2), (3, 3)]
    batches = trajectory_batches(ids, batch_size=2)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(ids)))
    for batch in batches:
        assert len({ids[i][0] for i in batch}) == len(batch)  # one frame per trajectory
    for sid in (3, 5, 9):
        fids = [ids[i][1] for i in flat if ids[i][0] == sid]
        assert fids == sorted(fids)
    # sids 3 and 5 walk together, then 9
    assert [sorted(ids[i][0] for i in b) for b in batches[:3]] == [[3, 5], [3, 5], [3, 5]]
    ranks = [trajectory_batches(ids, 1, rank, 2) for rank in range(2)]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(len(ids)))


def test_ordering_needs_fid():
    from types import SimpleNamespace

    with pytest.raises(OrderingError, match="frame 1 has no fid"):
        frame_ids([SimpleNamespace(sid=1, fid=0), SimpleNamespace(sid=1, fid=None)], "val")


# -- the model with a cache ---------------------------------------------------------------
@pytest.fixture(scope="module")
def calculator(trained_deq):
    *_, checkpoint = trained_deq
    return DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0)


@pytest.fixture(scope="module")
def cold_calculator(trained_deq):
    *_, checkpoint = trained_deq
    return DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, reuse=False)


def slab(toy_root, index: int = 0, rattle: float = 0.0) -> Atoms:
    frame = read_lmdb(toy_root / "relax")[index]
    atoms = Atoms(numbers=frame.atomic_numbers.long().numpy(), positions=frame.pos.numpy(),
                  cell=frame.cell[0].numpy(), pbc=True)
    atoms.set_constraint(FixAtoms(mask=frame.fixed.bool().numpy()))
    if rattle:
        atoms.rattle(rattle, seed=index)
    return atoms


def run_md(atoms, calc, steps: int, dt_fs: float = 1.0):
    """VelocityVerlet at 600 K: positions, energies, forces and solver stats per step."""
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, dt_fs * units.fs)
    record = []
    dyn.attach(lambda: record.append((atoms.get_positions().copy(), atoms.get_potential_energy(),
                                      atoms.get_forces().copy(), calc.last_nstep[0], calc.last_warm[0])))
    dyn.run(steps)
    return record


def test_reuse_along_md_lowers_iterations_and_stays_close_to_a_tight_solve(calculator, cold_calculator, trained_deq, toy_root):
    """Warm and cold solves both stop at relative residual 1e-2, so neither is exact: measure
    both against a ten times tighter cold solve. A warm start accepted at its first check
    sits closer to the tolerance than a cold solve's last step (measured here: mean error
    ~2% warm, ~0.6% cold): the bound is 5% mean, 15% worst frame."""
    *_, checkpoint = trained_deq
    tight = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, reuse=False)
    tight.model.backbone.deq_settings.eval_solver.tol = TOL / 10
    tight.model.backbone.deq_settings.eval_solver.max_iter = 120
    calculator.reset_fixed_point()
    record = run_md(slab(toy_root), calculator, steps=8)
    assert [r[4] for r in record] == [False] + [True] * (len(record) - 1)  # only the first call is cold
    cold_nstep, warm_error, cold_error = [], [], []
    for positions, _, forces, _, _ in record[1:]:
        reference, cold = [], []
        for calc, out in ((tight, reference), (cold_calculator, cold)):
            atoms = slab(toy_root)
            atoms.set_positions(positions)
            atoms.calc = calc
            out.append(atoms.get_forces())
        cold_nstep.append(cold_calculator.last_nstep[0])
        scale = np.linalg.norm(reference[0])
        warm_error.append(np.linalg.norm(forces - reference[0]) / scale)
        cold_error.append(np.linalg.norm(cold[0] - reference[0]) / scale)
    warm_nstep = [r[3] for r in record[1:]]
    # cold solves take ~4 evaluations; a warm one at least 1 (the residual check)
    assert np.mean(warm_nstep) < 0.75 * np.mean(cold_nstep), (warm_nstep, cold_nstep)
    assert np.mean(warm_error) < 0.05 and np.max(warm_error) < 0.15, (warm_error, cold_error)
    assert np.mean(cold_error) < 0.05, cold_error


def test_two_systems_interleaved_each_reuse_their_own_fixed_point(trained_deq, toy_root):
    *_, checkpoint = trained_deq
    shared = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0)
    model = shared.model
    a, b = slab(toy_root, 0), slab(toy_root, 1)
    cache = FixedPointCache(model.backbone.deq_settings.reuse)

    def call(atoms, key):
        atoms.calc = None
        with model.reusing(cache), cache.keys([key]):
            shared.trainer.predict(_batch(shared, atoms), per_image=False, disable_tqdm=True)
        return cache.last

    first_a, first_b = call(a, "A"), call(b, "B")
    assert not first_a["warm"].item() and not first_b["warm"].item()
    fixed_a = cache.start("A", torch.as_tensor(a.numbers)).clone()
    a.positions += 0.002
    b.positions -= 0.002
    again_a, again_b = call(a, "A"), call(b, "B")
    assert again_a["warm"].item() and again_b["warm"].item()
    assert again_a["deq_nstep"].item() < first_a["deq_nstep"].item()
    # A's entry was started from A's own state: it moved only slightly
    moved = (cache.start("A", torch.as_tensor(a.numbers)) - fixed_a).norm() / fixed_a.norm()
    assert moved < 0.05
    # same key, other elements: cold
    c = slab(toy_root, 0)
    c.numbers[-1] = 7 if c.numbers[-1] != 7 else 6
    assert not call(c, "A")["warm"].item()


def _batch(calc, atoms):
    from fairchem.core.datasets.lmdb_dataset import data_list_collater

    return data_list_collater([calc.a2g.convert(atoms)], otf_graph=True)


def test_mixed_batch_of_warm_and_cold_graphs_equals_separate_solves(calculator, toy_root):
    """A batch where one system is warm and one cold is split, solved with the right solver
    each, and put back in order."""
    from fairchem.core.datasets.lmdb_dataset import data_list_collater

    model = calculator.model.eval()
    frames = read_lmdb(toy_root / "relax")[:2]
    cache = FixedPointCache(model.backbone.deq_settings.reuse)
    with torch.no_grad(), model.reusing(cache):
        torch.manual_seed(0)
        alone = model(data_list_collater([frames[0]], otf_graph=True))  # warms sid of frame 0
        torch.manual_seed(0)
        both = model(data_list_collater(frames, otf_graph=True))
    assert cache.last["warm"].tolist() == [True, False]
    with torch.no_grad():
        torch.manual_seed(0)
        cold_second = model(data_list_collater([frames[1]], otf_graph=True), reuse=False)
    n0 = int(frames[0].natoms)
    torch.testing.assert_close(both["forces"][n0:], cold_second["forces"], rtol=0, atol=1e-3)
    assert both["deq_nstep"][1] == cold_second["deq_nstep"][0]
    rel = (both["forces"][:n0] - alone["forces"]).norm() / alone["forces"].norm()
    assert rel < 5 * TOL


# -- loose warm solves, refined near an optimiser's stop ------------------------------------
LOOSE = 0.3  # a warm tolerance far looser than eval_solver's, so refining visibly changes the solve


def _loose_calculator(checkpoint, refine_fmax: float) -> DEQCalculator:
    calc = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, refine_fmax=refine_fmax)
    settings = calc.model.backbone.deq_settings
    assert settings.reuse.refine_fmax == refine_fmax
    settings.reuse.solver = dataclasses.replace(settings.eval_solver, tol=LOOSE)
    return calc


def test_refine_picks_warm_graphs_whose_free_atoms_feel_small_forces_in_ev_per_a(trained_deq):
    from types import SimpleNamespace

    *_, checkpoint = trained_deq
    model = _loose_calculator(checkpoint, refine_fmax=0.2).model
    data = SimpleNamespace(natoms=torch.tensor([2, 2, 1]), batch=torch.tensor([0, 0, 1, 1, 2]),
                           fixed=torch.tensor([0, 1, 0, 0, 0]))
    out = {"forces": torch.tensor([[0.1, 0, 0], [5, 0, 0], [0, 0.1, 0], [0, 0.3, 0], [0, 0, 0.01]]),
           "deq_warm": torch.tensor([True, True, False])}
    # graph 0: its large force is on a fixed atom; graph 1: 0.3 > 0.2; graph 2: started cold
    assert model._to_refine(data, out).tolist() == [True, False, False]
    model.force_denorm = lambda forces: 0.5 * forces  # the trainer's normaliser: model units -> eV/A
    assert model._to_refine(data, out).tolist() == [True, True, False]
    model.force_denorm = None
    model.backbone.deq_settings.reuse.refine_fmax = 0.0
    assert model._to_refine(data, out) is None  # off
    model.backbone.deq_settings.reuse.refine_fmax = 0.2
    model.backbone.deq_settings.reuse.solver = None
    assert model._to_refine(data, out) is None  # warm solves already use eval_solver: nothing to refine
    model.backbone.deq_settings.reuse.solver = dataclasses.replace(model.backbone.deq_settings.eval_solver, tol=LOOSE)
    model.backbone.deq_settings.reuse.refine_fmax = None
    assert model._to_refine(data, out) is None  # null: off outside run-relaxations
    assert DEQSettings.from_config(None).reuse.refine_fmax is None
    for bad in (-1, "0.05", True):
        with pytest.raises(DEQConfigError, match="model.deq.reuse.refine_fmax must be null or a number >= 0"):
            DEQSettings.from_config({"reuse": {"refine_fmax": bad}})
    with pytest.raises(DEQConfigError, match=r"DEQCalculator.refine_fmax must be null or a number >= 0 \(0 turns it off\), got -0.1"):
        DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, refine_fmax=-0.1)


def test_run_relaxations_refines_at_the_relaxation_fmax_unless_set(trained_deq):
    """refine_fmax null: the trainer refines at fairchem's task.relaxation_fmax (default
    0.02) during run-relaxations only; a configured value (0 = off included) is kept."""
    *_, checkpoint = trained_deq
    trainer = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0).trainer
    reuse = trainer.deq_settings.reuse
    assert reuse.refine_fmax is None
    for task, expected in (({}, 0.02), ({"relaxation_fmax": 0.05}, 0.05)):
        trainer.config["task"] = {k: v for k, v in trainer.config["task"].items() if k != "relaxation_fmax"} | task
        with trainer._refining_at_relaxation_fmax():
            assert reuse.refine_fmax == expected
        assert reuse.refine_fmax is None
    for configured in (0.0, 0.1):
        reuse.refine_fmax = configured
        with trainer._refining_at_relaxation_fmax():
            assert reuse.refine_fmax == configured
    log = [{"sid": [1, 2], "nstep": [4, 4], "converged": [True, True], "refined": [False, False]},
           {"sid": [1, 2], "nstep": [3, 1], "converged": [True, True], "refined": [True, False]},
           {"sid": [1], "nstep": [1], "converged": [True]}]  # a call without refinement statistics
    assert summarise_solver_log(log, 1.0)["refined_solves"] == 1


def test_refined_graph_equals_an_eval_solve_from_its_loose_fixed_point(trained_deq, toy_root):
    """Graph 1 warm and refined, graph 0 cold in one batch: graph 1 is what a loose solve from
    its old fixed point followed by an eval_solver solve from there give (evaluations added),
    graph 0 what a cold solve alone gives; the cache keeps graph 1's refined fixed point. The
    batch was forwarded before, as in fairchem's batched relaxations (whose graph code
    reshapes its pbc in place)."""
    from fairchem.core.datasets.lmdb_dataset import data_list_collater

    *_, checkpoint = trained_deq
    model = _loose_calculator(checkpoint, refine_fmax=1e6).model.eval()
    settings = model.backbone.deq_settings
    frames = read_lmdb(toy_root / "relax")[:2]
    moved = [frame.clone() for frame in frames]
    for frame in moved:
        frame.pos[~frame.fixed.bool()] += 0.02
    n0 = int(frames[0].natoms)
    cache = FixedPointCache(settings.reuse)
    with torch.no_grad():
        with model.reusing(cache):
            model(data_list_collater([frames[1]], otf_graph=True))  # warms graph 1's sid only
            previous = cache.start(cache.last["keys"][0], frames[1].atomic_numbers.long()).clone()
            batch = data_list_collater(moved, otf_graph=True)
            model(batch, reuse=False)  # fairchem's relaxations forward one Batch object at every step
            torch.manual_seed(0)
            both = model(batch)
        assert both["deq_refined"].tolist() == [False, True] and cache.last["warm"].tolist() == [False, True]
        torch.manual_seed(0)
        loose = model(data_list_collater([moved[1]], otf_graph=True), z0=previous, solver=settings.reuse.solver)
        refined = model(data_list_collater([moved[1]], otf_graph=True), z0=loose["fixed_point"],
                        solver=settings.eval_solver)
        cold = model(data_list_collater([moved[0]], otf_graph=True), reuse=False)
    assert loose["deq_residual"][0] > refined["deq_residual"][0]  # the refinement did tighten the solve
    torch.testing.assert_close(both["forces"][n0:], refined["forces"], rtol=0, atol=1e-3)
    torch.testing.assert_close(both["energy"][1], refined["energy"][0], rtol=0, atol=1e-3)
    assert both["deq_nstep"][1] == loose["deq_nstep"][0] + refined["deq_nstep"][0]
    torch.testing.assert_close(both["forces"][:n0], cold["forces"], rtol=0, atol=1e-3)
    assert both["deq_nstep"][0] == cold["deq_nstep"][0]
    stored = cache.start(cache.last["keys"][1], frames[1].atomic_numbers.long())
    assert torch.equal(stored, both["fixed_point"][n0:])
    assert cache.last["deq_nstep"][1] == both["deq_nstep"][1]


def test_bfgs_stops_only_on_refined_forces(trained_deq, toy_root):
    """refine_fmax = the optimiser's fmax: loose warm solves serve the path, and the forces
    BFGS stops on come from a solve to eval_solver's tolerance (refine_fmax in eV/A: the
    calculator's trainer maps the model's normalised forces)."""
    *_, checkpoint = trained_deq
    atoms = slab(toy_root, 0, rattle=0.03)
    probe = DEQCalculator(checkpoint_path=checkpoint, cpu=True, seed=0, reuse=False)
    atoms.calc = probe
    fmax = 0.8 * float(np.sqrt((atoms.get_forces() ** 2).sum(1).max()))  # the tiny model relaxes little
    calc = _loose_calculator(checkpoint, refine_fmax=fmax)
    atoms.calc = calc
    refined, warm = [], []
    optimiser = BFGS(atoms, logfile=None, maxstep=0.04)
    optimiser.attach(lambda: (refined.append(calc.last_refined[0]), warm.append(calc.last_warm[0])))
    assert optimiser.run(fmax=fmax, steps=40)
    assert refined[-1] and calc.last_residual[0] < TOL
    assert warm[1:] == [True] * (len(warm) - 1) and not all(refined[1:])  # loose solves did serve the path
    assert np.sqrt((atoms.get_forces() ** 2).sum(1).max()) < fmax


def test_calculator_drives_ase_optimisers_and_md_and_resets_on_identity_change(calculator, toy_root):
    atoms = slab(toy_root, 0, rattle=0.03)
    atoms.calc = calculator
    fmax0 = np.abs(atoms.get_forces()).max()
    BFGS(atoms, logfile=None, maxstep=0.04).run(fmax=0.0, steps=8)
    assert calculator.last_warm == [True] and calculator.last_converged == [True]
    assert np.abs(atoms.get_forces()).max() < fmax0
    for optimiser in (LBFGS(atoms, logfile=None, maxstep=0.04), FIRE(atoms, logfile=None, maxstep=0.04)):
        optimiser.run(fmax=0.0, steps=3)
        assert calculator.last_warm == [True] and calculator.last_converged == [True]
    Langevin(atoms, 1.0 * units.fs, temperature_K=300, friction=0.02, rng=np.random.default_rng(1)).run(5)
    assert calculator.last_warm == [True] and calculator.last_residual[0] < TOL
    VelocityVerlet(atoms, 1.0 * units.fs).run(3)
    assert calculator.last_warm == [True] and calculator.last_residual[0] < TOL
    other = slab(toy_root, 1)
    other.calc = calculator
    other.get_potential_energy()
    if len(other) == len(atoms) and (other.numbers == atoms.numbers).all():
        pytest.skip("toy relax systems 0 and 1 have the same composition")
    assert calculator.last_warm == [False]  # new identity: cold start


# -- through the CLI ------------------------------------------------------------------------
@pytest.mark.parametrize("force_mode", ["direct", "conservative"])
def test_run_relaxations_warm_starts_and_writes_outputs(trained_deq, force_mode):
    work, config, _, checkpoint = trained_deq
    run_dir = work / f"relax_{force_mode}"
    run_cli("--mode", "run-relaxations", "--config-yml", config, "--cpu", "--checkpoint", checkpoint,
            "--run-dir", run_dir, "--identifier", "r", f"model.force_mode={force_mode}",
            "task.relaxation_steps=6", "task.relaxation_fmax=0.0", cwd=work)
    [results] = list((run_dir / "results").glob("*"))
    positions = np.load(results / "relaxed_positions.npz")
    assert {"ids", "pos", "chunk_idx"} <= set(positions.files)
    report = json.loads((results / "solver_relaxations.json").read_text())
    assert report["reuse"] and report["systems"] == len(positions["ids"])
    assert report["mean_nstep_later_calls"] < report["mean_nstep_first_call"]
    assert report["wall_time_per_system_s"] > 0
    assert report["refined_solves"] == 0  # warm solves use eval_solver: nothing to refine


def test_ordered_validation_reports_reuse_and_cold(trained_deq):
    work, config, _, checkpoint = trained_deq
    run_dir = work / "ordered"
    proc = run_cli("--mode", "validate", "--config-yml", config, "--cpu", "--checkpoint", checkpoint,
                   "--run-dir", run_dir, "--identifier", "o", "task.ordered_evaluation=compare", cwd=work)
    [results] = list((run_dir / "results").glob("*"))
    warm = json.loads((results / "solver_ordered_val.json").read_text())
    cold = json.loads((results / "solver_ordered_val_cold.json").read_text())
    assert warm["reuse"] and not cold["reuse"]
    assert warm["graph_evaluations"] == cold["graph_evaluations"] == len(read_lmdb(_val_src(config)))
    assert warm["mean_nstep_later_calls"] < cold["mean_nstep_later_calls"]
    log = proc.stdout + proc.stderr
    maes = [float(m) for m in re.findall(r"forces_mae: ([0-9.]+)", log)]
    assert len(maes) >= 2 and abs(maes[-1] - maes[-2]) < 0.05 * maes[-1], maes


def _val_src(config):
    return yaml.safe_load(open(config))["dataset"]["val"]["src"]


def test_ordered_validation_when_val_and_test_share_a_split(trained_deq):
    """Evaluating on labelled test frames (molecules) points dataset.val.src at the split the
    config also opens as dataset.test: both share one LMDB (py-lmdb refuses a second open).
    The toy S2EF test split has no labels, so here the test split points at the val split.
    ``true`` on the command line is the string "true"."""
    work, config, _, checkpoint = trained_deq
    val_src = _val_src(config)
    run_dir = work / "ordered_shared"
    run_cli("--mode", "validate", "--config-yml", config, "--cpu", "--checkpoint", checkpoint,
            "--run-dir", run_dir, "--identifier", "os", "task.ordered_evaluation=true",
            f"dataset.test.src={val_src}", cwd=work)
    [results] = list((run_dir / "results").glob("*"))
    report = json.loads((results / "solver_ordered_val.json").read_text())
    assert report["reuse"] and report["graph_evaluations"] == len(read_lmdb(val_src))
    assert not (results / "solver_ordered_val_cold.json").exists()


def test_calculator_refuses_structures_the_model_cannot_describe(cold_calculator, toy_root):
    """Overlapping atoms, a NaN coordinate and a lone atom: a clear error, not NaNs."""
    from ocp_deq.models.deq_equiformer_v2 import InvalidStructureError

    overlapping = slab(toy_root)
    positions = overlapping.get_positions()
    positions[1] = positions[0]
    overlapping.set_positions(positions, apply_constraint=False)
    nan = slab(toy_root)
    positions = nan.get_positions()
    positions[2, 0] = np.nan
    nan.set_positions(positions, apply_constraint=False)
    lone = Atoms("Cu", positions=[[0, 0, 0]], cell=[30, 30, 30], pbc=True)
    for atoms, message in ((overlapping, "overlapping"), (nan, "non-finite atom positions"),
                           (lone, "no pair of atoms within max_radius")):
        atoms.calc = cold_calculator
        with pytest.raises(InvalidStructureError, match=message):
            atoms.get_potential_energy()


def test_periodic_converted_data_works_wherever_the_toy_data_does(trained_deq, toy_root, tmp_path):
    """A user's periodic trajectory (a toy slab's frames as an ASE .traj), converted by the
    converter script: ordered validation with its cold comparison, run-relaxations and
    predict all run on it, as on the toy data."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from conftest import load_script

    work, config, _, checkpoint = trained_deq
    frames = read_lmdb(toy_root / "train")
    frames = [f for f in frames if f.sid == frames[0].sid]
    images = []
    for frame in frames:
        atoms = Atoms(numbers=frame.atomic_numbers.long().numpy(), positions=frame.pos.numpy(),
                      cell=frame.cell[0].numpy(), pbc=True, tags=frame.tags.numpy())
        atoms.set_constraint(FixAtoms(mask=frame.fixed.bool().numpy()))
        atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces.numpy())
        images.append(atoms)
    ase.io.write(tmp_path / "slab.traj", images)
    out = tmp_path / "converted"
    assert load_script("convert_trajectory").main([str(tmp_path / "slab.traj"), "-o", str(out), "--split", "ordered",
                                                    "--train", "2", "--val", "4", "--test", "2"]) == 0
    assert read_lmdb(out / "val")[0].pbc.tolist() == [[True, True, True]]
    # relax: one initial structure (fairchem writes one relaxation per sid); py-lmdb opens a file once per process
    write_lmdb(tmp_path / "relax" / "data.lmdb", read_lmdb(out / "test")[:1])
    sources = [f"dataset.val.src={out / 'val'}", f"dataset.test.src={out / 'test'}", f"dataset.relax.src={tmp_path / 'relax'}"]
    run = tmp_path / "run"
    # a one-evaluation warm solver: graphs it leaves unconverged go through the fallback solve
    proc = run_cli("--mode", "validate", "--config-yml", config, "--cpu", "--checkpoint", checkpoint,
                   "--run-dir", run, "--identifier", "o", "task.ordered_evaluation=compare",
                   "model.deq.reuse.solver.max_iter=1", *sources, cwd=work)
    [results] = list((run / "results").glob("*-o"))
    warm = json.loads((results / "solver_ordered_val.json").read_text())
    cold = json.loads((results / "solver_ordered_val_cold.json").read_text())
    assert warm["reuse"] and warm["graph_evaluations"] == cold["graph_evaluations"] == 4 and warm["systems"] == 1
    maes = [float(m) for m in re.findall(r"forces_mae: ([0-9.]+)", proc.stdout + proc.stderr)]
    assert len(maes) >= 2 and abs(maes[-1] - maes[-2]) < 0.05 * maes[-1], maes
    run_cli("--mode", "run-relaxations", "--config-yml", config, "--cpu", "--checkpoint", checkpoint, "--run-dir", run,
            "--identifier", "r", "task.relaxation_steps=3", "task.relaxation_fmax=0.0", *sources, cwd=work)
    [results] = list((run / "results").glob("*-r"))
    assert np.load(results / "relaxed_positions.npz")["ids"].tolist() == ["0"]
    run_cli("--mode", "predict", "--config-yml", config, "--cpu", "--checkpoint", checkpoint, "--run-dir", run,
            "--identifier", "p", *sources, cwd=work)
    [predictions] = list((run / "results").glob("*-p/*predictions.npz"))
    forces = np.load(predictions)["forces"]
    free = sum(int((f.fixed == 0).sum()) for f in read_lmdb(out / "test"))  # fairchem writes free atoms only
    assert forces.shape == (free, 3) and np.isfinite(forces).all()


def test_relax_frames_sharing_a_sid_are_refused_before_relaxing(toy_root):
    """fairchem writes one relaxation per sid: several initial structures from one trajectory
    (one sid) would lose all results but one."""
    from types import SimpleNamespace

    from ocp_deq.trainers.deq_trainer import DEQTrainer

    frames = read_lmdb(toy_root / "train")[:3]
    trainer = SimpleNamespace(relax_dataset=frames, config={"dataset": {"relax": {"src": "somewhere"}}})
    with pytest.raises(ValueError, match=r"dataset.relax \(somewhere\): 1 sid\(s\) shared by several frames "
                                         rf"\(sid {frames[0].sid}: 3 frames\)"):
        DEQTrainer._check_relaxation_ids(trainer)
    trainer.relax_dataset = read_lmdb(toy_root / "relax")
    DEQTrainer._check_relaxation_ids(trainer)  # one frame per sid: fine
