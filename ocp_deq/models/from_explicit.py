"""Start a DEQ EquiformerV2 from a trained explicit EquiformerV2 of the same width and lmax/mmax.

Both models are built from fairchem's parts, so the encoder (atom and edge-degree
embeddings), the final norm and the heads map one to one, and each block of f is a copy of
a chosen explicit block. What the explicit model has no counterpart for (the update gain,
extra norms: ``backbone.deq_*``) keeps its initialisation; spectral-normed layers of f
(``model.deq.spectral_norm``) are set up to give back the explicit weights exactly; any other tensor without a
counterpart is an error, not a silent random start. Old-style ``equiformer_v2`` checkpoints
(also fairchem's published ones: ``model`` + ``model_attributes``) and hydra ones (``hydra``
with ``equiformer_v2_backbone`` and the ``equiformer_v2_energy_head`` / ``_force_head``
heads, as fairchem's ``eqv2_to_hydra_eqv2.py`` writes them) are both read; the EMA weights
(what fairchem validates) are used when the checkpoint has them.
"""

from __future__ import annotations

import re

import torch
from fairchem.core.common.registry import registry

BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.(.+)$")


class MappingError(ValueError):
    """Explicit and DEQ weights that do not fit together (the message names the key)."""


def hydra_name(key: str) -> str:
    """An explicit model's parameter name in the hydra layout our DEQ uses."""
    key = key.removeprefix("module.")
    for block, head in (("energy_block.", "energy"), ("force_block.", "forces"), ("node_force_block.", "forces")):
        if key.startswith(block):  # old-style: heads at the top level
            return f"output_heads.{head}.{key}"
        match = re.match(rf"^output_heads\.[^.]+\.({re.escape(block)}.*)$", key)
        if match:  # hydra: heads under any name
            return f"output_heads.{head}.{match.group(1)}"
    return key if key.startswith("backbone.") else f"backbone.{key}"


def model_of(config: dict) -> tuple[str | None, dict]:
    """(model name, constructor arguments) of a checkpoint's config, in either of fairchem's
    layouts: ``model: {name: ..., **arguments}`` or ``model: name`` + ``model_attributes``."""
    model = config.get("model")
    if isinstance(model, str):
        return model, dict(config.get("model_attributes") or {})
    model = dict(model or {})
    return model.pop("name", None), model


def explicit_weights(checkpoint: dict, use_ema: bool = True) -> tuple[dict, str]:
    """The explicit model's tensors by hydra name, the EMA shadows in place of the trained
    parameters when present and asked for; and which weights were taken."""
    state = {hydra_name(k): v for k, v in checkpoint["state_dict"].items()}
    ema = checkpoint.get("ema")
    if not use_ema or not ema or not ema.get("shadow_params"):
        return state, "trained weights"
    name, model_config = model_of(checkpoint.get("config") or {})
    if name is None:
        raise MappingError("the explicit checkpoint's config names no model: cannot place its EMA weights "
                           "(pass use_ema=False / --no-ema to use the trained weights)")
    model = registry.get_model_class(name)(**model_config)
    names = [hydra_name(n) for n, p in model.named_parameters() if p.requires_grad]
    if len(names) != len(ema["shadow_params"]):
        raise MappingError(f"the explicit checkpoint's EMA holds {len(ema['shadow_params'])} tensors, its model "
                           f"{name} trains {len(names)}")
    state.update(zip(names, ema["shadow_params"]))
    return state, "EMA weights"


SPECTRAL_PART = re.compile(r"^(.+)_(orig|g|u|v)$")  # torchdeq's spectral norm: weight -> weight_orig, _g, _u, _v


def _spectral_normed(deq_state: dict, key: str) -> bool:
    base = key.rsplit("_", 1)[0]
    return f"{base}_orig" in deq_state and f"{base}_u" in deq_state


def spectral_norm_parts(weight: torch.Tensor) -> dict:
    """torchdeq's spectral norm (weight = orig * g / sigma, sigma = u^T orig v) set up to give
    back the explicit ``weight`` exactly: orig = W, u and v its top singular vectors (so
    sigma is exact), g = sigma for every row (a scalar: broadcast to g's shape; float64)."""
    matrix = weight.detach().reshape(weight.shape[0], -1).double()
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    return {"orig": weight.detach().double(), "g": values[0], "u": left[:, 0], "v": right[0]}


def deq_state_from_explicit(deq_state: dict, explicit: dict, blocks: list[int]) -> tuple[dict, list[tuple]]:
    """``deq_state`` (a freshly built DEQ's state dict) with every tensor that has an explicit
    counterpart replaced: DEQ block j <- explicit block ``blocks[j]``. Returns the new state
    and the mapping rows (deq key, explicit key or None when kept from initialisation)."""
    explicit_blocks = sorted({int(m.group(1)) for k in explicit if (m := BLOCK.match(k))})
    deq_blocks = sorted({int(m.group(1)) for k in deq_state if (m := BLOCK.match(k))})
    if len(blocks) != len(deq_blocks):
        raise MappingError(f"the DEQ's f has {len(deq_blocks)} block(s) (model.num_layers): give that many explicit "
                           f"block indices, got {blocks}")
    for index in blocks:
        if index not in explicit_blocks:
            raise MappingError(f"explicit block {index} does not exist: the explicit model has blocks {explicit_blocks}")
    state, rows, spectral_parts = {}, [], {}
    for key, value in deq_state.items():
        match = BLOCK.match(key)
        source = f"backbone.blocks.{blocks[int(match.group(1))]}.{match.group(2)}" if match else key
        spectral = SPECTRAL_PART.match(source)
        if spectral and spectral.group(1) in explicit and _spectral_normed(deq_state, key):
            base = spectral.group(1)
            if base not in spectral_parts:  # one SVD per layer, for its four tensors
                spectral_parts[base] = spectral_norm_parts(explicit[base])
            part = spectral_parts[base][spectral.group(2)]
            state[key] = torch.broadcast_to(part, value.shape).to(value.dtype).clone()
            rows.append((key, base))
            continue
        if source not in explicit:
            if not key.startswith("backbone.deq_"):
                raise MappingError(f"{key}: the explicit checkpoint has no {source} (its heads must be EquiformerV2's "
                                   "energy and force heads: energy_block / force_block, or node_force_block "
                                   "for both models with model.force_head=node)")
            state[key] = value
            rows.append((key, None))
            continue
        weight = explicit[source]
        if weight.shape != value.shape:
            raise MappingError(f"{key}: the DEQ's shape {tuple(value.shape)} differs from the explicit {source} "
                               f"{tuple(weight.shape)}; build the DEQ with the explicit model's channels and lmax/mmax")
        state[key] = weight.to(value.dtype).clone()
        rows.append((key, source))
    return state, rows


def summarise_mapping(rows: list[tuple]) -> list[str]:
    """One line per module (first three name parts): where its tensors came from."""
    groups: dict = {}
    for key, source in rows:
        module = ".".join(key.split(".")[:3])
        origin = "kept from initialisation" if source is None else ".".join(source.split(".")[:3])
        groups.setdefault((module, origin), 0)
        groups[(module, origin)] += 1
    return [f"{module:45s} <- {origin} ({n} tensors)" for (module, origin), n in groups.items()]

