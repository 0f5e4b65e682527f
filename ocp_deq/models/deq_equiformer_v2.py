"""Deep-equilibrium EquiformerV2, built from fairchem's own EquiformerV2 parts.

encoder (atom + edge-degree embedding) -> x;  z* = f(z*, x) with
f(z, x) = post_norm(blocks(inject(z, x)));  final norm -> fairchem's EquiformerV2 heads.
"""

from __future__ import annotations

import torch
from fairchem.core.common import gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HydraModel
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
from fairchem.core.models.equiformer_v2.layer_norm import get_normalization_layer
from fairchem.core.models.equiformer_v2.so3 import SO3_Embedding
from torchdeq import get_deq

from ocp_deq.deq import DEQSettings, pack_graphs, unpack_graphs
from ocp_deq.deq.settings import DEQConfigError, SolverSettings

_STOCHASTIC_OPTIONS = ("alpha_drop", "drop_path_rate", "proj_drop")


def _build_deq(solver: SolverSettings, settings: DEQSettings):
    """One torchdeq DEQ object for a given forward-solver setting."""
    kwargs = {"m": solver.anderson_m} if solver.solver == "anderson" else {}
    deq = get_deq(
        core="sliced",
        f_solver=f"per_graph_{solver.solver}",
        f_max_iter=int(solver.max_iter),
        f_tol=float(solver.tol),
        f_stop_mode=solver.stop_mode,
        grad=int(settings.grad_steps),
        tau=float(settings.grad_tau),
    )
    return deq, kwargs


def per_graph_sum(values: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    return values.new_zeros(num_graphs).index_add_(0, batch, values)


@registry.register_model("deq_equiformer_v2_backbone")
class DEQEquiformerV2Backbone(EquiformerV2Backbone):
    """EquiformerV2 backbone whose ``num_layers`` blocks are iterated to a fixed point.

    Accepts every ``equiformer_v2_backbone`` argument plus ``deq`` (see
    :class:`ocp_deq.deq.DEQSettings`). Dropout inside f would change f at every solver
    iteration, so the EquiformerV2 dropout options must be 0.
    """

    def __init__(self, deq: dict | None = None, num_layers: int = 1, **kwargs):
        for key in _STOCHASTIC_OPTIONS:
            kwargs.setdefault(key, 0.0)
            if kwargs[key]:
                raise DEQConfigError(
                    f"model.{key}={kwargs[key]}: random dropout inside the implicit layer changes "
                    f"f at every solver iteration, so a fixed point does not exist; set it to 0"
                )
        self.deq_settings = DEQSettings.from_config(deq)
        super().__init__(num_layers=num_layers, **kwargs)
        self.deq_post_norm = (
            get_normalization_layer(self.norm_type, lmax=max(self.lmax_list), num_channels=self.sphere_channels)
            if self.deq_settings.post_norm
            else None
        )
        self.deq_train, self.train_solver_kwargs = _build_deq(self.deq_settings.train_solver, self.deq_settings)
        self.deq_eval, self.eval_solver_kwargs = _build_deq(self.deq_settings.eval_solver, self.deq_settings)

    # -- encoder ---------------------------------------------------------------------
    def encode(self, data):
        """Graph, Wigner matrices and the input injection x [N, (lmax+1)^2, C]."""
        if gp_utils.initialized():
            raise NotImplementedError("graph parallelism is not supported by deq_equiformer_v2")
        self.batch_size = len(data.natoms)
        self.dtype = data.pos.dtype
        self.device = data.pos.device
        atomic_numbers = data.atomic_numbers.long()
        if atomic_numbers.max().item() >= self.max_num_elements:
            raise ValueError(
                f"atomic number {atomic_numbers.max().item()} exceeds model.max_num_elements="
                f"{self.max_num_elements}"
            )
        graph = self.generate_graph(data, enforce_max_neighbors_strictly=self.enforce_max_neighbors_strictly)
        edge_rot_mat = self._init_edge_rot_mat(data, graph.edge_index, graph.edge_distance_vec)
        for rotation in self.SO3_rotation:
            rotation.set_wigner(edge_rot_mat)

        x = SO3_Embedding(len(atomic_numbers), self.lmax_list, self.sphere_channels, self.device, self.dtype)
        offset_res, offset = 0, 0
        atom_embedding = self.sphere_embedding(atomic_numbers)
        for lmax in self.lmax_list:
            x.embedding[:, offset_res, :] = atom_embedding[:, offset : offset + self.sphere_channels]
            offset += self.sphere_channels
            offset_res += int((lmax + 1) ** 2)

        graph.edge_distance = self.distance_expansion(graph.edge_distance)
        if self.share_atom_edge_embedding and self.use_atom_edge_embedding:
            source = self.source_embedding(graph.atomic_numbers_full[graph.edge_index[0]])
            target = self.target_embedding(graph.atomic_numbers_full[graph.edge_index[1]])
            graph.edge_distance = torch.cat((graph.edge_distance, source, target), dim=1)
        edge_degree = self.edge_degree_embedding(
            graph.atomic_numbers_full, graph.edge_distance, graph.edge_index, len(atomic_numbers), graph.node_offset
        )
        return x.embedding + edge_degree.embedding, graph

    # -- implicit layer --------------------------------------------------------------
    def inject(self, z: torch.Tensor, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """z + x, rescaled per graph to the norm of that graph's x (never across graphs)."""
        u = z + x
        if self.deq_settings.injection == "add":
            return u
        x_norm = per_graph_sum(x.pow(2).flatten(1).sum(1), batch, num_graphs).sqrt()
        u_norm = per_graph_sum(u.pow(2).flatten(1).sum(1), batch, num_graphs).sqrt()
        scale = x_norm / (u_norm + 1e-8)
        return u * scale[batch].view(-1, *([1] * (u.dim() - 1)))

    def implicit_layer(self, z: torch.Tensor, x: torch.Tensor, graph, batch, num_graphs) -> torch.Tensor:
        h = SO3_Embedding(0, self.lmax_list, self.sphere_channels, self.device, self.dtype)
        h.set_embedding(self.inject(z, x, batch, num_graphs))
        for block in self.blocks:
            h = block(
                h,
                graph.atomic_numbers_full,
                graph.edge_distance,
                graph.edge_index,
                batch=batch,
                node_offset=graph.node_offset,
            )
        out = h.embedding
        return self.deq_post_norm(out) if self.deq_post_norm is not None else out

    def solve(self, x: torch.Tensor, graph, data, z0: torch.Tensor | None = None):
        """Run the torchdeq solver on per-graph packed states; returns (z*, stats)."""
        batch, natoms = data.batch, data.natoms
        num_graphs = natoms.numel()
        feat_shape = x.shape[1:]

        def f(packed):
            z = unpack_graphs(packed, batch, natoms, feat_shape)
            return pack_graphs(self.implicit_layer(z, x, graph, batch, num_graphs), batch, natoms)

        deq, solver_kwargs = (
            (self.deq_train, self.train_solver_kwargs) if self.training else (self.deq_eval, self.eval_solver_kwargs)
        )
        z_init = pack_graphs(torch.zeros_like(x) if z0 is None else z0, batch, natoms)
        z_out, info = deq(f, z_init, solver_kwargs=dict(solver_kwargs))
        z_star = unpack_graphs(z_out[-1], batch, natoms, feat_shape)
        stats = {
            "deq_nstep": info["nstep"].detach(),
            "deq_residual": info["rel_lowest"].detach(),
            "deq_converged": info["converged"].detach(),
        }
        return z_star, stats

    def forward(self, data):
        x, graph = self.encode(data)
        z_star, stats = self.solve(x, graph, data)
        node = SO3_Embedding(0, self.lmax_list, self.sphere_channels, self.device, self.dtype)
        node.set_embedding(self.norm(z_star))
        return {"node_embedding": node, "graph": graph, **stats}


SOLVER_STAT_KEYS = ("deq_nstep", "deq_residual", "deq_converged")


@registry.register_model("deq_equiformer_v2")
class DEQEquiformerV2(HydraModel):
    """Complete DEQ model (energy + direct forces), configured like ``equiformer_v2``.

    A :class:`HydraModel` with our backbone and fairchem's EquiformerV2 scalar / vector
    heads, so checkpoints work with fairchem's hydra fine-tuning. Outputs ``energy`` [B],
    ``forces`` [N, 3] and the per-graph solver statistics ``deq_nstep``, ``deq_residual``,
    ``deq_converged`` [B].
    """

    def __init__(self, energy_reduce: str = "sum", **backbone_kwargs):
        heads = {"energy": {"module": "equiformerV2_scalar_head", "reduce": energy_reduce}}
        if backbone_kwargs.get("regress_forces", True):
            heads["forces"] = {"module": "equiformerV2_vector_head"}
        super().__init__(
            backbone={"model": "deq_equiformer_v2_backbone", **backbone_kwargs},
            heads=heads,
            otf_graph=backbone_kwargs.get("otf_graph", True),
            pass_through_head_outputs=True,
        )

    def forward(self, data):
        emb = self.backbone(data)
        out = {}
        for head in self.output_heads.values():
            out.update(head(data, emb))
        out.update({key: emb[key] for key in SOLVER_STAT_KEYS})
        return out
