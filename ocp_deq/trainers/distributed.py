"""Metrics over all ranks in multi-process training.

fairchem's ``validate`` already sums every metric's total and count over the ranks
(``_aggregate_metrics``), DEQ solver statistics included. Its training loop, though, logs
rank 0's batches only. :func:`all_reduce_step_metrics` makes a training step's metrics
global with one small all-reduce per step, and carries each rank's non-finite flag, so
all ranks skip (or stop on) a bad batch together: DDP's backward needs every rank.
"""

from __future__ import annotations

import logging

import torch

from fairchem.core.common import distutils


def all_reduce_step_metrics(metrics: dict, nonfinite: bool, device) -> tuple[dict, bool]:
    """One step's ``{key: {total, numel, metric}}`` summed over ranks; a rank with
    non-finite values contributes nothing. Returns the global metrics (keys nobody
    counted are dropped) and whether any rank had non-finite values."""
    keys = sorted(metrics)  # the same order on every rank
    totals = [0.0 if nonfinite else float(metrics[key]["total"]) for key in keys]
    counts = [0.0 if nonfinite else float(metrics[key]["numel"]) for key in keys]
    summed = distutils.all_reduce(
        torch.tensor([*totals, *counts, float(nonfinite)], dtype=torch.float64, device=device), device=device
    ).tolist()
    n = len(keys)
    reduced = {
        key: {"total": total, "numel": int(count), "metric": total / count}
        for key, total, count in zip(keys, summed[:n], summed[n:2 * n])
        if count > 0
    }
    reduced = {key: reduced[key] for key in metrics if key in reduced}  # the caller's order
    return reduced, summed[2 * n] > 0


def log_solver_counts(metrics: dict) -> None:
    """After a validation's all-reduce: how many graphs the DEQ solved on all ranks, and how
    many did not converge (fairchem's sampler repeats a few frames when the split does not
    divide evenly over the ranks; they are counted here as in every metric)."""
    if "deq_nstep" not in metrics or not distutils.is_master():
        return
    graphs = int(metrics["deq_nstep"]["numel"])
    unconverged = int(round(float(metrics["deq_unconverged"]["total"])))
    backward = metrics.get("deq_backward_unconverged")
    backward = f", {int(round(float(backward['total'])))} with an unconverged force (IFT backward) solve" if backward else ""
    logging.info(
        f"DEQ solver: {graphs} graphs on {distutils.get_world_size()} rank(s), {unconverged} unconverged{backward}, "
        f"mean solver evaluations {float(metrics['deq_nstep']['metric']):.3f}"
    )
