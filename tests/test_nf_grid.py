"""Normal-float grid: codebooks, nearest rounding, and NF group quantization against hand-written numbers."""

import pytest
import torch

from qatlab.quantizers import QuantConfig, dequantize, fake_quantize, quantize
from qatlab.quantizers.nf_grid import nf_codebook, nf_round

# BitDistiller's reference NF3 table (quantization/quantizer.py, round_n2f3) and QLoRA's NF4 table.
NF3 = [-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718, 0.3819939494132996,
       0.6229856610298157, 1.0]
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def test_nf3_is_bitdistillers_table():
    torch.testing.assert_close(nf_codebook(3), torch.tensor(NF3), rtol=0, atol=1e-6)


def test_nf4_is_qloras_table():
    torch.testing.assert_close(nf_codebook(4), torch.tensor(NF4), rtol=0, atol=1e-6)


def test_nf2_has_one_negative_value_zero_and_two_positive():
    # offset = 1 - (1/8 + 1/6)/2; positives Phi^-1([offset, (offset+0.5)/2]) / Phi^-1(offset)
    book = nf_codebook(2)
    assert book[:2].tolist() == [-1.0, 0.0] and book[3].item() == 1.0
    assert book[2].item() == pytest.approx(0.4358, abs=1e-4)


def test_nearest_rounding_ties_go_up():
    mid = (NF3[1] + NF3[2]) / 2
    xn = torch.tensor([-1.2, -0.9, mid, 0.05, 0.0917, 0.7, 1.3])
    assert nf_round(xn, 3).tolist() == [0, 0, 2, 3, 4, 6, 7]


def test_asymmetric_nf3_group_against_hand_computed_values():
    # group 1: min -2, max 4 -> negatives / 2, positives / 4: [-1, -0.25, 0.075, 1] -> [-1, c2, 0, 1]
    # group 2: all positive: min widened to 0 (negative scale floors at EPS), [0.25, .5, .75, 1]
    cfg = QuantConfig(bits=3, symmetric=False, granularity="group", group_size=4, grid="nf")
    x = torch.tensor([[-2.0, -0.5, 0.3, 4.0, 1.0, 2.0, 3.0, 4.0]])
    codes, scale, zero = quantize(x, cfg)
    assert zero is None and codes.dtype == torch.uint8
    assert codes.tolist() == [[0, 2, 3, 7], [4, 5, 6, 7]]
    assert scale[0].tolist() == [2.0, 4.0] and scale[1, 1].item() == 4.0
    expected = torch.tensor([[-2.0, 2 * NF3[2], 0.0, 4.0, 4 * NF3[4], 4 * NF3[5], 4 * NF3[6], 4.0]])
    torch.testing.assert_close(fake_quantize(x, cfg), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(dequantize(codes, scale, zero, cfg, x.shape), expected, rtol=0, atol=1e-6)


def test_symmetric_nf4_uses_absmax():
    cfg = QuantConfig(bits=4, symmetric=True, granularity="channel", grid="nf")
    x = torch.tensor([[-0.5, 0.22, 1.0, -1.0]])  # absmax 1: values are already normalized
    expected = torch.tensor([[NF4[2], NF4[10], 1.0, -1.0]])  # -0.5 -> -0.5251, 0.22 -> 0.2461
    torch.testing.assert_close(fake_quantize(x, cfg), expected, rtol=0, atol=1e-6)


def test_nf_ste_passes_gradients_inside_and_zeroes_them_outside_given_scales():
    cfg = QuantConfig(bits=3, symmetric=False, granularity="tensor", grid="nf")
    x = torch.tensor([-3.0, -0.5, 0.5, 3.0], requires_grad=True)
    fake_quantize(x, cfg, scale=torch.tensor([[1.0, 1.0]])).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
