"""ocp_deq: deep-equilibrium EquiformerV2 for fairchem-core v1 (the OCP line).

Importing this package makes fairchem importable on CPU-only machines (pure-torch
stand-ins for missing compiled packages, see :mod:`ocp_deq.compat`) and registers our
models and trainer in fairchem's registry.
"""

from ocp_deq import compat

compat.install()

from ocp_deq.models import DEQEquiformerV2, DEQEquiformerV2Backbone  # noqa: E402
from ocp_deq.trainers import DEQTrainer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DEQEquiformerV2", "DEQEquiformerV2Backbone", "DEQTrainer"]
