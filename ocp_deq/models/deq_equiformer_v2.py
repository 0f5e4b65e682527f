"""Deep-equilibrium EquiformerV2, built from fairchem's own EquiformerV2 parts.

encoder (atom + edge-degree embedding) -> x;  z* = f(z*, x) with
f(z, x) = post_norm(blocks(inject(z, x)));  final norm -> fairchem's EquiformerV2 heads.
"""

from __future__ import annotations

import contextlib

import torch
from torch_geometric.data import Batch
from fairchem.core.common import gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HydraModel
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
from fairchem.core.models.equiformer_v2.layer_norm import get_normalization_layer
from fairchem.core.models.equiformer_v2.so3 import SO3_Embedding
from torchdeq.dropout import VariationalDropout, reset_dropout
from torchdeq.grad import backward_factory
from torchdeq.loss import jac_reg
from torchdeq.norm import apply_norm, reset_norm
from torchdeq.utils.layer_utils import DEQWrapper

from ocp_deq.deq import DEQSettings, PerGraphSolver, pack_graphs, unpack_graphs
from ocp_deq.deq.reuse import FixedPointCache
from ocp_deq.deq.settings import DEQConfigError, SolverSettings
from ocp_deq.models.edge_frames import attach_position_gradient

_STOCHASTIC_OPTIONS = ("alpha_drop", "drop_path_rate", "proj_drop")


def _solver_kwargs(solver: SolverSettings) -> dict:
    kwargs = dict(max_iter=int(solver.max_iter), tol=float(solver.tol), stop_mode=solver.stop_mode)
    if solver.solver == "anderson":
        kwargs["m"] = int(solver.anderson_m)
    return kwargs


def unrolled_solve(f, z, solver: SolverSettings):
    """Plain fixed-point iteration *with* autograd (BPTT), each graph frozen once converged."""
    tol, max_iter = float(solver.tol), int(solver.max_iter)
    active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    nstep = torch.zeros(z.shape[0], device=z.device)
    residual = torch.full((z.shape[0],), float("inf"), device=z.device)
    for _ in range(max_iter):
        fz = f(z)
        diff = (fz - z).detach().norm(dim=1)
        res = diff / (fz.detach().norm(dim=1) + 1e-9) if solver.stop_mode == "rel" else diff
        z = torch.where(active[:, None], fz, z)
        residual = torch.where(active, res, residual)
        nstep = nstep + active.float()
        active = active & (res >= tol)
        if not active.any():
            break
    return z, {"nstep": nstep, "rel_lowest": residual, "converged": ~active}


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
                    f"f at every solver iteration, so a fixed point does not exist; set it to 0 "
                    f"(model.deq.variational_dropout keeps one mask per forward)"
                )
        self.deq_settings = settings = DEQSettings.from_config(deq)
        super().__init__(num_layers=num_layers, **kwargs)

        def norm_layer():
            return get_normalization_layer(self.norm_type, lmax=max(self.lmax_list), num_channels=self.sphere_channels)

        self.deq_pre_norm = norm_layer() if settings.pre_norm else None
        self.deq_post_norm = norm_layer() if settings.post_norm else None
        self.deq_dropout = VariationalDropout(settings.variational_dropout) if settings.variational_dropout else None
        if settings.weight_norm or settings.spectral_norm:
            apply_norm(self.blocks, norm_type="weight_norm" if settings.weight_norm else "spectral_norm")

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
            if graph.edge_distance_vec.requires_grad:  # conservative forces: keep d/dpos
                attach_position_gradient(rotation, graph.edge_distance_vec)

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
        u = self.inject(z, x, batch, num_graphs)
        h.set_embedding(self.deq_pre_norm(u) if self.deq_pre_norm is not None else u)
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
        if self.deq_dropout is not None:
            out = self.deq_dropout(out)
        return self.deq_post_norm(out) if self.deq_post_norm is not None else out

    def solve(self, x: torch.Tensor, graph, data, z0: torch.Tensor | None = None, solver: SolverSettings | None = None):
        """Find z* per graph and attach the configured gradient.

        Returns (z* [N, ...], extra states for fixed-point correction, stats per graph).
        Gradients flow only when autograd is on and either training or positions require
        grad (conservative forces); derivatives w.r.t. positions always use an exact path
        (IFT, or BPTT when chosen), phantom gradients only serve parameters.
        """
        settings = self.deq_settings
        batch, natoms = data.batch, data.natoms
        num_graphs, feat_shape = natoms.numel(), x.shape[1:]
        solver = solver or (settings.train_solver if self.training else settings.eval_solver)

        def f(packed):
            z = unpack_graphs(packed, batch, natoms, feat_shape)
            return pack_graphs(self.implicit_layer(z, x, graph, batch, num_graphs), batch, natoms)

        z_init = pack_graphs(torch.zeros_like(x) if z0 is None else z0.to(x.dtype), batch, natoms)
        needs_grad = torch.is_grad_enabled() and (self.training or data.pos.requires_grad)
        mode = settings.gradient
        if mode == "phantom" and data.pos.requires_grad:
            mode = "ift"
        states, backward_solver = [], None
        if needs_grad and mode == "bptt":
            z, info = unrolled_solve(f, z_init, solver)
        else:
            n_states = int(settings.correction.n_states) if (self.training and needs_grad) else 1
            indexing = _spread(solver, n_states)
            with torch.no_grad():
                z, trajectory, info = PerGraphSolver(solver.solver)(f, z_init, indexing=indexing, **_solver_kwargs(solver))
            if needs_grad:
                wrapped = DEQWrapper(f, None)
                if mode == "ift":
                    backward = self.deq_settings.backward_solver
                    backward_solver = PerGraphSolver(backward.solver)
                    attach = backward_factory(
                        grad_type="ift", b_solver=backward_solver, b_solver_kwargs=_solver_kwargs(backward)
                    )
                    z = attach(None, wrapped, z.detach())[-1]
                phantom = backward_factory(grad_type=int(settings.grad_steps), tau=float(settings.grad_tau))
                if mode == "phantom":
                    z = phantom(None, wrapped, z.detach())[-1]
                # correction states always use phantom steps (their own fixed points do not exist)
                states = [phantom(None, wrapped, s.detach())[-1] for s in trajectory[:-1]]
        z_star = unpack_graphs(z, batch, natoms, feat_shape)
        states = [unpack_graphs(s, batch, natoms, feat_shape) for s in states]
        stats = {
            "deq_nstep": info["nstep"].detach().float(),
            "deq_residual": info["rel_lowest"].detach(),
            "deq_converged": info["converged"].detach(),
            "deq_backward_solver": backward_solver,  # its last_stat: after autograd ran the IFT solve
        }
        if needs_grad and self.training and self._jacobian_due():
            zj = z.detach().requires_grad_()
            stats["deq_jac_loss"] = jac_reg(f(zj), zj, vecs=int(settings.jacobian.vectors))
        return z_star, states, stats

    def _jacobian_due(self) -> bool:
        jac = self.deq_settings.jacobian
        return jac.weight > 0 and (jac.freq >= 1 or torch.rand(()).item() < jac.freq)

    def read_out(self, z: torch.Tensor) -> SO3_Embedding:
        node = SO3_Embedding(0, self.lmax_list, self.sphere_channels, self.device, self.dtype)
        node.set_embedding(self.norm(z))
        return node

    def forward(self, data, z0: torch.Tensor | None = None, solver: SolverSettings | None = None):
        reset_norm(self.blocks)
        reset_dropout(self)
        x, graph = self.encode(data)
        z_star, states, stats = self.solve(x, graph, data, z0=z0, solver=solver)
        return {
            "node_embedding": self.read_out(z_star),
            "graph": graph,
            "fixed_point": z_star,
            "correction_embeddings": [self.read_out(s) for s in states],
            **stats,
        }


def _spread(solver: SolverSettings, n_states: int) -> list[int] | None:
    """Solver steps at which to keep states for fixed-point correction (last = final)."""
    if n_states <= 1:
        return None
    step = max(int(solver.max_iter) // n_states, 1)
    return [step * (k + 1) for k in range(n_states - 1)] + [int(solver.max_iter) + 1]

SOLVER_STAT_KEYS = ("deq_nstep", "deq_residual", "deq_converged")
FORCE_MODES = ("direct", "conservative")


@registry.register_model("deq_equiformer_v2")
class DEQEquiformerV2(HydraModel):
    """Complete DEQ model (energy + forces), configured like ``equiformer_v2``.

    A :class:`HydraModel` with our backbone and fairchem's EquiformerV2 scalar / vector
    heads, so checkpoints work with fairchem's hydra fine-tuning. ``force_mode``:
    ``direct`` (the l=1 head) or ``conservative`` (-dE/dpos through the fixed point by
    implicit differentiation). The force head exists in both modes, so a direct-force
    checkpoint fine-tunes with ``model.force_mode=conservative`` and back.

    Outputs ``energy`` [B], ``forces`` [N, 3], the per-graph solver statistics
    ``deq_nstep``, ``deq_residual``, ``deq_converged`` [B] and, in training, the DEQ loss
    terms ``deq_correction`` (predictions on earlier solver states) and ``deq_jac_loss``.
    """

    def __init__(self, energy_reduce: str = "sum", force_mode: str = "direct", **backbone_kwargs):
        if force_mode not in FORCE_MODES:
            raise DEQConfigError(f"model.force_mode='{force_mode}' must be one of {FORCE_MODES}")
        heads = {"energy": {"module": "equiformerV2_scalar_head", "reduce": energy_reduce}}
        self.regress_forces = backbone_kwargs.get("regress_forces", True)
        if self.regress_forces:
            heads["forces"] = {"module": "equiformerV2_vector_head"}
        super().__init__(
            backbone={"model": "deq_equiformer_v2_backbone", **backbone_kwargs},
            heads=heads,
            otf_graph=backbone_kwargs.get("otf_graph", True),
            pass_through_head_outputs=True,
        )
        self.force_mode = force_mode
        self.fixed_point_cache: FixedPointCache | None = None

    @property
    def force_mode(self) -> str:
        return self._force_mode

    @force_mode.setter
    def force_mode(self, mode: str) -> None:
        """Conservative forces leave the direct force head unused: freeze it, or DDP (which
        fairchem wraps around every model, a single CPU process included) fails waiting for
        its gradients."""
        self._force_mode = mode
        if self.regress_forces:
            self.output_heads["forces"].requires_grad_(mode == "direct")

    def predict(self, data, emb) -> dict:
        """Energy and (direct) forces from one backbone embedding."""
        out = dict(self.output_heads["energy"](data, emb))
        if self.regress_forces and self.force_mode == "direct":
            out.update(self.output_heads["forces"](data, emb))
        return out

    @contextlib.contextmanager
    def reusing(self, cache: FixedPointCache | None = None):
        """Inside the context, evaluation forwards warm-start each system from its last fixed
        point in ``cache`` (a new one per ``model.deq.reuse`` if None). Yields the cache, or
        None when ``model.deq.reuse.enabled`` is false."""
        settings = self.backbone.deq_settings.reuse
        previous = self.fixed_point_cache
        self.fixed_point_cache = (cache if cache is not None else FixedPointCache(settings)) if settings.enabled else None
        try:
            yield self.fixed_point_cache
        finally:
            self.fixed_point_cache = previous

    def forward(self, data, z0: torch.Tensor | None = None, solver: SolverSettings | None = None, reuse: bool | None = None):
        """``z0``/``solver``: explicit start and solver; ``reuse=False`` ignores an active cache."""
        cache = self.fixed_point_cache
        if reuse and cache is None:
            raise RuntimeError("reuse=True needs an active fixed-point cache: use `with model.reusing(): ...`")
        if cache is not None and reuse is not False and z0 is None and not self.training:
            return self._forward_reusing(data, cache)
        return self._solve_and_predict(data, z0, solver)

    def _forward_reusing(self, data, cache: FixedPointCache) -> dict:
        settings = self.backbone.deq_settings.reuse
        keys = cache.keys_for(data)
        numbers = torch.split(data.atomic_numbers.long(), data.natoms.tolist())
        starts = [cache.start(key, n) for key, n in zip(keys, numbers)]
        warm = torch.tensor([s is not None for s in starts], device=data.natoms.device)
        if warm.all():
            out = self._solve_and_predict(data, torch.cat(starts), settings.solver)
        elif not warm.any():
            out = self._solve_and_predict(data)
        else:
            warm_z0 = torch.cat([s for s in starts if s is not None])
            out = _merge_graphs(data, [
                (warm.nonzero().flatten(), self._on_graphs(data, warm.nonzero().flatten(), warm_z0, settings.solver)),
                ((~warm).nonzero().flatten(), self._on_graphs(data, (~warm).nonzero().flatten())),
            ])
        retry = (warm & ~out["deq_converged"]).nonzero().flatten()
        if settings.fallback and retry.numel():  # finish what the warm-start solver left
            node_mask = torch.isin(data.batch, retry)
            again = self._on_graphs(data, retry, out["fixed_point"][node_mask])
            again["deq_nstep"] = again["deq_nstep"] + out["deq_nstep"][retry]
            keep = (~torch.isin(torch.arange(len(keys), device=retry.device), retry)).nonzero().flatten()
            out = _merge_graphs(data, [(retry, again), (keep, _select_graphs(data, out, keep))])
        for key, n, z in zip(keys, numbers, torch.split(out["fixed_point"], data.natoms.tolist())):
            cache.store(key, n, z)
        cache.record({
            "keys": keys,
            "warm": warm.cpu(),
            **{name: out[name].detach().cpu() for name in SOLVER_STAT_KEYS},
        })
        return out

    def _on_graphs(self, data, graphs: torch.Tensor, z0=None, solver=None) -> dict:
        """Solve and predict for a subset of the batch's graphs (its own sub-batch)."""
        return self._solve_and_predict(_sub_batch(data, graphs), z0, solver)

    def _solve_and_predict(self, data, z0: torch.Tensor | None = None, solver: SolverSettings | None = None):
        conservative = self.regress_forces and self.force_mode == "conservative"
        with torch.enable_grad() if conservative else contextlib.nullcontext():
            if conservative:
                data.pos.requires_grad_(True)
            emb = self.backbone(data, z0=z0, solver=solver)
            out = self.predict(data, emb)
            if conservative:
                create_graph = self.training
                out["forces"] = -torch.autograd.grad(out["energy"].sum(), data.pos, create_graph=create_graph)[0]
                backward = emb["deq_backward_solver"]
                if backward is not None and backward.last_stat is not None:  # IFT, not BPTT
                    out["deq_backward_converged"] = backward.last_stat["converged"].detach()
                if not create_graph:
                    out = {key: value.detach() for key, value in out.items()}
        out.update({key: emb[key] for key in SOLVER_STAT_KEYS})
        out["fixed_point"] = emb["fixed_point"].detach()
        if self.training:
            out["deq_correction"] = [self.predict(data, {**emb, "node_embedding": e}) for e in emb["correction_embeddings"]]
            if "deq_jac_loss" in emb:
                out["deq_jac_loss"] = emb["deq_jac_loss"]
        return out


_NODE_KEYS = ("forces", "fixed_point")


def _sub_batch(data: Batch, graphs: torch.Tensor) -> Batch:
    """A new batch of some of ``data``'s graphs. fairchem's graph generation reshapes a
    batch's ``pbc`` [3B] to [1, 3B] in place; undo that on a copy so PyG can slice it."""
    source = data.clone()
    if torch.is_tensor(getattr(source, "pbc", None)):
        source.pbc = source.pbc.reshape(-1)
    return Batch.from_data_list(source.index_select(graphs.tolist()))


def _select_graphs(data, out: dict, graphs: torch.Tensor) -> dict:
    """The outputs of ``graphs`` only (per-graph and per-node entries)."""
    node_mask = torch.isin(data.batch, graphs)
    return {key: value[node_mask] if key in _NODE_KEYS else value[graphs] for key, value in out.items()}


def _merge_graphs(data, parts: list) -> dict:
    """Outputs of sub-batches ``(graph indices, outputs)`` put back in the batch's order."""
    merged = {}
    for graphs, out in parts:
        node_mask = torch.isin(data.batch, graphs)
        for key, value in out.items():
            if key in _NODE_KEYS:
                rows, index = data.batch.numel(), node_mask.nonzero().flatten()
            else:
                rows, index = data.natoms.numel(), graphs
            if key not in merged:
                merged[key] = value.new_zeros((rows, *value.shape[1:]))
            merged[key][index] = value
    return merged
