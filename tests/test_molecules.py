"""Molecules: the toy MD generator, the molecule configs, training through the CLI on a
non-periodic set, free-space graphs and rotation equivariance without PBC."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.calculators.emt import EMT
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import load_config
from fairchem.core.datasets import data_list_collater
from scipy.spatial.transform import Rotation

from conftest import REPO, TINY_MODEL, run_cli
from ocp_deq.cli import ConfigError, prepare_data, resolve_config
from ocp_deq.data import read_lmdb
from ocp_deq.data.converters import convert_trajectory
from ocp_deq.data.splits import split_indices
from ocp_deq.data.toy_molecules import MoleculeSpec, ensure_molecule_data, generate_molecule_data, simulate

MOLECULE_CONFIGS = sorted(p for p in (REPO / "configs" / "molecules").rglob("*.yml") if p.name != "base.yml")
TOY_DEQ = REPO / "configs" / "molecules" / "toy" / "deq_equiformer_v2_molecule_toy.yml"
# 60 frames: 40 train / 10 val drawn from the first 50, test = the last 10 consecutive frames
SPEC = dict(seed=2, frames=60, interval=5, equilibration_steps=50, split="overlapping", n_train=40, n_val=10, n_test=10)
CUTOFF = 5.0


@pytest.fixture(scope="module")
def molecule_root(tmp_path_factory) -> Path:
    return generate_molecule_data(tmp_path_factory.mktemp("toy_molecule"), MoleculeSpec(**SPEC))


def model_config(path: Path, **overrides) -> tuple[str, dict]:
    config, _, _ = load_config(str(path))
    model = dict(config["model"])
    name = model.pop("name")
    return name, {**model, **overrides}


def graph_spy(model) -> list:
    """Record every graph the model builds (the backbone's ``generate_graph`` results)."""
    module = getattr(model, "backbone", model)
    graphs, original = [], module.generate_graph

    def generate_graph(*args, **kwargs):
        graphs.append(original(*args, **kwargs))
        return graphs[-1]

    module.generate_graph = generate_graph
    return graphs


# ----------------------------------------------------------------------------- toy data

def test_toy_molecule_is_a_converted_emt_md_trajectory(molecule_root):
    frames = {split: read_lmdb(molecule_root / split) for split in ("train", "val", "test")}
    expected = split_indices(SPEC["frames"], "overlapping", 40, 10, 10, seed=SPEC["seed"])
    for split, data in frames.items():
        assert [d.fid for d in data] == expected[split].tolist(), split
        assert {d.sid for d in data} == {0}
    everything = sorted((d for data in frames.values() for d in data), key=lambda d: d.fid)
    for data in everything:
        assert data.pbc.tolist() == [[False, False, False]] and not data.cell.any()
        assert data.atomic_numbers.tolist() == [6, 6, 8, 1, 1, 1, 1, 1, 1]  # ethanol
        distances = torch.cdist(data.pos, data.pos)
        assert distances.max() < CUTOFF  # still one molecule: every pair within the cutoff
        assert (distances + 9 * torch.eye(9)).min(dim=1).values.max() < 1.8  # no atom left alone
    # labels are EMT's energy and forces at the stored positions
    for data in everything[::15]:
        atoms = Atoms(numbers=data.atomic_numbers.int().numpy(), positions=data.pos.double().numpy(), calculator=EMT())
        assert data.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(data.forces.numpy(), atoms.get_forces(), atol=1e-3)
    # consecutive test frames are consecutive MD snapshots (2.5 fs apart): close, not equal
    steps = [float((b.pos - a.pos).norm(dim=1).max()) for a, b in zip(frames["test"], frames["test"][1:])]
    assert 0.005 < min(steps) and max(steps) < 0.5, steps
    # a rerun with the same spec keeps the data; the trajectory file is what a user would convert
    stamp = (molecule_root / "train" / "data.lmdb").stat().st_mtime_ns
    ensure_molecule_data(molecule_root, MoleculeSpec(**SPEC))
    assert (molecule_root / "train" / "data.lmdb").stat().st_mtime_ns == stamp
    assert np.load(molecule_root / "trajectory.npz")["R"].shape == (SPEC["frames"], 9, 3)


def test_toy_molecule_does_not_depend_on_last_bits(monkeypatch):
    """Another CPU's numpy computes EMT's exponentials to different last bits; the chaotic MD
    would grow that into another trajectory (a 1e-14 A change of the start reaches 1e-10 A in
    these 350 steps and 1e-3 A in 2000). Noise of that size on every force must leave the
    data bit for bit the same."""
    spec = MoleculeSpec(**SPEC)
    clean = simulate(spec)
    noise = np.random.default_rng(0)
    calculate = EMT.calculate

    def last_bit_noise(self, *args, **kwargs):
        calculate(self, *args, **kwargs)
        forces = self.results["forces"]
        self.results["forces"] = forces * (1 + 2e-16 * noise.standard_normal(forces.shape))

    monkeypatch.setattr(EMT, "calculate", last_bit_noise)
    noisy = simulate(spec)
    for key in ("R", "E"):
        assert np.array_equal(clean[key], noisy[key]), key


def test_toy_data_block_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"toy_data: unknown key\(s\) \['temperature'\] for kind 'molecule'"):
        prepare_data({"toy_data": {"kind": "molecule", "root": str(tmp_path), "temperature": 300}})
    with pytest.raises(ConfigError, match="toy_data.kind='protein' must be 's2ef' or 'molecule'"):
        prepare_data({"toy_data": {"kind": "protein", "root": str(tmp_path)}})


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("path", MOLECULE_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_molecule_config_resolves_and_builds_at_its_size(path):
    assert resolve_config(path.name) == path  # the bare name is unique under configs/
    config, _, _ = load_config(str(path))
    energy_weight = 10 if "toy" in path.parts else 1  # the short toy runs weight the energy up
    assert {k: v["coefficient"] for loss in config["loss_functions"] for k, v in loss.items()} == {"energy": energy_weight, "forces": 80}
    assert config["dataset"]["train"]["transforms"]["normalizer"]["fit"]["targets"] == {"energy": {}, "forces": {"mean": 0.0}}
    assert all(config["outputs"][key]["prediction_dtype"] == "float32" for key in ("energy", "forces"))
    name, kwargs = model_config(path)
    assert kwargs["use_pbc"] is False and kwargs["otf_graph"] is True and kwargs["max_neighbors"] >= 1000
    model = registry.get_model_class(name)(**kwargs)
    module = getattr(model, "backbone", model)
    if "md17" in path.parts:
        assert config["dataset"]["train"]["src"] == "data/md17/aspirin/train"
        assert (module.sphere_channels, module.lmax_list, module.mmax_list) == (64, [3], [2])
        blocks = {"deq_equiformer_v2.yml": 2, "equiformer_v2_1l.yml": 1, "equiformer_v2_4l.yml": 4,
                  "equiformer_v2_8l.yml": 8}[path.name]
    else:
        assert config["toy_data"]["kind"] == "molecule"
        blocks = 1 if name == "deq_equiformer_v2" else 4
    assert len(module.blocks) == blocks


def test_old_config_names_still_resolve():
    assert resolve_config("deq_equiformer_v2_toy.yml").parts[-3:] == ("s2ef", "toy", "deq_equiformer_v2_toy.yml")
    assert resolve_config("equiformer_v2_toy.yml").parts[-3:] == ("s2ef", "toy", "equiformer_v2_toy.yml")
    assert resolve_config("md17/deq_equiformer_v2.yml").parts[-3:] == ("molecules", "md17", "deq_equiformer_v2.yml")


def test_md17_paths_are_where_the_converter_writes(molecule_root, tmp_path, monkeypatch):
    config, _, _ = load_config(str(REPO / "configs" / "molecules" / "md17" / "deq_equiformer_v2.yml"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="dataset.train.src: LMDB path 'data/md17/aspirin/train' does not exist"):
        prepare_data(config)
    convert_trajectory(molecule_root / "trajectory.npz", tmp_path / "data" / "md17" / "aspirin", n_train=40, n_val=10)
    prepare_data(config)  # every configured split exists now


# ----------------------------------------------------------------------------- graph

@pytest.mark.parametrize("path", MOLECULE_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_molecule_models_use_the_free_space_graph(path, molecule_root):
    """Even a frame that carries a periodic cell gets the plain radius graph: no image edges."""
    frame = read_lmdb(molecule_root / "val")[0]
    frame.cell = 6.0 * torch.eye(3)[None]
    frame.pbc = torch.ones(1, 3, dtype=torch.bool)
    name, kwargs = model_config(path, **TINY_MODEL)
    if "deq" in kwargs:  # the graph is built before the solve: few iterations suffice
        kwargs["deq"] = {**kwargs["deq"], "eval_solver": {"max_iter": 3}}
    model = registry.get_model_class(name)(**kwargs).eval()
    graphs = graph_spy(model)
    model(data_list_collater([frame], otf_graph=True))
    graph = graphs[-1]
    assert not graph.cell_offsets.any()
    pos = frame.pos.double()
    distances = torch.cdist(pos, pos)
    expected = {(j, i) for j, i in (distances < kwargs["max_radius"]).nonzero().tolist() if j != i}
    assert sorted(zip(*graph.edge_index.tolist())) == sorted(expected)
    # the control: with PBC on, the same frame in a 6 A box has image edges
    periodic = registry.get_model_class(name)(**{**kwargs, "use_pbc": True}).eval()
    graphs = graph_spy(periodic)
    periodic(data_list_collater([frame], otf_graph=True))
    assert graphs[-1].cell_offsets.abs().sum(dim=1).gt(0).any()


# ----------------------------------------------------------------------------- equivariance

def predictions(model, frame, seed=123, batch=False):
    torch.manual_seed(seed)  # EquiformerV2 draws a random roll per edge in each forward
    out = model(frame if batch else data_list_collater([frame], otf_graph=True))
    if "deq_nstep" in out:  # a real fixed point, not a truncated iteration
        assert out["deq_converged"].all(), out["deq_residual"]
    return out["energy"].detach(), out["forces"].detach()


def moved(frame, R=None, shift=None):
    frame = frame.clone()
    if R is not None:
        frame.pos = frame.pos @ R.T
    if shift is not None:
        frame.pos = frame.pos + shift
    return frame


def symmetry_errors(model, frame, trajectory, rotation_seeds=(0, 1)) -> dict:
    """Relative force errors; energy errors relative to the model's energy spread over the
    trajectory (an untrained model's energies can lie close to 0)."""
    energy, forces = predictions(model, frame)
    spread = predictions(model, data_list_collater(trajectory, otf_graph=True), batch=True)[0].std()
    errors = {"force_rotation": 0.0, "energy_rotation": 0.0, "unrotated": 1.0}
    for seed in rotation_seeds:
        R = torch.tensor(Rotation.random(random_state=seed).as_matrix(), dtype=torch.float32)
        energy_rot, forces_rot = predictions(model, moved(frame, R=R))
        errors["force_rotation"] = max(errors["force_rotation"], float((forces_rot - forces @ R.T).norm() / forces.norm()))
        errors["energy_rotation"] = max(errors["energy_rotation"], float((energy_rot - energy).abs() / spread))
        errors["unrotated"] = min(errors["unrotated"], float((forces_rot - forces).norm() / forces.norm()))
    energy_shift, forces_shift = predictions(model, moved(frame, shift=torch.tensor([3.0, -7.0, 11.0])))
    errors["force_translation"] = float((forces_shift - forces).norm() / forces.norm())
    errors["energy_translation"] = float((energy_shift - energy).abs() / spread)
    return errors


def test_equivariance_without_pbc(molecule_root):
    """A molecule in free space: energy invariant, forces rotating with it, translations
    changing nothing, as well as fairchem's explicit EquiformerV2 of the same width manages
    (bound: 10x its largest error over the same random initialisations, rotations and input).

    A small gain on the blocks' update makes f a strong contraction, so every solve here
    converges to relative residual 3e-3 (float32 round-off in f sits near 1e-3): the
    symmetry of the fixed point itself is tested, not that of a truncated iteration.
    """
    trajectory = read_lmdb(molecule_root / "test")
    frame = trajectory[4]
    graph = dict(use_pbc=False, otf_graph=True, max_neighbors=100000, max_radius=CUTOFF)
    deq_errors, reference = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        deq = registry.get_model_class("deq_equiformer_v2")(
            **graph, **TINY_MODEL, num_layers=1,
            deq={"eval_solver": {"tol": 3e-3, "max_iter": 200}, "update_gain": 0.3}).eval()
        torch.manual_seed(seed)
        explicit = registry.get_model_class("equiformer_v2")(**graph, **TINY_MODEL, num_layers=4).eval()
        deq_errors.append(symmetry_errors(deq, frame, trajectory))
        reference.append(symmetry_errors(explicit, frame, trajectory))
    bound = {key: max(errors[key] for errors in reference) for key in reference[0]}
    assert bound["force_rotation"] < 1e-2  # the reference itself is nearly equivariant
    for errors in deq_errors:
        for key in ("force_rotation", "energy_rotation", "force_translation", "energy_translation"):
            assert errors[key] < 10 * bound[key] + 1e-6, (key, deq_errors, reference)
        assert errors["unrotated"] > 0.1  # forces really turn: the comparison can fail


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The toy DEQ molecule config through main.py: tiny width, one epoch (5 steps); the
    CLI generates the data itself from the config's toy_data block."""
    work = tmp_path_factory.mktemp("molecule_cli")
    config, _, _ = load_config(str(TOY_DEQ))
    data_root = work / "data"
    config["toy_data"] = {"kind": "molecule", "root": str(data_root), **SPEC}
    for split in ("train", "val", "test"):
        config["dataset"][split]["src"] = str(data_root / split)
    config["model"].update(TINY_MODEL)
    config["optim"].update({"batch_size": 8, "eval_batch_size": 10, "max_epochs": 1})
    path = work / "molecule.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = run_cli("--mode", "train", "--config-yml", path, "--cpu", "--run-dir", work / "run",
                   "--identifier", "m", "--print-every", "1", cwd=work)
    return work, path, data_root, proc


def numbers(pattern: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(pattern, text)]


def test_training_on_the_toy_molecule(trained):
    work, _, data_root, proc = trained
    log = proc.stdout + proc.stderr
    assert (data_root / "toy_molecule.json").is_file()  # made by the CLI from toy_data
    [checkpoint] = (work / "run" / "checkpoints").glob("*/checkpoint.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["config"]["model"]["use_pbc"] is False
    # normalisers fitted on the training split, as computed here independently
    train = read_lmdb(data_root / "train")
    energies = np.array([d.energy for d in train])
    forces = torch.cat([d.forces for d in train]).double()
    [(e_mean, e_rmsd)] = re.findall(r"output energy: mean=([0-9.e+-]+), rmsd=([0-9.e+-]*[0-9])", log)
    [(f_mean, f_rmsd)] = re.findall(r"output forces: mean=([0-9.e+-]+), rmsd=([0-9.e+-]*[0-9])", log)
    assert float(e_mean) == pytest.approx(energies.mean(), rel=1e-5)
    assert float(e_rmsd) == pytest.approx(energies.std(ddof=1), rel=1e-4)
    # fairchem's force rmsd: root mean square of the per-atom force *norm*, over N - 1 atoms
    # (fairchem 1.10 keeps the energy's ddof=1 for every later target)
    f_expected = float((forces.pow(2).sum() / (len(forces) - 1)).sqrt())
    assert float(f_mean) == 0.0 and float(f_rmsd) == pytest.approx(f_expected, rel=1e-5)
    # 5 training steps logged, then validation; everything finite
    losses = numbers(r"loss: ([0-9.e+-]+|nan|inf), lr:", log)
    assert len(losses) == 5 and np.isfinite(losses).all(), log[-3000:]
    validation = [line for line in log.splitlines() if "energy_mae" in line and "lr:" not in line]
    assert validation, log[-3000:]
    for key in ("energy_mae", "forces_mae", "forces_cosine_similarity", "deq_nstep", "deq_residual"):
        values = numbers(rf"{key}: ([0-9.e+-]+|nan|inf)", validation[-1])
        assert len(values) == 1 and np.isfinite(values).all(), (key, validation[-1])


def test_predictions_on_the_toy_molecule_are_float32(trained):
    work, path, data_root, _ = trained
    [checkpoint] = (work / "run" / "checkpoints").glob("*/checkpoint.pt")
    run_cli("--mode", "predict", "--config-yml", path, "--cpu", "--run-dir", work / "pred", "--identifier", "p",
            "--checkpoint", checkpoint, cwd=work)
    [npz] = (work / "pred" / "results").glob("*/ocp_predictions.npz")
    pred = np.load(npz)
    test = read_lmdb(data_root / "test")
    assert sorted(pred["ids"]) == sorted(f"0_{d.fid}" for d in test)
    assert pred["energy"].dtype == pred["forces"].dtype == np.float32
    assert pred["forces"].shape == (9 * len(test), 3) and np.isfinite(pred["forces"]).all()


def test_ordered_evaluation_on_the_test_trajectory(trained):
    """The README's molecule evaluation: validate the consecutive test frames (val pointed
    at the test split, which the config also opens as dataset.test) with and without reuse."""
    work, path, data_root, _ = trained
    [checkpoint] = (work / "run" / "checkpoints").glob("*/checkpoint.pt")
    proc = run_cli("--mode", "validate", "--config-yml", path, "--cpu", "--run-dir", work / "ordered",
                   "--identifier", "o", "--checkpoint", checkpoint, "task.ordered_evaluation=compare",
                   f"dataset.val.src={data_root / 'test'}", cwd=work)
    [results] = (work / "ordered" / "results").glob("*")
    warm = json.loads((results / "solver_ordered_val.json").read_text())
    cold = json.loads((results / "solver_ordered_val_cold.json").read_text())
    test = read_lmdb(data_root / "test")
    fids = sorted(d.fid for d in test)
    assert fids == list(range(fids[0], fids[0] + len(test)))  # one contiguous block
    for report in (warm, cold):
        assert report["graph_evaluations"] == len(test) and report["systems"] == 1
        assert len(report["nstep_per_system"]["0"]) == len(test)  # one call per frame, in order
    assert warm["reuse"] and not cold["reuse"]
    assert warm["mean_nstep_first_call"] == cold["mean_nstep_first_call"]  # the first frame starts cold
    assert (results / "solver_ordered_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # accuracy with and without reuse, both logged (val, then val_cold)
    maes = numbers(r"forces_mae: ([0-9.e+-]+)", proc.stdout + proc.stderr)
    assert len(maes) >= 2 and np.isfinite(maes[-2:]).all()
    warm_mae, cold_mae = maes[-2:]
    assert abs(warm_mae - cold_mae) <= 0.05 * cold_mae, (warm_mae, cold_mae)  # reuse costs no accuracy
