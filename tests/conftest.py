"""Shared fixtures: small generated toy data, tiny models and a CLI runner."""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

import ocp_deq  # noqa: F401  (stand-ins + registry)
from cli_server import CommandServer
from fairchem.core.common.utils import load_config
from ocp_deq.data.toy_s2ef import ToySpec, generate_toy_data

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIGS = REPO / "configs" / "s2ef" / "toy"

# A tiny EquiformerV2 width: enough for every code path, seconds per forward on CPU.
TINY_MODEL = dict(
    sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
    attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, num_distance_basis=64,
    lmax_list=[2], mmax_list=[2], num_sphere_samples=32,
)
SMALL_SPEC = ToySpec(seed=1, systems={"train": 4, "val": 2, "test": 2}, relax_systems=2, relax_frames=4, md_frames=4)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    return generate_toy_data(tmp_path_factory.mktemp("toy_s2ef"), SMALL_SPEC)


TRAINED_EPOCHS = 4


@pytest.fixture(scope="session")
def trained_deq(toy_root, tmp_path_factory):
    """A tiny DEQ trained through the CLI on the small toy data: (work dir, config, process, checkpoint)."""
    work = tmp_path_factory.mktemp("trained_deq")
    config = make_config(work, toy_root, optim={"max_epochs": TRAINED_EPOCHS, "lr_initial": 0.004})
    proc = run_cli("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", work / "run",
                   "--identifier", "t", "--print-every", "1", cwd=work)
    checkpoints = list((work / "run" / "checkpoints").glob("*/checkpoint.pt"))
    assert len(checkpoints) == 1, checkpoints
    return work, config, proc, checkpoints[0]


def make_config(directory: Path, data_root: Path, config_name: str = "deq_equiformer_v2_toy.yml",
                model: dict | None = None, optim: dict | None = None) -> Path:
    """A toy config (includes merged) pointed at ``data_root``, with a tiny model."""
    config, _, _ = load_config(str(TOY_CONFIGS / config_name))
    config.pop("toy_data", None)
    for split in ("train", "val", "test", "relax"):
        config["dataset"][split]["src"] = str(data_root / split)
    # fixed normalisers, no fitted references: the tests check training mechanics, not the toy recipe
    config["dataset"]["train"]["transforms"] = {"normalizer": {"energy": {"mean": -4.1, "rmsd": 0.84},
                                                               "forces": {"mean": 0.0, "rmsd": 0.36}}}
    config["loss_functions"] = [{"energy": {"fn": "mae", "coefficient": 4}}, {"forces": {"fn": "l2mae", "coefficient": 100}}]
    config["model"].update(TINY_MODEL)
    config["model"].update(model or {})
    config["optim"].update({"batch_size": 4, "eval_batch_size": 4, "max_epochs": 1})
    config["optim"].update(optim or {})
    path = directory / f"test_{config_name}"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


_server: CommandServer | None = None


def run_command(script: Path, *args, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python script args`` in its own process, forked from one pre-imported server (no
    ~10 s start-up per command; see cli_server.py)."""
    global _server
    if _server is None:
        _server = CommandServer(Path(tempfile.mkdtemp(prefix="ocp_deq_commands_")))
    return _server.run(script, args, cwd=cwd, env=env, timeout=timeout)


def pytest_sessionfinish(session, exitstatus):
    if _server is not None:
        _server.close()


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_command(REPO / "main.py", *args, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def load_script(name: str):
    """A script of scripts/ as a module (its main runs in this process: no start-up cost)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
