"""Multi-process runs, SLURM submission through submitit, and the run identity for resuming.

``--distributed`` (fairchem 1.10 dropped the flag; OCP's documented command lines use it)
means data-parallel over ``--num-nodes`` x ``--num-gpus`` processes, one per GPU (with
``--cpu``: CPU processes talking gloo). It is implied by ``--num-gpus > 1`` or
``--num-nodes > 1``, so it never changes what runs; it is checked against them.

``--submit`` sends the run to SLURM with submitit (fairchem's ``--slurm-*`` flags and the
yml ``slurm:`` block). fairchem's job-side set-up needs ``scontrol``, forces NCCL and never
sets the local rank off SLURM; :class:`Runner` instead takes ranks and the rendezvous
address from submitit's job environment and uses fairchem's ``env://`` path, with gloo
under ``--cpu``. So the same code runs on SLURM and, with ``--submitit-cluster local``, in
submitit's local executor (how it is tested here). On preemption or timeout submitit calls
:meth:`Runner.checkpoint`: it saves ``checkpoint.pt`` and requeues a Runner that resumes
from it.

Run identity: fairchem names a run's folders ``<run-dir>/{checkpoints,results,logs}/<id>``
with ``id = --timestamp-id`` or, without it, the start time plus ``-<identifier>``. With
``--timestamp-id`` the same command finds its own ``checkpoint.pt`` after a crash or a
kill and resumes from it (fairchem's task set-up; we log what was restored).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fairchem.core import _cli as fairchem_cli
from fairchem.core.common.utils import setup_logging
from submitit import AutoExecutor
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed", action="store_true",
        help="data-parallel over --num-nodes x --num-gpus processes (one per GPU; gloo CPU processes "
             "with --cpu). Implied by --num-gpus > 1 or --num-nodes > 1; needs more than one process.",
    )
    parser.add_argument(
        "--submitit-cluster", choices=("slurm", "local"), default=None,
        help="with --submit: where submitit sends the job (default: SLURM if srun is found, else "
             "submitit's local executor, one node, for testing).",
    )


def check_cluster_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot run (parser.error exits with status 2)."""
    if args.num_gpus < 1 or args.num_nodes < 1:
        parser.error(f"--num-gpus ({args.num_gpus}) and --num-nodes ({args.num_nodes}) must be at least 1")
    ranks = args.num_gpus * args.num_nodes
    if args.distributed and ranks == 1:
        parser.error("--distributed needs more than one process: set --num-gpus (processes per node) "
                     "and/or --num-nodes")
    if args.num_nodes > 1 and not args.submit:
        parser.error(f"--num-nodes {args.num_nodes} needs --submit: without it, processes are started on "
                     "this node only")
    if args.submitit_cluster and not args.submit:
        parser.error("--submitit-cluster applies only with --submit")
    if args.submit:
        args.submitit_cluster = args.submitit_cluster or AutoExecutor.which()
    if args.submitit_cluster == "local" and args.num_nodes > 1:
        parser.error("submitit's local executor (--submitit-cluster local, or no SLURM found) runs on one node: "
                     "use --num-nodes 1")
    if ranks > 1:
        logging.info(f"ocp_deq: data-parallel over {args.num_nodes} node(s) x {args.num_gpus} process(es) = "
                     f"{ranks} ranks ({'gloo' if args.cpu else 'nccl'})")


def warn_if_unresumable(args: argparse.Namespace) -> None:
    """A training run without --timestamp-id gets a new folder each time: point at earlier
    runs with the same --identifier that the user may have meant to resume."""
    if args.mode != "train" or args.timestamp_id or args.checkpoint or not args.identifier:
        return
    earlier = sorted(Path(args.run_dir, "checkpoints").glob(f"*-{args.identifier}/checkpoint.pt"))
    if earlier:
        logging.warning(
            f"ocp_deq: starting a new run; earlier runs with --identifier {args.identifier} have checkpoints "
            f"({', '.join(str(p) for p in earlier)}). To resume one, pass --timestamp-id "
            f"{earlier[-1].parent.name} instead."
        )


class SubmititExecutor(AutoExecutor):
    """fairchem's AutoExecutor on the cluster chosen by --submitit-cluster, requesting no
    GPUs for --cpu runs (fairchem asks for --num-gpus GPUs per node in any case)."""

    def __init__(self, folder, cluster: str | None = None, cpu: bool = False, **kwargs):
        self.cpu = cpu
        super().__init__(folder, cluster=cluster, **kwargs)

    def update_parameters(self, **kwargs) -> None:
        if self.cpu:
            kwargs.pop("gpus_per_node", None)
        super().update_parameters(**kwargs)


def join_submitted_job(config: dict) -> dict:
    """Inside a submitit task: export rank, world size and rendezvous address for torch's
    ``env://`` and return the config for fairchem's non-SLURM set-up path (``submit`` off),
    which uses ``distributed_backend`` (gloo with --cpu) and sets the local rank."""
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if env.world_size != config["world_size"]:
        raise RuntimeError(
            f"the submitted job has {env.world_size} tasks but the run expects --num-nodes x --num-gpus = "
            f"{config['world_size']}"
        )
    logging.info(f"ocp_deq: submitted task rank {env.rank}/{env.world_size} (local rank {env.local_rank}), "
                 f"rendezvous {env.master_addr}:{env.master_port}")
    return {**config, "submit": False}


class Runner(fairchem_cli.Runner):
    """fairchem's submitit-checkpointable Runner, importable from ocp_deq (spawned, submitted
    and requeued processes unpickle it and so import our registrations first)."""

    def __call__(self, config: dict) -> None:
        self.submitted_config = config
        setup_logging()  # fairchem's format, INFO to stdout, as in the CLI (also in submitted jobs)
        if config.get("submit"):
            config = join_submitted_job(config)
        super().__call__(config)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Preemption / timeout (rank 0): save ``checkpoint.pt`` at the last completed
        training step and requeue a Runner (ours: fairchem's would requeue its own class,
        whose job could not import ocp_deq) that resumes from it."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:  # signalled before the trainer existed: nothing to save
            return DelayedSubmission(Runner(), self.submitted_config)
        rewind = getattr(trainer, "rewind_to_completed_step", None)
        if rewind is not None:
            rewind()
        submission = super().checkpoint(*args, **kwargs)
        config = {**submission.args[0], "submit": self.submitted_config.get("submit", False)}
        logging.info(f"ocp_deq: pid {os.getpid()} requeues run {config['timestamp_id']} from {config['checkpoint']} "
                     f"(step {trainer.step})")
        return DelayedSubmission(Runner(), config)


def runner_wrapper(config: dict) -> None:
    Runner()(config)
