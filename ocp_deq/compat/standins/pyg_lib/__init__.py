"""Partial stand-in for ``pyg_lib``: only the ``radius`` op, in plain torch.

Why pyg_lib and not torch_cluster: PyG >= 2.7 no longer uses torch_cluster at all (it warns
that it is "being ignored"). ``torch_geometric.nn.radius_graph`` / ``radius`` check
``torch_geometric.typing.WITH_RADIUS`` (set when ``import pyg_lib`` works and
``pyg_lib.ops`` has ``radius``) and then call ``torch.ops.pyg.radius``. fairchem's
``GraphModelMixin.generate_graph`` uses that path for non-periodic graphs
(``use_pbc=False``). Importing this stand-in registers ``pyg::radius`` (see :mod:`.ops`).

Only used when the real pyg-lib is absent (``ocp_deq.compat`` puts its finder last), and
only if ``ocp_deq`` is imported before ``torch_geometric`` (``torch_geometric.typing``
imports pyg_lib once, at its own import).

Side effect: PyG sees ``WITH_PYG_LIB = True`` but every capability flag except
``WITH_RADIUS`` stays False. PyG features gated on the bare ``WITH_PYG_LIB`` flag
(``NeighborLoader`` sampling, ``Node2Vec``, ``dropout_path``) need the real pyg-lib either
way; with this stand-in they fail on a missing ``torch.ops.pyg.*`` operator (or the clear
error in :mod:`.sampler`) instead of PyG's "requires pyg-lib" ImportError. fairchem uses
none of them.
"""

from . import ops, sampler  # noqa: F401  (ops registers torch.ops.pyg.radius)

__version__ = "0.0+ocp_deq.standin"
