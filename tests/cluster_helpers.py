"""Helpers for the multi-process, submission and resume tests: a few toy frames, a config
without test/relax splits, the CLI with one thread per process, and log parsing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from cli_server import run_fresh
from conftest import REPO, make_config, run_command
from ocp_deq.data import read_lmdb, write_lmdb

# Two CPU cores: one thread per process (2 threads each oversubscribe the cores and make
# torch several times slower under load).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def small_data(toy_root: Path, directory: Path, train: int, val: int = 0) -> Path:
    """The first ``train`` / ``val`` frames of the toy splits as a new data root."""
    for split, n in (("train", train), ("val", val)):
        if n:
            write_lmdb(directory / split / "data.lmdb", read_lmdb(toy_root / split)[:n])
    return directory


def cluster_config(directory: Path, data_root: Path, name: str, val: bool = True, **optim) -> Path:
    """The tiny toy DEQ config on ``data_root`` (train, optionally val), written as ``name``."""
    config = yaml.safe_load(make_config(directory, data_root, optim=optim).read_text())
    for split in ("test", "relax") if val else ("val", "test", "relax"):
        del config["dataset"][split]
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main_command(*args) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), *map(str, args)]


def run_main(*args, cwd: Path) -> str:
    """Run main.py to the end; its stdout + stderr (an AssertionError with the tail if it fails).
    These runs take under a minute: 300 s means a hang (its stacks are in the TimeoutExpired).
    A multi-process run starts in a fresh interpreter, as a user starts it: its launcher
    (torch elastic's agent: rendezvous threads, TCP store, worker processes) then never runs in
    a forked copy of the test server (one such run hung at exit once, not reproduced)."""
    flags = [str(a) for a in args]
    ranks = int(flags[flags.index("--num-gpus") + 1]) if "--num-gpus" in flags else 1
    try:
        if ranks > 1:
            proc = run_fresh(main_command(*args), cwd=cwd, env=ENV, timeout=300)
        else:
            proc = run_command(REPO / "main.py", *args, cwd=cwd, env=ENV, timeout=300)
    except subprocess.TimeoutExpired as hung:  # pytest would show the command only, not the stacks
        raise AssertionError(f"main.py hung ({hung.timeout} s); its output with every process's stacks:\n"
                             f"{(hung.stdout or '')[-4000:]}\n{(hung.stderr or '')[-16000:]}") from None
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{log[-8000:]}")
    return log


_METRIC = re.compile(r"(\w+): (-?[0-9.]+(?:e[+-][0-9]+)?)")


def training_steps(log: str) -> dict[int, dict[str, float]]:
    """fairchem's per-step console lines (``--print-every 1``), by step."""
    steps = {}
    for line in log.splitlines():
        if "lr: " in line and "step: " in line:
            values = {key: float(value) for key, value in _METRIC.findall(line.split("(INFO): ")[-1])}
            steps[int(values["step"])] = values
    return steps


def validations(log: str) -> list[dict[str, float]]:
    """fairchem's validation lines (metrics, then ``epoch``), in order."""
    return [
        {key: float(value) for key, value in _METRIC.findall(line.split("(INFO): ")[-1])}
        for line in log.splitlines()
        if "energy_mae: " in line and "lr: " not in line
    ]
