"""BitDistiller method: options, CAKLD's gamma, clip cache, a tiny training run end to end."""

import math
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig, LlamaForCausalLM

import qatlab.inits.clip_search as clip_search
from qatlab.errors import QatlabError
from qatlab.losses.divergences import top1_probability_sum
from qatlab.recipes import compose_recipe
from qatlab.stages.qat_module import QATModule
from qatlab.quantizers import QuantConfig, fake_quantize
from qatlab.train import make_student, train
from tests.test_train import CONF

W2 = {"bits": 2, "symmetric": False, "group_size": 32}


def bitdistiller(tmp_path, *overrides):
    return compose_recipe("bitdistiller", ["method.weight.group_size=32", f"init.cache_dir={tmp_path}/clip", *overrides])


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 24), generator=g),
             "attention_mask": torch.ones(2, 24, dtype=torch.long)} for _ in range(n)]


def test_asymmetric_int2_group_quantizer_against_hand_computed_values():
    # group [-1, -0.2, 0.4, 2]: scale = 3/3 = 1, zero = 1 -> codes [0, 1, 1, 3] -> [-1, 0, 0, 2]
    # group [0.5, 1, 1.5, 3]: min widened to 0, scale 1, zero 0 -> codes [0, 1, 2, 3] -> [0, 1, 2, 3]
    cfg = QuantConfig(bits=2, symmetric=False, granularity="group", group_size=4)
    x = torch.tensor([[-1.0, -0.2, 0.4, 2.0, 0.5, 1.0, 1.5, 3.0]])
    assert fake_quantize(x, cfg).tolist() == [[-1.0, 0.0, 0.0, 2.0, 0.0, 1.0, 2.0, 3.0]]


def test_options_are_checked_with_one_line_messages(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"Could not find 'loss/kl'"):
        bitdistiller(tmp_path, "loss=kl")
    with pytest.raises(QatlabError, match=r"loss.gamma_batches=0 must be an integer >= 1"):
        bitdistiller(tmp_path, "loss.gamma_batches=0")
    with pytest.raises(QatlabError, match=r"loss \(qatlab.losses.CAKLD\): .*gama"):
        bitdistiller(tmp_path, "+loss.gama=0.5")
    assert bitdistiller(tmp_path, "stages.train.enabled=false").trains is False


def test_running_gamma_is_measured_over_the_first_batches_then_fixed_and_restorable(tmp_path):
    method = bitdistiller(tmp_path, "loss.gamma_batches=2", "loss.gamma=running")  # the pre-pass: test_fidelity.py
    torch.manual_seed(0)
    logits = [torch.randn(2, 5, 7) * s for s in (1.0, 3.0, 10.0)]
    sums = [top1_probability_sum(t)[0].item() for t in logits]
    student, batch = SimpleNamespace(logits=torch.zeros(2, 5, 7)), {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    out = [method.loss(student, SimpleNamespace(logits=t), batch)["cakld_gamma"].item() for t in logits]
    assert out[0] == pytest.approx(sums[0] / 10, rel=1e-5)  # running mean while measuring
    assert out[1] == pytest.approx((sums[0] + sums[1]) / 20, rel=1e-5)
    assert out[2] == out[1] and method.loss.gamma_fixed  # the third batch no longer moves it
    resumed = bitdistiller(tmp_path, "loss.gamma_batches=2", "loss.gamma=running")
    resumed.load_state_dict(method.state_dict())
    assert resumed.loss.gamma == method.loss.gamma and resumed.loss.gamma_fixed


@pytest.mark.parametrize("loss", ["cakld", "forward_kl", "reverse_kl", "jsd"])
def test_every_loss_trains_the_tiny_student(tmp_path, loss):
    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02): the blocks then matter, so 2-bit weights leave a real gap to close
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    teacher = LlamaForCausalLM(config).eval()
    method = bitdistiller(tmp_path, f"loss={loss}", *(["loss.gamma_batches=2", "loss.gamma=running"] if loss == "cakld" else []))
    student = make_student(teacher, method, "float32")
    method.initialize(student, teacher, batches())
    module = QATModule(teacher, student, method.loss, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    optimizer = module.configure_optimizers()
    batch = batches(1, seed=1)[0]
    losses = []
    for _ in range(25):
        with torch.no_grad():
            teacher_out = teacher(input_ids=batch["input_ids"])
        out = method.loss(student(input_ids=batch["input_ids"]), teacher_out, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert ("cakld_gamma" in out) == (loss == "cakld")


def test_clip_cache_is_written_then_reused_without_searching(tmp_path, tiny_llama_model, monkeypatch):
    teacher = tiny_llama_model
    first = bitdistiller(tmp_path)
    student = make_student(teacher, first, "float32")
    facts = first.initialize(student, teacher, batches())
    report = first.init.report
    assert not report.cached and report.layers == 10 and report.path.exists()
    assert facts["init/clip_layers"] == 10

    def no_search(*args, **kwargs):
        raise AssertionError("the clip search ran although its result was cached")

    monkeypatch.setattr(clip_search, "search_model", no_search)
    second = bitdistiller(tmp_path)
    again = make_student(teacher, second, "float32")
    second.initialize(again, teacher, batches())
    assert second.init.report.cached and second.init.report.path == report.path
    for (name, a), b in zip(student.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name
    assert list((tmp_path / "clip").iterdir()) == [report.path]  # no temp files left behind

    # other calibration data or other quantizer settings: another key
    third = bitdistiller(tmp_path, "method.weight.bits=3")
    with pytest.raises(AssertionError, match="clip search ran"):
        third.initialize(make_student(teacher, third, "float32"), teacher, batches())
    fourth = bitdistiller(tmp_path)
    with pytest.raises(AssertionError, match="clip search ran"):
        fourth.initialize(make_student(teacher, fourth, "float32"), teacher, batches(seed=5))


def test_gradient_checkpointing_option(tmp_path, tiny_llama_model):
    method = bitdistiller(tmp_path, "stages.train.gradient_checkpointing=true")
    student = make_student(tiny_llama_model, method, "float32")
    method.stages[0].prepare(student, method)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in student.modules())


def make_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def test_tiny_bitdistiller_run_end_to_end(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=bitdistiller", "method.weight.group_size=32",
                   f"init.cache_dir={tmp_path}/clip", "loss.gamma_batches=2")
    results = train(cfg)
    assert results["method"] == "bitdistiller" and results["train/steps"] == cfg.trainer.max_steps
    for key in ("test/ppl_teacher", "test/ppl_rtn", "test/ppl_student"):
        assert math.isfinite(results[key]) and results[key] > 1, key
    assert results["init/clip_layers"] == 10 and results["init/clip_cached"] == 0
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/cakld_gamma" in metrics and "train/cakld" in metrics
    assert len(list((tmp_path / "clip").glob("*.safetensors"))) == 1


def test_clip_only_run_skips_training(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=bitdistiller", "method.weight.group_size=32",
                   f"init.cache_dir={tmp_path}/clip", "stages.train.enabled=false")
    results = train(cfg)
    assert "train/steps" not in results and math.isfinite(results["test/ppl_student"])
