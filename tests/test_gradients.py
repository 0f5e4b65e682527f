"""Exact gradients where claimed: IFT = BPTT = finite differences; conservative forces.

float64 on a small non-periodic molecule with an explicit all-pairs graph (fairchem's
periodic radius graph is float32-only, and a fixed graph keeps the energy smooth).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairchem.core.common.registry import registry
from fairchem.core.datasets import data_list_collater
from scipy.spatial.transform import Rotation
from torch_geometric.data import Data

MOLECULE = dict(
    numbers=[6, 1, 1, 8, 7, 1],
    positions=[[0, 0, 0], [1.1, 0, 0], [-0.4, 1.0, 0], [0.2, -0.5, 1.2], [-1.2, -0.6, -0.5], [1.5, 1.2, 0.8]],
)
WIDTH = dict(use_pbc=False, otf_graph=False, max_radius=6.0, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
             attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
             num_distance_basis=32, lmax_list=[2], mmax_list=[2], num_sphere_samples=16)
TIGHT = {"solver": "fixed_point_iter", "tol": 1e-11, "max_iter": 300}


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def molecule_batch(positions=None):
    pos = torch.tensor(MOLECULE["positions"] if positions is None else positions, dtype=torch.float64)
    n = len(pos)
    edges = torch.tensor([(j, i) for i in range(n) for j in range(n) if i != j]).T
    data = Data(pos=pos, atomic_numbers=torch.tensor(MOLECULE["numbers"], dtype=torch.float64), natoms=n,
                edge_index=edges, cell=torch.zeros(1, 3, 3), fixed=torch.zeros(n), tags=torch.zeros(n, dtype=torch.long))
    return data_list_collater([data], otf_graph=False)


def build(gradient="ift", force_mode="direct", solver=TIGHT, **deq):
    torch.manual_seed(0)
    settings = {"gradient": gradient, "train_solver": solver, "eval_solver": solver,
                "backward_solver": {"solver": "fixed_point_iter", "tol": 1e-12, "max_iter": 300}, **deq}
    return registry.get_model_class("deq_equiformer_v2")(num_layers=1, force_mode=force_mode, deq=settings, **WIDTH)


def loss(model, batch=None):
    """Energy plus a fixed projection of the forces; random edge rolls seeded."""
    torch.manual_seed(5)
    out = model(batch if batch is not None else molecule_batch())
    weights = torch.linspace(-1, 1, out["forces"].numel()).view_as(out["forces"])
    return out["energy"].sum() + (out["forces"] * weights).sum()


def param_grad(model):
    model.train()
    model.zero_grad()
    loss(model).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def gradients():
    torch.set_default_dtype(torch.float64)
    grads = {mode: param_grad(build(mode)) for mode in ("ift", "bptt", "phantom")}
    torch.set_default_dtype(torch.float32)
    return grads


def test_ift_equals_unrolled_backprop(gradients):
    rel = (gradients["ift"] - gradients["bptt"]).norm() / gradients["ift"].norm()
    print(f"IFT vs BPTT relative error: {rel:.2e}")
    assert rel < 1e-7


def finite_difference_parameter_error(model, grad, samples: int = 6, h: float = 1e-5) -> float:
    """Largest relative error of ``grad`` (the loss gradient of ``model``'s parameters)
    against central differences of the loss in randomly drawn block parameters."""
    params = [p for p in model.parameters() if p.grad is not None]
    flat_index = {id(p): sum(q.numel() for q in params[:i]) for i, p in enumerate(params)}
    gen = torch.Generator().manual_seed(1)
    block_params = [p for name, p in model.named_parameters() if p.grad is not None and ".blocks." in name]
    errors = []
    model.eval()  # same solver settings; eval skips the gradient bookkeeping
    with torch.no_grad():
        for p in [block_params[i] for i in torch.randint(len(block_params), (samples,), generator=gen).tolist()]:
            k = int(torch.randint(p.numel(), (1,), generator=gen))
            p.view(-1)[k] += h
            up = loss(model).item()
            p.view(-1)[k] -= 2 * h
            down = loss(model).item()
            p.view(-1)[k] += h
            fd = (up - down) / (2 * h)
            exact = grad[flat_index[id(p)] + k].item()
            errors.append(abs(fd - exact) / max(abs(exact), 1e-3))
    return max(errors)


def test_ift_equals_finite_differences():
    model = build("ift")
    error = finite_difference_parameter_error(model, param_grad(model))
    print(f"IFT vs central finite differences, max relative error: {error:.2e}")
    assert error < 1e-5


def test_phantom_gradient_points_the_same_way(gradients):
    cosine = F.cosine_similarity(gradients["ift"], gradients["phantom"], dim=0).item()
    rel = ((gradients["phantom"] - gradients["ift"]).norm() / gradients["ift"].norm()).item()
    print(f"phantom vs IFT: cosine {cosine:.4f}, relative error {rel:.3f}")
    assert cosine > 0.9
    assert rel > 1e-6  # it is an approximation, not the exact gradient


def conservative_force_error(model, h: float = 1e-5) -> float:
    """Largest |F - F_fd| / max|F| over a few force components, F_fd from central
    differences of the energy (same edge rolls in every forward)."""
    torch.manual_seed(5)
    forces = model(molecule_batch())["forces"].detach()
    pos = np.array(MOLECULE["positions"], dtype=float)
    worst = 0.0
    with torch.no_grad():
        for atom, axis in [(0, 0), (3, 2), (5, 1), (2, 0)]:
            energies = []
            for sign in (1, -1):
                moved = pos.copy()
                moved[atom, axis] += sign * h
                torch.manual_seed(5)
                energies.append(model(molecule_batch(moved))["energy"].item())
            fd = -(energies[0] - energies[1]) / (2 * h)
            worst = max(worst, abs(fd - forces[atom, axis].item()) / forces.abs().max().item())
    return worst


@pytest.mark.parametrize("training", [True, False])
def test_conservative_forces_are_minus_energy_gradient(training):
    worst = conservative_force_error(build("phantom", force_mode="conservative").train(training))
    print(f"conservative forces vs finite differences ({'train' if training else 'eval'} mode): {worst:.2e}")
    assert worst < 1e-6


def test_unconverged_backward_solve_is_reported_per_graph():
    """Conservative forces are only as exact as the IFT backward solve: its convergence is
    reported per graph (``deq_backward_converged``), and a cut-short solve changes them."""
    def forces(backward_solver):
        model = build("ift", force_mode="conservative", backward_solver=backward_solver).eval()
        torch.manual_seed(5)
        out = model(molecule_batch())
        return out["forces"], out["deq_backward_converged"]

    exact, converged = forces({"solver": "fixed_point_iter", "tol": 1e-12, "max_iter": 300})
    rough, cut_short = forces({"solver": "fixed_point_iter", "tol": 1e-12, "max_iter": 2})
    assert converged.tolist() == [True] and cut_short.tolist() == [False]
    assert (rough - exact).norm() > 1e-4 * exact.norm()


def test_conservative_forces_rotate_with_the_molecule():
    model = build("ift", force_mode="conservative", solver={"solver": "anderson", "tol": 1e-9, "max_iter": 300}).eval()
    R = torch.tensor(Rotation.random(random_state=3).as_matrix())
    pos = torch.tensor(MOLECULE["positions"], dtype=torch.float64)
    torch.manual_seed(5)
    out = model(molecule_batch(pos))
    torch.manual_seed(5)
    out_rot = model(molecule_batch(pos @ R.T))
    assert (out_rot["forces"] - out["forces"] @ R.T).norm() / out["forces"].norm() < 1e-3
    assert abs(out_rot["energy"] - out["energy"]).item() < 1e-4 * abs(out["energy"]).item() + 1e-8


def test_training_on_conservative_forces_backpropagates_through_the_force_loss():
    """Double backward: the force part of the loss moves the block parameters."""
    model = build("ift", force_mode="conservative").train()
    torch.manual_seed(5)
    out = model(molecule_batch())
    assert out["forces"].requires_grad
    (out["forces"] ** 2).sum().backward()
    block_grads = [p.grad for name, p in model.named_parameters() if ".blocks." in name and p.grad is not None]
    assert block_grads and max(g.abs().max().item() for g in block_grads) > 0
