"""Fake-quant math against hand-computed numbers (powers of two keep the float math exact)."""

import pytest
import torch

from qatlab.quantizers import QuantConfig, dequantize, fake_quantize, quantize, round_ste
from qatlab.quantizers.primitives import compute_qparams, group_view


def cfg(bits, symmetric=True, granularity="tensor", group_size=None):
    return QuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- symmetric -------------------------------------------------------------------------------


def test_sym_2bit_tensor():
    # qmax = 1, scale = max|x| / 1 = 1; x/s = [-1, .2, .5, 1] -> round (half to even) [-1, 0, 0, 1]
    x = t(-1.0, 0.2, 0.5, 1.0)
    codes, scale, zero = quantize(x, cfg(2))
    assert torch.equal(scale, t([1.0]))
    assert zero is None
    assert torch.equal(codes, torch.tensor([[-1, 0, 0, 1]], dtype=torch.int8))
    assert torch.equal(fake_quantize(x, cfg(2)), t(-1.0, 0.0, 0.0, 1.0))


def test_round_half_to_even():
    # qmax = 7, scale = 3.5 / 7 = 0.5; x/s = [0.5, 1.5, 2.5, 7] -> [0, 2, 2, 7]
    x = t(0.25, 0.75, 1.25, 3.5)
    assert torch.equal(fake_quantize(x, cfg(4)), t(0.0, 1.0, 1.0, 3.5))


def test_sym_4bit_tensor():
    # qmax = 7, scale = 0.5; x/s = [-7, -2, 0, 0.6, 1.6, 7] -> [-7, -2, 0, 1, 2, 7]
    x = t(-3.5, -1.0, 0.0, 0.3, 0.8, 3.5)
    codes, scale, _ = quantize(x, cfg(4))
    assert torch.equal(scale, t([0.5]))
    assert codes.tolist() == [[-7, -2, 0, 1, 2, 7]]
    assert torch.equal(fake_quantize(x, cfg(4)), t(-3.5, -1.0, 0.0, 0.5, 1.0, 3.5))


def test_sym_3bit_channel():
    # qmax = 3. row 0: scale 3/3 = 1, [3, -1, .4, 1.6] -> [3, -1, 0, 2]
    #           row 1: scale .75/3 = .25, x/s = [-3, 1.2, .4, 0] -> [-3, 1, 0, 0]
    w = t([3.0, -1.0, 0.4, 1.6], [-0.75, 0.3, 0.1, 0.0])
    c = cfg(3, granularity="channel")
    codes, scale, _ = quantize(w, c)
    assert torch.equal(scale, t([1.0], [0.25]))
    assert codes.tolist() == [[3, -1, 0, 2], [-3, 1, 0, 0]]
    assert torch.equal(fake_quantize(w, c), t([3.0, -1.0, 0.0, 2.0], [-0.75, 0.25, 0.0, 0.0]))


def test_sym_4bit_group():
    # qmax = 7, group_size 2 -> 4 groups, scales [7/7, .875/7, 14/7, ~0]
    # [7, -3.2] -> [7, -3];  [.875, .3]/.125 = [7, 2.4] -> [7, 2];  [-14, 5.2]/2 = [-7, 2.6] -> [-7, 3]
    # [0, 0] is an all-zero group: scale floors at EPS/7 and it stays exactly 0.
    w = t([7.0, -3.2, 0.875, 0.3], [-14.0, 5.2, 0.0, 0.0])
    c = cfg(4, granularity="group", group_size=2)
    codes, scale, _ = quantize(w, c)
    assert codes.shape == (4, 2)
    assert torch.equal(scale[:3], t([1.0], [0.125], [2.0]))
    assert codes.tolist() == [[7, -3], [7, 2], [-7, 3], [0, 0]]
    expected = t([7.0, -3.0, 0.875, 0.25], [-14.0, 6.0, 0.0, 0.0])
    assert torch.equal(fake_quantize(w, c), expected)


# ---- asymmetric ------------------------------------------------------------------------------


def test_asym_2bit_tensor():
    # levels 0..3; min -1, max 2 -> scale 3/3 = 1, zero = round(1/1) = 1
    # codes = round(x) + 1 = [0, 1, 2, 3] -> (c - 1) * 1 = [-1, 0, 1, 2]
    x = t(-1.0, 0.0, 0.6, 2.0)
    c = cfg(2, symmetric=False)
    codes, scale, zero = quantize(x, c)
    assert torch.equal(scale, t([1.0])) and torch.equal(zero, t([1.0]))
    assert torch.equal(codes, torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8))
    assert torch.equal(fake_quantize(x, c), t(-1.0, 0.0, 1.0, 2.0))


def test_asym_3bit_channel():
    # levels 0..7, range widened to include 0.
    # row 0: [0, 1.75] -> scale .25, zero 0; x/s = [0, 2.8, 7, 1.2] -> [0, 3, 7, 1]
    # row 1 (all positive): [0, 3.5] -> scale .5, zero 0; x/s = [4, 7, 2, 6]
    # row 2: [-.5, 1.25] -> scale .25, zero 2; round(x/s) + 2 = [0, 7, 2, 2]
    w = t([0.0, 0.7, 1.75, 0.3], [2.0, 3.5, 1.0, 3.0], [-0.5, 1.25, 0.1, 0.0])
    c = cfg(3, symmetric=False, granularity="channel")
    codes, scale, zero = quantize(w, c)
    assert torch.equal(scale, t([0.25], [0.5], [0.25]))
    assert torch.equal(zero, t([0.0], [0.0], [2.0]))
    assert codes.tolist() == [[0, 3, 7, 1], [4, 7, 2, 6], [0, 7, 2, 2]]
    expected = t([0.0, 0.75, 1.75, 0.25], [2.0, 3.5, 1.0, 3.0], [-0.5, 1.25, 0.0, 0.0])
    assert torch.equal(fake_quantize(w, c), expected)


def test_asym_all_zero_group_stays_zero():
    x = torch.zeros(2, 4)
    assert torch.equal(fake_quantize(x, cfg(4, symmetric=False, granularity="channel")), x)


# ---- binary ----------------------------------------------------------------------------------


def test_binary_channel():
    # s = mean|x| = (.5 + 1.5 + 0 + 1) / 4 = .75; sign with sign(0) = +1
    x = t([0.5, -1.5, 0.0, 1.0])
    c = cfg(1, granularity="channel")
    codes, scale, _ = quantize(x, c)
    assert torch.equal(scale, t([0.75]))
    assert torch.equal(codes, torch.tensor([[1, 0, 1, 1]], dtype=torch.uint8))
    assert torch.equal(fake_quantize(x, c), t([0.75, -0.75, 0.75, 0.75]))


def test_binary_group():
    # groups [.5, -1.5] (s = 1) and [0, 1] (s = .5)
    x = t([0.5, -1.5, 0.0, 1.0])
    c = cfg(1, granularity="group", group_size=2)
    assert torch.equal(fake_quantize(x, c), t([1.0, -1.0, 0.5, 0.5]))


# ---- all bit widths ---------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", range(1, 9))
def test_levels_and_error_bound(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(4, 64)
    c = cfg(bits, symmetric, granularity="group", group_size=32)
    xq = fake_quantize(x, c)
    xg, qg = group_view(x, c), group_view(xq, c)
    scale, _ = compute_qparams(xg, c)
    for row in qg:
        assert row.unique().numel() <= 2**bits
    if c.binary:
        assert torch.equal(qg.abs(), scale.expand_as(qg))
    else:  # MinMax: every value is inside the range, so rounding error <= half a step
        assert ((xg - qg).abs() <= scale / 2 * (1 + 1e-5)).all()


# ---- round trip, dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", [(1, True), (3, True), (4, False), (8, True), (8, False)])
def test_quantize_dequantize_equals_fake_quantize(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    c = cfg(bits, symmetric, granularity="group", group_size=16)
    codes, scale, zero = quantize(w, c)
    assert codes.shape == (16, 16)
    assert torch.equal(dequantize(codes, scale, zero, c, w.shape), fake_quantize(w, c))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16).to(dtype)
    c = cfg(4, granularity="token")
    out = fake_quantize(x, c)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, fake_quantize(x.float(), c).to(dtype))  # qparams are float32


def test_none_config_is_identity():
    x = torch.randn(3)
    assert fake_quantize(x, None) is x


def test_group_view_shapes():
    x = torch.zeros(2, 3, 8)  # activations (batch, seq, in)
    assert group_view(x, cfg(4, granularity="tensor")).shape == (1, 48)
    assert group_view(x, cfg(4, granularity="token")).shape == (6, 8)
    assert group_view(x, cfg(4, granularity="group", group_size=4)).shape == (12, 4)


# ---- straight-through estimator ----------------------------------------------------------------


def test_ste_identity_inside_range():
    x = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 16)
    fake_quantize(x, cfg(3, granularity="channel")).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_ste_zero_outside_given_clip_range():
    # qmax = 7, given scale .25 -> representable [-1.75, 1.75];
    # x/s = [-12, -2, 0, 2, 7.2, 7.6, 12]: 7.2 rounds to 7 (kept), 7.6 -> 8 and +-12 are clipped
    x = t(-3.0, -0.5, 0.0, 0.5, 1.8, 1.9, 3.0).requires_grad_()
    c = cfg(4)
    y = fake_quantize(x, c, scale=torch.tensor([[0.25]]))
    assert torch.equal(y, t(-1.75, -0.5, 0.0, 0.5, 1.75, 1.75, 1.75))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, t(0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0))


def test_ste_asym_given_params():
    # levels 0..3, scale 1, zero 1 -> representable [-1, 2]
    x = t(-2.0, -1.0, 2.0, 3.0).requires_grad_()
    y = fake_quantize(x, cfg(2, symmetric=False), scale=torch.tensor(1.0), zero=torch.tensor(1.0))
    assert torch.equal(y, t(-1.0, -1.0, 2.0, 2.0))
    y.sum().backward()
    assert torch.equal(x.grad, t(0.0, 1.0, 1.0, 0.0))


def test_ste_keeps_dtype():
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    fake_quantize(x, cfg(4, granularity="channel")).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, torch.ones_like(x))


def test_round_ste():
    x = t(0.4, 1.5, 2.5, -0.6).requires_grad_()
    y = round_ste(x)
    assert torch.equal(y, t(0.0, 2.0, 2.0, -1.0))
    y.backward(t(1.0, 2.0, 3.0, 4.0))
    assert torch.equal(x.grad, t(1.0, 2.0, 3.0, 4.0))
