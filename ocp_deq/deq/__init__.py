"""DEQ machinery independent of the network: settings and the per-graph solver."""

from ocp_deq.deq.settings import DEQSettings, SolverSettings
from ocp_deq.deq.solver import PerGraphSolver, pack_graphs, unpack_graphs

__all__ = ["DEQSettings", "SolverSettings", "PerGraphSolver", "pack_graphs", "unpack_graphs"]
