"""How fast f contracts at its fixed point: the spectral radius of J = df/dz at z*.

A solver needs about log(tol) / log(rho) plain iterations, and a solve stopped at residual
r is within about r / (1 - rho) of z*: rho near 1 means many evaluations and answers that
depend on the start. f acts on each graph alone, so J is block-diagonal over graphs and one
batched vector-Jacobian product advances every graph's power iteration at once.
"""

from __future__ import annotations

import torch

from ocp_deq.deq.problem import FixedPointProblem


def spectral_radius(problem: FixedPointProblem, z_star: torch.Tensor, iters: int, seed: int = 0) -> torch.Tensor:
    """Per-graph estimate [B] of the spectral radius of J at ``z_star``: ``iters`` steps of
    power iteration on v -> J^T v (same spectrum as J). A lower bound that tightens with
    ``iters``; for a non-normal J the norm ratio approaches the dominant |eigenvalue|.
    Uses its own random generator, so the caller's random stream is untouched."""
    segments = problem.segments
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(z_star.shape, generator=generator, dtype=z_star.dtype).to(z_star.device)
    v = v / segments.expand(segments.norm(v).clamp_min(1e-30), v)
    with torch.enable_grad():
        z = z_star.detach().requires_grad_()
        fz = problem.f(z)
        rho = torch.zeros(segments.num_graphs, dtype=z_star.dtype, device=z_star.device)
        for k in range(int(iters)):
            (u,) = torch.autograd.grad(fz, z, v, retain_graph=k < iters - 1)
            rho = segments.norm(u)  # |v| = 1 per graph
            v = u / segments.expand(rho.clamp_min(1e-30), u)
    return rho.detach()
