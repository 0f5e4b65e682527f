"""Checkpoints that survive a kill, and resuming from them at the step they were saved.

fairchem writes ``checkpoint.pt`` with ``torch.save`` straight to its final name: a kill or
a full disk during the write leaves a truncated file that the next run cannot load. Here
each checkpoint goes to a temporary file in the same directory, is fsynced, and is renamed
over the old one (``os.replace``, atomic on POSIX): the file is always a whole checkpoint.

fairchem's periodic checkpoint (``optim.checkpoint_every`` steps; by default each epoch's
last step) is written after step k's optimizer and EMA updates but before its LR-scheduler
step. A run resumed from it would run its LR schedule one step behind; we catch up.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from fairchem.core.common import distutils

TEMPORARY_SUFFIX = ".tmp"


def replace_durably(temporary: Path, final: Path) -> None:
    """Flush ``temporary`` to disk, rename it to ``final`` and flush the directory entry."""
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumableCheckpoints:
    """Trainer mixin (before fairchem's trainer in the bases): atomic checkpoint files,
    the LR schedule in step after a resume, a log line saying what was restored, and
    :meth:`rewind_to_completed_step` for checkpoints written on preemption."""

    def save(self, metrics=None, checkpoint_file: str = "checkpoint.pt", training_state: bool = True):
        # unique per call: a preemption handler may save while an interrupted save is open
        temporary = f".{checkpoint_file}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
        try:
            written = super().save(metrics, temporary, training_state)
        except BaseException:
            Path(self.config["cmd"]["checkpoint_dir"], temporary).unlink(missing_ok=True)
            raise
        if written is None:  # not rank 0, or a debug run: nothing written
            return None
        written = Path(written)
        final = written.with_name(checkpoint_file)
        replace_durably(written, final)
        # temporaries left by killed writers of this checkpoint
        for stale in final.parent.glob(f".{checkpoint_file}.*{TEMPORARY_SUFFIX}"):
            stale.unlink(missing_ok=True)
        return str(final)

    def load_checkpoint(self, checkpoint_path: str, checkpoint: dict | None = None, inference_only: bool = False):
        super().load_checkpoint(checkpoint_path, checkpoint, inference_only)
        self.completed_step = self.step
        scheduler = getattr(self, "scheduler", None)
        if inference_only or scheduler is None:
            return
        if scheduler.scheduler_type not in ("Null", "ReduceLROnPlateau") and scheduler.scheduler.last_epoch == self.step - 1:
            scheduler.step()  # the step the periodic checkpoint was written before
        restored = [f"step {self.step}", f"epoch {self.epoch:.3f}",
                    f"optimizer ({len(self.optimizer.state_dict()['state'])} parameter states)"]
        if scheduler.scheduler_type != "Null":
            restored.append(f"LR scheduler (step {scheduler.scheduler.last_epoch}, lr {scheduler.get_lr():.3e})")
        restored.append("EMA" if self.ema is not None else "no EMA")
        restored.append(f"normalizers {sorted(self.normalizers)}")
        if distutils.is_master():
            logging.info(f"ocp_deq: restored from {checkpoint_path}: {', '.join(restored)}")

    def _backward(self, loss) -> None:
        super()._backward(loss)
        self.completed_step = self.step

    def rewind_to_completed_step(self) -> None:
        """Before a preemption checkpoint: if the signal came during a step whose update is
        not applied yet, save the previous step, so the requeued job redoes this batch
        instead of skipping it."""
        completed, loader = getattr(self, "completed_step", 0), getattr(self, "train_loader", None)
        if loader is not None and completed == self.step - 1:
            self.step = completed
            self.epoch = completed / len(loader)
