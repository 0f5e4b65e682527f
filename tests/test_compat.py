"""The pure-torch torch_scatter stand-in against loop references, and its fallback rule."""

import subprocess
import sys
import textwrap

import pytest
import torch

from ocp_deq import compat

import torch_scatter  # noqa: E402  (resolves to the real package or our stand-in)


def loop_scatter(src, index, dim_size, reduce):
    """Reference: reduce rows of ``src`` [E, F] into ``dim_size`` rows, one at a time."""
    out = torch.zeros(dim_size, *src.shape[1:], dtype=src.dtype)
    for slot in range(dim_size):
        rows = src[index == slot]
        if len(rows) == 0:
            continue
        out[slot] = {
            "sum": rows.sum(0), "add": rows.sum(0), "mean": rows.mean(0),
            "max": rows.max(0).values, "min": rows.min(0).values, "mul": rows.prod(0),
        }[reduce]
    return out


@pytest.mark.parametrize("reduce", ["sum", "add", "mean", "max", "min", "mul"])
def test_scatter_matches_loop_reference(reduce):
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(50, 3, 4, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 9, (50,), generator=gen)
    expected = loop_scatter(src, index, 11, reduce)  # slots 9, 10 stay empty -> 0
    got = torch_scatter.scatter(src, index, dim=0, dim_size=11, reduce=reduce)
    torch.testing.assert_close(got, expected)


def test_scatter_along_last_dim_and_default_size():
    src = torch.arange(12.0).view(2, 6)
    index = torch.tensor([0, 1, 0, 2, 2, 1])
    got = torch_scatter.scatter(src, index, dim=-1)
    assert torch.equal(got, torch.tensor([[2.0, 6.0, 7.0], [14.0, 18.0, 19.0]]))


def test_scatter_gradient_matches_index_add():
    src = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 4, (20,))
    weights = torch.randn(4, 5, dtype=torch.float64)
    (torch_scatter.scatter(src, index, 0, dim_size=4) * weights).sum().backward()
    torch.testing.assert_close(src.grad, weights[index])


def test_segment_csr_and_coo_match_scatter():
    src = torch.randn(10, 3)
    counts = torch.tensor([3, 0, 5, 2])
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    index = torch.repeat_interleave(torch.arange(4), counts)
    expected = loop_scatter(src, index, 4, "sum")
    torch.testing.assert_close(torch_scatter.segment_csr(src, indptr), expected)
    torch.testing.assert_close(torch_scatter.segment_coo(src, index, dim_size=4), expected)


def test_standin_is_only_a_fallback(tmp_path):
    """A real torch_scatter on the path wins over the stand-in."""
    fake = tmp_path / "torch_scatter"
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\nscatter = segment_coo = segment_csr = None\n")
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        import ocp_deq, torch_scatter
        assert getattr(torch_scatter, "REAL", False), torch_scatter.__file__
        assert not ocp_deq.compat.using_standin("torch_scatter")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_sparse_standin_fails_clearly_on_use():
    import torch_sparse

    if not compat.using_standin("torch_sparse"):
        pytest.skip("the real torch_sparse is installed")
    with pytest.raises(ImportError, match="torch_sparse is not installed"):
        torch_sparse.SparseTensor(row=torch.tensor([0]), col=torch.tensor([0]))
