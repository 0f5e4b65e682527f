"""Solver statistics of a relaxation or ordered-evaluation run: first visits vs later ones."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

PER_SYSTEM_LIMIT = 1000  # keep per-system nstep sequences in the report up to this many systems


def summarise_solver_log(log: list[dict], wall_time: float, ranks: int = 1) -> dict:
    """``log``: one entry per model call with ``sid``, ``nstep``, ``converged`` lists, from
    ``ranks`` processes that ran side by side for ``wall_time`` seconds.

    A system's first call starts cold; later calls can reuse its fixed point. ``refined``
    (optional): which graphs' loose warm solves were solved again (``reuse.refine_fmax``).
    """
    seen, first, later, unconverged = {}, [], [], 0
    for call in log:
        for sid, nstep, converged in zip(call["sid"], call["nstep"], call["converged"]):
            (later if sid in seen else first).append(nstep)
            seen.setdefault(sid, []).append(nstep)
            unconverged += not converged
    graphs = len(first) + len(later)
    report = {
        "model_calls": len(log),
        "systems": len(seen),
        "graph_evaluations": graphs,
        "mean_nstep": float(np.mean(first + later)),
        "mean_nstep_first_call": float(np.mean(first)),
        "mean_nstep_later_calls": float(np.mean(later)) if later else None,
        "unconverged_fraction": unconverged / graphs,
        "refined_solves": int(sum(sum(call.get("refined", [])) for call in log)),
        "wall_time_s": wall_time,
        "ranks": ranks,
        "wall_time_per_call_s": wall_time * ranks / len(log),
        "wall_time_per_system_s": wall_time * ranks / len(seen),
    }
    if len(seen) <= PER_SYSTEM_LIMIT:
        report["nstep_per_system"] = {str(sid): steps for sid, steps in seen.items()}
    return report


def write_solver_report(results_dir: str | None, name: str, report: dict) -> Path | None:
    later = report["mean_nstep_later_calls"]
    logging.info(
        f"solver statistics ({name}, reuse {'on' if report['reuse'] else 'off'}): {report['systems']} systems, "
        f"{report['model_calls']} model calls, mean solver evaluations {report['mean_nstep']:.2f} "
        f"(first call {report['mean_nstep_first_call']:.2f}, later calls "
        f"{'-' if later is None else f'{later:.2f}'}), unconverged {report['unconverged_fraction']:.3f}, "
        f"refined {report['refined_solves']}, {report['wall_time_per_call_s']:.3f} s per call, {report['wall_time_per_system_s']:.3f} s per system"
    )
    if results_dir is None:
        return None
    path = Path(results_dir) / f"solver_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def plot_reuse_comparison(results_dir: str | None, name: str, warm: dict, cold: dict) -> Path | None:
    """``solver_<name>.png``: solver evaluations at each position along the trajectories
    (mean over systems), with reuse and with cold starts."""
    if results_dir is None or "nstep_per_system" not in warm or "nstep_per_system" not in cold:
        return None
    from matplotlib.figure import Figure  # no pyplot: the user's matplotlib backend stays as it is

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for label, report in (("cold starts", cold), ("reuse", warm)):
        runs = list(report["nstep_per_system"].values())
        length = max(len(run) for run in runs)
        mean = [np.mean([run[t] for run in runs if t < len(run)]) for t in range(length)]
        ax.plot(mean, lw=1, label=f"{label} (mean {report['mean_nstep']:.2f})")
    ax.set_xlabel("frame along the trajectory")
    ax.set_ylabel("solver evaluations of f")
    n = warm["systems"]
    ax.set_title(f"{name}: {n} trajector{'y' if n == 1 else 'ies'}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    path = Path(results_dir) / f"solver_{name}.png"
    fig.savefig(path, dpi=120)
    return path
