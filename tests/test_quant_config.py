"""QuantConfig validation: every bad value fails with a one-line message naming key and fix."""

import pytest

from qatlab.errors import QatlabError
from qatlab.quantizers import QuantConfig


def test_defaults():
    c = QuantConfig()
    assert (c.bits, c.symmetric, c.granularity, c.group_size, c.grid) == (4, True, "group", 128, "int")
    assert (c.qmin, c.qmax) == (-7, 7)


@pytest.mark.parametrize(
    "kwargs,qmin,qmax",
    [
        (dict(bits=1), 0, 1),  # binary codes 0/1 for -s/+s
        (dict(bits=2), -1, 1),
        (dict(bits=8), -127, 127),
        (dict(bits=1, symmetric=False), 0, 1),
        (dict(bits=4, symmetric=False), 0, 15),
    ],
)
def test_code_range(kwargs, qmin, qmax):
    c = QuantConfig(**kwargs)
    assert (c.qmin, c.qmax) == (qmin, qmax)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(QatlabError, match=rf"weight.bits={bits} is out of range; use 1-8"):
        QuantConfig(bits=bits)


def test_bits_message_uses_name_and_mentions_null():
    with pytest.raises(QatlabError, match=r"act.bits=16 is out of range; use 1-8 .*set act to null"):
        QuantConfig(bits=16, name="act")


def test_bits_must_be_int():
    with pytest.raises(QatlabError, match=r"weight.bits=4.0 must be an integer"):
        QuantConfig(bits=4.0)


def test_unknown_granularity():
    with pytest.raises(QatlabError, match=r"granularity='row'.*tensor, channel, group, token"):
        QuantConfig(granularity="row")


@pytest.mark.parametrize("group_size", [None, 0, -64])
def test_group_needs_positive_group_size(group_size):
    with pytest.raises(QatlabError, match=r"weight.group_size=.* must be a positive integer"):
        QuantConfig(granularity="group", group_size=group_size)


def test_group_size_ignored_outside_group():
    c = QuantConfig(granularity="channel", group_size=None)
    assert QuantConfig(granularity="channel", group_size=64) == c
    c.check_width(577, "any")  # no group, nothing to divide


def test_group_size_must_divide_width():
    c = QuantConfig(group_size=128)
    c.check_width(512, "model.layers.0.mlp.up_proj")
    layer = "model.layers.0.self_attn.q_proj"
    with pytest.raises(QatlabError, match=r"group_size=128 does not divide the input width 576") as e:
        c.check_width(576, layer)
    msg = str(e.value)
    assert f"'{layer}'" in msg and "granularity=channel" in msg and "\n" not in msg
    assert "e.g. 96, 144, 192" in msg  # the divisors of 576 nearest 128


def test_grid_nf_exists_for_2_to_4_bits():
    c = QuantConfig(bits=3, symmetric=False, grid="nf")
    assert (c.qmin, c.qmax) == (0, 7)  # codes index the 8-value codebook
    with pytest.raises(QatlabError, match=r"weight.bits=5 has no normal-float codebook; use bits 2-4"):
        QuantConfig(bits=5, grid="nf")


def test_unknown_grid():
    with pytest.raises(QatlabError, match=r"weight.grid='fp4'"):
        QuantConfig(grid="fp4")


def test_from_dict():
    c = QuantConfig.from_dict({"bits": 8, "granularity": "token"}, "act")
    assert c == QuantConfig(bits=8, granularity="token")
    assert c.name == "act"


def test_from_dict_null_is_off():
    assert QuantConfig.from_dict(None, "weight") is None


@pytest.mark.parametrize("bits", [0, 9, 16, 32, 99])
def test_from_dict_any_bit_width_outside_1_to_8_is_an_error_not_full_precision(bits):
    """Issue 19: bits=99 (or 16) used to mean 'unquantized' and ran with exit 0 while the results row said W99."""
    with pytest.raises(QatlabError, match=rf"weight.bits={bits} is out of range; use 1-8 .*null"):
        QuantConfig.from_dict({"bits": bits, "granularity": "group"}, "weight")


def test_from_dict_unknown_key():
    with pytest.raises(QatlabError, match=r"weight: unknown key\(s\) \['group', 'sym'\]; valid keys are .*'bits'"):
        QuantConfig.from_dict({"bits": 4, "sym": True, "group": 64}, "weight")


def test_from_dict_bad_value_names_quantizer():
    with pytest.raises(QatlabError, match=r"act.bits=9"):
        QuantConfig.from_dict({"bits": 9}, "act")


def test_describe():
    assert QuantConfig().describe() == "4-bit sym group128"
    assert QuantConfig(bits=8, symmetric=False, granularity="token").describe() == "8-bit asym token"
