"""Active-set per-graph solvers: each graph stops on its own, f runs only on graphs still
iterating, iterates equal torchdeq's, gradients (IFT, phantom, BPTT) on the engine alone."""

import pytest
import torch
from torchdeq.solver import get_solver

from fixed_point_toys import CoupledToy
from ocp_deq.deq import SolverSettings, solve
from ocp_deq.deq import gradients

SOLVERS = ["anderson", "broyden", "fixed_point_iter"]
NATOMS, RATES = [3, 1, 5], [0.3, 0.9, 0.6]


def settings(name, tol=1e-8, max_iter=200):
    return SolverSettings(solver=name, tol=tol, max_iter=max_iter, anderson_m=5)


def graph_nodes(g):
    start = sum(NATOMS[:g])
    return slice(start, start + NATOMS[g])


@pytest.mark.parametrize("name", SOLVERS)
def test_graphs_stop_on_their_own_and_match_solving_alone(name):
    toy = CoupledToy(NATOMS, RATES)
    out = solve(toy, toy.zeros(), settings(name))
    assert out.converged.all()
    residual = toy.segments.norm(toy.f(out.z) - out.z) / toy.segments.norm(toy.f(out.z))
    assert (residual < 1e-7).all()
    assert out.nstep[1] > out.nstep[0]  # the slowly contracting graph needs more evaluations
    for g in range(3):
        alone = toy.restrict(torch.tensor([g]))
        single = solve(alone, alone.zeros(), settings(name))
        torch.testing.assert_close(single.z, out.z[graph_nodes(g)], rtol=1e-10, atol=1e-12)
        assert single.nstep.item() == out.nstep[g].item()
        assert single.residual.item() == pytest.approx(out.residual[g].item(), rel=1e-6)


@pytest.mark.parametrize("name", SOLVERS)
def test_f_runs_only_on_graphs_still_iterating(name):
    toy = CoupledToy(NATOMS, RATES)
    toy.calls.clear()
    out = solve(toy, toy.zeros(), settings(name))
    # the work done is exactly the sum of per-graph evaluation counts, not batch x slowest
    assert out.work.graph_evaluations == sum(toy.calls) == int(out.nstep.sum())
    assert out.work.calls == int(out.nstep.max()) and out.work.node_evaluations == int(
        sum(n * s for n, s in zip(NATOMS, out.nstep.tolist())))
    assert toy.calls[0] == 3 and toy.calls[-1] == int((out.nstep == out.nstep.max()).sum())
    assert toy.calls == sorted(toy.calls, reverse=True)


@pytest.mark.parametrize("name", SOLVERS)
def test_same_iterates_as_torchdeq_on_one_graph(name):
    toy = CoupledToy(NATOMS, RATES).restrict(torch.tensor([1]))
    shape = toy.zeros().shape
    ours = solve(toy, toy.zeros(), settings(name, tol=1e-8, max_iter=100))

    def flat(z):
        return toy.f(z.view(shape)).view(1, -1)

    reference, _, info = get_solver(name)(flat, torch.zeros(1, toy.zeros().numel(), dtype=torch.float64),
                                          max_iter=100, tol=1e-8, stop_mode="rel", m=5)
    torch.testing.assert_close(ours.z.view(1, -1), reference, rtol=1e-9, atol=1e-12)
    # torchdeq counts Broyden's steps after its first evaluation
    assert ours.nstep.item() == info["nstep"].item() + (1 if name == "broyden" else 0)


@pytest.mark.parametrize("name", SOLVERS)
def test_converged_start_costs_one_evaluation(name):
    toy = CoupledToy(NATOMS, RATES)
    exact = solve(toy, toy.zeros(), settings("fixed_point_iter", tol=1e-13, max_iter=2000)).z
    again = solve(toy, exact, settings(name, tol=1e-6))
    assert again.nstep.tolist() == [1.0, 1.0, 1.0]


def test_unconverged_graphs_are_reported_with_their_last_state():
    toy = CoupledToy([2, 2], [0.2, 0.99])
    out = solve(toy, toy.zeros(), settings("fixed_point_iter", tol=1e-10, max_iter=5))
    assert out.converged.tolist() == [False, False] and out.nstep.tolist() == [5.0, 5.0]
    f_out = toy.f(out.z)
    residual = toy.segments.norm(f_out - out.z) / toy.segments.norm(f_out)
    assert (out.residual > 1e-10).all() and residual.shape == (2,)


def test_kept_states_for_correction():
    toy = CoupledToy(NATOMS, RATES)
    out = solve(toy, toy.zeros(), settings("fixed_point_iter"), keep_steps=[2, 1000])
    first = toy.f(toy.f(toy.zeros()))  # fixed-point iteration: state after two evaluations
    torch.testing.assert_close(out.states[0], first)
    torch.testing.assert_close(out.states[1], out.z)  # a step never reached keeps the final state


def test_ift_gradient_equals_unrolled_backprop():
    """d(sum z*^2)/dc by the active-set adjoint solve and by BPTT through fixed-point iteration."""
    def loss_grad(method):
        toy = CoupledToy(NATOMS, RATES)
        toy.c.requires_grad_(True)
        if method == "ift":
            with torch.no_grad():
                z_star = solve(toy, toy.zeros(), settings("anderson", tol=1e-12)).z
            z, report = gradients.implicit(toy, z_star, settings("anderson", tol=1e-12))
        else:
            z, _ = gradients.unrolled(toy, toy.zeros(), settings("fixed_point_iter", tol=1e-13, max_iter=1000))
            report = None
        (z ** 2).sum().backward()
        return toy.c.grad, report

    ift, report = loss_grad("ift")
    bptt, _ = loss_grad("bptt")
    torch.testing.assert_close(ift, bptt, rtol=1e-8, atol=1e-10)
    assert report.converged.tolist() == [True, True, True]
    # the adjoint solve dropped graphs too: per-graph counts differ
    assert len(set(report.solution.nstep.tolist())) > 1


def test_phantom_gradient_is_close_to_ift():
    toy = CoupledToy([4], [0.3])
    toy.c.requires_grad_(True)
    with torch.no_grad():
        z_star = solve(toy, toy.zeros(), settings("anderson", tol=1e-12)).z
    ift_z, _ = gradients.implicit(toy, z_star, settings("anderson", tol=1e-12))
    ift = torch.autograd.grad((ift_z ** 2).sum(), toy.c)[0]
    phantom = torch.autograd.grad((gradients.phantom(toy, z_star, 5, 1.0) ** 2).sum(), toy.c)[0]
    assert torch.nn.functional.cosine_similarity(ift.flatten(), phantom.flatten(), dim=0) > 0.99


def test_warm_graphs_use_the_reuse_solver_and_fall_back_to_the_eval_solver():
    """With its own ``reuse.solver``, warm graphs are solved on their own graphs; those it
    leaves unconverged continue with the cold solver from where it stopped; cold graphs are
    solved as if alone."""
    from ocp_deq.deq import DEQSettings
    from ocp_deq.deq.engine import solve_from_starts

    toy = CoupledToy(NATOMS, RATES)
    cold = settings("anderson", tol=1e-8)
    exact = solve(toy, toy.zeros(), settings("fixed_point_iter", tol=1e-13, max_iter=2000)).z
    z0 = exact.clone()
    z0[graph_nodes(1)] += 0.3  # graph 1: a poor warm start
    z0[graph_nodes(2)] = 0.0  # graph 2: cold
    deq = DEQSettings.from_config({"reuse": {"solver": {"solver": "fixed_point_iter", "tol": 1e-8, "max_iter": 1}}})
    toy.calls.clear()
    out = solve_from_starts(toy, z0, torch.tensor([True, True, False]), deq, cold)
    assert out.nstep[0] == 1 and out.converged.all()
    assert out.nstep[1] > 1  # one warm evaluation, then the fallback
    alone = toy.restrict(torch.tensor([2]))
    torch.testing.assert_close(out.z[graph_nodes(2)], solve(alone, alone.zeros(), cold).z)
    torch.testing.assert_close(out.z, exact, rtol=0, atol=1e-6)
    assert out.work.graph_evaluations == int(out.nstep.sum())


def test_a_warm_part_holding_every_graph_is_solved_without_copying_the_problem():
    """All graphs warm (one system along MD): the warm solve and its fallback run on the
    problem as it is; restricting to every graph would copy all edge features for nothing."""
    from ocp_deq.deq import DEQSettings
    from ocp_deq.deq.engine import solve_from_starts

    toy = CoupledToy(NATOMS, RATES)
    exact = solve(toy, toy.zeros(), settings("fixed_point_iter", tol=1e-13, max_iter=2000)).z
    restricted_to = []
    restrict = toy.restrict
    toy.restrict = lambda graphs: restricted_to.append(graphs.numel()) or restrict(graphs)
    deq = DEQSettings.from_config({"reuse": {"solver": {"solver": "fixed_point_iter", "tol": 1e-8, "max_iter": 1}}})
    out = solve_from_starts(toy, exact + 0.3, torch.ones(3, dtype=torch.bool), deq, settings("anderson"))
    assert out.converged.all() and (out.nstep > 1).all()  # one warm evaluation, then the fallback
    torch.testing.assert_close(out.z, exact, rtol=0, atol=1e-6)
    assert len(NATOMS) not in restricted_to  # only the solver's own dropping of converged graphs
    # the reference path: the same two solves on a restricted copy holding every graph
    everything = restrict(torch.arange(len(NATOMS)))
    warm_part = solve(everything, exact + 0.3, deq.reuse.solver)
    reference = solve(everything, warm_part.z, settings("anderson"))
    torch.testing.assert_close(out.z, reference.z, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.nstep, warm_part.nstep + reference.nstep)
