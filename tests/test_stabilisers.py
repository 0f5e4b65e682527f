"""DEQ stabilisers do what they claim (on the small float64 molecule of test_gradients)."""

import pytest
import torch

from ocp_deq.models.deq_equiformer_v2 import EquiformerFixedPoint
from test_gradients import build, float64, molecule_batch  # noqa: F401  (fixture)

LOOSE = {"solver": "anderson", "tol": 1e-6, "max_iter": 100}


def test_variational_dropout_keeps_one_mask_per_forward():
    model = build("phantom", solver=LOOSE, variational_dropout=0.3).train()
    torch.manual_seed(5)
    first = model(molecule_batch())
    torch.manual_seed(6)
    second = model(molecule_batch())
    # one mask for all iterations: f is fixed within a forward, so a fixed point is reached
    assert first["deq_residual"].item() < 1e-3 and second["deq_residual"].item() < 1e-3
    # a new mask per forward: two training forwards differ
    assert not torch.allclose(first["energy"], second["energy"])
    model.eval()
    torch.manual_seed(5)
    a = model(molecule_batch())["energy"]
    torch.manual_seed(5)
    b = model(molecule_batch())["energy"]
    torch.testing.assert_close(a, b)  # no dropout at evaluation


def test_pre_norm_makes_f_insensitive_to_the_injection_scale():
    def f_ratio(pre_norm):  # form "block": f's output is the blocks' output, all of it from the normed input
        model = build("phantom", solver=LOOSE, pre_norm=pre_norm, injection="add", form="block").eval()
        backbone = model.backbone
        torch.manual_seed(5)
        data = molecule_batch()
        x, graph = backbone.encode(data)
        z = torch.randn_like(x)
        out1 = EquiformerFixedPoint.build(backbone, x, graph, data).f(z)
        out2 = EquiformerFixedPoint.build(backbone, 3 * x, graph, data).f(3 * z)
        return ((out1 - out2).norm() / out1.norm()).item()

    assert f_ratio(True) < 1e-4  # up to the norm's eps
    assert f_ratio(False) > 1e-3


def test_post_norm_bounds_the_output_of_f():
    model = build("phantom", solver=LOOSE, post_norm=True).eval()
    torch.manual_seed(5)
    data = molecule_batch()
    x, graph = model.backbone.encode(data)
    problem = EquiformerFixedPoint.build(model.backbone, x, graph, data)
    small = problem.f(torch.zeros_like(x))
    large = problem.f(100 * torch.randn_like(x))
    # the output's scale is set by the norm, not by the input
    assert 0.2 < large.norm() / small.norm() < 5


def test_weight_norm_reparametrises_and_is_reset_every_forward():
    model = build("phantom", solver=LOOSE, weight_norm=True).eval()
    normed = [m for m in model.backbone.blocks.modules() if hasattr(m, "_deq_norm")]
    assert normed, "weight norm was applied to no layer"
    layer = normed[0]
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("_g"):
                param.mul_(2.0)
    before = layer.weight.detach().clone()
    torch.manual_seed(5)
    model(molecule_batch())  # forward resets the norm: weight = g * v / |v| recomputed
    torch.testing.assert_close(layer.weight.detach(), 2 * before)


def largest_singular_values(spectral_norm):
    model = build("phantom", solver=LOOSE, spectral_norm=spectral_norm).train()
    for _ in range(3):  # power iterations run in training forwards
        torch.manual_seed(5)
        model(molecule_batch())
    layers = [m for m in model.backbone.blocks.modules() if isinstance(m, torch.nn.Linear)]
    return [torch.linalg.matrix_norm(m.weight.detach(), ord=2).item() for m in layers]


def test_spectral_norm_shrinks_the_largest_singular_values():
    plain, normed = largest_singular_values(False), largest_singular_values(True)
    assert max(normed) < 1.5 < max(plain)


def test_jacobian_regulariser_is_a_trainable_penalty():
    model = build("phantom", solver=LOOSE, jacobian={"weight": 1.0}).train()
    optimiser = torch.optim.Adam(model.backbone.blocks.parameters(), lr=3e-3)
    values = []
    for step in range(15):
        torch.manual_seed(step)
        jac = model(molecule_batch())["deq_jac_loss"]
        values.append(jac.item())
        optimiser.zero_grad()
        jac.backward()
        optimiser.step()
    assert values[0] > 0
    assert sum(values[-3:]) / 3 < 0.7 * values[0], values


@pytest.mark.parametrize("gradient", ["phantom", "ift"])
def test_fixed_point_correction_predicts_on_earlier_states(gradient):
    model = build(gradient, solver={"solver": "fixed_point_iter", "tol": 1e-8, "max_iter": 30},
                  correction={"n_states": 3, "decay": 0.8}).train()
    torch.manual_seed(5)
    out = model(molecule_batch())
    states = out["deq_correction"]
    assert len(states) == 2
    # earlier solver states give different (less converged) predictions, each with gradients
    assert all(s["energy"].requires_grad for s in states)
    assert not torch.allclose(states[0]["energy"], out["energy"])
