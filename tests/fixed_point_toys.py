"""A small per-graph fixed-point problem for engine tests: nodes of a graph are coupled,
graphs are independent, and each graph contracts at its own rate."""

from __future__ import annotations

import torch

from ocp_deq.deq.problem import Segments


class CoupledToy:
    """f(z)_i = rate_g * tanh(W z_i + mean_g(z)) + c_i over nodes [N, 3, dim] (float64)."""

    def __init__(self, natoms, rates, dim=4, seed=0, *, _parts=None):
        if _parts is not None:
            self.segments, self.W, self.c, self.rates, self.calls = _parts
            return
        gen = torch.Generator().manual_seed(seed)
        self.segments = Segments.from_sizes(torch.as_tensor(natoms))
        self.W = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
        self.c = torch.randn(self.segments.num_nodes, 3, dim, generator=gen, dtype=torch.float64)
        self.rates = torch.as_tensor(rates, dtype=torch.float64)
        self.calls = []  # graphs evaluated per call of f

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.c)

    def f(self, z: torch.Tensor) -> torch.Tensor:
        seg = self.segments
        self.calls.append(seg.num_graphs)
        count = seg.sum(torch.ones(seg.num_nodes, dtype=z.dtype))
        mean = seg.sum(z) / count[:, None, None]
        return self.rates[seg.batch][:, None, None] * torch.tanh(z @ self.W.T + mean[seg.batch]) + self.c

    def restrict(self, graphs: torch.Tensor) -> "CoupledToy":
        segments, nodes = self.segments.restrict(graphs)
        return CoupledToy(None, None, _parts=(segments, self.W, self.c[nodes], self.rates[graphs], self.calls))
