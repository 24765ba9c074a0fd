"""kiln.nn.fuse rewrites compute the same function with the same parameters and state-dict keys."""

import copy

import pytest
import torch

from kiln.nn import build_model
from kiln.nn.blocks.adapters import RowsToSequence
from kiln.nn.blocks.conv import Conv2d, MaxPool2d
from kiln.nn.fuse import ConvPool, fuse


def _pair(conv_fields, pool_fields=None, in_shape=(1, 28, 28)):
    torch.manual_seed(0)
    specs = [Conv2d(**{"filters": 8, **conv_fields}), MaxPool2d(**(pool_fields or {})), RowsToSequence()]
    plain = build_model(specs, in_shape)
    return plain, copy.deepcopy(plain)


@pytest.mark.parametrize(("conv_fields", "pool_fields", "in_shape"), [
    ({"activation": "relu"}, {}, (1, 28, 28)),
    ({"activation": "none", "kernel": [3, 2]}, {"size": 3, "stride": 2}, (2, 15, 12)),
    ({"activation": "relu", "kernel": 5}, {}, (1, 17, 17)),  # odd conv output: the pool drops the edge
])
def test_fused_conv_pool_matches_plain(conv_fields, pool_fields, in_shape):
    plain, fused = _pair(conv_fields, pool_fields, in_shape)
    assert fuse(fused) and isinstance(fused.blocks[0], ConvPool)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    x = torch.rand(5, *in_shape)
    g = torch.randn(5, *plain.output_shape)
    (plain(x) * g).sum().backward()
    (fused(x) * g).sum().backward()
    assert torch.allclose(plain(x), fused(x), atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("conv_fields", [
    {"activation": "gelu"},
    {"stride": 2},
    {"padding": "same"},
    {"kernel": 7},  # 1 x 7 x 7 = 49 values per output: above MAX_PATCH, where the plain conv wins
])
def test_fuse_leaves_other_patterns_alone(conv_fields):
    _, fused = _pair(conv_fields)
    assert fuse(fused) == []
    assert not any(isinstance(b, ConvPool) for b in fused.blocks)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A process-fresh native loader that builds into an empty cache."""
    from kiln.nn import native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    return native


@pytest.mark.parametrize(("conv_fields", "in_shape"), [
    ({"activation": "relu"}, (1, 28, 28)),
    ({"activation": "none", "kernel": [3, 2]}, (2, 11, 14)),
])
def test_native_kernel_matches_plain_blocks_with_ties(fresh_native, conv_fields, in_shape):
    plain, fused = _pair(conv_fields, {}, in_shape)
    fuse(fused)
    conv = fused.blocks[0].conv
    assert fresh_native.load(conv.in_channels, *conv.kernel_size, conv.out_channels, 2)[0] is not None
    x = (torch.rand(6, *in_shape) > 0.5).float()  # saturated 0/1 pixels: many equal window values (ties)
    g = torch.randn(6, *plain.output_shape)
    (plain(x) * g).sum().backward()
    out = fused(x)
    (out * g).sum().backward()
    assert torch.allclose(plain(x), out, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-4), name


def test_without_a_compiler_the_pytorch_path_runs(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    lib, how = fresh_native.load(1, 3, 3, 8, 2)
    assert lib is None and "native kernel unavailable" in how
    plain, fused = _pair({"activation": "relu"})
    fuse(fused)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(plain(x), fused(x), atol=1e-5)


def test_tracing_takes_the_pytorch_operators(fresh_native):
    _, fused = _pair({"activation": "relu"})
    fuse(fused)
    fused.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)  # would record nothing of a C call
        other = torch.rand(7, 1, 28, 28)
        assert torch.allclose(traced(other), fused(other), atol=1e-5)
