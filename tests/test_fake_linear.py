"""FakeQuantLinear shares the Linear's Parameters and matches nn.Linear exactly when disabled."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatlab.errors import QatlabError
from qatlab.quantizers import QuantConfig, fake_quantize
from qatlab.layers import FakeQuantLinear

W4 = QuantConfig(bits=4, granularity="group", group_size=8)
A8 = QuantConfig(bits=8, granularity="token", name="act")


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(16, 6)


def test_shares_parameters(linear):
    q = FakeQuantLinear.from_linear(linear, W4)
    assert q.weight is linear.weight and q.bias is linear.bias
    assert (q.in_features, q.out_features) == (16, 6)
    assert [n for n, _ in q.named_parameters()] == ["weight", "bias"]  # same state-dict keys


def test_disabled_is_bit_exact_linear(linear):
    q = FakeQuantLinear.from_linear(linear, W4, A8)
    q.enabled = False
    x = torch.randn(2, 3, 16)
    assert torch.equal(q(x), linear(x))


def test_enabled_weight_only(linear):
    q = FakeQuantLinear.from_linear(linear, W4)
    x = torch.randn(2, 3, 16)
    expected = F.linear(x, fake_quantize(linear.weight, W4), linear.bias)
    assert torch.equal(q(x), expected)
    assert not torch.equal(q(x), linear(x))


def test_enabled_weight_and_act(linear):
    q = FakeQuantLinear.from_linear(linear, W4, A8)
    x = torch.randn(2, 3, 16)
    expected = F.linear(fake_quantize(x, A8), fake_quantize(linear.weight, W4), linear.bias)
    assert torch.equal(q(x), expected)


def test_gradients_reach_the_shared_weight(linear):
    q = FakeQuantLinear.from_linear(linear, W4, A8)
    q(torch.randn(4, 16)).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_to_linear_round_trip(linear):
    q = FakeQuantLinear.from_linear(linear, W4)
    back = q.to_linear()
    assert type(back) is nn.Linear
    assert back.weight is linear.weight and back.bias is linear.bias
    x = torch.randn(5, 16)
    assert torch.equal(back(x), linear(x))


def test_to_linear_without_bias():
    linear = nn.Linear(8, 4, bias=False)
    back = FakeQuantLinear.from_linear(linear, None).to_linear()
    assert back.bias is None and back.weight is linear.weight


def test_group_size_checked_with_layer_name():
    with pytest.raises(QatlabError, match=r"does not divide the input width 12 of layer 'blk.q_proj'"):
        FakeQuantLinear.from_linear(nn.Linear(12, 4), W4, name="blk.q_proj")


def test_rejects_non_linear():
    with pytest.raises(QatlabError, match=r"layer 'emb' is Embedding, not nn.Linear"):
        FakeQuantLinear.from_linear(nn.Embedding(4, 4), W4, name="emb")


def test_repr_is_readable(linear):
    text = repr(FakeQuantLinear.from_linear(linear, W4, A8))
    assert "in_features=16, out_features=6" in text
    assert "MinMax(4-bit sym group8, shape=(6, 16))" in text and "DynamicQuantizer(8-bit sym token)" in text
