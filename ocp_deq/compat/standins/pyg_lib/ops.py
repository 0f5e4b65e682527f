"""``pyg::radius`` in plain torch (chunked brute force), registered as ``torch.ops.pyg.radius``.

Semantics of pyg-lib's op ``radius(x, y, ptr_x, ptr_y, r, max_num_neighbors, num_workers,
ignore_same_index)``:

* for every point ``y[i]``, the points ``x[j]`` of the same example (examples are the
  contiguous CSR ranges ``ptr_x`` / ``ptr_y``; no ptr = one example) with squared distance
  strictly below ``r * r`` (in the input dtype);
* ``ignore_same_index`` drops ``j == i`` (``radius_graph``'s ``loop=False``);
* at most ``max_num_neighbors`` per ``y[i]`` (dropped self pairs do not count);
* returns ``[2, E]`` long: row 0 the ``y`` index, row 1 the ``x`` index.
  ``radius_graph(flow="source_to_target")`` flips it, so fairchem gets
  ``edge_index = [neighbor j, center i]``.

Which neighbours survive the ``max_num_neighbors`` cap: pyg-lib's CUDA kernel keeps the
first ones in ``x`` index order, its CPU kernel the first ones in k-d tree order (arbitrary,
"biased towards certain quadrants" per PyG's docs) -- neither keeps the nearest. We keep the
lowest ``x`` indices, i.e. exactly the CUDA kernel's result, deterministically. Edges come
out sorted by ``y`` index, then ``x`` index. If the cap matters for your molecules (say
300 atoms at 6 A and 20 neighbours), raise ``max_neighbors``: a cap by index order makes the
graph depend on atom order.

Memory and speed: examples are padded to the largest one in a block of consecutive examples
and compared as ``[examples, y rows, x rows]`` (no cross-example pairs); a block holds at most
``PAIR_BUDGET`` pairs, and an example larger than that is split by ``y`` rows. Squared
distances are summed one coordinate at a time (no ``[.., 3]`` difference tensor), in the
same order as pyg-lib's kernels.
"""

from __future__ import annotations

import torch

PAIR_BUDGET = 1 << 22  # pairs per block: ~16 MB per float32 [block] tensor


def _blocks(ptr_x: list[int], ptr_y: list[int], budget: int):
    """``(first example, end example, first y row, end y row)`` blocks covering every pair."""
    n_x = [b - a for a, b in zip(ptr_x[:-1], ptr_x[1:])]
    n_y = [b - a for a, b in zip(ptr_y[:-1], ptr_y[1:])]
    start = 0
    while start < len(n_x):
        if n_y[start] * n_x[start] > budget:  # one big example: split its y rows
            rows = max(1, budget // n_x[start])
            for lo in range(0, n_y[start], rows):
                yield start, start + 1, lo, min(lo + rows, n_y[start])
            start += 1
            continue
        end, my, mx = start + 1, n_y[start], n_x[start]
        while end < len(n_x) and (end + 1 - start) * max(my, n_y[end]) * max(mx, n_x[end]) <= budget:
            my, mx, end = max(my, n_y[end]), max(mx, n_x[end]), end + 1
        yield start, end, 0, my
        start = end


def radius(
    x: torch.Tensor,
    y: torch.Tensor,
    ptr_x: torch.Tensor | None = None,
    ptr_y: torch.Tensor | None = None,
    r: float = 1.0,
    max_num_neighbors: int = 32,
    num_workers: int = 1,
    ignore_same_index: bool = False,
) -> torch.Tensor:
    if x.dim() != 2 or y.dim() != 2 or x.size(1) != y.size(1):
        raise ValueError(f"radius: x and y must be [N, D] with the same D (got {tuple(x.shape)}, {tuple(y.shape)})")
    if not r > 0:
        raise ValueError(f"radius: r must be positive (got {r})")
    if (ptr_x is None) != (ptr_y is None):
        raise ValueError("radius: give both ptr_x and ptr_y or neither")
    ptr_x = [0, x.size(0)] if ptr_x is None else ptr_x.tolist()
    ptr_y = [0, y.size(0)] if ptr_y is None else ptr_y.tolist()
    if len(ptr_x) != len(ptr_y):
        raise ValueError("radius: ptr_x and ptr_y must have the same number of elements")
    rows, cols = [], []
    if x.size(0) > 0 and y.size(0) > 0:
        x, y = x.detach(), y.detach()
        r2 = torch.tensor(r * r, dtype=x.dtype, device=x.device)  # compared in the input dtype
        for block in _blocks(ptr_x, ptr_y, PAIR_BUDGET):
            row, col = _block_edges(x, y, ptr_x, ptr_y, *block, r2, max_num_neighbors, ignore_same_index)
            rows.append(row)
            cols.append(col)
    if not rows:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def _block_edges(x, y, ptr_x, ptr_y, b0, b1, lo, hi, r2, cap, ignore_same_index):
    """Edges of examples ``b0..b1-1`` for their local y rows ``lo..hi-1``, sorted by (y, x)."""
    device = x.device
    start_x = torch.tensor(ptr_x[b0:b1], device=device)
    start_y = torch.tensor(ptr_y[b0:b1], device=device)
    n_x = torch.tensor(ptr_x[b0 + 1 : b1 + 1], device=device) - start_x
    n_y = torch.tensor(ptr_y[b0 + 1 : b1 + 1], device=device) - start_y
    local_x = torch.arange(int(n_x.max()), device=device)
    local_y = torch.arange(lo, hi, device=device)
    valid = (local_y[None, :] < n_y[:, None])[:, :, None] & (local_x[None, :] < n_x[:, None])[:, None, :]
    gx = start_x[:, None] + local_x[None, :]  # [examples, max x] global indices (padding clamped)
    gy = start_y[:, None] + local_y[None, :]
    xs, ys = x[gx.clamp(max=x.size(0) - 1)], y[gy.clamp(max=y.size(0) - 1)]
    d2 = None
    for k in range(x.size(1)):
        diff = ys[:, :, None, k] - xs[:, None, :, k]
        d2 = diff.mul_(diff) if d2 is None else d2.add_(diff.mul_(diff))
    mask = (d2 < r2) & valid
    if ignore_same_index:
        mask &= gy[:, :, None] != gx[:, None, :]
    over = mask.sum(2) > cap
    if over.any():  # keep the first `cap` neighbours in x order
        rows = mask[over]
        mask[over] = rows & (rows.cumsum(1, dtype=torch.int32) <= cap)
    example, i, j = mask.nonzero(as_tuple=True)
    return gy[example, i], gx[example, j]


def _register() -> torch.library.Library | None:
    try:
        torch.ops.pyg.radius  # noqa: B018  (defined already: leave it alone)
        return None
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("pyg", "FRAGMENT")
    lib.define(
        "radius(Tensor x, Tensor y, Tensor? ptr_x=None, Tensor? ptr_y=None, float r=1.0, "
        "int max_num_neighbors=32, int num_workers=1, bool ignore_same_index=False) -> Tensor"
    )
    lib.impl("radius", radius, "CompositeExplicitAutograd")
    return lib


_LIBRARY = _register()  # keep the Library alive: dropping it unregisters the op
