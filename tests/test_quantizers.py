"""Quantizer modules: what they compute, what they ship, and their gradients against the references' rules.

Hand-computed cases pin the references' math (ParetoQ's LsqBinaryTernaryExtension / StretchedElasticQuant,
lsq-net's LSQ, EfficientQAT's UniformAffineQuantizer), not qatlab's own conventions.
"""

import math

import pytest
import torch

from qatlab.quantizers import LSQ, SEQ, Binary, MinMax, NormalFloat, QuantConfig, minmax, paretoq

torch.manual_seed(0)


def spec(**kw):
    return QuantConfig(**{"bits": 4, "symmetric": True, "granularity": "group", "group_size": 8, **kw})


QUANTIZERS = {
    "minmax sym restricted": lambda w: minmax(spec(), w),
    "minmax sym full": lambda w: minmax(spec(range="full"), w),
    "minmax asym": lambda w: minmax(spec(symmetric=False), w),
    "minmax ternary": lambda w: minmax(spec(bits=2), w),
    "minmax channel": lambda w: minmax(spec(granularity="channel"), w),
    "minmax tensor": lambda w: minmax(spec(granularity="tensor"), w),
    "nf3 asym": lambda w: minmax(spec(bits=3, symmetric=False, grid="nf"), w),
    "binary": lambda w: minmax(spec(bits=1, granularity="channel"), w),
    "lsq 4-bit full": lambda w: LSQ(spec(range="full"), w),
    "lsq 3-bit mse": lambda w: LSQ(spec(bits=3, range="full"), w, init="mse"),
    "lsq 3sigma channel": lambda w: LSQ(spec(granularity="channel"), w, init="3sigma"),
    "efficientqat 2-bit asym": lambda w: LSQ(spec(bits=2, symmetric=False), w, init="minmax", grad_scale="none",
                                             clip_test="rounded", scale_min=1e-4, scale_max=1e4),
    "seq 2-bit": lambda w: SEQ(spec(bits=2, range="full", granularity="channel"), w),
    "seq ternary group": lambda w: SEQ(spec(bits=2), w),
    "paretoq 3-bit": lambda w: paretoq(spec(bits=3, range="full", granularity="channel"), w),
}


@pytest.mark.parametrize("name", QUANTIZERS)
def test_forward_equals_what_encode_ships_bit_for_bit(name):
    w = torch.randn(6, 16) * 0.1
    q = QUANTIZERS[name](w)
    with torch.no_grad():
        for p in q.parameters():  # learned qparams away from their init: encode must ship them, not recompute
            p.mul_(1.3)
    qw = q.encode(w)
    assert torch.equal(q(w), qw.dequantize())
    assert qw.codes.shape == w.shape and qw.codes.dtype == torch.int16
    assert int(qw.codes.min()) >= qw.grid.qmin and int(qw.codes.max()) <= qw.grid.qmax
    assert qw.scale.shape[:2] == (q.rows, q.groups) and qw.group_size * q.rows * q.groups == w.numel()
    assert q.storage_bits() > w.numel() * q.spec.bits


def test_minmax_classes_follow_the_spec():
    w = torch.randn(4, 16)
    assert type(minmax(spec(), w)) is MinMax and type(minmax(spec(grid="nf", bits=3), w)) is NormalFloat
    assert type(minmax(spec(bits=1), w)) is Binary


def test_full_range_minmax_is_deepspeeds_symquantizer():
    """ZeroQuant's reference (DeepSpeed SymQuantizer): scale = 2 max|x| / 2^b, codes clamp(-2^(b-1), 2^(b-1) - 1)."""
    x = torch.tensor([[0.8, -0.4, 0.3, -0.1]])
    s = 2 * 0.8 / 2**3  # 3 bits: 0.2
    expected = torch.clamp(torch.round(x / s), -4, 3) * s  # 0.8 / 0.2 = 4 clips to 3
    q = minmax(QuantConfig(bits=3, granularity="channel", range="full"), x)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)
    assert q.encode(x).codes.tolist() == [[3, -2, 2, 0]]


def test_ternary_is_three_levels_and_says_so():
    c = QuantConfig(bits=2, granularity="channel")
    assert c.ternary and c.levels == 3 and "ternary" in c.describe()
    assert QuantConfig(bits=2, granularity="channel", range="full").levels == 4


# ---- LSQ: ParetoQ / lsq-net's symmetric rule, by hand -------------------------------------------------


def test_lsq_gradients_match_the_reference_rule_by_hand():
    """3-bit full range: Qn = -4, Qp = 3; x = w / s with s = 1; g = 1 / sqrt(N * Qp) (N = 6, the whole matrix).
    Inside [Qn, Qp]: dw = dy, ds += (round(x) - x) dy; below: ds += Qn dy; above: ds += Qp dy (dw = 0)."""
    w = torch.tensor([[0.3, -1.2, 2.9, 0.05, 3.8, -5.0]], requires_grad=True)
    q = LSQ(QuantConfig(bits=3, granularity="channel", range="full"), w.detach(), init="absmax")
    with torch.no_grad():
        q.scale.fill_(1.0)
    y = q(w)
    assert y.tolist() == [[0.0, -1.0, 3.0, 0.0, 3.0, -4.0]]
    dy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    y.backward(dy)
    assert w.grad.tolist() == [[1.0, 2.0, 3.0, 4.0, 0.0, 0.0]]
    g = 1 / math.sqrt(6 * 3)
    by_hand = (0 - 0.3) * 1 + (-1 + 1.2) * 2 + (3 - 2.9) * 3 + (0 - 0.05) * 4 + 3 * 5 + (-4) * 6
    torch.testing.assert_close(q.scale.grad, torch.tensor([[by_hand * g]]))


def test_lsq_grad_scale_per_group_is_a_switch():
    w = torch.randn(4, 16)
    layer = LSQ(spec(range="full"), w, grad_scale="layer")
    group = LSQ(spec(range="full"), w, grad_scale="group")
    assert layer.gradient_scale == pytest.approx(1 / math.sqrt(64 * 7))
    assert group.gradient_scale == pytest.approx(1 / math.sqrt(8 * 7))


def test_lsq_inits_are_the_papers_rules():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.25]])
    c = QuantConfig(bits=4, granularity="channel", range="full")  # Qp = 7
    assert LSQ(c, w, init="absmax").scale.item() == pytest.approx(1.0 / 7)  # ParetoQ: max|w| / (2^(b-1) - 1)
    assert LSQ(c, w, init="lsq").scale.item() == pytest.approx(2 * 0.5 / math.sqrt(7))  # 2 mean|w| / sqrt(Qp)
    mu, sigma = w.mean().item(), w.std(unbiased=False).item()
    assert LSQ(c, w, init="3sigma").scale.item() == pytest.approx(max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 8)
    assert LSQ(c, w, init="minmax").scale.item() == pytest.approx(1.0 / 8)  # = the full-range MinMax step


# ---- EfficientQAT: asymmetric, zero point rounded + clamped with an STE, rounded clip test -------------


def efficientqat_reference(wg, scale, zero, qmax):
    """EfficientQAT's forward written with its own STE idioms (round_ste / clamp_ste as x + (f(x) - x).detach()),
    so autograd gives the reference's gradients."""
    def round_ste(x):
        return x + (x.round() - x).detach()

    def clamp_ste(x, lo, hi):
        return x + (x.clamp(lo, hi) - x).detach()

    s = clamp_ste(scale, 1e-4, 1e4)
    z = clamp_ste(round_ste(zero), 0, qmax)
    q = (round_ste(wg / s) + z).clamp(0, qmax)  # wg: (R, group), scale / zero: (R, 1)
    return (q - z) * s


def test_efficientqat_gradients_by_hand():
    """2-bit (codes 0..3), s = 0.5, z = 1.4 -> z' = 1. x = w / s = [0.4, -1.8, 2.6, 1.2] -> r = round(x) + z' =
    [1, -1, 4, 2]: elements 1 and 2 clip (rounded test). ds: inside round(x) - x, clipped q - z'; dz: clipped -s."""
    w = torch.tensor([[0.2, -0.9, 1.3, 0.6]], requires_grad=True)
    q = LSQ(QuantConfig(bits=2, symmetric=False, granularity="channel"), w.detach(), init="minmax", grad_scale="none",
            clip_test="rounded", scale_min=1e-4, scale_max=1e4)
    with torch.no_grad():
        q.scale.fill_(0.5)
        q.zero.fill_(1.4)
    y = q(w)
    assert y.tolist() == [[0.0, -0.5, 1.0, 0.5]]
    y.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert w.grad.tolist() == [[1.0, 0.0, 0.0, 4.0]]
    torch.testing.assert_close(q.scale.grad, torch.tensor([[-0.4 * 1 + (0 - 1) * 2 + (3 - 1) * 3 + -0.2 * 4]]))
    torch.testing.assert_close(q.zero.grad, torch.tensor([[-0.5 * 2 + -0.5 * 3]]))


def test_efficientqat_matches_its_autograd_reference_on_random_groups():
    torch.manual_seed(1)
    w = torch.randn(4, 16, requires_grad=True)
    q = LSQ(QuantConfig(bits=2, symmetric=False, group_size=8), w.detach(), init="minmax", grad_scale="none",
            clip_test="rounded", scale_min=1e-4, scale_max=1e4)
    with torch.no_grad():
        q.scale.mul_(0.8)  # clip some elements
        q.zero.add_(0.3)
    dy = torch.randn(4, 16)
    q(w).backward(dy)
    ws, s, z = w.detach().clone().requires_grad_(True), q.scale.detach().clone().requires_grad_(True), \
        q.zero.detach().clone().requires_grad_(True)
    ref = efficientqat_reference(ws.reshape(-1, 8), s, z, 3).reshape(4, 16)
    ref.backward(dy)
    torch.testing.assert_close(q(w).detach(), ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.grad, ws.grad)
    torch.testing.assert_close(q.scale.grad, s.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.zero.grad, z.grad, rtol=1e-5, atol=1e-6)


def test_efficientqat_init_is_minmax_without_widening_to_zero():
    w = torch.tensor([[0.2, 0.5, 0.8, 1.1]])  # all positive: min is not widened to 0
    q = LSQ(QuantConfig(bits=2, symmetric=False, granularity="channel"), w, init="minmax", grad_scale="none")
    assert q.scale.item() == pytest.approx(0.3)  # (1.1 - 0.2) / 3
    assert q.zero.item() == round(-0.2 / 0.3)  # round(-min / s) = -1, clamped to 0 only in the forward


# ---- ParetoQ's SEQ -----------------------------------------------------------------------------------


def test_seq_two_bit_grid_and_gradients_by_hand():
    """alpha = 1, x = [0.1, -0.6, 1.5, -2.0]: u = clamp(x, +-0.99); levels (round(2u - 0.5) + 0.5) / 2 =
    [0.25, -0.75, 0.75, -0.75]. |x| > 0.99 clips (dw = 0, dalpha += +-0.75); inside dalpha += level - x.
    g = 1 / sqrt(N) = 1/2."""
    w = torch.tensor([[0.1, -0.6, 1.5, -2.0]], requires_grad=True)
    q = SEQ(QuantConfig(bits=2, range="full", granularity="channel"), w.detach())
    assert q.alpha.item() == 2.0  # init: max|w|
    with torch.no_grad():
        q.alpha.fill_(1.0)
    y = q(w)
    assert y.tolist() == [[0.25, -0.75, 0.75, -0.75]]
    y.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert w.grad.tolist() == [[1.0, 2.0, 0.0, 0.0]]
    by_hand = (0.25 - 0.1) * 1 + (-0.75 + 0.6) * 2 + 0.75 * 3 + (-0.75) * 4
    torch.testing.assert_close(q.alpha.grad, torch.tensor([[by_hand / 2]]))
    assert q.encode(w.detach()).codes.tolist() == [[0, -2, 1, -2]]  # shipped as (code + 0.5) * alpha / 2


def test_seq_ternary_levels_are_two_thirds_alpha_and_clip_gradient_is_one():
    w = torch.tensor([[0.2, -0.5, 0.9, 1.2]], requires_grad=True)
    q = SEQ(QuantConfig(bits=2, granularity="channel"), w.detach())  # restricted range: ternary
    with torch.no_grad():
        q.alpha.fill_(1.0)
    y = q(w)
    torch.testing.assert_close(y, torch.tensor([[0.0, -2 / 3, 2 / 3, 2 / 3]]))
    y.backward(torch.ones(1, 4))
    by_hand = (0 - 0.2) + (-2 / 3 + 0.5) + (2 / 3 - 0.9) + 1.0  # the clipped element counts Qp' = 1
    torch.testing.assert_close(q.alpha.grad, torch.tensor([[by_hand / 2]]))


def test_seq_refuses_other_widths_and_paretoq_picks_lsq_at_3_bits():
    from qatlab.errors import QatlabError

    with pytest.raises(QatlabError, match="quantizer=seq is ParetoQ's 2-bit / ternary grid"):
        SEQ(QuantConfig(bits=3, granularity="channel"), torch.randn(2, 4))
    chosen = paretoq(QuantConfig(bits=3, range="full", granularity="channel"), torch.randn(2, 4))
    assert isinstance(chosen, LSQ) and chosen.init == "absmax"
    assert chosen.gradient_scale == pytest.approx(1 / math.sqrt(8 * 3))


# ---- frozen codes (E2E-QP) -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda w: LSQ(spec(bits=2, symmetric=False), w, init="minmax"),
                                  lambda w: SEQ(spec(bits=2, range="full"), w)])
def test_frozen_codes_ignore_the_latent_weight_and_train_only_the_scales(make):
    w = torch.randn(4, 16, requires_grad=True)
    q = make(w.detach())
    before = q.encode(w.detach()).codes.clone()
    q.freeze_codes(w.detach())
    moved = (w.detach() + 5.0).requires_grad_(True)
    y = q(moved)
    assert torch.equal(q.encode(moved.detach()).codes, before)
    y.sum().backward()
    assert moved.grad is None
    step = q.scale if isinstance(q, LSQ) else q.alpha
    assert step.grad is not None and step.grad.abs().sum() > 0
    if isinstance(q, LSQ):
        assert not q.zero.requires_grad
    assert torch.equal(q(moved).detach(), q.encode(moved.detach()).dequantize())
