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
import pickle
import uuid
from pathlib import Path

import torch
from fairchem.core.common import distutils
from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

TEMPORARY_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint file that cannot or must not be loaded; the message names the file."""


def load_checkpoint_file(path, map_location="cpu") -> dict:
    """``torch.load`` restricted to tensors and plain containers (``weights_only``): a file
    that needs arbitrary unpickling, which could run code, is refused, not executed."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"refusing to load checkpoint {path}: it holds objects other than tensors and "
                              f"plain containers, and unpickling them could run code ({reason})") from None
    except Exception as error:  # torch.load fails on junk with many types (IndexError, RuntimeError, ...)
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no fairchem 'state_dict' (got {type(checkpoint).__name__})")
    return checkpoint


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
        if checkpoint is None:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
            logging.info(f"Loading checkpoint from: {checkpoint_path}")
            checkpoint = load_checkpoint_file(checkpoint_path, "cpu" if self.cpu else self.device)
        checkpoint = self._adapt_to_force_mode(checkpoint, checkpoint_path)
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

    def load_extras(self) -> None:
        super().load_extras()
        source = self.config.get("task", {}).get("finetune_from")
        if source:
            self.finetune_from(source)

    def finetune_from(self, path: str) -> None:
        """``task.finetune_from``: start from a checkpoint's weights (and its EMA, normalisers
        and element references when present) at step 0, with this config's fresh optimiser and
        LR schedule. A resume (``--checkpoint``, or the run's own ``checkpoint.pt``) is loaded
        afterwards and wins. Without an EMA in the file, the EMA restarts from the weights
        (fairchem would otherwise switch EMA off)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"task.finetune_from: checkpoint not found: {path}")
        checkpoint = load_checkpoint_file(path, "cpu" if self.cpu else self.device)
        kept = {key: checkpoint[key] for key in ("state_dict", "ema", "normalizers", "elementrefs", "config", "scale_dict")
                if checkpoint.get(key) is not None}
        kept.setdefault("normalizers", {})
        wants_ema = self.ema is not None
        # no optimizer, scheduler or step in `kept`: fairchem keeps the fresh ones and sets step 0
        super(ResumableCheckpoints, self).load_checkpoint(path, self._adapt_to_force_mode(kept, path))
        if wants_ema and self.ema is None:
            self.ema = ExponentialMovingAverage(self.model.parameters(), self.ema_decay)
        self.completed_step = self.step
        if distutils.is_master():
            what = ["weights", "EMA" if "ema" in kept else "EMA from the weights" if self.ema is not None else "no EMA",
                    f"normalizers {sorted(kept['normalizers'])}", f"element references {sorted(kept.get('elementrefs', {}))}"]
            logging.info(f"ocp_deq: fine-tuning from {path}: {', '.join(what)}; step 0, fresh optimizer and LR schedule")

    def _adapt_to_force_mode(self, checkpoint: dict, checkpoint_path: str) -> dict:
        """A checkpoint saved in the other force mode has another set of trainable parameters
        (conservative forces freeze the direct force head): its optimizer state cannot be
        matched to ours (a fresh optimiser starts) and its EMA shadows are re-indexed by
        parameter name (the force head's shadows, when missing, start from its weights)."""
        model = self._unwrapped_model
        mode = getattr(model, "force_mode", None)
        saved_mode = (checkpoint.get("config") or {}).get("model", {}).get("force_mode", "direct")
        if mode is None or saved_mode == mode or "forces" not in getattr(model, "output_heads", {}):
            return checkpoint
        checkpoint = dict(checkpoint)
        head = {f"output_heads.forces.{name}" for name, _ in model.output_heads["forces"].named_parameters()}
        named = list(model.named_parameters())
        saved_trainable = [n for n, p in named if (n in head and saved_mode == "direct") or (n not in head and p.requires_grad)]
        trainable = [n for n, p in named if p.requires_grad]
        if checkpoint.pop("optimizer", None) is not None and distutils.is_master():
            logging.warning(f"ocp_deq: {checkpoint_path} was saved with force_mode={saved_mode}, this run uses "
                            f"{mode}: the trainable parameters differ, so its optimizer state is not restored "
                            "(a fresh optimiser starts; step, LR schedule and weights are restored)")
        ema = checkpoint.get("ema")
        if ema is not None:
            if len(ema["shadow_params"]) != len(saved_trainable):
                raise ValueError(f"{checkpoint_path}: EMA holds {len(ema['shadow_params'])} parameters, a "
                                 f"force_mode={saved_mode} model trains {len(saved_trainable)}")
            shadows = dict(zip(saved_trainable, ema["shadow_params"]))
            weights = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
            checkpoint["ema"] = dict(ema, shadow_params=[shadows.get(n, weights.get(n)) for n in trainable],
                                     collected_params=[])
        return checkpoint

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
