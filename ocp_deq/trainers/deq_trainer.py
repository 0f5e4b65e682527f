"""fairchem's OCP trainer (its EquiformerV2 variant: cosine LR in epochs) plus DEQ solver statistics and clear errors for bad data."""

from __future__ import annotations

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer

from ocp_deq.models.deq_equiformer_v2 import SOLVER_STAT_KEYS


class MissingTargetError(KeyError):
    """An S2EF frame lacks a label the loss needs."""

    def __str__(self):
        return str(self.args[0])


@registry.register_trainer("deq")
class DEQTrainer(EquiformerV2ForcesTrainer):
    """``trainer: deq``: ``equiformerv2_forces`` (OCPTrainer + cosine schedule in epochs).
    Works with any fairchem model; for DEQ models it logs, per step
    and per validation, the mean solver iterations (``deq_nstep``), the mean final relative
    residual (``deq_residual``) and the fraction of graphs that did not converge
    (``deq_unconverged``), on the console line and in the configured logger."""

    def load_model(self) -> None:
        super().load_model()
        self._solver_stats = None
        self._unwrapped_model.register_forward_hook(self._capture_solver_stats)

    def _capture_solver_stats(self, module, inputs, output):
        if isinstance(output, dict) and all(key in output for key in SOLVER_STAT_KEYS):
            self._solver_stats = {key: output[key].detach() for key in SOLVER_STAT_KEYS}

    def _compute_loss(self, out, batch):
        for target_name, _ in self.loss_functions:
            if target_name not in batch.keys():
                sids = batch.sid.tolist() if hasattr(batch, "sid") else "?"
                fids = batch.fid.tolist() if hasattr(batch, "fid") else "?"
                src = self.config["dataset"].get("src", "?")
                raise MissingTargetError(
                    f"training frames have no '{target_name}' (dataset.train.src={src}, "
                    f"frames sid={sids}, fid={fids}); every S2EF training frame needs it"
                )
        return super()._compute_loss(out, batch)

    def _compute_metrics(self, out, batch, evaluator, metrics=None):
        metrics = super()._compute_metrics(out, batch, evaluator, metrics)
        stats, self._solver_stats = self._solver_stats, None
        if stats is not None:
            n = int(stats["deq_nstep"].numel())
            for key, values in (
                ("deq_nstep", stats["deq_nstep"]),
                ("deq_residual", stats["deq_residual"]),
                ("deq_unconverged", (~stats["deq_converged"]).float()),
            ):
                metrics = evaluator.update(key, {"total": float(values.float().sum()), "numel": n}, metrics)
        return metrics
