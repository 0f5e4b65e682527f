"""Deep-equilibrium EquiformerV2, built from fairchem's own EquiformerV2 parts.

encoder (atom + edge-degree embedding) -> x;  z* = f(z*, x) with
f(z, x) = x + gain * (blocks(u) - u), u = inject(z, x)  (form "update", the default), or
f(z, x) = blocks(inject(z, x))  (form "block"; optional pre/post norms around the blocks);
final norm -> fairchem's EquiformerV2 heads.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from fairchem.core.common import gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HydraModel
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
from fairchem.core.models.equiformer_v2.layer_norm import get_normalization_layer
from fairchem.core.models.equiformer_v2.so3 import SO3_Embedding
from torch_geometric.data import Batch
from torchdeq.norm import apply_norm, reset_norm

from ocp_deq.data.ordering import id_list
from ocp_deq.deq import DEQSettings, OPTIONAL_STAT_KEYS, SOLVER_STAT_KEYS, Segments, equilibrium
from ocp_deq.deq.reuse import FixedPointCache, TrainingFrameMemory
from ocp_deq.deq.settings import DEQConfigError, SolverSettings
from ocp_deq.models.distance_expansion import band_gaussians
from ocp_deq.models.edge_frames import attach_position_gradient

STOCHASTIC_OPTIONS = ("alpha_drop", "drop_path_rate", "proj_drop")
FORCE_MODES = ("direct", "conservative")
FORCE_HEADS = {"attention": "equiformerV2_vector_head", "node": "node_vector_head"}


class InvalidStructureError(ValueError):
    """A structure the model cannot describe (the message names the systems)."""


def _systems(data, node_mask: torch.Tensor) -> str:
    graphs = torch.unique(data.batch[node_mask]).tolist()
    sid = getattr(data, "sid", None)
    if sid is None:
        return f"at batch index {graphs}"
    names = id_list(sid)
    return "sid=" + ", ".join(str(names[g]) for g in graphs)


def _check_graph(data, graph, cutoff: float) -> None:
    """Atoms on top of each other (no edge direction) and systems without any edge (nothing
    for the attention to read) get a clear error instead of NaNs or a reduction failure."""
    with torch.no_grad():  # fairchem's radius graph drops pairs closer than 0.01 A: look at the positions
        overlapping = torch.zeros(data.batch.numel(), dtype=torch.bool, device=data.pos.device)
        for nodes in torch.split(torch.arange(data.batch.numel(), device=data.pos.device), data.natoms.tolist()):
            distance = torch.cdist(data.pos[nodes], data.pos[nodes])
            distance.fill_diagonal_(float("inf"))
            overlapping[nodes] = (distance < 1e-2).any(1)
    if overlapping.any():
        raise InvalidStructureError(f"atoms closer than 0.01 A (overlapping) in system(s) {_systems(data, overlapping)}")
    has_edge = torch.zeros(data.natoms.numel(), dtype=torch.bool, device=data.pos.device)
    has_edge[data.batch[graph.edge_index[1]]] = True
    if not has_edge.all():
        lonely = (~has_edge)[data.batch]
        raise InvalidStructureError(f"no pair of atoms within max_radius={cutoff} A in system(s) {_systems(data, lonely)}")


@contextlib.contextmanager
def _edge_features_given(attention, features: dict):
    """Run fairchem's attention with its graph-only edge features (atom-type edge embeddings
    and radial functions of the SO(2) convolution) taken from ``features``. Only plain
    attributes change (an instance ``forward``, a flag): the modules and their state_dict
    stay as they are, even for a checkpoint written by a signal handler mid-forward."""
    given = [(module, features[key]) for module, key in ((attention.so2_conv_1.rad_func, "conv"),
                                                          (getattr(attention, "rad_func", None), "shared"))
             if features[key] is not None]
    saved = attention.use_atom_edge_embedding
    attention.use_atom_edge_embedding = False
    for module, value in given:
        module.forward = lambda _, value=value: value
    try:
        yield
    finally:
        attention.use_atom_edge_embedding = saved
        for module, _ in given:
            del module.forward


def _edge_features(attention, graph) -> dict:
    """What fairchem's attention computes from the graph alone, once per forward."""
    x_edge = graph.edge_distance
    if attention.use_atom_edge_embedding:
        numbers = graph.atomic_numbers_full
        x_edge = torch.cat((x_edge, attention.source_embedding(numbers[graph.edge_index[0]]),
                            attention.target_embedding(numbers[graph.edge_index[1]])), dim=1)
    conv = attention.so2_conv_1.rad_func
    return {"conv": conv(x_edge) if conv is not None else None,
            "shared": attention.rad_func(x_edge) if attention.use_m_share_rad else None}


def _collated_pbc(data) -> torch.Tensor:
    """``data.pbc`` in the layout PyG collated it in, so that the batch can be sliced again:
    fairchem's radius graph makes it at least 2-D in place ([3B] -> [1, 3B]), on the Batch
    object that its relaxations forward at every step."""
    slices = getattr(data, "_slice_dict", {}).get("pbc")
    if slices is None or data.pbc.shape[0] == int(slices[-1]):
        return data.pbc
    return data.pbc.reshape(int(slices[-1]), *data.pbc.shape[2:])


class EquiformerFixedPoint:
    """f(z) on some graphs of a batch: post_norm(x + gain * (blocks(u) - u)) (form "update")
    or post_norm(blocks(u)) (form "block"), u = pre_norm(inject(z, x)); norms optional.

    Everything that depends only on the graph is computed once per forward and sliced, not
    recomputed, when graphs leave the solve: edges, Wigner matrices, the atom-type edge
    embeddings and radial functions of every block, each graph's |x|, the dropout mask.
    """

    def __init__(self, backbone, x, segments: Segments, edge_index, wigners, features, x_norm, dropout_mask):
        self.backbone, self.x, self.segments = backbone, x, segments
        self.edge_index, self.wigners, self.features = edge_index, wigners, features
        self.x_norm, self.dropout_mask = x_norm, dropout_mask
        self.no_edges = x.new_empty((edge_index.shape[1], 0))

    @classmethod
    def build(cls, backbone, x, graph, data) -> "EquiformerFixedPoint":
        segments = Segments(data.batch, data.natoms.numel())
        wigners = [(rotation.wigner, rotation.wigner_inv) for rotation in backbone.SO3_rotation]
        features = [_edge_features(block.ga, graph) for block in backbone.blocks]
        p = backbone.deq_settings.variational_dropout
        mask = None
        if p and backbone.training:
            mask = torch.bernoulli(torch.full_like(x, 1 - p)) / (1 - p)
        x_norm = segments.norm(x) if backbone.deq_settings.injection == "add_rescale" else None
        return cls(backbone, x, segments, graph.edge_index, wigners, features, x_norm, mask)

    def bind(self) -> None:
        """Point fairchem's shared rotation modules at this problem's Wigner matrices."""
        for rotation, (wigner, wigner_inv) in zip(self.backbone.SO3_rotation, self.wigners):
            rotation.wigner, rotation.wigner_inv = wigner, wigner_inv

    def inject(self, z: torch.Tensor) -> torch.Tensor:
        """z + x, rescaled per graph to the norm of that graph's x (never across graphs)."""
        u = z + self.x
        if self.x_norm is None:
            return u
        scale = self.x_norm / (self.segments.norm(u) + 1e-8)
        return u * self.segments.expand(scale, u)

    def f(self, z: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        self.bind()
        h = SO3_Embedding(0, bb.lmax_list, bb.sphere_channels, bb.device, bb.dtype)
        u = self.inject(z)
        u = bb.deq_pre_norm(u) if bb.deq_pre_norm is not None else u
        h.set_embedding(u)
        for block, features in zip(bb.blocks, self.features):
            with _edge_features_given(block.ga, features):
                h = block(h, None, self.no_edges, self.edge_index, batch=self.segments.batch)
        out = h.embedding
        if bb.deq_update_gain is not None:  # form "update": x + what the blocks add, z's own path removed
            out = self.x + bb.deq_update_gain * (out - u)
        if self.dropout_mask is not None:
            out = out * self.dropout_mask
        return bb.deq_post_norm(out) if bb.deq_post_norm is not None else out

    def restrict(self, graphs: torch.Tensor) -> "EquiformerFixedPoint":
        segments, nodes = self.segments.restrict(graphs)
        renumber = torch.full((self.segments.num_nodes,), -1, dtype=torch.long, device=nodes.device)
        renumber[nodes] = torch.arange(nodes.numel(), device=nodes.device)
        edges = (renumber[self.edge_index[1]] >= 0).nonzero().flatten()
        return EquiformerFixedPoint(
            self.backbone, self.x[nodes], segments, renumber[self.edge_index[:, edges]],
            [(w[edges], w_inv[edges]) for w, w_inv in self.wigners],
            [{k: (v[edges] if v is not None else None) for k, v in feats.items()} for feats in self.features],
            None if self.x_norm is None else self.x_norm[graphs],
            None if self.dropout_mask is None else self.dropout_mask[nodes],
        )


@registry.register_model("deq_equiformer_v2_backbone")
class DEQEquiformerV2Backbone(EquiformerV2Backbone):
    """EquiformerV2 backbone whose ``num_layers`` blocks are iterated to a fixed point.

    Accepts every ``equiformer_v2_backbone`` argument plus ``deq`` (see
    :class:`ocp_deq.deq.DEQSettings`). Dropout inside f would change f at every solver
    iteration, so the EquiformerV2 dropout options must be 0.
    """

    def __init__(self, deq: dict | None = None, num_layers: int = 1, **kwargs):
        for key in STOCHASTIC_OPTIONS:
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
        # form "update": a learnable per-channel gain on the blocks' update (scalar per
        # channel, so equivariant); the residual paths of the blocks no longer carry z
        # into f(z) with gain ~1, which is what makes form "block" contract slowly
        self.deq_update_gain = (torch.nn.Parameter(torch.full((self.sphere_channels,), float(settings.update_gain)))
                                if settings.form == "update" else None)
        if settings.weight_norm or settings.spectral_norm:
            apply_norm(self.blocks, norm_type="weight_norm" if settings.weight_norm else "spectral_norm")
        self.estimate_contraction = False  # set by the trainer around validation
        band_gaussians(self)  # same expansion to 1e-9, ~20x fewer exp (ocp_deq.models.distance_expansion)

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
        if not torch.isfinite(data.pos).all():
            raise InvalidStructureError(f"non-finite atom positions in system(s) {_systems(data, ~torch.isfinite(data.pos).all(1))}")
        graph = self.generate_graph(data, enforce_max_neighbors_strictly=self.enforce_max_neighbors_strictly)
        _check_graph(data, graph, self.cutoff)
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

    def read_out(self, z: torch.Tensor) -> SO3_Embedding:
        node = SO3_Embedding(0, self.lmax_list, self.sphere_channels, self.device, self.dtype)
        node.set_embedding(self.norm(z))
        return node

    def forward(self, data, z0: torch.Tensor | None = None, solver: SolverSettings | None = None,
                cache: FixedPointCache | None = None):
        """z* per graph with the configured gradient (``ocp_deq.deq.engine``).

        Gradients flow when autograd is on and either training or positions require grad
        (conservative forces); derivatives w.r.t. positions always use an exact path (IFT,
        or BPTT when chosen), phantom gradients only serve parameters. ``cache``: warm
        starts per system (evaluation) or per training frame. With ``estimate_contraction``
        on (the trainer's validation), evaluation forwards also estimate the contraction of
        f at z* (``deq_contraction``, ``model.deq.contraction_iters`` power iterations).
        """
        reset_norm(self.blocks)
        x, graph = self.encode(data)
        problem = EquiformerFixedPoint.build(self, x, graph, data)
        exact = data.pos.requires_grad
        keys = numbers = None
        if cache is not None:
            keys = cache.keys_for(data)
            numbers = list(torch.split(data.atomic_numbers.long(), data.natoms.tolist()))
        estimate = self.estimate_contraction and not self.training
        eq = equilibrium(problem, self.deq_settings, x, training=self.training,
                         needs_grad=torch.is_grad_enabled() and (self.training or exact), exact_grad=exact,
                         z0=z0, solver=solver, cache=cache, keys=keys, numbers=numbers,
                         contraction_iters=int(self.deq_settings.contraction_iters) if estimate else 0)
        problem.bind()  # the heads rotate edges with the whole batch's Wigner matrices
        return {
            "node_embedding": self.read_out(eq.z),
            "graph": graph,
            "fixed_point": eq.z,
            "correction_embeddings": [self.read_out(s) for s in eq.states],
            "equilibrium": eq,
            **eq.stats(),
        }


@registry.register_model("deq_equiformer_v2")
class DEQEquiformerV2(HydraModel):
    """Complete DEQ model (energy + forces), configured like ``equiformer_v2``.

    A :class:`HydraModel` with our backbone and fairchem's EquiformerV2 scalar / vector
    heads, so checkpoints work with fairchem's hydra fine-tuning. ``force_mode``:
    ``direct`` (the l=1 head) or ``conservative`` (-dE/dpos through the fixed point by
    implicit differentiation). The force head exists in both modes, so a direct-force
    checkpoint fine-tunes with ``model.force_mode=conservative`` and back. ``force_head``:
    ``attention`` (fairchem's edge-attention head, about one block evaluation per forward)
    or ``node`` (:mod:`ocp_deq.models.node_force_head`, per atom, no edges).

    Outputs ``energy`` [B], ``forces`` [N, 3], the per-graph solver statistics
    ``deq_nstep``, ``deq_residual``, ``deq_converged`` [B] and, in training, the DEQ loss
    terms ``deq_correction`` (predictions on earlier solver states) and ``deq_jac_loss``.
    """

    def __init__(self, energy_reduce: str = "sum", force_mode: str = "direct", force_head: str = "attention",
                 **backbone_kwargs):
        if force_mode not in FORCE_MODES:
            raise DEQConfigError(f"model.force_mode='{force_mode}' must be one of {FORCE_MODES}")
        if force_head not in FORCE_HEADS:
            raise DEQConfigError(f"model.force_head='{force_head}' must be one of {tuple(FORCE_HEADS)}")
        heads = {"energy": {"module": "equiformerV2_scalar_head", "reduce": energy_reduce}}
        self.regress_forces = backbone_kwargs.get("regress_forces", True)
        if self.regress_forces:
            heads["forces"] = {"module": FORCE_HEADS[force_head]}
        super().__init__(
            backbone={"model": "deq_equiformer_v2_backbone", **backbone_kwargs},
            heads=heads,
            otf_graph=backbone_kwargs.get("otf_graph", True),
            pass_through_head_outputs=True,
        )
        self.force_mode = force_mode
        self.fixed_point_cache: FixedPointCache | None = None
        self.force_denorm = None  # the trainer's map from force outputs to eV/A, set around its forwards
        start = self.backbone.deq_settings.train_start
        self.training_memory = TrainingFrameMemory(start) if start.enabled else None

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
        if reuse is False or z0 is not None or self.training:
            cache = self.training_memory if self.training and z0 is None else None
        refining = cache is not None and not self.training and self._refining()
        out = self._solve_and_predict(data, z0, solver, cache)
        if refining:
            refine = self._to_refine(data, out)
            if refine is not None:
                out = self._refined(data, out, refine, cache) if refine.any() else {**out, "deq_refined": refine}
                cache.last["deq_refined"] = refine.cpu()
        return out

    def _refining(self) -> bool:
        """Refinement is on: a looser ``reuse.solver`` and ``reuse.refine_fmax`` > 0, forces predicted."""
        settings = self.backbone.deq_settings
        reuse = settings.reuse
        return bool(reuse.refine_fmax) and reuse.solver is not None and reuse.solver != settings.eval_solver \
            and self.regress_forces

    def _to_refine(self, data, out) -> torch.Tensor | None:
        """Warm graphs solved by a looser ``reuse.solver`` whose forces on free atoms are all
        below ``reuse.refine_fmax`` [B], or None when refining is off (see ``ReuseSettings``)."""
        if not self._refining() or "forces" not in out:
            return None
        reuse = self.backbone.deq_settings.reuse
        forces = out["forces"].detach()
        norm = (self.force_denorm(forces) if self.force_denorm is not None else forces).norm(dim=1)
        fixed = getattr(data, "fixed", None)
        if fixed is not None:
            norm = norm.masked_fill(fixed.bool(), 0.0)
        fmax = norm.new_zeros(data.natoms.numel()).scatter_reduce(0, data.batch, norm, "amax")
        return out["deq_warm"].to(fmax.device) & (fmax < float(reuse.refine_fmax))

    def _refined(self, data, out: dict, refine: torch.Tensor, cache: FixedPointCache) -> dict:
        """``out`` with the ``refine`` graphs solved again from their fixed points by
        ``eval_solver`` (their evaluations add up); the cache keeps the refined fixed points."""
        graphs = refine.nonzero().flatten()
        nodes = refine[data.batch]
        part = copy.copy(data)
        if not refine.all():
            part.pbc = _collated_pbc(data)
            part = Batch.from_data_list(part.index_select(graphs.tolist()))
            part.pos = part.pos.detach()
        again = self._solve_and_predict(part, out["fixed_point"][nodes], self.backbone.deq_settings.eval_solver, None)
        merged = {key: value.clone() if torch.is_tensor(value) else value for key, value in out.items()}
        merged["energy"][graphs] = again["energy"]
        merged["forces"][nodes] = again["forces"]
        merged["fixed_point"][nodes] = again["fixed_point"]
        merged["deq_nstep"][graphs] += again["deq_nstep"]
        for key in ("deq_residual", "deq_converged", "deq_backward_converged"):
            if key in again:
                merged[key][graphs] = again[key]
        merged["deq_work"] = copy.deepcopy(out["deq_work"])
        merged["deq_work"].add(again["deq_work"])
        merged["deq_refined"] = refine
        keys = cache.keys_for(data)
        numbers = torch.split(part.atomic_numbers.long(), part.natoms.tolist())
        cache.store_all([keys[g] for g in graphs.tolist()], list(numbers), again["fixed_point"])
        cache.last.update({key: merged[key].cpu() for key in SOLVER_STAT_KEYS})
        return merged

    def _solve_and_predict(self, data, z0, solver, cache) -> dict:
        conservative = self.regress_forces and self.force_mode == "conservative"
        with torch.enable_grad() if conservative else contextlib.nullcontext():
            if conservative:
                data.pos.requires_grad_(True)
            emb = self.backbone(data, z0=z0, solver=solver, cache=cache)
            out = self.predict(data, emb)
            if conservative:
                create_graph = self.training
                out["forces"] = -torch.autograd.grad(out["energy"].sum(), data.pos, create_graph=create_graph)[0]
                backward = emb["equilibrium"].backward
                if backward is not None and backward.converged is not None:  # IFT, not BPTT
                    out["deq_backward_converged"] = backward.converged.detach()
                if not create_graph:
                    out = {key: value.detach() for key, value in out.items()}
        out.update({key: emb[key] for key in (*SOLVER_STAT_KEYS, *OPTIONAL_STAT_KEYS, "deq_work") if key in emb})
        out["fixed_point"] = emb["fixed_point"].detach()
        if self.training:
            out["deq_correction"] = [self.predict(data, {**emb, "node_embedding": e}) for e in emb["correction_embeddings"]]
            if emb["equilibrium"].jacobian_loss is not None:
                out["deq_jac_loss"] = emb["equilibrium"].jacobian_loss
        return out
