"""Wigner matrices of fairchem's edge frames that carry the derivative w.r.t. positions.

fairchem's EquiformerV2 builds each edge's rotation matrix R0 and its Wigner matrices D(R0)
*detached* from the positions, so -dE/dpos misses how the edge frames turn when atoms move.
For conservative forces we keep fairchem's values and add the first-order turn of each frame:
when the edge direction moves from u0 to u, the frame becomes R0 Q^T with Q the smallest
rotation taking u0 to u, Q ~ I + [u0 x u]_x, and (D is a homomorphism)

    D(R0 Q^T) ~ D(R0) (I - sum_k v_k G_k),   v = u0 x u,

with G_k the Wigner generators. Exact in value (v = 0) and in first derivative, which is
all forces and their parameter gradients need (not Hessians).
"""

from __future__ import annotations

import torch

_GENERATOR_CACHE: dict[int, torch.Tensor] = {}


def _axis_generator(k: int) -> torch.Tensor:
    """Skew matrix of a rotation about axis k (x, y, z)."""
    K = torch.zeros(3, 3, dtype=torch.float64)
    a, b = [(1, 2), (2, 0), (0, 1)][k]
    K[a, b], K[b, a] = -1.0, 1.0
    return K


def wigner_generators(rotation) -> torch.Tensor:
    """G_k [3, K, K] of fairchem's Wigner convention, by central differences in float64."""
    lmax = rotation.lmax
    if lmax not in _GENERATOR_CACHE:
        device, dtype = getattr(rotation, "device", None), getattr(rotation, "dtype", None)
        rotation.device, rotation.dtype = "cpu", torch.float64
        base = torch.linalg.matrix_exp(_axis_generator(0) * 0.3 + _axis_generator(1) * 1.1 + _axis_generator(2) * -0.7)

        def wigner(R):
            return rotation.RotationToWignerDMatrix(R[None], 0, lmax)[0].to(torch.float64)

        eps = 1e-5
        d_base = wigner(base)
        generators = []
        for k in range(3):
            step = torch.linalg.matrix_exp(eps * _axis_generator(k))
            derivative = (wigner(base @ step) - wigner(base @ step.T)) / (2 * eps)
            generators.append(torch.linalg.solve(d_base, derivative))
        _GENERATOR_CACHE[lmax] = torch.stack(generators)
        rotation.device, rotation.dtype = device, dtype
    return _GENERATOR_CACHE[lmax]


def attach_position_gradient(rotation, edge_distance_vec: torch.Tensor) -> None:
    """Give ``rotation.wigner`` / ``wigner_inv`` (set by fairchem) the edge-direction derivative."""
    u = torch.nn.functional.normalize(edge_distance_vec, dim=-1)
    v = torch.cross(u.detach(), u, dim=-1)
    G = wigner_generators(rotation).to(device=u.device, dtype=u.dtype)
    turn = torch.eye(G.shape[-1], device=u.device, dtype=u.dtype) - torch.einsum("ek,kab->eab", v, G)
    rotation.wigner = torch.bmm(rotation.wigner, turn)
    rotation.wigner_inv = rotation.wigner.transpose(1, 2)
