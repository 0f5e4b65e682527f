"""All fixed-point machinery, independent of the network: settings, per-graph active-set
solvers, gradients (phantom / IFT / BPTT), warm starts from a fixed-point cache."""

from ocp_deq.deq.engine import OPTIONAL_STAT_KEYS, SOLVER_STAT_KEYS, Equilibrium, equilibrium
from ocp_deq.deq.problem import FixedPointProblem, Segments
from ocp_deq.deq.settings import DEQSettings, SolverSettings
from ocp_deq.deq.solvers import Solution, solve

__all__ = ["OPTIONAL_STAT_KEYS", "SOLVER_STAT_KEYS", "Equilibrium", "equilibrium", "FixedPointProblem", "Segments",
           "DEQSettings", "SolverSettings", "Solution", "solve"]
