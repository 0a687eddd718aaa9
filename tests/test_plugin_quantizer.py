"""A quantizer from outside qatlab (tests/plugins/pow2.py) plugs in by `_target_` alone: it trains, reports its
bits, and ships its own codes and scales through the packed export (the README's "Adding a quantizer")."""

import math

import torch

from qatlab.export import load_packed
from qatlab.layers import FakeQuantLinear
from qatlab.recipes import compose_recipe
from qatlab.train import make_student
from tests.plugins.pow2 import PowerOfTwo
from tests.test_compositions import step_losses
from tests.test_export import Exported, logits

PLUGIN = ["quantizer._target_=tests.plugins.pow2.PowerOfTwo", "method.weight.bits=4", "method.weight.group_size=32"]


def test_power_of_two_scales_by_hand():
    spec = compose_recipe("kd", PLUGIN).weight_config
    w = torch.tensor([[0.5, -0.3, 0.07, 0.0] * 8, [3.0, 1.0, -2.0, 0.1] * 8])  # (2, 32): one group per row
    q = PowerOfTwo(spec, w)
    # max|w| / 7: 0.0714 -> 2^-3 = 0.125;  3 / 7 = 0.43 -> 2^-1 = 0.5
    assert q.scale(w).flatten().tolist() == [0.125, 0.5]
    expected_row0 = torch.tensor([0.5, -0.25, 0.125, 0.0])  # round(4, -2.4, 0.56, 0) x 0.125
    expected_row1 = torch.tensor([3.0, 1.0, -2.0, 0.0])  # round(6, 2, -4, 0.2) x 0.5
    torch.testing.assert_close(q(w)[0, :4], expected_row0, rtol=0, atol=0)
    torch.testing.assert_close(q(w)[1, :4], expected_row1, rtol=0, atol=0)
    assert torch.equal(q(w), q.encode(w).dequantize())


def test_a_plugin_quantizer_trains_and_ships_its_own_codes(tmp_path, tiny_llama_model):
    recipe = compose_recipe("kd", PLUGIN)
    assert all(math.isfinite(v) for v in step_losses(tiny_llama_model, recipe, steps=3))
    student = make_student(tiny_llama_model, recipe, "float32")
    ids = torch.randint(0, 100, (2, 16))
    out = student(input_ids=ids)
    recipe.loss(out, tiny_llama_model(input_ids=ids), {"input_ids": ids})["loss"].backward()
    down = student.get_submodule("model.layers.0.mlp.down_proj")
    assert down.weight.grad is not None and down.weight.grad.abs().sum() > 0  # the STE reaches the latent weights
    layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert layers and all(isinstance(m.weight_quantizer, PowerOfTwo) for m in layers)
    path = Exported(recipe, student.eval()).export(student, tmp_path, dtype="float32")
    assert torch.equal(logits(load_packed(path), ids), logits(student, ids))
    assert recipe.describe()["w_bits"] == 4
