"""Swapping Linear layers of tiny HF causal LMs for FakeQuantLinear and back."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qatlab.errors import QatlabError
from qatlab.quantizers import QuantConfig
from qatlab.layers import FakeQuantLinear, find_linears, quantize_model, set_quant_enabled, swap_linears, unswap
from qatlab.layers.swap import conv1d_to_linear

W4 = QuantConfig(bits=4, granularity="group", group_size=32)
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ids(vocab: int) -> torch.Tensor:
    return torch.arange(12).reshape(2, 6) % vocab


def logits(model, vocab):
    with torch.no_grad():
        return model(input_ids=ids(vocab)).logits


def test_find_linears_llama(tiny_llama_model):
    names = find_linears(tiny_llama_model)
    assert len(names) == 14
    assert {n.rsplit(".", 1)[1] for n in names} == set(LLAMA_PROJ)
    assert "lm_head" not in names


def test_tied_lm_head_is_skipped_even_if_not_excluded(tiny_llama_model):
    assert "lm_head" not in find_linears(tiny_llama_model, exclude=())


def test_swap_llama_all_projections(tiny_llama_model):
    model = tiny_llama_model
    reference = logits(model, 128)
    embed = model.model.embed_tokens
    weights = {n: m.weight for n, m in find_linears(model).items()}

    names = quantize_model(model, W4)

    assert len(names) == 14 and names == sorted(names)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, FakeQuantLinear) and layer.weight is weights[name]
    assert type(model.lm_head) is nn.Linear and model.model.embed_tokens is embed
    quantized = logits(model, 128)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, reference)

    assert set_quant_enabled(model, False) == 14
    assert torch.equal(logits(model, 128), reference)

    assert unswap(model) == 14
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert torch.equal(logits(model, 128), reference)


def test_include_restricts(tiny_llama_model):
    names = quantize_model(tiny_llama_model, W4, include=["mlp"])
    assert len(names) == 6 and all(".mlp." in n for n in names)
    assert type(tiny_llama_model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_exclude_drops(tiny_llama_model):
    names = quantize_model(tiny_llama_model, W4, exclude=["lm_head", r"layers\.0\."])
    assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)


def test_nothing_matched(tiny_llama_model):
    with pytest.raises(QatlabError, match=r"no Linear layers matched include=\['nope'\].*LlamaForCausalLM"):
        quantize_model(tiny_llama_model, W4, include=["nope"])


def test_bad_regex(tiny_llama_model):
    with pytest.raises(QatlabError, match=r"include pattern '\(mlp' is not a valid regex"):
        quantize_model(tiny_llama_model, W4, include=["(mlp"])


def test_include_must_be_a_list(tiny_llama_model):
    with pytest.raises(QatlabError, match=r"include='mlp' must be a list"):
        find_linears(tiny_llama_model, include="mlp")


def test_bad_group_size_leaves_model_untouched(tiny_llama_model):
    # hidden 64 and intermediate 128: group 128 fits the mlp down_proj input only.
    with pytest.raises(QatlabError, match=r"does not divide the input width 64 of layer 'model.layers.0"):
        quantize_model(tiny_llama_model, QuantConfig(group_size=128))
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_llama_model.modules())


def test_swap_linears_custom_factory(tiny_llama_model):
    seen = []

    def make(name, linear):
        seen.append(name)
        return nn.Identity() if "k_proj" in name else linear

    names = swap_linears(tiny_llama_model, make, include=["layers.0.self_attn"])
    assert names == sorted(seen) and len(names) == 4
    assert isinstance(tiny_llama_model.model.layers[0].self_attn.k_proj, nn.Identity)


def test_conv1d_to_linear():
    conv = Conv1D(6, 4)  # nf=out, nx=in; weight (in, out)
    linear = conv1d_to_linear(conv)
    assert linear.weight.shape == (6, 4) and linear.bias is conv.bias
    x = torch.randn(3, 4)
    assert torch.allclose(linear(x), conv(x), atol=1e-6)


def test_swap_gpt2(tiny_gpt2_model):
    model = tiny_gpt2_model
    original = copy.deepcopy(model)
    names = quantize_model(model, QuantConfig(bits=4, granularity="group", group_size=16))
    assert names == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)  # (out, in)
    assert torch.isfinite(logits(model, 100)).all()

    set_quant_enabled(model, False)
    assert torch.allclose(logits(model, 100), logits(original, 100), atol=1e-6)
    assert unswap(model) == 4
    assert type(model.transformer.h[0].mlp.c_fc) is nn.Linear
