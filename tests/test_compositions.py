"""Any init x quantizer x loss x stage composes without code: the README's compositions and the loss matrix."""

import math

import pytest
import torch

from qatlab.layers import FakeQuantLinear
from qatlab.quantizers import LSQ, SEQ
from qatlab.recipes import compose_recipe
from qatlab.stages.params import parameter_groups
from qatlab.stages.qat_module import QATModule
from qatlab.train import make_student, train
from tests.test_train import make_cfg

WHOLE_MODEL_RECIPES = {
    "kd": ["method.weight.group_size=32"],
    "bitdistiller": ["method.weight.group_size=32", "init=none"],
    "onebit": [],
    "lsq": ["method.weight.group_size=32"],
    "paretoq": [],
    "efficientqat": ["method.weight.group_size=32", "stages.block_ap.enabled=false"],
}
LOSSES = ["forward_kl", "reverse_kl", "cakld", "jsd", "ce", "hidden_mse", "block_mse"]


def batch(seed=0):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def step_losses(teacher, recipe, steps=3, lr=2e-3):
    """A few optimizer steps of the recipe's whole-model stage on one batch, as QATModule runs them."""
    student = make_student(teacher, recipe, "float32")
    recipe.initialize(student, teacher, [batch(1)])
    stage = recipe.stages[-1]
    stage.prepare(student, recipe)
    module = QATModule(teacher, student, recipe.loss, optimizer=lambda g: torch.optim.AdamW(g, lr=lr),
                       param_groups=lambda m: parameter_groups(m, stage.train, None))
    module.log_dict = lambda *a, **k: None
    recipe.loss.prepare(teacher, [batch(2), batch(3)])  # e.g. CAKLD's gamma pre-pass, as the stage runs it
    optimizer = module.configure_optimizers()
    values = []
    for _ in range(steps):
        loss = module.training_step(batch(), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    return values


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("method", WHOLE_MODEL_RECIPES)
def test_every_loss_trains_with_every_whole_model_recipe(tiny_llama_model, method, loss):
    overrides = [*WHOLE_MODEL_RECIPES[method], f"loss={loss}"]
    if loss in ("forward_kl", "reverse_kl", "cakld", "jsd") and method == "onebit":
        overrides.append("loss.hidden_mse=0.05")
    values = step_losses(tiny_llama_model, compose_recipe(method, overrides), steps=1)
    assert all(math.isfinite(v) and v >= 0 for v in values), values


@pytest.fixture
def peaked_teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # initializer_range 0.1: the blocks matter, so 2-bit weights leave a real gap
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def test_bitdistiller_clip_init_with_lsq_and_cakld_lowers_its_loss(tmp_path, peaked_teacher):
    """Composition 1 of the README: BitDistiller's clip init + LSQ's learned steps + CAKLD, no code."""
    recipe = compose_recipe("bitdistiller", ["quantizer=efficientqat", "method.weight.group_size=32",
                                             f"init.cache_dir={tmp_path}", "loss.gamma_batches=1"])
    student = make_student(peaked_teacher, recipe, "float32")
    facts = recipe.initialize(student, peaked_teacher, [batch(1)])
    assert facts["init/clip_layers"] == 10
    layer = student.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer.weight_quantizer, LSQ)
    clipped = layer.weight.detach().reshape(-1, 32)  # the LSQ steps start from the clipped ranges
    torch.testing.assert_close(layer.weight_quantizer.scale.detach(),
                               ((clipped.amax(-1, keepdim=True) - clipped.amin(-1, keepdim=True)) / 3).clamp(1e-4))
    values = step_losses(peaked_teacher, recipe, steps=6, lr=3e-3)
    assert values[-1] < values[0], values


def test_block_ap_then_cakld_end_to_end(tmp_path):
    """Composition 2: EfficientQAT's Block-AP, then end-to-end training of the qparams on CAKLD, as a run."""
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=efficientqat", "method.weight.group_size=32",
                   "loss=cakld", "loss.gamma_batches=1", "stages.block_ap.samples=4", "stages.block_ap.steps=3",
                   "trainer.max_steps=3")
    results = train(cfg)
    assert results["stages"] == ["block_ap", "e2e_qp"] and results["loss"] == "cakld"
    assert results["block_ap/steps"] == 6 and results["train/steps"] == 3
    assert results["block_ap/mse_after"] < results["block_ap/mse_before"]
    assert math.isfinite(results["test/ppl_student"])


def test_onebit_style_kd_with_seq(tiny_llama_model):
    """Composition 3: OneBit's loss (KL + normalized hidden MSE) with ParetoQ's SEQ quantizer at 2 bits."""
    recipe = compose_recipe("onebit", ["quantizer=seq", "init=none", "method.weight.bits=2",
                                       "+method.weight.range=full"])
    student = make_student(tiny_llama_model, recipe, "float32")
    assert isinstance(student.get_submodule("model.layers.0.self_attn.q_proj").weight_quantizer, SEQ)
    assert recipe.loss.hidden_mse == 1.0 and recipe.loss.scale == 0.01  # OneBit reference weights
    values = step_losses(tiny_llama_model, recipe, steps=3)
    assert all(math.isfinite(v) for v in values)


def test_e2e_qp_moves_only_the_scales(peaked_teacher):
    """EfficientQAT's second stage: codes frozen, zero points frozen, latent weights untouched; scales train."""
    recipe = compose_recipe("efficientqat", ["method.weight.group_size=32", "stages.block_ap.enabled=false"])
    student = make_student(peaked_teacher, recipe, "float32")
    recipe.initialize(student, peaked_teacher, [])
    layer = student.get_submodule("model.layers.1.mlp.up_proj")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    codes = layer.encode().codes.clone()
    stage = recipe.stages[-1]
    stage.prepare(student, recipe)
    optimizer = torch.optim.SGD(parameter_groups(student, stage.train, None), lr=1.0)
    recipe.loss(student(input_ids=batch()["input_ids"]), None, batch())["loss"].backward()
    optimizer.step()
    after = student.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("weight_quantizer.scale") for k in changed), sorted(changed)[:5]
    assert torch.equal(layer.encode().codes, codes)
    assert all(isinstance(m.weight_quantizer, LSQ) and m.weight_quantizer.frozen is not None
               for m in student.modules() if isinstance(m, FakeQuantLinear))
