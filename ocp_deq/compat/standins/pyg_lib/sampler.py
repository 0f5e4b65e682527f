"""``torch_geometric.typing`` inspects ``pyg_lib.sampler.neighbor_sample``'s signature at
import; without it PyG would warn and disable the stand-in. It is not implemented."""


def neighbor_sample(*args, **kwargs):
    raise ImportError(
        "pyg_lib is not installed (ocp_deq provides a stand-in with the radius op only); "
        "neighbor sampling needs the real package: pip install pyg-lib -f "
        "https://data.pyg.org/whl/torch-<version>+<cpu|cuXXX>.html"
    )
