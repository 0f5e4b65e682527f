"""Conditioning tools: the contraction estimate, warm-started training solves, training on a
wall-clock budget."""

from __future__ import annotations

import math

import pytest
import torch
from fairchem.core.datasets import data_list_collater
from fairchem.core.models.equiformer_v2.trainers.lr_scheduler import LRScheduler

from fixed_point_toys import CoupledToy
from ocp_deq.deq import engine
from ocp_deq.deq.contraction import contraction_penalty, spectral_radius
from ocp_deq.deq.gradients import phantom
from ocp_deq.deq.settings import SolverSettings
from ocp_deq.deq.solvers import solve
from ocp_deq.models.deq_equiformer_v2 import EquiformerFixedPoint
from ocp_deq.trainers.wall_clock import follow_budget
from test_gradients import MOLECULE, build, float64, molecule_batch  # noqa: F401  (fixture)

TIGHT = {"solver": "anderson", "tol": 1e-4, "max_iter": 60}


def test_spectral_radius_estimate_matches_dense_jacobian_eigenvalues():
    problem = CoupledToy([3, 5, 2], [0.3, 0.7, 0.95])
    z_star = solve(problem, problem.zeros(), SolverSettings(tol=1e-10, max_iter=200)).z
    estimate = spectral_radius(problem, z_star, iters=60)
    state = torch.get_rng_state()
    spectral_radius(problem, z_star, iters=2)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched
    for graph in range(3):
        alone = problem.restrict(torch.tensor([graph]))
        z = z_star[problem.segments.batch == graph]
        jacobian = torch.autograd.functional.jacobian(lambda u: alone.f(u.view_as(z)).flatten(), z.flatten())
        exact = torch.linalg.eigvals(jacobian).abs().max().item()
        assert abs(estimate[graph].item() - exact) < 0.03 * exact, (graph, estimate[graph].item(), exact)
        assert estimate[graph].item() <= torch.linalg.matrix_norm(jacobian, 2).item() + 1e-9


def frames(sids, fids, numbers=None):
    data = []
    for k, (sid, fid) in enumerate(zip(sids, fids)):
        frame = molecule_batch([[p[0] + 0.01 * k, p[1], p[2]] for p in MOLECULE["positions"]]).to_data_list()[0]
        if numbers is not None:
            frame.atomic_numbers = torch.as_tensor(numbers, dtype=frame.atomic_numbers.dtype)
        frame.sid, frame.fid = sid, fid
        data.append(frame)
    return data_list_collater(data, otf_graph=False)


def test_training_solves_start_from_each_frames_last_fixed_point():
    model = build("phantom", solver=TIGHT, train_start={"enabled": True, "dtype": "float32"}).train()
    batch = frames([0, 1], [0, 0])
    first = model(batch)
    assert not first["deq_warm"].any()
    second = model(batch)  # same weights, same frames: each starts at its own fixed point
    assert second["deq_warm"].all()
    assert (second["deq_nstep"] <= 1).all() and (first["deq_nstep"] > 3).all()
    # a frame never seen starts from the nearest stored frame of its trajectory
    unseen = model(frames([1, 7], [3, 0]))
    assert unseen["deq_warm"].tolist() == [True, False]
    assert unseen["deq_nstep"][0] < first["deq_nstep"][1]
    # same frame id, other atoms: cold; evaluation never uses the training memory
    other = list(MOLECULE["numbers"])
    other[0] = 7
    assert not model(frames([0], [0], numbers=other))["deq_warm"].any()
    with torch.no_grad():
        assert "deq_warm" not in model.eval()(batch)


def test_training_memory_is_bounded_and_needs_frame_ids():
    model = build("phantom", solver=TIGHT, train_start={"enabled": True, "memory_mb": 1e-6}).train()
    model(frames([0, 1, 2], [0, 0, 0]))
    assert len(model.training_memory) == 1 and model.training_memory.bytes > 0
    no_fid = frames([0], [0])
    del no_fid.fid
    with pytest.raises(KeyError, match="needs 'fid'"):
        model(no_fid)


def test_budget_schedule_lands_where_the_budget_fraction_says():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = LRScheduler(optimizer, {"scheduler": "LambdaLR", "lr_initial": 1.0, "scheduler_params": {
        "lambda_type": "cosine", "warmup_factor": 0.2, "warmup_epochs": 10, "epochs": 1000, "lr_min_factor": 0.01}})
    for step, fraction in ((3, 0.0), (50, 0.5), (60, 1.0)):
        follow_budget(scheduler, fraction, 1000, step)
        scheduler.step()
        if fraction == 0.0:  # early: the real step (warmup) wins
            expected = 0.2 * (1 - step / 10) + step / 10
        else:
            expected = 0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * fraction)) if fraction < 1 else 0.01
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)


def test_update_form_contracts_faster_than_block_form():
    """Form "block" carries z through the blocks' residual paths with gain ~1, so f barely
    contracts; form "update" (x + what the blocks add) does not, at the same weights."""
    from ocp_deq.models.deq_equiformer_v2 import EquiformerFixedPoint

    radius, nstep = {}, {}
    for form, post_norm in (("block", True), ("update", False)):
        model = build("phantom", solver=TIGHT, form=form, post_norm=post_norm).eval()
        torch.manual_seed(5)
        data = molecule_batch()
        with torch.no_grad():
            nstep[form] = model(data)["deq_nstep"].item()
            torch.manual_seed(5)
            x, graph = model.backbone.encode(data)
            problem = EquiformerFixedPoint.build(model.backbone, x, graph, data)
            z_star = solve(problem, torch.zeros_like(x), SolverSettings(tol=1e-8, max_iter=200)).z
        radius[form] = spectral_radius(problem, z_star, iters=30).item()
    assert radius["update"] < 0.8 * radius["block"], radius
    assert nstep["update"] < nstep["block"], nstep


def test_contraction_penalty_is_the_power_estimate_above_its_target_and_pushes_only_there():
    problem = CoupledToy([3, 5, 2], [0.3, 0.7, 0.95])
    z_star = solve(problem, problem.zeros(), SolverSettings(tol=1e-10, max_iter=200)).z
    problem.rates.requires_grad_()
    loss, rho = contraction_penalty(problem, z_star, 40, target=0.4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rho, spectral_radius(problem, z_star, iters=40))
    torch.testing.assert_close(loss, torch.relu(rho - 0.4).pow(2).mean())
    above = rho > 0.4
    assert above.tolist() == [False, True, True], rho  # graph 2's tanh saturates: 0.95 -> rho 0.44
    (grad,) = torch.autograd.grad(loss, problem.rates)
    assert (grad[~above] == 0).all() and (grad[above] > 0).all(), grad  # lower rates where rho is too high


def test_contraction_penalty_trains_the_spectral_radius_down():
    from ocp_deq.models.deq_equiformer_v2 import EquiformerFixedPoint

    model = build("phantom", solver=TIGHT, jacobian={"weight": 1.0, "kind": "spectral", "target": 0.05}).train()

    def radius():
        torch.manual_seed(5)
        data = molecule_batch()
        with torch.no_grad():
            x, graph = model.backbone.encode(data)
            problem = EquiformerFixedPoint.build(model.backbone, x, graph, data)
            z_star = solve(problem, torch.zeros_like(x), SolverSettings(tol=1e-8, max_iter=200)).z
        return spectral_radius(problem, z_star, iters=30).item()

    before = radius()
    optimiser = torch.optim.Adam(model.backbone.blocks.parameters(), lr=3e-3)
    for step in range(12):
        torch.manual_seed(step)
        out = model(molecule_batch())
        assert out["deq_contraction"].shape == (1,)  # the training solve's estimate, logged
        optimiser.zero_grad()
        out["deq_jac_loss"].backward()
        optimiser.step()
    after = radius()
    assert before > 0.3 and after < 0.8 * before, (before, after)  # measured 0.52 -> 0.34


def test_contraction_penalty_below_its_target_is_zero_without_the_differentiated_step():
    problem = CoupledToy([3, 5], [0.3, 0.5])
    z_star = solve(problem, problem.zeros(), SolverSettings(tol=1e-10, max_iter=200)).z
    problem.rates.requires_grad_()
    loss, rho = contraction_penalty(problem, z_star, 30, target=0.9)
    assert loss.item() == 0 and not loss.requires_grad and (rho < 0.9).all()
    torch.testing.assert_close(rho, spectral_radius(problem, z_star, iters=29), rtol=0.02, atol=0)


def _training_step(model, batch, monkeypatch):
    """Loss (energy, a fixed projection of the forces, the Jacobian term) and its gradients;
    the number of evaluations of f the forward made."""
    calls, f = [], EquiformerFixedPoint.f
    with monkeypatch.context() as patch:
        patch.setattr(EquiformerFixedPoint, "f", lambda self, z: calls.append(z.shape[0]) or f(self, z))
        torch.manual_seed(5)
        out = model(batch)
    weights = torch.linspace(-1, 1, out["forces"].numel()).view_as(out["forces"])
    loss = out["energy"].sum() + (out["forces"] * weights).sum() + out.get("deq_jac_loss", 0.0)
    model.zero_grad()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads, len(calls), out["deq_nstep"]


@pytest.mark.parametrize("jacobian", [{}, {"weight": 1.0, "freq": 1.0, "kind": "spectral", "target": 1e-3, "power_iters": 2},
                                      {"weight": 1.0, "freq": 1.0, "kind": "frobenius"}], ids=["plain", "spectral", "frobenius"])
@pytest.mark.parametrize("moved", [False, True], ids=["converged-start", "changed-frame"])
def test_warm_training_step_takes_the_phantom_step_from_the_solves_evaluation(monkeypatch, jacobian, moved):
    """A warm training solve evaluates f(z0) with autograd; when every graph passes its first
    check, that evaluation is the phantom step's (and the penalty's): one evaluation of f in
    the step instead of two, with the reference path's loss and gradients."""
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(engine, "FUSE_WARM_TRAINING_EVALUATION", fused)
        model = build("phantom", solver={"solver": "anderson", "tol": 1e-2, "max_iter": 40},
                      train_start={"enabled": True, "dtype": "float32"}, jacobian=jacobian).train()
        torch.manual_seed(5)
        model(frames([0, 1], [0, 0]))  # fills the training memory
        batch = frames([0, 1], [0, 0])
        if moved:  # frame (1, 0) changed: its stored fixed point is a start, not a solution
            batch.pos[int((batch.batch == 1).nonzero()[0])] += torch.tensor([0.3, -0.2, 0.1])
        results[fused] = _training_step(model, batch, monkeypatch)
    (loss, grads, calls, nstep), (ref_loss, ref_grads, ref_calls, ref_nstep) = results[True], results[False]
    assert torch.equal(nstep, ref_nstep)
    if moved:
        assert nstep[1] > 1 and calls == ref_calls == int(nstep.max()) + 1
    else:
        assert (nstep == 1).all() and (calls, ref_calls) == (1, 2)
    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
    assert torch.allclose(grads, ref_grads, rtol=1e-9, atol=1e-12)


def test_phantom_step_starts_where_the_solve_last_evaluated_f():
    """The phantom step's output has the value of the solve's own output, so training and
    evaluation forwards predict the same: Anderson's and the plain iteration's output is f at
    their last point; Broyden's output is that point itself (its phantom step goes one further)."""
    problem = CoupledToy([3, 5, 2], [0.3, 0.7, 0.95])
    for solver in ("anderson", "fixed_point_iter", "broyden"):
        solution = solve(problem, problem.zeros(), SolverSettings(solver=solver, tol=1e-3, max_iter=80))
        assert solution.converged.all()
        if solver == "broyden":
            assert torch.equal(solution.z_in, solution.z)
        else:
            assert not torch.equal(solution.z_in, solution.z)
            assert torch.equal(phantom(problem, solution.z_in, 1, 1.0), solution.z), solver
