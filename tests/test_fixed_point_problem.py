"""EquiformerV2's f with its graph-only work done once per forward equals fairchem's own
block on the same input, and restricting f to some graphs gives those graphs' rows."""

import pytest
import torch
from fairchem.core.datasets import data_list_collater
from fairchem.core.models.equiformer_v2.so3 import SO3_Embedding

from ocp_deq.models.deq_equiformer_v2 import EquiformerFixedPoint
from test_gradients import MOLECULE, build, float64, molecule_batch  # noqa: F401  (fixture)


def two_molecules():
    first = molecule_batch().to_data_list()[0]
    second = molecule_batch([[p[0] * 1.1, p[1] - 0.2, p[2]] for p in MOLECULE["positions"]]).to_data_list()[0]
    return data_list_collater([first, second], otf_graph=False)


def fairchem_f(backbone, x, graph, data, z, form):
    """f computed by fairchem's blocks alone: edge features recomputed inside each block;
    form "update" keeps only what the blocks add to their input, on top of x."""
    x_norm = torch.zeros(2).index_add_(0, data.batch, x.pow(2).flatten(1).sum(1)).sqrt()
    u = z + x
    u_norm = torch.zeros(2).index_add_(0, data.batch, u.pow(2).flatten(1).sum(1)).sqrt()
    if backbone.deq_settings.injection == "add_rescale":
        u = u * (x_norm / (u_norm + 1e-8))[data.batch][:, None, None]
    h = SO3_Embedding(0, backbone.lmax_list, backbone.sphere_channels, x.device, x.dtype)
    h.set_embedding(u)
    for block in backbone.blocks:
        h = block(h, graph.atomic_numbers_full, graph.edge_distance, graph.edge_index, batch=data.batch)
    out = h.embedding if form == "block" else x + backbone.deq_update_gain * (h.embedding - u)
    return backbone.deq_post_norm(out) if backbone.deq_post_norm is not None else out


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("form,post_norm,injection", [("block", True, "add_rescale"), ("update", False, "add"),
                                                       ("update", True, "add_rescale")])
def test_hoisted_f_equals_fairchem_blocks(training, form, post_norm, injection):
    model = build("ift", form=form, post_norm=post_norm, injection=injection, update_gain=0.7)
    backbone = model.backbone.train(training)
    torch.manual_seed(3)
    data = two_molecules()
    x, graph = backbone.encode(data)
    problem = EquiformerFixedPoint.build(backbone, x, graph, data)
    z = torch.randn_like(x)
    ours = problem.f(z)
    reference = fairchem_f(backbone, x, graph, data, z, form)
    assert (ours - reference).norm() / reference.norm() < 1e-6
    # and after restricting to the second graph: its rows, from its own edges only
    second = problem.restrict(torch.tensor([1]))
    rows = data.batch == 1
    alone = second.f(z[rows])
    assert (alone - ours[rows]).norm() / ours[rows].norm() < 1e-10
    assert second.edge_index.shape[1] == int(rows[graph.edge_index[1]].sum())


def test_radial_functions_run_once_per_forward():
    model = build("ift", solver={"solver": "anderson", "tol": 1e-8, "max_iter": 30}).eval()
    calls = []
    rad = model.backbone.blocks[0].ga.so2_conv_1.rad_func
    rad.net.register_forward_hook(lambda *args: calls.append(1))  # the radial MLP itself
    mid_forward = []  # what a checkpoint written by a signal handler during f would hold
    model.backbone.blocks[0].register_forward_pre_hook(lambda *args: mid_forward.append(set(model.state_dict())))
    torch.manual_seed(3)
    out = model(two_molecules())
    assert out["deq_nstep"].max() > 5 and len(calls) == 1
    assert "forward" not in vars(rad) and mid_forward and all(keys == set(model.state_dict()) for keys in mid_forward)
