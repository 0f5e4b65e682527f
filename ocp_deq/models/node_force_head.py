"""A force head that reads each atom's own embedding (``model.force_head: node``).

fairchem's ``equiformerV2_vector_head`` is one more SO(2) graph attention over every edge:
it costs about one block evaluation, and a DEQ pays it after every solve, warm one-step
solves included. This head is EquiformerV2's feed-forward network (the energy head's
module) with one output channel, read at l=1 instead of l=0: O(atoms), not O(edges), and
equivariant like the energy head. The fixed point already mixes every neighbourhood, so
the head needs no edges of its own; an explicit EquiformerV2 can use it as well.
"""

from __future__ import annotations

from functools import partial

import torch
from fairchem.core.common import gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HeadInterface, HydraModel
from fairchem.core.models.equiformer_v2.transformer_block import FeedForwardNetwork
from fairchem.core.models.equiformer_v2.weight_initialization import eqv2_init_weights


@registry.register_model("node_vector_head")
class NodeVectorHead(torch.nn.Module, HeadInterface):
    """Per-atom l=1 output [N, 3] of a feed-forward network on ``node_embedding``."""

    def __init__(self, backbone, output_name: str = "forces"):
        super().__init__()
        if max(backbone.lmax_list) < 1:
            raise ValueError(f"node_vector_head needs lmax >= 1 for an l=1 output; lmax_list={backbone.lmax_list}")
        self.output_name = output_name
        self.node_force_block = FeedForwardNetwork(
            backbone.sphere_channels,
            backbone.ffn_hidden_channels,
            1,
            backbone.lmax_list,
            backbone.mmax_list,
            backbone.SO3_grid,
            backbone.ffn_activation,
            backbone.use_gate_act,
            backbone.use_grid_mlp,
            backbone.use_sep_s2_act,
        )
        self.apply(partial(eqv2_init_weights, weight_init=backbone.weight_init))

    def forward(self, data, emb: dict) -> dict:
        output = self.node_force_block(emb["node_embedding"]).embedding.narrow(1, 1, 3).reshape(-1, 3)
        if gp_utils.initialized():
            output = gp_utils.gather_from_model_parallel_region(output, dim=0)
        return {self.output_name: output}


@registry.register_model("equiformer_v2_node_head")
class EquiformerV2NodeHead(HydraModel):
    """Explicit EquiformerV2 (fairchem's backbone, configured like ``equiformer_v2``) with the
    per-atom force head: the fair baseline for a DEQ that uses it."""

    def __init__(self, energy_reduce: str = "sum", **backbone_kwargs):
        super().__init__(
            backbone={"model": "equiformer_v2_backbone", **backbone_kwargs},
            heads={"energy": {"module": "equiformerV2_scalar_head", "reduce": energy_reduce},
                   "forces": {"module": "node_vector_head"}},
            otf_graph=backbone_kwargs.get("otf_graph", True),
            pass_through_head_outputs=True,
        )
        self.backbone.direct_forces = True  # forces come from the head: no autograd graph in evaluation
