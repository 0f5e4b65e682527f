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


def test_spectral_normed_f_started_from_explicit_weights_computes_with_them():
    """A DEQ with a spectral-normed f started from an explicit model (ocp_deq.models.from_explicit):
    its normed layers give back the explicit block's weights exactly, in evaluation forwards
    and after the power iteration of a training forward."""
    from fairchem.core.common.registry import registry

    from ocp_deq.models.from_explicit import deq_state_from_explicit, hydra_name
    from test_gradients import WIDTH

    torch.manual_seed(1)
    explicit = registry.get_model_class("equiformer_v2")(num_layers=2, **WIDTH)
    weights = {hydra_name(k): v for k, v in explicit.state_dict().items()}
    deq = build("phantom", solver=LOOSE, spectral_norm=True)
    state, rows = deq_state_from_explicit(deq.state_dict(), weights, [1])
    assert not [key for key, source in rows if source is None and "blocks" in key]  # nothing of f left at its init
    deq.load_state_dict(state)
    layers = {hydra_name(name).replace("backbone.blocks.1.", "backbone.blocks.0."): module
              for name, module in explicit.named_modules() if isinstance(module, torch.nn.Linear)}
    normed = {name: module for name, module in deq.named_modules() if hasattr(module, "weight_orig")}
    assert normed and set(normed) <= set(layers)
    for mode in ("eval", "train"):
        getattr(deq, mode)()
        torch.manual_seed(5)
        deq(molecule_batch())  # the forward recomputes weight = orig * g / sigma
        for name, module in normed.items():
            torch.testing.assert_close(module.weight, layers[name].weight, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
