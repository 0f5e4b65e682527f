"""The banded Gaussian distance expansion is fairchem's dense one to float tolerance: values,
derivatives w.r.t. the distance, and whole-model predictions (DEQ and explicit)."""

from __future__ import annotations

import pytest
import torch
from fairchem.core.common.registry import registry
from fairchem.core.datasets import data_list_collater
from fairchem.core.models.scn.smearing import GaussianSmearing

from conftest import TINY_MODEL
from ocp_deq.data import read_lmdb
from ocp_deq.models.distance_expansion import NEGLIGIBLE, BandedGaussianSmearing, band_gaussians

GRAPH = dict(use_pbc=True, otf_graph=True, max_neighbors=100000, max_radius=5.0)


def dense_and_banded(*args):
    dense = GaussianSmearing(*args)
    banded = GaussianSmearing(*args)
    assert band_gaussians(banded) == 1 and type(banded) is BandedGaussianSmearing
    return dense, banded


@pytest.mark.parametrize("args", [(0.0, 5.0, 600, 2.0), (0.0, 6.0, 600, 2.0), (0.0, 12.0, 1024, 1.0)])
def test_banded_expansion_equals_dense_values_and_distance_derivatives(args):
    dense, banded = dense_and_banded(*args)
    torch.manual_seed(0)
    # both ends of the basis (clipped bands), centres exactly, and the radius graph's range
    distance = torch.cat([torch.tensor([0.0, 0.01, args[1], args[1] - 1e-4]), dense.offset[::37], torch.rand(500) * args[1]])
    distance.requires_grad_(True)
    want, got = dense(distance), banded(distance)
    assert got.shape == want.shape == (distance.numel(), args[2])
    assert (got - want).abs().max() < NEGLIGIBLE
    assert (got == 0).float().mean() > 0.9  # it is banded: most of each row is left at zero
    weights = torch.randn_like(want)
    grad_want, = torch.autograd.grad((want * weights).sum(), distance)
    grad_got, = torch.autograd.grad((got * weights).sum(), distance)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5 * grad_want.abs().max().item())


def test_banded_expansion_in_float64_matches_to_negligible():
    dense, banded = dense_and_banded(0.0, 5.0, 600, 2.0)
    dense.double(), banded.double()
    distance = torch.rand(300, dtype=torch.float64) * 5.0
    assert (banded(distance) - dense(distance)).abs().max() < NEGLIGIBLE


def test_a_basis_narrower_than_the_band_uses_the_dense_forward():
    dense, banded = dense_and_banded(0.0, 5.0, 20, 2.0)  # band of 27 > 20 basis functions
    distance = torch.rand(50) * 5.0
    assert torch.equal(banded(distance), dense(distance))


@pytest.mark.parametrize("name, extra", [("deq_equiformer_v2", {"force_mode": "conservative"}),
                                         ("deq_equiformer_v2", {}), ("equiformer_v2", {"num_layers": 2})])
def test_models_predict_the_same_with_banded_and_dense_expansion(toy_root, name, extra):
    """The DEQ bands its expansion when built; switching it back to the dense class is the
    reference path (same state: the banded class only overrides forward)."""
    torch.manual_seed(0)
    model = registry.get_model_class(name)(**{**GRAPH, **TINY_MODEL, **extra}).eval()
    band_gaussians(model)
    expansions = [m for m in model.modules() if isinstance(m, GaussianSmearing)]
    assert len(expansions) == 1 and type(expansions[0]) is BandedGaussianSmearing
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = data_list_collater(read_lmdb(toy_root / "train")[:2])

    def predict():
        torch.manual_seed(1)  # EquiformerV2 draws a random roll about every edge
        with torch.no_grad() if extra.get("force_mode") != "conservative" else torch.enable_grad():
            out = model(batch.clone())
        return out["energy"].detach(), out["forces"].detach()

    banded = predict()
    expansions[0].__class__ = GaussianSmearing
    dense = predict()
    assert model.state_dict().keys() == state.keys()
    for got, want in zip(banded, dense):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
