"""fairchem's OCP trainer (its EquiformerV2 variant: cosine LR in epochs) plus DEQ solver statistics and clear errors for bad data."""

from __future__ import annotations

from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer

from ocp_deq.models.deq_equiformer_v2 import SOLVER_STAT_KEYS


class MissingLabelError(KeyError):
    """An S2EF frame lacks a label its split needs."""

    def __str__(self):
        return str(self.args[0])


class LabelCheckingCollater:
    """fairchem's collater, after checking each frame carries the labels its split needs
    (otherwise PyG fails later with an error that names neither file nor frame)."""

    def __init__(self, collater, required: tuple[str, ...], where: str):
        self.collater, self.required, self.where = collater, required, where

    def __call__(self, frames):
        for frame in frames:
            missing = [key for key in self.required if key not in frame]
            if missing:
                raise MissingLabelError(
                    f"{self.where}: frame sid={getattr(frame, 'sid', '?')} fid={getattr(frame, 'fid', '?')} "
                    f"has no {missing} (keys: {sorted(frame.keys())})"
                )
        return self.collater(frames)


@registry.register_trainer("deq")
class DEQTrainer(EquiformerV2ForcesTrainer):
    """``trainer: deq``: ``equiformerv2_forces`` (OCPTrainer + cosine schedule in epochs).
    Works with any fairchem model; for DEQ models it logs, per step
    and per validation, the mean solver iterations (``deq_nstep``), the mean final relative
    residual (``deq_residual``) and the fraction of graphs that did not converge
    (``deq_unconverged``), on the console line and in the configured logger."""

    def load_extras(self) -> None:
        # fairchem turns warmup_epochs into int(warmup_epochs * steps_per_epoch) and divides
        # by it: on small data that is 0. Keep at least one warmup step.
        params = self.config["optim"].get("scheduler_params", {})
        if self.train_loader is not None and params.get("warmup_epochs"):
            params["warmup_epochs"] = max(params["warmup_epochs"], 1.0 / len(self.train_loader))
        super().load_extras()

    def load_model(self) -> None:
        super().load_model()
        self._solver_stats = None
        self._unwrapped_model.register_forward_hook(self._capture_solver_stats)

    def _capture_solver_stats(self, module, inputs, output):
        if isinstance(output, dict) and all(key in output for key in SOLVER_STAT_KEYS):
            self._solver_stats = {key: output[key].detach() for key in SOLVER_STAT_KEYS}

    def get_dataloader(self, dataset, sampler, workers=None):
        labelled = {
            "train": (getattr(self, "train_dataset", None), "dataset"),
            "val": (getattr(self, "val_dataset", None), "val_dataset"),
        }
        split = next((name for name, (ds, _) in labelled.items() if ds is dataset), None)
        if split is not None:
            required = tuple(self.output_targets)
            where = f"dataset.{split} ({self.config[labelled[split][1]].get('src', '?')})"
            collater = self.collater
            self.collater = LabelCheckingCollater(collater, required, where)
            try:
                return super().get_dataloader(dataset, sampler, workers)
            finally:
                self.collater = collater
        return super().get_dataloader(dataset, sampler, workers)

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
