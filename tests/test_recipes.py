"""Recipes: the method = quantizer + init + loss + stages composition, built from conf/ like a run builds it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qatlab.errors import QatlabError
from qatlab.export.hf import export_hf
from qatlab.layers import FakeQuantLinear
from qatlab.losses import CAKLD, ForwardKL
from qatlab.quantizers import LSQ, MinMax
from qatlab.recipes import compose_recipe
from qatlab.stages import Blockwise, WholeModel
from qatlab.stages.params import parameter_groups
from qatlab.stages.qat_module import QATModule
from qatlab.train import make_student

METHODS = ["rtn", "gptq", "kd", "llm_qat", "bitdistiller", "onebit", "zeroquant", "lsq", "efficientqat", "paretoq"]


@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_composes_from_conf(method):
    recipe = compose_recipe(method)
    assert recipe.name == method
    assert recipe.trains == (method not in ("rtn", "gptq"))


def test_a_recipe_is_its_pieces_and_each_can_be_swapped():
    bd = compose_recipe("bitdistiller")
    assert bd.init.name == "clip" and isinstance(bd.loss, CAKLD) and [type(s) for s in bd.stages] == [WholeModel]
    mixed = compose_recipe("bitdistiller", ["quantizer=lsq", "loss=forward_kl"])
    assert mixed.init.name == "clip" and isinstance(mixed.loss, ForwardKL)
    assert mixed.quantizer.func is LSQ
    eq = compose_recipe("efficientqat")
    assert [s.name for s in eq.stages] == ["block_ap", "e2e_qp"] and [type(s) for s in eq.stages] == [Blockwise, WholeModel]
    assert eq.stages[0].config.target_input == "teacher" and eq.stages[1].freeze_codes


def test_a_disabled_stage_is_not_run_and_the_row_says_so():
    recipe = compose_recipe("zeroquant", ["stages.lkd.enabled=false"])
    assert not recipe.trains and recipe.describe()["stages"] == []


def test_unknown_method_key_names_it_and_the_valid_ones():
    with pytest.raises(QatlabError, match=r"method: unknown key\(s\) \['lrr'\]; a method holds .*'weight'"):
        compose_recipe("kd", ["+method.lrr=1.0"])


def test_unknown_quantizer_option_fails_before_any_layer_is_built():
    with pytest.raises(QatlabError, match=r"quantizer \(qatlab.quantizers.lsq.LSQ\) has no option\(s\) \['initt'\]"):
        compose_recipe("lsq", ["+quantizer.initt=lsq"])


def test_unknown_loss_option_is_one_clear_error():
    with pytest.raises(QatlabError, match=r"loss \(qatlab.losses.CAKLD\): .*gama_batches"):
        compose_recipe("bitdistiller", ["+loss.gama_batches=3"])


def test_rtn_converts_every_block_linear_and_keeps_the_teacher_untouched(tiny_llama_model):
    teacher = tiny_llama_model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    recipe = compose_recipe("rtn", ["method.weight.group_size=32"])
    student = make_student(teacher, recipe, "float32")
    assert len(recipe.quantized_layers) == 14  # 7 projections x 2 blocks; lm_head stays
    layer = student.model.layers[0].mlp.down_proj
    assert isinstance(layer, FakeQuantLinear) and isinstance(layer.weight_quantizer, MinMax)
    assert not isinstance(student.lm_head, FakeQuantLinear)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_null_override_leaves_those_layers_dense_and_the_row_says_so(tiny_llama_model):
    recipe = compose_recipe("rtn", ["method.weight.group_size=32", "+method.weight_overrides.self_attn=null"])
    student = make_student(tiny_llama_model, recipe, "float32")
    facts = recipe.describe(student)
    assert facts["dense_layers"] == 8 and facts["w_bits_label"] == "4/16"
    assert facts["weight_overrides"] == {"self_attn": "full precision"}
    assert recipe.bits_per_weight(student) > 4.25  # the dense layers count at 16 bits


def test_dense_export_reproduces_the_student(tmp_path, tiny_llama_model):
    recipe = compose_recipe("rtn", ["method.weight.bits=3", "method.weight.group_size=32"])
    student = make_student(tiny_llama_model, recipe, "float32")
    path = export_hf(student, tmp_path / "export", recipe.describe())
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=0, atol=1e-5)
    assert (path / "qatlab_manifest.json").exists()


def test_kd_training_lowers_the_distillation_loss(tiny_llama_model):
    teacher = tiny_llama_model
    recipe = compose_recipe("kd", ["method.weight.bits=2", "method.weight.symmetric=false", "method.weight.group_size=32"])
    student = make_student(teacher, recipe, "float32")
    module = QATModule(teacher, student, recipe.loss, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    optimizer = module.configure_optimizers()
    batch = {"input_ids": torch.randint(0, 128, (4, 32)), "attention_mask": torch.ones(4, 32)}
    losses = []
    for _ in range(30):
        with torch.no_grad():
            teacher_out = teacher(input_ids=batch["input_ids"])
        loss = recipe.loss(student(input_ids=batch["input_ids"]), teacher_out, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_weights_trains_the_latent_weights_only(tiny_llama_model):
    student = make_student(tiny_llama_model, compose_recipe("kd", ["method.weight.group_size=32"]), "float32")
    (group,) = parameter_groups(student, "weights", None)
    layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert len(group["params"]) == 14 and all(p is m.weight for p, m in zip(group["params"], layers))
    assert sum(p.requires_grad for p in student.parameters()) == 14


def test_quantizer_parameters_get_their_own_group_without_weight_decay(tiny_llama_model):
    student = make_student(tiny_llama_model, compose_recipe("lsq", ["method.weight.group_size=32"]), "float32")
    weights, qparams = parameter_groups(student, "all", qparams_lr=1e-2)
    (single,) = parameter_groups(student, "all", qparams_lr=None)  # no differences: one group, model order
    assert [id(p) for p in single["params"]] == [id(p) for p in student.parameters()]
    assert len(parameter_groups(student, "all", None, weight_decay=0.01)) == 2  # qparams never decay
    scales = [m.weight_quantizer.scale for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert {id(p) for p in qparams["params"]} == {id(s) for s in scales}
    assert qparams["weight_decay"] == 0.0 and qparams["lr"] == 1e-2 and "lr" not in weights
    assert not {id(p) for p in weights["params"]} & {id(s) for s in scales}
    (only,) = parameter_groups(student, "qparams", None)
    assert only["name"] == "qparams" and sum(p.requires_grad for p in student.parameters()) == len(scales)


def test_a_parameterless_quantizer_cannot_train_qparams_only(tiny_llama_model):
    student = make_student(tiny_llama_model, compose_recipe("kd", ["method.weight.group_size=32"]), "float32")
    with pytest.raises(QatlabError, match="leaves nothing to train.*quantizer=minmax recomputes"):
        parameter_groups(student, "qparams", None)


def test_checkpoints_hold_the_student_and_the_recipe_state(tiny_llama_model):
    teacher = tiny_llama_model
    recipe = compose_recipe("bitdistiller", ["method.weight.group_size=32"])
    module = QATModule(teacher, make_student(teacher, recipe, "float32"), recipe.loss, optimizer=torch.optim.AdamW,
                       state=recipe)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert checkpoint["qatlab_recipe"] == {"loss": {"top1_sum": 0.0, "top1_count": 0, "gamma_steps": 0, "prepass_gamma": None}}
    module.train()
    assert module.student.training and not module.teacher.training


def test_ce_needs_no_teacher_forward(tiny_llama_model):
    recipe = compose_recipe("paretoq")
    student = make_student(tiny_llama_model, recipe, "float32")
    module = QATModule(None, student, recipe.loss, optimizer=torch.optim.AdamW)
    batch = {"input_ids": torch.randint(0, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    module.log_dict = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    expected = torch.nn.functional.cross_entropy(student(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, 128),
                                                 batch["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
