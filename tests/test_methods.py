import pytest
import torch
from transformers import AutoModelForCausalLM

from qatlab.errors import QatlabError
from qatlab.methods import METHODS, build_method, register_method
from qatlab.methods.base import QuantMethod
from qatlab.module import QATModule
from qatlab.quant import FakeQuantLinear
from qatlab.train import make_student


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(QatlabError, match=r"unknown method 'onebitt'; choose one of: .*kd.*rtn"):
        build_method("onebitt")


def test_unknown_option_names_it_and_the_valid_ones():
    with pytest.raises(QatlabError, match=r"method 'kd' has no option\(s\) \['lrr'\].*'loss'"):
        build_method("kd", lrr=1.0)


def test_registering_a_name_twice_fails_loudly():
    with pytest.raises(RuntimeError, match="registered twice"):
        register_method("kd")(type("Again", (QuantMethod,), {}))
    assert METHODS["kd"].__name__ == "KD"


def test_rtn_converts_every_block_linear_and_keeps_the_teacher_untouched(tiny_llama_model):
    teacher = tiny_llama_model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = build_method("rtn", weight={"bits": 4, "group_size": 32})
    student = make_student(teacher, method, "float32")
    assert len(method.quantized_layers) == 14  # 7 projections x 2 blocks; lm_head stays
    assert isinstance(student.model.layers[0].mlp.down_proj, FakeQuantLinear)
    assert not isinstance(student.lm_head, FakeQuantLinear)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_export_writes_a_dense_checkpoint_that_reproduces_the_student(tmp_path, tiny_llama_model):
    method = build_method("rtn", weight={"bits": 3, "group_size": 32})
    student = make_student(tiny_llama_model, method, "float32")
    path = method.export_dense(student, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=0, atol=1e-5)
    assert (path / "qatlab_manifest.json").exists()


def test_kd_training_lowers_the_distillation_loss(tiny_llama_model):
    teacher = tiny_llama_model
    method = build_method("kd", weight={"bits": 2, "symmetric": False, "group_size": 32})
    student = make_student(teacher, method, "float32")
    module = QATModule(teacher, student, method, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    optimizer = module.configure_optimizers()
    batch = {"input_ids": torch.randint(0, 128, (4, 32)), "attention_mask": torch.ones(4, 32)}
    losses = []
    for _ in range(30):
        with torch.no_grad():
            teacher_out = teacher(input_ids=batch["input_ids"])
        loss = method.loss(student(input_ids=batch["input_ids"]), teacher_out, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_kd_trains_only_what_it_says(tiny_llama_model):
    method = build_method("kd", weight={"bits": 4, "group_size": 32}, trainable="quantized")
    student = make_student(tiny_llama_model, method, "float32")
    params = method.trainable_parameters(student)
    assert len(params) == 14
    assert all(p is m.weight for p, m in zip(params, [m for m in student.modules() if isinstance(m, FakeQuantLinear)]))


def test_checkpoints_hold_the_student_only(tiny_llama_model):
    teacher = tiny_llama_model
    method = build_method("kd", weight={"bits": 4, "group_size": 32})
    module = QATModule(teacher, make_student(teacher, method, "float32"), method, optimizer=torch.optim.AdamW)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    module.train()
    assert module.student.training and not module.teacher.training
