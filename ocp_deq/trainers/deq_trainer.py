"""fairchem's OCP trainer (its EquiformerV2 variant: cosine LR in epochs) plus DEQ solver statistics and clear errors for bad data."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer

from ocp_deq.data.ordering import frame_ids, id_list, plain_id, trajectory_batches
from ocp_deq.deq import OPTIONAL_STAT_KEYS, SOLVER_STAT_KEYS
from ocp_deq.models.distance_expansion import band_gaussians
from ocp_deq.trainers.checkpointing import ResumableCheckpoints
from ocp_deq.trainers.distributed import all_reduce_step_metrics, log_solver_counts
from ocp_deq.trainers.wall_clock import BudgetSpent, TrainingClock, follow_budget
from ocp_deq.trainers.solver_report import plot_reuse_comparison, summarise_solver_log, write_solver_report


class NonFiniteError(FloatingPointError):
    """NaN/inf in a fixed point, prediction or loss during training."""


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


class _KeepOutput:
    """Stands in for the trainer's model during one forward: calls it and keeps its whole
    output dict on the trainer; everything else (state_dict for a checkpoint requested by a
    signal mid-forward, ...) goes to the model itself."""

    def __init__(self, model, trainer):
        self._model, self._trainer = model, trainer

    def __call__(self, data):
        out = self._model(data)
        self._trainer.last_model_output = out if isinstance(out, dict) else None
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


@registry.register_trainer("deq")
class DEQTrainer(ResumableCheckpoints, EquiformerV2ForcesTrainer):
    """``trainer: deq``: ``equiformerv2_forces`` (OCPTrainer + cosine schedule in epochs).
    Works with any fairchem model; for DEQ models it logs, per step
    and per validation, the mean solver iterations (``deq_nstep``), the mean final relative
    residual (``deq_residual``) and the fraction of graphs that did not converge
    (``deq_unconverged``; with conservative forces also ``deq_backward_unconverged``, the
    IFT backward solve behind the forces), on the console line and in the configured logger."""

    def load_extras(self) -> None:
        # fairchem turns warmup_epochs into int(warmup_epochs * steps_per_epoch) and divides
        # by it: on small data that is 0. Keep at least one warmup step.
        params = self.config["optim"].get("scheduler_params", {})
        if self.train_loader is not None and params.get("warmup_epochs"):
            params["warmup_epochs"] = max(params["warmup_epochs"], 1.0 / len(self.train_loader))
        super().load_extras()

    def load_datasets(self) -> None:
        """py-lmdb refuses to open one file twice in a process: when the test split is the
        validation split (evaluating on test frames: ``dataset.val.src=<test split>``), both
        use one dataset and loader."""
        val, test = self.config["val_dataset"], self.config["test_dataset"]
        shared = "src" in val and "src" in test and Path(val["src"]).resolve() == Path(test["src"]).resolve()
        if shared:
            self.config["test_dataset"] = {key: value for key, value in test.items() if key != "src"}
        try:
            super().load_datasets()
        finally:
            self.config["test_dataset"] = test
        if shared:
            self.test_dataset, self.test_sampler, self.test_loader = self.val_dataset, self.val_sampler, self.val_loader

    def train(self, disable_eval_tqdm: bool = False) -> None:
        """fairchem's training loop; with ``optim.max_train_seconds`` / ``eval_every_seconds``
        on a training clock (``ocp_deq.trainers.wall_clock``)."""
        self._clock = TrainingClock.from_config(self.config)
        if self._clock is None:
            return super().train(disable_eval_tqdm)
        try:
            super().train(disable_eval_tqdm)
        except BudgetSpent:
            logging.info(f"ocp_deq: training budget of {self._clock.budget:.0f} s spent at step {self.step}")
            self.save(checkpoint_file="checkpoint.pt", training_state=True)
        finally:
            clock, self._clock = self._clock, None
        if clock.interval is not None and self.val_loader is not None and \
                (not clock.records or clock.records[-1]["step"] != self.step):
            clock.record(self.step, self.epoch, self.validate("val", disable_eval_tqdm))

    def _after_step(self) -> None:
        """Training clock: validate on its intervals, steer the LR schedule, stop at the budget."""
        clock = getattr(self, "_clock", None)
        if clock is None:
            return
        clock.observe(self.last_model_output or {})
        validate, spent = clock.tick()
        if validate and self.val_loader is not None:
            clock.record(self.step, self.epoch, self.validate("val", disable_tqdm=True))
            self.model.train()
        fraction = clock.budget_fraction()
        if fraction is not None and self.scheduler is not None:
            params = self.config["optim"].get("scheduler_params", {})
            total = params.get("epochs") or self.config["optim"]["max_epochs"] * len(self.train_loader)
            follow_budget(self.scheduler, fraction, int(total), self.step)
        if spent:
            raise BudgetSpent

    def load_references_and_normalizers(self) -> None:
        """fairchem fits element references / normalisers (``...transforms.*.fit``) by reading
        the training frames; one without the label fails there with a bare KeyError."""
        try:
            super().load_references_and_normalizers()
        except KeyError as error:
            src = self.config["dataset"].get("src", "?")
            raise MissingLabelError(f"dataset.train ({src}): a training frame has no {error.args[0]!r} label, "
                                    f"needed to fit the element references / normalizers") from None

    def load_model(self) -> None:
        """fairchem's model, with the banded Gaussian distance expansion for DEQ and explicit
        EquiformerV2 alike (same output to 1e-9; a fair speed comparison needs it in both)."""
        super().load_model()
        band_gaussians(self.model)
        self.last_model_output, self._nonfinite, self._nonfinite_on_any_rank = None, None, False

    # -- fixed-point reuse: relaxations and trajectory-ordered evaluation ------------------
    @contextlib.contextmanager
    def solver_report(self, name: str, reuse: bool):
        """Collect per-call solver statistics inside the context (from every rank); log them
        and write ``<results_dir>/solver_<name>.json`` (DEQ models only)."""
        self._solver_log, start = [], time.perf_counter()
        try:
            yield
        finally:
            log, self._solver_log = self._solver_log, None
            ranks = distutils.get_world_size() if distutils.initialized() else 1
            if ranks > 1:  # every rank's systems
                gathered = [None] * ranks
                torch.distributed.all_gather_object(gathered, log)
                log = [call for rank_log in gathered for call in rank_log]
            self.last_solver_report = None
            if log and distutils.is_master():
                report = {"reuse": reuse, **summarise_solver_log(log, time.perf_counter() - start, ranks)}
                write_solver_report(self.config["cmd"].get("results_dir"), name, report)
                self.last_solver_report = report

    @contextlib.contextmanager
    def fixed_point_reuse(self):
        """DEQ models warm-start each system from its last fixed point inside the context
        (``model.deq.reuse``; a no-op for other models)."""
        reusing = getattr(self._unwrapped_model, "reusing", None)
        if reusing is None:
            yield None
            return
        with reusing() as cache:
            yield cache

    def run_relaxations(self):
        self._check_relaxation_ids()
        # ranks whose relaxations converge early run fewer steps: no per-step collectives
        with self._rank_local(), self.fixed_point_reuse() as cache, self._refining_at_relaxation_fmax(), \
                self.solver_report("relaxations", cache is not None):
            return super().run_relaxations()

    @contextlib.contextmanager
    def _refining_at_relaxation_fmax(self):
        """``model.deq.reuse.refine_fmax: null``: loose warm solves are refined where the
        relaxation could stop, at its own fmax (fairchem's ``task.relaxation_fmax``, 0.02)."""
        settings = self.deq_settings
        if settings is None or settings.reuse.refine_fmax is not None:
            yield
            return
        settings.reuse.refine_fmax = float(self.config["task"].get("relaxation_fmax", 0.02))
        try:
            yield
        finally:
            settings.reuse.refine_fmax = None

    def _check_relaxation_ids(self) -> None:
        """fairchem keys relaxation outputs by sid (duplicates dropped): refuse a relax set in
        which frames share one (e.g. several frames of one converted trajectory) before
        relaxing, rather than lose all but one of their results."""
        dataset = getattr(self, "relax_dataset", None)
        if dataset is None:
            return
        counts = Counter(str(plain_id(dataset[i].sid)) for i in range(len(dataset)))
        shared = {sid: n for sid, n in counts.items() if n > 1}
        if shared:
            example = ", ".join(f"sid {sid}: {n} frames" for sid, n in list(shared.items())[:3])
            raise ValueError(f"dataset.relax ({self.config['dataset'].get('relax', {}).get('src')}): {len(shared)} "
                             f"sid(s) shared by several frames ({example}); fairchem writes one relaxation per sid, "
                             "so give each initial structure its own sid")

    def _ordered_evaluation(self):
        """``task.ordered_evaluation``: false, true (trajectory order + reuse) or ``compare``
        (also a cold pass in the same order, logged as ``<split>_cold``)."""
        value = self.config.get("task", {}).get("ordered_evaluation", False)
        # fairchem's command-line overrides keep "true" / "false" as strings
        value = {"true": True, "false": False}.get(value.lower(), value) if isinstance(value, str) else value
        if value not in (False, True, "compare"):
            raise ValueError(f"task.ordered_evaluation={value!r} must be false, true or 'compare'")
        return value if self.deq_settings is not None else False

    def _trajectory_loader(self, dataset, where: str):
        ids = frame_ids(dataset, where)
        batches = trajectory_batches(
            ids, self.config["optim"].get("eval_batch_size", self.config["optim"]["batch_size"]),
            distutils.get_rank(), distutils.get_world_size(),
        )
        return DataLoader(dataset, batch_sampler=batches, collate_fn=self.collater,
                          num_workers=self.config["optim"].get("num_workers", 0))

    @contextlib.contextmanager
    def _rank_local(self):
        """Trajectory-ordered batches give the ranks different numbers of batches, so no
        collective may run per batch (it would wait forever for the rank that ran out):
        call the model without DDP (whose forward broadcasts buffers), and take each loss's
        mean over this rank's samples (fairchem's DDPLoss all-reduces the sample count).
        The metrics are still summed over the ranks once, at the end."""
        wrapped, self.model = self.model, self._unwrapped_model
        losses = [spec["fn"] for _, spec in self.loss_functions if hasattr(spec["fn"], "_ddp_mean")]
        for loss in losses:
            loss._ddp_mean = lambda num_samples, value: value / num_samples  # shadows the method
        try:
            yield
        finally:
            self.model = wrapped
            for loss in losses:
                del loss._ddp_mean

    @contextlib.contextmanager
    def _estimating_contraction(self):
        """Validation also estimates the contraction of f at each fixed point (DEQ models)."""
        backbone = getattr(self._unwrapped_model, "backbone", None)
        if not hasattr(backbone, "estimate_contraction"):
            yield
            return
        backbone.estimate_contraction = True
        try:
            yield
        finally:
            backbone.estimate_contraction = False

    def validate(self, split: str = "val", disable_tqdm: bool = False):
        try:
            with self._estimating_contraction():
                return self._validate(split, disable_tqdm)
        finally:
            if getattr(self, "_clock", None) is not None:
                self._clock.resume()  # validation time is not training time

    def _validate(self, split: str, disable_tqdm: bool):
        ordered = self._ordered_evaluation()
        if not ordered:
            return super().validate(split, disable_tqdm)
        dataset = self.val_dataset if split == "val" else self.test_dataset
        loaders = (self.val_loader, self.test_loader)
        self.val_loader = self.test_loader = self._trajectory_loader(dataset, f"{split} dataset")
        try:
            with self._rank_local(), self.fixed_point_reuse() as cache, \
                    self.solver_report(f"ordered_{split}", cache is not None):
                metrics = super().validate(split, disable_tqdm)
            if ordered == "compare":
                warm = self.last_solver_report
                with self._rank_local(), self.solver_report(f"ordered_{split}_cold", False):
                    super().validate(f"{split}_cold", disable_tqdm)
                if warm is not None and self.last_solver_report is not None:
                    plot_reuse_comparison(self.config["cmd"].get("results_dir"), f"ordered_{split}",
                                          warm, self.last_solver_report)
        finally:
            self.val_loader, self.test_loader = loaders
        return metrics

    def predict(self, data_loader, per_image: bool = True, results_file=None, disable_tqdm: bool = False):
        if not self._ordered_evaluation() or data_loader is not self.test_loader:
            return super().predict(data_loader, per_image, results_file, disable_tqdm)
        loader = self._trajectory_loader(self.test_dataset, "test dataset")
        with self._rank_local(), self.fixed_point_reuse() as cache, \
                self.solver_report("ordered_predict", cache is not None):
            return super().predict(loader, per_image, results_file, disable_tqdm)

    @property
    def deq_settings(self):
        """The model's ``model.deq`` settings, or None for a non-DEQ model."""
        return getattr(getattr(self._unwrapped_model, "backbone", None), "deq_settings", None)

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

    def _forward(self, batch):
        """fairchem's forward, keeping the model's whole output dict (solver statistics, DEQ
        loss terms) in ``last_model_output``: fairchem keeps only the predicted targets."""
        model, unwrapped, self.last_model_output = self.model, self._unwrapped_model, None
        self.model = _KeepOutput(model, self)
        if hasattr(unwrapped, "force_denorm"):  # DEQ reuse judges forces in eV/A (ReuseSettings.refine_fmax)
            normalizer = self.normalizers.get("forces")
            unwrapped.force_denorm = normalizer.forward if normalizer is not None else None
        try:
            out = super()._forward(batch)
        finally:
            self.model = model
            if hasattr(unwrapped, "force_denorm"):
                unwrapped.force_denorm = None
        self._log_solve(batch)
        self._nonfinite = self._find_nonfinite(out, batch)
        return out

    def _log_solve(self, batch) -> None:
        log, out = getattr(self, "_solver_log", None), self.last_model_output or {}
        if log is not None and "deq_nstep" in out:
            sid = getattr(batch, "sid", None)
            sids = id_list(sid) if sid is not None else [None] * len(out["deq_nstep"])
            log.append({"sid": sids, "nstep": out["deq_nstep"].tolist(), "converged": out["deq_converged"].tolist(),
                        "refined": out["deq_refined"].tolist() if "deq_refined" in out else []})

    def _find_nonfinite(self, out, batch) -> str | None:
        """Which outputs are NaN/inf, and for which systems (sid)."""
        bad = torch.zeros(batch.natoms.numel(), dtype=torch.bool, device=batch.natoms.device)
        what = []
        model_out = self.last_model_output or {}
        for key, value in [*out.items(), ("fixed point residual", model_out.get("deq_residual"))]:
            if value is None:
                continue
            finite = torch.isfinite(value.detach()).reshape(value.shape[0], -1).all(dim=1)
            if finite.all():
                continue
            what.append(key)
            graphs = batch.batch[~finite] if value.shape[0] == batch.batch.numel() else torch.nonzero(~finite).flatten()
            bad[graphs] = True
        if not what:
            return None
        sids = [sid for sid, hit in zip(id_list(batch.sid), bad.tolist()) if hit] if hasattr(batch, "sid") else "?"
        return f"non-finite {', '.join(what)} at step {self.step} (epoch {self.epoch:.3f}) for systems sid={sids}"

    def _shape_like_targets(self, prediction: dict, batch) -> dict:
        """Model-level predictions reshaped as fairchem's _forward shapes its outputs."""
        shaped = {}
        for key, target in self.output_targets.items():
            rows = int(batch.natoms.sum()) if target["level"] == "atom" else batch.natoms.numel()
            shaped[key] = prediction[key].view(rows, -1)
        return shaped

    def _compute_loss(self, out, batch):
        loss = super()._compute_loss(out, batch)
        settings, model_out = self.deq_settings, self.last_model_output or {}
        if settings is not None and self._unwrapped_model.training:
            states = model_out.get("deq_correction", [])
            for k, state in enumerate(states):
                weight = settings.correction.decay ** (len(states) - k)
                loss = loss + weight * super()._compute_loss(self._shape_like_targets(state, batch), batch)
            if "deq_jac_loss" in model_out:
                loss = loss + settings.jacobian.weight * model_out["deq_jac_loss"]
        if self._nonfinite is None and not torch.isfinite(loss.detach()):
            self._nonfinite = f"non-finite loss ({loss.item()}) at step {self.step} (epoch {self.epoch:.3f}) for systems sid={id_list(batch.sid)}"
        if self._nonfinite is not None and self._nonfinite_action() == "skip":
            return torch.zeros((), device=loss.device, requires_grad=True)
        return loss

    def _nonfinite_action(self) -> str:
        return self.deq_settings.on_nonfinite if self.deq_settings is not None else "stop"

    def _backward(self, loss) -> None:
        message, self._nonfinite = self._nonfinite, None
        anywhere, self._nonfinite_on_any_rank = self._nonfinite_on_any_rank, False
        if message is None and not anywhere:
            super()._backward(loss)
            return self._after_step()
        message = message or f"non-finite values on another rank at step {self.step} (epoch {self.epoch:.3f})"
        if self._nonfinite_action() == "stop":
            raise NonFiniteError(f"{message}; stopping (set model.deq.on_nonfinite=skip to skip such batches)")
        logging.warning(f"{message}; batch skipped (model.deq.on_nonfinite=skip)")
        self.skipped_batches = getattr(self, "skipped_batches", 0) + 1
        self.completed_step = self.step  # done with this batch (see rewind_to_completed_step)
        self.optimizer.zero_grad()
        return self._after_step()

    def _compute_metrics(self, out, batch, evaluator, metrics=None):
        training = self._unwrapped_model.training
        if self._nonfinite is not None and not training:
            logging.warning(f"{self._nonfinite} (evaluation)")
        running = metrics  # in training: this step's metrics alone first, summed over the ranks below
        metrics = super()._compute_metrics(out, batch, evaluator, {} if training else metrics)
        model_out = self.last_model_output or {}
        if all(key in model_out for key in SOLVER_STAT_KEYS):
            n = int(model_out["deq_nstep"].numel())
            stats = [("deq_nstep", model_out["deq_nstep"]), ("deq_residual", model_out["deq_residual"]),
                     ("deq_unconverged", (~model_out["deq_converged"]).float())]
            stats += [(key, model_out[key]) for key in OPTIONAL_STAT_KEYS if key in model_out]
            for key, values in stats:
                metrics = evaluator.update(key, {"total": float(values.float().sum()), "numel": n}, metrics)
        if "deq_backward_converged" in model_out:  # conservative forces through an IFT solve
            unconverged = (~model_out["deq_backward_converged"]).float()
            metrics = evaluator.update("deq_backward_unconverged",
                                       {"total": float(unconverged.sum()), "numel": int(unconverged.numel())}, metrics)
        if not training:
            return metrics
        step, self._nonfinite_on_any_rank = all_reduce_step_metrics(metrics, self._nonfinite is not None, self.device)
        running = {} if running is None else running
        for key, stat in step.items():
            running = evaluator.update(key, stat, running)
        return running

    def _aggregate_metrics(self, metrics):
        """fairchem all-reduces each metric in the order of the rank's dict: every rank must
        hold the same keys in the same order, also a rank whose share of a trajectory-ordered
        evaluation is empty (or lacks a key)."""
        if distutils.initialized() and distutils.get_world_size() > 1:
            keys = [None] * distutils.get_world_size()
            torch.distributed.all_gather_object(keys, list(metrics))
            empty = {"total": 0.0, "numel": 0}
            # one dtype per entry on every rank (gloo checks sizes): float64 totals, int counts
            metrics = {key: {"total": np.float64(float(metrics.get(key, empty)["total"])),
                             "numel": int(metrics.get(key, empty)["numel"])}
                       for key in dict.fromkeys(k for rank_keys in keys for k in rank_keys)}
        metrics = super()._aggregate_metrics(metrics)
        log_solver_counts(metrics)
        return metrics
