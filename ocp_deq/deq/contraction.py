"""How fast f contracts at its fixed point: the spectral radius of J = df/dz at z*.

A solver needs about log(tol) / log(rho) plain iterations, and a solve stopped at residual
r is within about r / (1 - rho) of z*: rho near 1 means many evaluations and answers that
depend on the start. f acts on each graph alone, so J is block-diagonal over graphs and one
batched vector-Jacobian product advances every graph's power iteration at once.
"""

from __future__ import annotations

import torch

from ocp_deq.deq.problem import FixedPointProblem, Segments


def _unit_start(z: torch.Tensor, segments: Segments, generator: torch.Generator | None) -> torch.Tensor:
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu" if generator else z.device).to(z.device)
    return v / segments.expand(segments.norm(v).clamp_min(1e-30), v)


def _power_steps(fz, z, v, segments: Segments, iters: int, keep_graph: bool = False):
    """``iters`` steps v -> J^T v / |J^T v| per graph; returns |J^T v| [B] of the last step
    (|v| = 1) and the last v. ``keep_graph``: f's graph survives for more products."""
    rho = None
    for k in range(iters):
        (u,) = torch.autograd.grad(fz, z, v, retain_graph=keep_graph or k < iters - 1)
        rho = segments.norm(u)
        v = u / segments.expand(rho.clamp_min(1e-30), u)
    return rho, v


def spectral_radius(problem: FixedPointProblem, z_star: torch.Tensor, iters: int, seed: int = 0) -> torch.Tensor:
    """Per-graph estimate [B] of the spectral radius of J at ``z_star``: ``iters`` steps of
    power iteration on v -> J^T v (same spectrum as J). A lower bound that tightens with
    ``iters``; for a non-normal J the norm ratio approaches the dominant |eigenvalue|.
    Uses its own random generator, so the caller's random stream is untouched."""
    segments = problem.segments
    v = _unit_start(z_star, segments, torch.Generator().manual_seed(seed))
    with torch.enable_grad():
        z = z_star.detach().requires_grad_()
        rho, _ = _power_steps(problem.f(z), z, v, segments, int(iters))
    return rho.detach()


def contraction_penalty(problem: FixedPointProblem, z_star: torch.Tensor, iters: int, target: float,
                        generator: torch.Generator | None = None,
                        f_z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mean over graphs of relu(rho - target)^2, rho the power-iteration estimate above with
    its last step differentiated w.r.t. f's parameters (z* itself is a constant), and the
    per-graph rho [B] (detached). Aims at the slowest mode of J, which sets the solver's
    evaluations, where the Frobenius penalty spreads its push over all of J's directions.
    When no graph is above ``target`` after ``iters - 1`` steps, the penalty is 0 and the
    costly differentiated step is skipped (that earlier estimate is returned). ``f_z``:
    f(z_star) with autograd, ``z_star`` the leaf it was evaluated at, if already evaluated."""
    segments = problem.segments
    v = _unit_start(z_star, segments, generator)
    if f_z is None:
        z = z_star.detach().requires_grad_()
        fz = problem.f(z)
    else:
        z, fz = z_star, f_z
    rho, v = _power_steps(fz, z, v, segments, int(iters) - 1, keep_graph=True)
    if rho is not None and not (rho > target).any():
        return fz.new_zeros(()), rho.detach()
    (u,) = torch.autograd.grad(fz, z, v.detach(), create_graph=True)
    rho = segments.norm(u)
    return torch.relu(rho - target).pow(2).mean(), rho.detach()
