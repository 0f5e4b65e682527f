"""fairchem's v1 CLI with ocp_deq's registrations.

Every fairchem flag and dotted override works as in ``fairchem``; additionally a bare config
name (e.g. ``deq_equiformer_v2_toy.yml``) resolves to the file of that name under
``configs/``; the ``model.deq`` block, the checkpoint and the dataset files (existing,
LMDB, not truncated) are checked before any work starts, each mistake reported in one
line (exit status 2); configs with a
``toy_data`` block generate the built-in toy data on first use. ``--distributed``,
``--submitit-cluster`` and the job side of ``--submit`` are in :mod:`ocp_deq.cluster`.
"""

from __future__ import annotations

import datetime
import functools
import sys
from pathlib import Path

import ocp_deq  # noqa: F401  (stand-ins + registry entries before fairchem runs)
from fairchem.core import _cli as fairchem_cli
from fairchem.core.common.flags import Flags
from fairchem.core.common.utils import build_config, setup_logging

from ocp_deq.cluster import (
    Runner,
    SubmititExecutor,
    add_cluster_flags,
    check_cluster_flags,
    runner_wrapper,
    warn_if_unresumable,
)

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
DATASET_SPLITS = ("train", "val", "test", "relax")


class ConfigError(ValueError):
    """A config name or config entry that cannot work; the message says which."""


def resolve_config(name: str | Path, root: Path = CONFIG_ROOT) -> Path:
    """An existing path is used as is; otherwise find ``name`` as a path suffix under ``root``."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts
    candidates = sorted(p for p in root.rglob(path.name) if p.parts[-len(parts):] == parts)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        known = sorted(str(p.relative_to(root)) for p in root.rglob("*.yml") if p.name != "base.yml")
        raise ConfigError(
            f"config '{name}' is neither a file nor a config name under {root}; available:\n  "
            + "\n  ".join(known)
        )
    raise ConfigError(
        f"config name '{name}' is ambiguous under {root}; give a longer path such as:\n  "
        + "\n  ".join(str(p.relative_to(root)) for p in candidates)
    )


def prepare_data(config: dict) -> None:
    """Generate toy data when asked, then check every configured LMDB path exists."""
    toy = dict(config.get("toy_data") or {})
    if toy:
        kind, root = toy.pop("kind", "s2ef"), toy.pop("root")
        if kind == "s2ef":
            from ocp_deq.data.toy_s2ef import ToySpec, ensure_toy_data

            ensure_toy_data(root, ToySpec(seed=toy.get("seed", 0)))
        elif kind == "molecule":
            from ocp_deq.data.toy_molecules import MoleculeSpec, ensure_molecule_data

            try:
                spec = MoleculeSpec.from_config(toy)
            except ValueError as error:
                raise ConfigError(str(error)) from None
            ensure_molecule_data(root, spec)
        else:
            raise ConfigError(f"toy_data.kind='{kind}' must be 's2ef' or 'molecule'")
    from ocp_deq.data.lmdb_io import LMDBFileError, check_lmdb_file

    datasets = config.get("dataset", {})
    for split in DATASET_SPLITS:
        entry = datasets.get(split)
        if isinstance(entry, dict) and entry.get("format", "lmdb") == "lmdb" and "src" in entry:
            src = Path(entry["src"])
            if not src.exists():
                raise ConfigError(f"dataset.{split}.src: LMDB path '{src}' does not exist")
            if src.is_dir() and not any(src.glob("*.lmdb")):
                raise ConfigError(f"dataset.{split}.src: folder '{src}' holds no *.lmdb file")
            for path in sorted(src.glob("*.lmdb")) if src.is_dir() else [src]:
                try:
                    check_lmdb_file(path)
                except LMDBFileError as error:
                    raise ConfigError(f"dataset.{split}.src: {error}") from None


DEQ_MODELS = ("deq_equiformer_v2", "deq_equiformer_v2_backbone")
NEEDS_CHECKPOINT = ("predict", "validate", "run-relaxations")


def check_model_config(config: dict) -> None:
    """The whole ``model.deq`` block and the DEQ's own options, before fairchem builds anything."""
    model = config.get("model") or {}
    name = model.get("name")
    if name not in DEQ_MODELS:
        return
    from ocp_deq.deq.settings import DEQConfigError, DEQSettings
    from ocp_deq.models.deq_equiformer_v2 import FORCE_MODES, STOCHASTIC_OPTIONS

    try:
        DEQSettings.from_config(model.get("deq"))
    except DEQConfigError as error:
        raise ConfigError(str(error)) from None
    if model.get("force_mode", "direct") not in FORCE_MODES:
        raise ConfigError(f"model.force_mode='{model['force_mode']}' must be one of {FORCE_MODES}")
    for key in STOCHASTIC_OPTIONS:
        if model.get(key):
            raise ConfigError(f"model.{key}={model[key]}: random dropout inside the implicit layer changes f at "
                              "every solver iteration; set it to 0 (model.deq.variational_dropout keeps one mask per forward)")


def check_checkpoint(args, config: dict) -> None:
    """--checkpoint, task.finetune_from and the checkpoint a --timestamp-id run resumes from
    must be readable checkpoints; evaluation modes need one."""
    finetune = (config.get("task") or {}).get("finetune_from")
    if args.checkpoint is None and finetune is None and args.mode in NEEDS_CHECKPOINT:
        raise ConfigError(f"--mode {args.mode} needs --checkpoint <checkpoint.pt or best_checkpoint.pt>")
    from ocp_deq.trainers.checkpointing import CheckpointError, load_checkpoint_file

    resume = None  # fairchem resumes from <run-dir>/checkpoints/<timestamp-id>/checkpoint.pt by itself
    if args.checkpoint is None and args.timestamp_id:
        found = Path(args.run_dir, "checkpoints", args.timestamp_id, "checkpoint.pt")
        resume = found if found.is_file() else None
    for option, path in (("--checkpoint", args.checkpoint), ("task.finetune_from", finetune),
                         (f"--timestamp-id {args.timestamp_id} (resuming)", resume)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"{option}: no file '{path}'")
        try:
            load_checkpoint_file(path)
        except CheckpointError as error:
            raise ConfigError(f"{option}: {error}") from None


def claim_run_id(run_dir: str, identifier: str | None) -> str:
    """fairchem names a run ``<start time>-<identifier>`` from a float32 timestamp, so runs
    started within ~2 minutes of each other share folders. Claim a free name to the second
    instead (creating its checkpoint folder, so a concurrent start takes the next second)."""
    now = datetime.datetime.now()
    while True:
        run_id = now.strftime("%Y-%m-%d-%H-%M-%S") + (f"-{identifier}" if identifier else "")
        if not (Path(run_dir) / "results" / run_id).exists():
            try:
                (Path(run_dir) / "checkpoints" / run_id).mkdir(parents=True)
                return run_id
            except FileExistsError:
                pass
        now += datetime.timedelta(seconds=1)


def main(argv: list[str] | None = None) -> None:
    parser = Flags().get_parser()
    add_cluster_flags(parser)
    args, override_args = parser.parse_known_args(argv)
    setup_logging()
    check_cluster_flags(parser, args)
    try:
        args.config_yml = resolve_config(args.config_yml)
        config = build_config(args, list(override_args))
        check_model_config(config)
        check_checkpoint(args, config)
        prepare_data(config)
    except ConfigError as error:
        parser.exit(2, f"ocp_deq: error: {error}\n")
    # fairchem's main looks these names up at call time: use ours, importable by children.
    fairchem_cli.Runner = Runner
    fairchem_cli.runner_wrapper = runner_wrapper
    fairchem_cli.AutoExecutor = functools.partial(SubmititExecutor, cluster=args.submitit_cluster, cpu=args.cpu)
    warn_if_unresumable(args)
    if args.timestamp_id is None and args.sweep_yml is None:
        args.timestamp_id = claim_run_id(args.run_dir, args.identifier)
    fairchem_cli.main(args, override_args)


if __name__ == "__main__":
    sys.exit(main())
