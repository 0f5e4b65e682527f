"""Per-graph fixed-point solving on top of torchdeq's solvers.

torchdeq treats the first tensor dimension as the batch: Anderson/Broyden mixing and the
residuals are per row, but the loop stops only when *every* row has converged, and each row
keeps improving until then. Node features [N_atoms, ...] would make rows atoms. We instead
pack each graph's node features into one row ([B, max_atoms * D], zero padded), so mixing
and residuals are per graph, and :class:`PerGraphSolver` returns for every graph the state
at which *that graph* first met the tolerance, with its own step count. A graph's fixed
point, iterations and residual are therefore the same alone or in any batch.
"""

from __future__ import annotations

import torch
from torchdeq.solver import get_solver, register_solver
from torchdeq.solver.stat import SolverStat

# Function evaluations a torchdeq solver spends before its first convergence check.
_EVALS_BEFORE_FIRST_CHECK = {"anderson": 2, "broyden": 1, "fixed_point_iter": 0}


def graph_slots(batch: torch.Tensor, natoms: torch.Tensor) -> torch.Tensor:
    """Position of every node inside its own graph (0 .. natoms-1)."""
    start = torch.cumsum(natoms, 0) - natoms
    return torch.arange(batch.numel(), device=batch.device) - start[batch]


def pack_graphs(z: torch.Tensor, batch: torch.Tensor, natoms: torch.Tensor) -> torch.Tensor:
    """[N, *feat] node tensor -> [B, max_atoms * prod(feat)], one row per graph."""
    slots = graph_slots(batch, natoms)
    packed = z.new_zeros((natoms.numel(), int(natoms.max()), *z.shape[1:]))
    packed = packed.index_put((batch, slots), z)
    return packed.flatten(1)


def unpack_graphs(packed: torch.Tensor, batch: torch.Tensor, natoms: torch.Tensor, feat_shape) -> torch.Tensor:
    """Inverse of :func:`pack_graphs`."""
    slots = graph_slots(batch, natoms)
    return packed.view(natoms.numel(), int(natoms.max()), *feat_shape)[batch, slots]


class PerGraphSolver:
    """A torchdeq-compatible solver: per-row stopping over a torchdeq base solver.

    Called by torchdeq like its own solvers: ``(func, x0, max_iter, tol, stop_mode, ...)``
    -> ``(z, trajectory, SolverStat)``. ``nstep`` counts function evaluations per graph.
    ``last_stat`` keeps the latest call's statistics: an IFT backward solve runs inside
    autograd, where nothing else sees them.
    """

    def __init__(self, base: str):
        if base not in _EVALS_BEFORE_FIRST_CHECK:
            raise ValueError(f"no per-graph wrapper for torchdeq solver '{base}'")
        self.base = base
        self.base_solver = get_solver(base)
        self.offset = _EVALS_BEFORE_FIRST_CHECK[base]
        self.last_stat = None

    @property
    def name(self) -> str:
        return f"per_graph_{self.base}"

    def __call__(self, func, x0, max_iter=40, tol=1e-3, stop_mode="rel", indexing=None, **kwargs):
        max_iter = max(int(max_iter), self.offset + 1)
        every_step = list(range(1, max_iter + 2))
        _, states, info = self.base_solver(
            func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, indexing=every_step, **kwargs
        )
        n = len(states)
        trace = info[f"{stop_mode}_trace"][:, 1 : n + 1]
        rel = info["rel_trace"][:, 1 : n + 1]
        absolute = info["abs_trace"][:, 1 : n + 1]
        converged = trace < tol
        first = torch.argmax(converged.to(torch.int8), dim=1)
        chosen = torch.where(converged.any(dim=1), first, torch.full_like(first, n - 1))
        rows = torch.arange(x0.shape[0], device=x0.device)
        stacked = torch.stack(states, dim=1)
        z = stacked[rows, chosen].view_as(x0)
        stat = SolverStat(
            nstep=(chosen + 1 + self.offset).to(torch.float32),
            rel_lowest=rel[rows, chosen],
            abs_lowest=absolute[rows, chosen],
            rel_trace=rel,
            abs_trace=absolute,
        )
        stat["converged"] = converged.any(dim=1)
        trajectory = []
        for step in indexing or []:
            at = torch.clamp(torch.minimum(chosen, torch.full_like(chosen, step - 1 - self.offset)), min=0)
            trajectory.append(stacked[rows, at].view_as(x0))
        self.last_stat = stat
        return z, trajectory, stat


def register_per_graph_solvers() -> None:
    """Make ``per_graph_<base>`` available to ``torchdeq.get_deq(f_solver=...)``."""
    for base in _EVALS_BEFORE_FIRST_CHECK:
        solver = PerGraphSolver(base)
        register_solver(solver.name, solver)


register_per_graph_solvers()
