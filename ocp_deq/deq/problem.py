"""What the fixed-point engine needs from a network: node states grouped by graph.

States are node tensors [N, ...]. Which node belongs to which graph is a :class:`Segments`;
every solver quantity (residuals, Anderson's Gram matrices, Broyden's inner products) is
a sum over one graph's nodes, so graphs never mix. A :class:`FixedPointProblem` evaluates
f on its graphs and restricts itself to a subset of them: the solvers drop graphs that
have converged and evaluate f only on the rest.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Segments:
    """Node -> graph assignment with per-graph reductions over node tensors."""

    def __init__(self, batch: torch.Tensor, num_graphs: int):
        self.batch = batch
        self.num_graphs = int(num_graphs)

    @classmethod
    def from_sizes(cls, natoms: torch.Tensor) -> "Segments":
        return cls(torch.repeat_interleave(torch.arange(natoms.numel(), device=natoms.device), natoms), natoms.numel())

    @property
    def num_nodes(self) -> int:
        return self.batch.numel()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-graph sums of node values [N, *rest] -> [B, *rest]."""
        return values.new_zeros((self.num_graphs, *values.shape[1:])).index_add_(0, self.batch, values)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-graph inner products of two node tensors [N, ...] -> [B]."""
        return self.sum((a * b).flatten(1).sum(1))

    def norm(self, a: torch.Tensor) -> torch.Tensor:
        return self.dot(a, a).clamp_min(0).sqrt()

    def expand(self, per_graph: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-graph values [B] broadcast to the nodes of ``like`` [N, ...]."""
        return per_graph[self.batch].view(-1, *([1] * (like.dim() - 1)))

    def node_mask(self, graph_mask: torch.Tensor) -> torch.Tensor:
        return graph_mask[self.batch]

    def restrict(self, graphs: torch.Tensor) -> tuple["Segments", torch.Tensor]:
        """Segments of ``graphs`` (sorted indices), and the kept node indices."""
        keep = torch.zeros(self.num_graphs, dtype=torch.bool, device=self.batch.device)
        keep[graphs] = True
        nodes = keep[self.batch].nonzero().flatten()
        renumber = torch.cumsum(keep, 0) - 1
        return Segments(renumber[self.batch[nodes]], graphs.numel()), nodes


class FixedPointProblem(Protocol):
    """z* = f(z*) for the graphs of one batch (or a subset of them)."""

    segments: Segments

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """f on node states [N, ...] of this problem's graphs."""

    def restrict(self, graphs: torch.Tensor) -> "FixedPointProblem":
        """The same problem on some of its graphs (sorted indices into its own graphs)."""
