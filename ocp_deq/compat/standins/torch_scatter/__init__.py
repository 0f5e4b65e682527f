"""Stand-in for ``torch_scatter`` (only what fairchem 1.x uses), in plain torch.

Used only when the compiled package is absent (see ``ocp_deq.compat``). Semantics follow
torch_scatter: ``out[..., index[i], ...] = reduce(src[..., i, ...])`` along ``dim``; the
output size along ``dim`` is ``dim_size`` or ``index.max() + 1``; empty slots are 0.
"""

from __future__ import annotations

import torch

__version__ = "0.0+ocp_deq.standin"

_REDUCE = {"sum": "sum", "add": "sum", "mean": "mean", "max": "amax", "min": "amin", "mul": "prod"}


def broadcast(src: torch.Tensor, other: torch.Tensor, dim: int) -> torch.Tensor:
    """Expand a 1-D ``src`` index to the shape of ``other`` along ``dim``."""
    if dim < 0:
        dim = other.dim() + dim
    if src.dim() == 1:
        for _ in range(dim):
            src = src.unsqueeze(0)
    for _ in range(src.dim(), other.dim()):
        src = src.unsqueeze(-1)
    return src.expand(other.size())


def scatter(src, index, dim=-1, out=None, dim_size=None, reduce="sum"):
    if reduce not in _REDUCE:
        raise ValueError(f"torch_scatter stand-in: unknown reduce '{reduce}'")
    dim = src.dim() + dim if dim < 0 else dim
    index = broadcast(index, src, dim)
    if out is None:
        size = list(src.size())
        if dim_size is not None:
            size[dim] = dim_size
        else:
            size[dim] = int(index.max()) + 1 if index.numel() > 0 else 0
        out = src.new_zeros(size)
        include_self = False
    else:
        include_self = True
    return out.scatter_reduce(dim, index, src, _REDUCE[reduce], include_self=include_self)


def scatter_sum(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, "sum")


scatter_add = scatter_sum


def scatter_mean(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, "mean")


def scatter_max(src, index, dim=-1, out=None, dim_size=None):
    raise NotImplementedError("torch_scatter stand-in: scatter_max (argmax) is not provided")


def segment_coo(src, index, out=None, dim_size=None, reduce="sum"):
    """Reduce along the first dim of ``index`` (sorted) for ``src`` [*, E, ...]."""
    dim = index.dim() - 1
    return scatter(src, index, dim, out, dim_size, reduce)


def segment_csr(src, indptr, out=None, reduce="sum"):
    """Reduce ``src`` over the segments [indptr[i], indptr[i+1]) along dim indptr.dim()-1."""
    dim = indptr.dim() - 1
    if indptr.dim() != 1:
        raise NotImplementedError("torch_scatter stand-in: segment_csr needs a 1-D indptr")
    counts = indptr[1:] - indptr[:-1]
    index = torch.repeat_interleave(torch.arange(counts.numel(), device=src.device), counts)
    n = counts.numel()
    start = int(indptr[0])
    src = src.narrow(dim, start, index.numel())
    return scatter(src, index, dim, out, n, reduce)
