"""Non-periodic radius graph (PyG's ``radius_graph`` / ``radius`` through the pyg_lib
stand-in) against a brute-force O(N^2) reference."""

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import ocp_deq  # noqa: F401  (before torch_geometric: installs the stand-ins)
import torch_geometric.typing
from ocp_deq import compat
from torch_geometric.nn import radius, radius_graph

STANDIN = compat.using_standin("pyg_lib")


def reference_graph(pos, r, batch=None, loop=False, max_num_neighbors=None):
    """Edges (neighbor j, center i) with |p_j - p_i| < r, same graph; per center the lowest j first."""
    pos = np.asarray(pos, dtype=np.float64)
    batch = np.zeros(len(pos), int) if batch is None else np.asarray(batch)
    edges = []
    for i in range(len(pos)):
        found = [
            j for j in range(len(pos))
            if batch[j] == batch[i] and (loop or j != i) and ((pos[j] - pos[i]) ** 2).sum() < r * r
        ]
        edges += [(j, i) for j in found[:max_num_neighbors]]
    return sorted(edges)


def as_edges(edge_index):
    assert edge_index.dtype == torch.long and edge_index.shape[0] == 2
    return sorted(map(tuple, edge_index.t().tolist()))


def random_batch(sizes, seed=0, box=6.0):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), 3, generator=gen) * box
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return pos, batch


def test_pyg_sees_a_radius_op():
    assert torch_geometric.typing.WITH_RADIUS
    if STANDIN:  # every other pyg-lib capability stays off
        assert not torch_geometric.typing.WITH_KNN and not torch_geometric.typing.WITH_SOFTMAX


@pytest.mark.parametrize("cutoff", [0.8, 2.0, 5.0, 20.0])
def test_batched_graph_matches_brute_force(cutoff):
    pos, batch = random_batch([1, 7, 30, 2, 45], seed=1)
    edge_index = radius_graph(pos, r=cutoff, batch=batch, max_num_neighbors=1000)
    assert as_edges(edge_index) == reference_graph(pos, cutoff, batch)


def test_direction_is_source_to_target_neighbor_then_center():
    """fairchem reads ``j, i = edge_index`` and uses pos[j] - pos[i]."""
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    assert as_edges(radius_graph(pos, r=1.5)) == [(0, 1), (1, 0)]
    # radius(x, y): for each y, the x within r; rows are [y index, x index]
    y = torch.tensor([[0.9, 0.0, 0.0]])
    assert radius(pos, y, r=0.5).tolist() == [[0], [1]]


def test_cutoff_is_strict_and_self_loops_optional():
    # points on a 0.5 grid: squared distances are exact in float32
    grid = torch.tensor(list(itertools.product([0.0, 0.5, 1.0, 1.5], repeat=3)))
    for r in (0.5, 1.0, 1.5):  # pairs exactly at r are excluded
        got = as_edges(radius_graph(grid, r=r, max_num_neighbors=1000))
        assert got == reference_graph(grid, r)
        dist = (grid[[j for j, _ in got]] - grid[[i for _, i in got]]).norm(dim=1)
        assert (dist < r).all()
    assert as_edges(radius_graph(grid, r=0.5)) == []  # nearest grid neighbours sit at 0.5
    with_loops = as_edges(radius_graph(grid, r=0.6, loop=True, max_num_neighbors=1000))
    assert with_loops == reference_graph(grid, 0.6, loop=True)
    assert all((i, i) in with_loops for i in range(len(grid)))


def test_float64_input():
    pos, batch = random_batch([20, 20], seed=2)
    pos = pos.double()
    assert as_edges(radius_graph(pos, r=2.5, batch=batch, max_num_neighbors=99)) == reference_graph(pos, 2.5, batch)


@pytest.mark.skipif(not STANDIN, reason="the real pyg-lib's CPU kernel keeps neighbours in k-d tree order")
def test_max_num_neighbors_keeps_the_lowest_indices():
    pos, batch = random_batch([25, 40], seed=3, box=3.0)
    for cap in (1, 3, 10):
        edge_index = radius_graph(pos, r=2.0, batch=batch, max_num_neighbors=cap)
        assert as_edges(edge_index) == reference_graph(pos, 2.0, batch, max_num_neighbors=cap)
        assert torch.bincount(edge_index[1]).max() <= cap
    # the cap counts neighbours, not the skipped self pair (as pyg-lib does)
    line = torch.tensor([[float(k), 0.0, 0.0] for k in range(5)])
    j, i = radius_graph(line, r=10.0, max_num_neighbors=2)
    assert j[i == 0].tolist() == [1, 2] and j[i == 1].tolist() == [0, 2]


@pytest.mark.skipif(not STANDIN, reason="tests the stand-in's chunking")
def test_chunked_blocks_give_the_same_graph(monkeypatch):
    from pyg_lib import ops

    pos, batch = random_batch([3, 50, 1, 17, 60], seed=4)
    full = radius_graph(pos, r=2.0, batch=batch, max_num_neighbors=8)
    for budget in (1, 7, 60, 400, 2500):  # down to one y row per block
        monkeypatch.setattr(ops, "PAIR_BUDGET", budget)
        chunked = radius_graph(pos, r=2.0, batch=batch, max_num_neighbors=8)
        assert torch.equal(chunked, full)  # same edges in the same order


def test_empty_examples_and_inputs():
    x = torch.rand(6, 3)
    ptr = torch.tensor([0, 0, 4, 4, 6])  # examples 0 and 2 are empty
    got = torch.ops.pyg.radius(x, x, ptr, ptr, 10.0, 32, 1, True)
    expected = reference_graph(x, 10.0, [1, 1, 1, 1, 3, 3])
    assert sorted((int(j), int(i)) for i, j in got.t()) == expected
    empty = radius_graph(torch.zeros(0, 3), r=1.0)
    assert empty.shape == (2, 0) and empty.dtype == torch.long
    assert radius_graph(torch.zeros(1, 3), r=1.0).shape == (2, 0)


def test_gradients_flow_through_fairchem_style_distances():
    pos, batch = random_batch([10, 12], seed=5)
    pos.requires_grad_(True)
    j, i = radius_graph(pos, r=3.0, batch=batch)
    (pos[j] - pos[i]).norm(dim=-1).sum().backward()
    assert pos.grad is not None and torch.isfinite(pos.grad).all()


def test_standin_is_only_a_fallback(tmp_path):
    """A real pyg_lib on the path wins over the stand-in."""
    fake = tmp_path / "pyg_lib"
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\n")
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        import ocp_deq, pyg_lib
        assert getattr(pyg_lib, "REAL", False), pyg_lib.__file__
        assert not ocp_deq.compat.using_standin("pyg_lib")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fresh_import_is_quiet_and_ready():
    """In a new process `import ocp_deq` then PyG: no pyg-lib / torch-cluster warnings."""
    code = textwrap.dedent("""
        import warnings; warnings.simplefilter("always")
        import ocp_deq, torch, torch_geometric.typing as t
        from torch_geometric.nn import radius_graph
        assert t.WITH_RADIUS, "radius op not detected"
        print(radius_graph(torch.rand(5, 3), r=10.0).shape[1])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "20"
    assert "pyg-lib" not in proc.stderr and "torch-cluster" not in proc.stderr, proc.stderr
