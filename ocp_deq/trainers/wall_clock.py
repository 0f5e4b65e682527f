"""Training for a wall-clock budget: validation at fixed training-time intervals, a
learning-rate schedule that ends with the budget, a stop when it is spent.

Models that cost different amounts per step are compared fairly by time, not steps
(``scripts/benchmark_race.py``). The training clock runs only inside training steps, so
validation does not eat the budget. ``optim`` keys:

- ``max_train_seconds``: stop after this much training time (checkpoint written);
  fairchem's step-based cosine / warmup schedule is then driven by the fraction of the
  budget spent (the step count of a run stopped by time is unknown in advance).
- ``eval_every_seconds``: validate each time the training clock passes a multiple of it,
  and at the end; every validation is appended to ``<results_dir>/validation_clock.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from fairchem.core.common import distutils


class BudgetSpent(Exception):
    """Raised after the step that spends the training budget; ends fairchem's loop."""


class TrainingClock:
    def __init__(self, budget: float | None, interval: float | None, results_dir: str | None):
        self.budget = float(budget) if budget else None
        self.interval = float(interval) if interval else None
        self.path = Path(results_dir, "validation_clock.json") if results_dir else None
        self.train_seconds = 0.0
        self.next_validation = self.interval
        self.records: list[dict] = []
        self._train_solves = [0.0, 0.0, 0]  # evaluations, unconverged graphs, graphs since the last record
        self._since = time.perf_counter()
        self._started = self._since

    @classmethod
    def from_config(cls, config: dict) -> "TrainingClock | None":
        optim = config["optim"]
        budget, interval = optim.get("max_train_seconds"), optim.get("eval_every_seconds")
        for key, value in (("max_train_seconds", budget), ("eval_every_seconds", interval)):
            if value is not None and not float(value) > 0:
                raise ValueError(f"optim.{key} must be > 0 seconds, got {value!r}")
        if budget is None and interval is None:
            return None
        return cls(budget, interval, config["cmd"].get("results_dir"))

    def tick(self) -> tuple[bool, bool]:
        """After a training step: (validate now, budget spent), agreed by every rank."""
        now = time.perf_counter()
        self.train_seconds += now - self._since
        self._since = now
        validate = self.next_validation is not None and self.train_seconds >= self.next_validation
        spent = self.budget is not None and self.train_seconds >= self.budget
        if distutils.initialized() and distutils.get_world_size() > 1:  # rank 0's clock decides
            flags = torch.tensor([validate, spent], dtype=torch.float64)
            if torch.distributed.get_backend() == "nccl":
                flags = flags.cuda()
            distutils.broadcast(flags, 0)
            validate, spent = bool(flags[0]), bool(flags[1])
        if validate:
            while self.next_validation <= self.train_seconds:
                self.next_validation += self.interval
        return validate, spent

    def observe(self, model_out: dict) -> None:
        """Training-solve statistics of a step (DEQ models), summarised at the next record."""
        if "deq_nstep" in model_out and "deq_converged" in model_out:
            self._train_solves[0] += float(model_out["deq_nstep"].sum())
            self._train_solves[1] += float((~model_out["deq_converged"]).sum())
            self._train_solves[2] += int(model_out["deq_nstep"].numel())

    def budget_fraction(self) -> float | None:
        return None if self.budget is None else min(self.train_seconds / self.budget, 1.0)

    def record(self, step: int, epoch: float, metrics: dict) -> None:
        """One validation at the current training time; the clock is paused until resume()."""
        self.records.append({
            "train_seconds": round(self.train_seconds, 3),
            "wall_seconds": round(time.perf_counter() - self._started, 3),
            "step": int(step), "epoch": float(epoch),
            **{key: float(value["metric"]) for key, value in metrics.items()},
        })
        evaluations, unconverged, graphs = self._train_solves
        if graphs:  # this rank's training solves since the last validation
            self.records[-1].update(train_deq_nstep=evaluations / graphs, train_deq_unconverged=unconverged / graphs)
        self._train_solves = [0.0, 0.0, 0]
        if self.path is not None and distutils.is_master():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.records, indent=1))
            temporary.replace(self.path)

    def resume(self) -> None:
        """Restart the training clock (after a validation)."""
        self._since = time.perf_counter()


def follow_budget(scheduler, fraction: float, total_steps: int, step: int) -> None:
    """Make fairchem's next ``scheduler.step()`` land at ``fraction`` of a ``total_steps``
    schedule (never behind the real ``step``, so step-counted warmup stays intact)."""
    inner = getattr(scheduler, "scheduler", None)
    if inner is None or not hasattr(inner, "last_epoch") or getattr(scheduler, "scheduler_type", "") == "ReduceLROnPlateau":
        return
    inner.last_epoch = max(step, int(fraction * total_steps)) - 1
