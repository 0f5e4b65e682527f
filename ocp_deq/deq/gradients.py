"""Gradients through a fixed point: phantom steps, implicit differentiation, unrolling.

- phantom: ``steps`` damped applications of f with autograd (parameters only), from the
  point of the solve's last evaluation, so that the first one has the solve's output value.
- IFT: one application of f at z* with autograd, whose incoming gradient g is replaced by
  the solution of the adjoint equation y = J^T y + g (J = df/dz at z*), solved per graph
  with the same active-set solvers as the forward pass: each graph's adjoint leaves when
  it meets ``backward_solver.tol``, and the vector-Jacobian products are taken on the
  remaining graphs only.
- BPTT: fixed-point iteration with autograd, each graph stopped at its own tolerance.
"""

from __future__ import annotations

import torch

from ocp_deq.deq.problem import FixedPointProblem, Segments
from ocp_deq.deq.settings import SolverSettings
from ocp_deq.deq.solvers import Solution, solve


def phantom(problem: FixedPointProblem, z: torch.Tensor, steps: int, tau: float,
            f_z: torch.Tensor | None = None) -> torch.Tensor:
    """``steps`` applications of z -> tau f(z) + (1 - tau) z from ``z`` (a constant, or a leaf
    whose own gradient is not wanted); ``f_z``: f(z) with autograd, if already evaluated."""
    z = z if z.requires_grad else z.detach()
    for step in range(int(steps)):
        fz = f_z if step == 0 and f_z is not None else problem.f(z)
        z = tau * fz + (1 - tau) * z
    return z


class AdjointProblem:
    """y = J^T y + g per graph, J the Jacobian of f at z*; restricting rebuilds f's graph."""

    def __init__(self, primal: FixedPointProblem, z_star: torch.Tensor, grad: torch.Tensor):
        self.primal, self.z_star, self.grad = primal, z_star, grad
        self.segments: Segments = primal.segments
        self.h = z_star.detach().requires_grad_()
        with torch.enable_grad():
            self.fh = primal.f(self.h)

    def f(self, y: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self.fh, self.h, y, retain_graph=True)[0] + self.grad

    def restrict(self, graphs: torch.Tensor) -> "AdjointProblem":
        _, nodes = self.segments.restrict(graphs)
        return AdjointProblem(self.primal.restrict(graphs), self.z_star[nodes], self.grad[nodes])


class BackwardReport:
    """Filled when autograd runs the adjoint solve: per-graph convergence and its cost."""

    def __init__(self):
        self.solution: Solution | None = None

    @property
    def converged(self) -> torch.Tensor | None:
        return None if self.solution is None else self.solution.converged


class _ImplicitGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f_star, problem, z_star, settings, report):
        ctx.problem, ctx.settings, ctx.report = problem, settings, report
        ctx.save_for_backward(z_star)
        return f_star.clone()

    @staticmethod
    def backward(ctx, grad):
        z_star, = ctx.saved_tensors
        adjoint = AdjointProblem(ctx.problem, z_star, grad.detach())
        with torch.no_grad():
            solution = solve(adjoint, torch.zeros_like(grad), ctx.settings)
        ctx.report.solution = solution
        return solution.z, None, None, None, None


def implicit(problem: FixedPointProblem, z_star: torch.Tensor, backward: SolverSettings):
    """z* with exact implicit gradients; returns (z, report of the backward solve)."""
    z_star = z_star.detach()
    report = BackwardReport()
    return _ImplicitGradient.apply(problem.f(z_star), problem, z_star, backward, report), report


def unrolled(problem: FixedPointProblem, z0: torch.Tensor, settings: SolverSettings) -> tuple[torch.Tensor, Solution]:
    """Fixed-point iteration with autograd through every step (BPTT), per-graph stopping."""
    tol, rel = float(settings.tol), settings.stop_mode == "rel"
    B = problem.segments.num_graphs
    stats = Solution.empty(z0.detach(), B)
    graph_ids = torch.arange(B, device=z0.device)
    node_ids = torch.arange(z0.shape[0], device=z0.device)
    finished, finished_in, finished_nodes = [], [], []
    z = z0
    for evaluation in range(1, int(settings.max_iter) + 1):
        seg = problem.segments
        fz = problem.f(z)
        stats.work.calls += 1
        stats.work.graph_evaluations += seg.num_graphs
        stats.work.node_evaluations += seg.num_nodes
        with torch.no_grad():
            absolute = seg.norm(fz - z)
            relative = absolute / (seg.norm(fz) + 1e-9)
        done = (relative if rel else absolute) < tol
        last = evaluation == int(settings.max_iter)
        leaving = torch.ones_like(done) if last else done
        stats.nstep[graph_ids[leaving]] = float(evaluation)
        stats.residual[graph_ids[leaving]] = relative[leaving]
        stats.abs_residual[graph_ids[leaving]] = absolute[leaving]
        stats.converged[graph_ids[leaving]] = done[leaving]
        if leaving.any():
            nodes = seg.node_mask(leaving)
            finished.append(fz[nodes])
            finished_in.append(z[nodes].detach())
            finished_nodes.append(node_ids[nodes])
        if leaving.all():
            break
        if leaving.any():
            keep = (~leaving).nonzero().flatten()
            nodes = seg.node_mask(~leaving)
            problem = problem.restrict(keep)
            graph_ids, node_ids, z = graph_ids[keep], node_ids[nodes], fz[nodes]
        else:
            z = fz
    order = torch.argsort(torch.cat(finished_nodes))
    stats.z, stats.z_in = torch.cat(finished)[order], torch.cat(finished_in)[order]
    return stats.z, stats


__all__ = ["phantom", "implicit", "unrolled", "BackwardReport"]
