"""Per-graph fixed-point solvers that evaluate f only on graphs still iterating.

torchdeq's solvers iterate a batch until its slowest row converges and cannot drop rows.
Here every graph leaves the iteration at the evaluation where it meets the tolerance:
its state, evaluation count and residual are final, and f is evaluated from then on only
on the remaining graphs (their nodes, edges and edge features: ``problem.restrict``).
All inner products are per graph, so a graph's iterates are those it would have alone.

Anderson and Broyden follow torchdeq's formulas (same iterates: tests/test_solver.py);
unlike torchdeq, the residual is checked after *every* evaluation, so a warm start that is
already converged costs one evaluation. A graph that never meets the tolerance returns its
last state and residual. ``max_iter`` counts evaluations of f for every solver. Each graph
also returns the point of its last evaluation (``Solution.z_in``): phantom gradients and
the Jacobian penalties differentiate f there, so their first f(z_in) has the value of the
solve's own output and a training step can take it from the solve's evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ocp_deq.deq.problem import FixedPointProblem, Segments
from ocp_deq.deq.settings import SolverSettings

ANDERSON_LAMBDA = 1e-4  # torchdeq's default regularisation of the mixing system


@dataclass
class Work:
    """What a solve cost: f calls, graph- and node-evaluations, seconds in and out of f."""

    calls: int = 0
    graph_evaluations: int = 0
    node_evaluations: int = 0
    f_seconds: float = 0.0
    seconds: float = 0.0

    def add(self, other: "Work") -> None:
        for name in ("calls", "graph_evaluations", "node_evaluations", "f_seconds", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Solution:
    """Per-graph result of a solve: states [N, ...], and per graph [B] values."""

    z: torch.Tensor
    z_in: torch.Tensor  # where f was last evaluated: f(z_in) is z (Anderson, fixed-point iteration); Broyden: z_in = z
    nstep: torch.Tensor
    residual: torch.Tensor  # relative: |f(z) - z| / |f(z)|
    abs_residual: torch.Tensor
    converged: torch.Tensor
    states: list = field(default_factory=list)  # requested earlier states (fixed-point correction)
    work: Work = field(default_factory=Work)

    @classmethod
    def empty(cls, like: torch.Tensor, num_graphs: int, n_states: int = 0) -> "Solution":
        per_graph = like.new_zeros(num_graphs)
        return cls(torch.zeros_like(like), torch.zeros_like(like), per_graph.clone(), per_graph.clone(), per_graph.clone(),
                   torch.zeros(num_graphs, dtype=torch.bool, device=like.device),
                   [torch.zeros_like(like) for _ in range(n_states)])

    def put(self, graphs: torch.Tensor, nodes: torch.Tensor, part: "Solution", add_steps: bool = False) -> None:
        """Write ``part`` (a solve on ``graphs`` / ``nodes`` of this batch) into this solution."""
        self.z[nodes], self.z_in[nodes] = part.z, part.z_in
        self.nstep[graphs] = part.nstep + (self.nstep[graphs] if add_steps else 0)
        self.residual[graphs] = part.residual
        self.abs_residual[graphs] = part.abs_residual
        self.converged[graphs] = part.converged
        for mine, theirs in zip(self.states, part.states):
            mine[nodes] = theirs
        self.work.add(part.work)


class _Run:
    """Active-set bookkeeping shared by the solvers: counted f, retirement of graphs."""

    def __init__(self, problem: FixedPointProblem, z0: torch.Tensor, settings: SolverSettings, keep_steps,
                 first: torch.Tensor | None = None):
        self.problem, self.segments = problem, problem.segments
        self.first = first  # f(z0), when the caller evaluated it already
        self.tol, self.stop_mode = float(settings.tol), settings.stop_mode
        B = self.segments.num_graphs
        self.graph_ids = torch.arange(B, device=z0.device)
        self.node_ids = torch.arange(z0.shape[0], device=z0.device)
        self.out = Solution.empty(z0, B, len(keep_steps))
        self.keep_steps = list(keep_steps)
        self.recorded_until = torch.zeros(B, dtype=torch.long, device=z0.device)  # last kept step written
        self.state = self.point = self.relative = self.absolute = None  # the latest evaluation's, per active graph

    def f(self, z: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if self.first is not None:  # the first evaluation is always f(z0)
            fz, self.first = self.first, None
        else:
            fz = self.problem.f(z)
        work = self.out.work
        work.calls += 1
        work.graph_evaluations += self.segments.num_graphs
        work.node_evaluations += self.segments.num_nodes
        work.f_seconds += time.perf_counter() - start
        return fz

    def check(self, x: torch.Tensor, fx: torch.Tensor, state: torch.Tensor, evaluation: int) -> torch.Tensor:
        """Residuals after ``evaluation`` evaluations; returns the graphs that met the tolerance."""
        seg = self.segments
        absolute = seg.norm(fx - x)
        relative = absolute / (seg.norm(fx) + 1e-9)
        residual = relative if self.stop_mode == "rel" else absolute
        self.state, self.point, self.relative, self.absolute = state, x, relative, absolute
        if evaluation in self.keep_steps:
            k = self.keep_steps.index(evaluation)
            self.out.states[k][self.node_ids] = state
            self.recorded_until[self.graph_ids] = k + 1
        return residual < self.tol

    def retire(self, graphs: torch.Tensor, evaluation: int, converged: bool) -> None:
        """Write the final result of these active graphs (a bool mask over active graphs)."""
        if not graphs.any():
            return
        nodes = self.segments.node_mask(graphs)
        ids, node_ids = self.graph_ids[graphs], self.node_ids[nodes]
        out = self.out
        out.z[node_ids] = self.state[nodes]
        out.z_in[node_ids] = self.point[nodes]
        out.nstep[ids] = float(evaluation)
        out.residual[ids] = self.relative[graphs]
        out.abs_residual[ids] = self.absolute[graphs]
        out.converged[ids] = converged
        for k, state in enumerate(out.states):  # steps after retirement keep the final state
            later = self.segments.node_mask(graphs & (self.recorded_until[self.graph_ids] <= k))
            state[self.node_ids[later]] = self.state[later]

    def keep(self, graphs: torch.Tensor) -> torch.Tensor:
        """Drop every active graph not in the mask; returns the kept node mask."""
        index = graphs.nonzero().flatten()
        nodes = self.segments.node_mask(graphs)
        self.problem = self.problem.restrict(index)
        self.segments = self.problem.segments
        self.graph_ids, self.node_ids = self.graph_ids[index], self.node_ids[nodes]
        return nodes


class _Anderson:
    """torchdeq's Anderson mixing (tau 1), history and Gram matrices per graph."""

    def __init__(self, run: _Run, z0: torch.Tensor, m: int):
        self.run, self.m, self.k = run, int(m), 0
        self.X = z0.new_zeros((self.m, *z0.shape))
        self.F = torch.zeros_like(self.X)
        self.x0 = z0

    def next(self):
        run, k, m = self.run, self.k, self.m
        if k == 0:
            x = self.x0
        elif k == 1:
            x = self.F[0]
        else:
            n = min(k, m)
            G = (self.F[:n] - self.X[:n]).flatten(2)  # [n, nodes, D]
            gram = run.segments.sum(torch.einsum("ind,jnd->nij", G, G))  # [graphs, n, n]
            B = gram.shape[0]
            H = gram.new_zeros((B, n + 1, n + 1))
            H[:, 0, 1:] = H[:, 1:, 0] = 1
            H[:, 1:, 1:] = gram + ANDERSON_LAMBDA * torch.eye(n, dtype=gram.dtype, device=gram.device)
            y = gram.new_zeros((B, n + 1, 1))
            y[:, 0] = 1
            alpha = torch.linalg.solve(H, y)[:, 1:, 0]  # [graphs, n]
            x = torch.einsum("in...,ni->n...", self.F[:n], alpha[run.segments.batch])
        fx = run.f(x)
        self.X[k % m], self.F[k % m] = x, fx
        self.k += 1
        return x, fx, fx

    def keep(self, nodes: torch.Tensor) -> None:
        self.X, self.F = self.X[:, nodes], self.F[:, nodes]


class _Broyden:
    """torchdeq's Broyden method (no line search) with per-graph inner products."""

    def __init__(self, run: _Run, z0: torch.Tensor):
        self.run, self.x, self.k = run, z0, 0
        self.U, self.VT = [], []
        self.gx = self.delta = None

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        seg, out = self.run.segments, -v
        for u, vt in zip(self.U, self.VT):
            out = out + u * seg.expand(seg.dot(vt, v), u)
        return out

    def _rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        seg, out = self.run.segments, -v
        for u, vt in zip(self.U, self.VT):
            out = out + vt * seg.expand(seg.dot(v, u), vt)
        return out

    def next(self):
        seg = self.run.segments
        if self.k == 0:
            fx = self.run.f(self.x)
            self.gx, self.k = fx - self.x, 1
            return self.x, fx, self.x
        if self.delta is not None:
            dx, dg = self.delta
            vT = self._rmatvec(dx)
            u = (dx - self._matvec(dg)) / seg.expand(seg.dot(vT, dg), dx)
            self.U.append(torch.nan_to_num(u, nan=0.0))
            self.VT.append(torch.nan_to_num(vT, nan=0.0))
        x = self.x - self._matvec(self.gx)
        fx = self.run.f(x)
        gx = fx - x
        self.delta = (x - self.x, gx - self.gx)
        self.x, self.gx, self.k = x, gx, self.k + 1
        return x, fx, x

    def keep(self, nodes: torch.Tensor) -> None:
        self.x, self.gx = self.x[nodes], self.gx[nodes]
        self.U, self.VT = [u[nodes] for u in self.U], [v[nodes] for v in self.VT]
        if self.delta is not None:
            self.delta = tuple(d[nodes] for d in self.delta)


class _FixedPointIteration:
    def __init__(self, run: _Run, z0: torch.Tensor):
        self.run, self.x = run, z0

    def next(self):
        x = self.x
        self.x = fx = self.run.f(x)
        return x, fx, fx

    def keep(self, nodes: torch.Tensor) -> None:
        self.x = self.x[nodes]


def solve(problem: FixedPointProblem, z0: torch.Tensor, settings: SolverSettings, keep_steps=(),
          first: torch.Tensor | None = None) -> Solution:
    """Solve z = f(z) per graph from ``z0`` [N, ...]; f only on graphs still iterating.

    ``keep_steps``: evaluation counts at which to keep each graph's state
    (for fixed-point correction losses; a graph done earlier keeps its final state).
    ``first``: f(z0) if already known (it still counts as the first evaluation).
    """
    start = time.perf_counter()
    run = _Run(problem, z0, settings, keep_steps, first)
    if settings.solver == "anderson":
        method = _Anderson(run, z0, settings.anderson_m)
    elif settings.solver == "broyden":
        method = _Broyden(run, z0)
    else:
        method = _FixedPointIteration(run, z0)
    max_iter = int(settings.max_iter)
    for evaluation in range(1, max_iter + 1):
        x, fx, state = method.next()
        converged = run.check(x, fx, state, evaluation)
        if evaluation == max_iter:
            run.retire(converged, evaluation, True)
            run.retire(~converged, evaluation, False)
            break
        if converged.any():
            run.retire(converged, evaluation, True)
            if converged.all():
                break
            method.keep(run.keep(~converged))
    run.out.work.seconds += time.perf_counter() - start
    return run.out
