"""One DEQ forward: start states, per-graph solve, gradient attachment, statistics.

The network supplies a :class:`~ocp_deq.deq.problem.FixedPointProblem` (its f with all
graph-only work done once); everything about finding and differentiating z* is here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torchdeq.loss import jac_reg

from ocp_deq.deq import gradients
from ocp_deq.deq.contraction import contraction_penalty, spectral_radius
from ocp_deq.deq.problem import FixedPointProblem
from ocp_deq.deq.reuse import FixedPointCache
from ocp_deq.deq.settings import DEQSettings, SolverSettings
from ocp_deq.deq.solvers import Solution, solve

# Warm-started training solves evaluate f(z0) with autograd (tests compare against False:
# the same loss and gradients with one more evaluation of f).
FUSE_WARM_TRAINING_EVALUATION = True

# Per-graph solver statistics in every DEQ model output.
SOLVER_STAT_KEYS = ("deq_nstep", "deq_residual", "deq_converged")
# ... and, when they apply, which graphs started warm, their estimated contraction and
# which were solved again to eval_solver's tolerance (``ReuseSettings.refine_fmax``).
OPTIONAL_STAT_KEYS = ("deq_warm", "deq_contraction", "deq_refined")


@dataclass
class Equilibrium:
    z: torch.Tensor  # z* [N, ...], carrying the configured gradient
    solution: Solution  # per-graph statistics and the solve's cost
    states: list = field(default_factory=list)  # earlier states for fixed-point correction losses
    backward: gradients.BackwardReport | None = None  # IFT: filled when autograd runs
    jacobian_loss: torch.Tensor | None = None
    warm: torch.Tensor | None = None  # graphs started from a cached fixed point
    contraction: torch.Tensor | None = None  # per-graph spectral radius of df/dz at z*, when estimated

    def stats(self) -> dict:
        s = self.solution
        stats = {"deq_nstep": s.nstep.detach().float(), "deq_residual": s.residual.detach(),
                 "deq_converged": s.converged.detach(), "deq_work": s.work}
        if self.warm is not None:
            stats["deq_warm"] = self.warm.detach()
        if self.contraction is not None:
            stats["deq_contraction"] = self.contraction
        return stats


def correction_steps(solver: SolverSettings, n_states: int) -> list[int]:
    """Evaluation counts at which to keep states for fixed-point correction (final excluded)."""
    if n_states <= 1:
        return []
    step = max(int(solver.max_iter) // n_states, 1)
    return [step * (k + 1) for k in range(n_states - 1)]


def solve_from_starts(problem: FixedPointProblem, z0: torch.Tensor, warm: torch.Tensor | None,
                      settings: DEQSettings, solver: SolverSettings, keep_steps=(),
                      first: torch.Tensor | None = None) -> Solution:
    """Cold graphs with ``solver``; warm ones with ``reuse.solver`` (and ``solver`` after it
    where it stopped unconverged, with ``reuse.fallback``). One problem, no re-encoding.
    ``first``: f(z0), already evaluated (one solver for all graphs only)."""
    if _one_solver(warm, settings, solver):
        return solve(problem, z0, solver, keep_steps, first=first)
    if first is not None:
        raise ValueError("a known first evaluation needs one solver for every graph")
    reuse = settings.reuse
    warm_solver = reuse.solver or solver
    out = Solution.empty(z0, problem.segments.num_graphs, len(keep_steps))
    for mask, part_solver in ((warm, warm_solver), (~warm, solver)):
        if mask.any():
            _solve_part(problem, mask, z0, part_solver, keep_steps, out)
    retry = warm & ~out.converged
    if reuse.fallback and retry.any():
        _solve_part(problem, retry, out.z, solver, keep_steps, out, add_steps=True)
    return out


def _one_solver(warm: torch.Tensor | None, settings: DEQSettings, solver: SolverSettings) -> bool:
    return warm is None or not warm.any() or (settings.reuse.solver or solver) == solver


@dataclass
class _Linearisation:
    """f evaluated with autograd at z (a leaf requiring grad when df/dz is wanted)."""

    z: torch.Tensor
    fz: torch.Tensor
    seconds: float = 0.0

    @classmethod
    def at(cls, problem: FixedPointProblem, z: torch.Tensor, wrt_z: bool) -> "_Linearisation":
        start = time.perf_counter()
        z = z.detach().requires_grad_(wrt_z)
        with torch.enable_grad():
            fz = problem.f(z)
        return cls(z, fz, time.perf_counter() - start)


def _solve_part(problem: FixedPointProblem, mask: torch.Tensor, z0: torch.Tensor, solver: SolverSettings,
                keep_steps, out: Solution, add_steps: bool = False) -> None:
    """Solve the graphs in ``mask`` from ``z0`` into ``out``; the whole problem as it is
    when the mask holds every graph (restricting copies every edge feature)."""
    graphs, nodes = mask.nonzero().flatten(), problem.segments.node_mask(mask)
    part = problem if mask.all() else problem.restrict(graphs)
    out.put(graphs, nodes, solve(part, z0[nodes], solver, keep_steps), add_steps=add_steps)


def equilibrium(problem: FixedPointProblem, settings: DEQSettings, like: torch.Tensor, *,
                training: bool, needs_grad: bool, exact_grad: bool,
                z0: torch.Tensor | None = None, solver: SolverSettings | None = None,
                cache: FixedPointCache | None = None, keys: list | None = None, numbers: list | None = None,
                contraction_iters: int = 0) -> Equilibrium:
    """Find z* of every graph and attach gradients.

    ``needs_grad``: autograd wants gradients (training, or conservative forces);
    ``exact_grad``: derivatives w.r.t. inputs are taken (positions), so phantom gradients
    give way to IFT. ``cache``: warm starts per system (or training frame) ``keys`` with
    atomic ``numbers``; the fixed points found are stored back. ``contraction_iters`` > 0:
    also estimate each graph's contraction at z* (``ocp_deq.deq.contraction``).
    """
    solver = solver or (settings.train_solver if training else settings.eval_solver)
    warm = None
    if z0 is None and cache is not None:
        z0, warm = cache.starts(keys, numbers, like)
    if z0 is None:
        z0 = torch.zeros_like(like)
    z0 = z0.to(like.dtype)
    mode = settings.gradient
    if mode == "phantom" and exact_grad:
        mode = "ift"
    jacobian_due = needs_grad and training and _jacobian_due(settings)
    linear = None  # f with autograd at the solve's last evaluation point, shared by phantom step and penalty
    if needs_grad and mode == "bptt":
        z, solution = gradients.unrolled(problem, z0, solver)
        result = Equilibrium(z, solution, warm=warm)
    else:
        n_states = int(settings.correction.n_states) if (training and needs_grad) else 1
        phantom = needs_grad and mode == "phantom"
        if phantom and FUSE_WARM_TRAINING_EVALUATION and warm is not None and warm.all() \
                and _one_solver(warm, settings, solver):
            # warm training starts mostly pass their first check: evaluating f(z0) with autograd
            # then serves as the solve's evaluation and the phantom step's (same values)
            linear = _Linearisation.at(problem, z0, wrt_z=jacobian_due)
        with torch.no_grad():
            solution = solve_from_starts(problem, z0, warm, settings, solver, correction_steps(solver, n_states),
                                         first=None if linear is None else linear.fz.detach())
        if linear is not None:
            solution.work.f_seconds += linear.seconds
            solution.work.seconds += linear.seconds
            if not bool((solution.nstep == 1).all()):  # some graph went on: z_in is not z0 there
                linear = None
        result = Equilibrium(solution.z, solution, warm=warm)
        if needs_grad:
            if mode == "ift":
                result.z, result.backward = gradients.implicit(problem, solution.z, settings.backward_solver)
            else:
                linear = linear or _Linearisation.at(problem, solution.z_in, wrt_z=jacobian_due)
                result.z = gradients.phantom(problem, linear.z, settings.grad_steps, settings.grad_tau, linear.fz)
            # correction states always use phantom steps (their own fixed points do not exist)
            result.states = [gradients.phantom(problem, s, settings.grad_steps, settings.grad_tau)
                             for s in solution.states]
    if jacobian_due:
        linear = linear or _Linearisation.at(problem, solution.z_in, wrt_z=True)
        jac = settings.jacobian
        if jac.kind == "spectral":
            result.jacobian_loss, rho = contraction_penalty(problem, linear.z, int(jac.power_iters), float(jac.target),
                                                            f_z=linear.fz)
            if jac.freq >= 1:  # a training metric only when every step (on every rank) has it
                result.contraction = rho
        else:
            result.jacobian_loss = jac_reg(linear.fz, linear.z, vecs=int(jac.vectors))
    if contraction_iters > 0:
        result.contraction = spectral_radius(problem, solution.z, contraction_iters)
    if cache is not None:
        cache.store_all(keys, numbers, solution.z)
        cache.record({"keys": keys, "warm": warm.cpu(),
                      **{k: v.cpu() for k, v in result.stats().items() if k in SOLVER_STAT_KEYS}})
    return result


def _jacobian_due(settings: DEQSettings) -> bool:
    jac = settings.jacobian
    return jac.weight > 0 and (jac.freq >= 1 or torch.rand(()).item() < jac.freq)
