"""Pure-torch stand-ins for compiled packages fairchem 1.x imports at start-up.

fairchem-core 1.10 imports ``torch_scatter`` (and, through its CLI's model discovery,
``torch_sparse``) at import time; both ship only as sources on PyPI (a ~10 min compile).
PyG 2.8's ``radius_graph`` (non-periodic graphs) needs ``pyg_lib``, not on PyPI. :func:`install` appends an import finder to the *end*
of ``sys.meta_path``: a real installed package is always found first; the stand-ins in
``standins/`` are used only when it is missing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

STANDIN_DIR = Path(__file__).with_name("standins")
STANDIN_PACKAGES = ("torch_scatter", "torch_sparse", "pyg_lib")


class _StandinFinder(importlib.abc.MetaPathFinder):
    """Finds our stand-in only after every regular finder has failed."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top not in STANDIN_PACKAGES:
            return None
        search = [str(STANDIN_DIR)] if "." not in fullname else path
        return importlib.machinery.PathFinder.find_spec(fullname, search)


def install() -> None:
    if not any(isinstance(f, _StandinFinder) for f in sys.meta_path):
        sys.meta_path.append(_StandinFinder())


def using_standin(package: str) -> bool:
    """True when ``package`` resolves to our stand-in rather than a real install."""
    module = sys.modules.get(package) or __import__(package)
    return Path(module.__file__).resolve().is_relative_to(STANDIN_DIR.resolve())
