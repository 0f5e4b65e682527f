"""Per-graph fixed-point solving: each row stops on its own, independent of batch partners."""

import pytest
import torch
from torchdeq import get_deq

from ocp_deq.deq import PerGraphSolver, pack_graphs, unpack_graphs


def test_pack_unpack_roundtrip():
    natoms = torch.tensor([3, 1, 4])
    batch = torch.repeat_interleave(torch.arange(3), natoms)
    z = torch.randn(8, 4, 5)
    packed = pack_graphs(z, batch, natoms)
    assert packed.shape == (3, 4 * 4 * 5)
    assert torch.equal(unpack_graphs(packed, batch, natoms, z.shape[1:]), z)
    # padding of the 1-atom graph stays zero
    assert torch.count_nonzero(packed[1].view(4, 4, 5)[1:]) == 0


def contraction(rates, dim=6, seed=0):
    """Row b: z -> rates[b] * tanh(W z) + c, a contraction with factor about rates[b]."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    c = torch.randn(len(rates), dim, generator=gen, dtype=torch.float64)
    rates = torch.as_tensor(rates, dtype=torch.float64)[:, None]
    return lambda z, rows=slice(None): rates[rows] * torch.tanh(z @ W.T) + c[rows]


@pytest.mark.parametrize("base", ["anderson", "fixed_point_iter", "broyden"])
def test_rows_stop_independently_of_batch_partners(base):
    rates = [0.2, 0.9, 0.5]
    f = contraction(rates)
    solver = PerGraphSolver(base)
    x0 = torch.zeros(3, 6, dtype=torch.float64)
    z, _, info = solver(f, x0, max_iter=200, tol=1e-8, stop_mode="rel")
    assert bool(info["converged"].all())
    residual = (f(z) - z).norm(dim=1) / f(z).norm(dim=1)
    assert bool((residual < 1e-7).all())
    # the slowly contracting row needs more evaluations than the fast one
    assert info["nstep"][1] > info["nstep"][0]
    for row in range(3):
        alone, _, alone_info = solver(lambda v, r=row: f(v, slice(r, r + 1)), x0[row : row + 1],
                                      max_iter=200, tol=1e-8, stop_mode="rel")
        torch.testing.assert_close(alone[0], z[row], rtol=1e-10, atol=1e-12)
        assert alone_info["nstep"][0] == info["nstep"][row]


def test_fixed_point_iter_stops_after_one_evaluation_at_a_converged_start():
    f = contraction([0.5])
    exact, _, _ = PerGraphSolver("fixed_point_iter")(f, torch.zeros(1, 6, dtype=torch.float64), max_iter=500, tol=1e-12)
    _, _, info = PerGraphSolver("fixed_point_iter")(f, exact, max_iter=40, tol=1e-6)
    assert info["nstep"].item() == 1


def test_unconverged_rows_are_reported():
    f = contraction([0.2, 0.99])
    _, _, info = PerGraphSolver("fixed_point_iter")(f, torch.zeros(2, 6, dtype=torch.float64), max_iter=5, tol=1e-10)
    assert info["converged"].tolist() == [False, False]
    assert info["nstep"].tolist() == [5.0, 5.0]


def test_registered_with_torchdeq():
    f = contraction([0.3, 0.7])
    deq = get_deq(f_solver="per_graph_anderson", f_max_iter=100, f_tol=1e-9, f_stop_mode="rel").eval()
    z_out, info = deq(lambda z: f(z), torch.zeros(2, 6, dtype=torch.float64))
    z = z_out[-1]
    torch.testing.assert_close(f(z), z, rtol=1e-7, atol=1e-9)
    assert info["nstep"].shape == (2,)
