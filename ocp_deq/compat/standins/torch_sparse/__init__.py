"""Import-only stand-in for ``torch_sparse``.

fairchem's CLI imports every model module at start-up, and GemNet / DimeNet++ import
``SparseTensor`` from torch_sparse. DEQ / EquiformerV2 never use it, so this stand-in only
lets those imports succeed; using it is a clear error that names the real package.
"""

__version__ = "0.0+ocp_deq.standin"


class SparseTensor:
    def __init__(self, *args, **kwargs):
        raise ImportError(
            "torch_sparse is not installed (ocp_deq provided an import-only stand-in). "
            "Models using SparseTensor (GemNet, DimeNet++) need the real package: "
            "pip install torch-sparse -f https://data.pyg.org/whl/torch-<version>.html"
        )
