"""ZeroQuant: quantizers against hand-written references, mixed precision by pattern, LKD, calibration data."""

import math
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import qatlab.train as train_module
from qatlab.data.random_tokens import random_token_batches
from qatlab.errors import QatlabError
from qatlab.recipes import Recipe, compose_recipe
from qatlab.stages.blockwise import BlockwiseConfig, calibration_batches, run_blockwise
from qatlab.models.layer_maps import decoder_blocks
from qatlab.quantizers import fake_quantize
from qatlab.layers import FakeQuantLinear
from qatlab.train import evaluate_rtn, make_student, train
from tests.test_train import make_cfg

W4_G32 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32}
ATTN_W8 = {"self_attn": {"bits": 8}}
A8 = {"bits": 8, "symmetric": True, "granularity": "token"}


# qatlab's per-row groups with the restricted grid (the reference's flattened chunks: tests/test_fidelity.py)
PER_ROW_GROUPS = ["method.weight.granularity=group", "+method.weight.group_size=32", "method.weight.range=restricted"]


def zeroquant(*overrides):
    """The zeroquant recipe from conf/ with per-row groups of 32 (the tiny model's width is 64)."""
    return compose_recipe("zeroquant", [*PER_ROW_GROUPS, *overrides])


# ---- hand-written reference quantizers ------------------------------------------------------------


def ref_token_int8(x):
    """Per token vector v: s = max|v| / 127, codes clamp(round(v / s), -127, 127), back to codes * s."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for t, v in enumerate(rows):
        s = (v.abs().max() / 127).clamp_min(1e-8)
        out[t] = torch.clamp(torch.round(v / s), -127, 127) * s
    return out.reshape(x.shape)


def ref_group(w, bits, group, symmetric):
    """Per row, per `group` consecutive inputs: MinMax symmetric (restricted range) or asymmetric with zero point."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[r, start : start + group]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = (g.abs().max() / qmax).clamp_min(1e-8)
                out[r, start : start + group] = torch.clamp(torch.round(g / s), -qmax, qmax) * s
            else:
                qmax = 2**bits - 1
                lo, hi = g.min().clamp_max(0), g.max().clamp_min(0)
                s = ((hi - lo) / qmax).clamp_min(1e-8)
                z = torch.round(-lo / s).clamp(0, qmax)
                out[r, start : start + group] = (torch.clamp(torch.round(g / s) + z, 0, qmax) - z) * s
    return out


def test_token_wise_int8_activation_quantizer_matches_reference():
    method = compose_recipe("zeroquant")
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 64)
    assert torch.equal(fake_quantize(x, method.act_config), ref_token_int8(x))
    # A hand-checkable token: max|v| = 127 gives s = 1, so codes are just round(v) (halves to even).
    v = torch.tensor([[127.0, -0.5, 1.5, -2.4, 3.6]])
    assert fake_quantize(v, method.act_config).tolist() == [[127.0, -0.0, 2.0, -2.0, 4.0]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_wise_weight_quantizer_matches_reference(symmetric):
    method = zeroquant(f"method.weight.symmetric={str(symmetric).lower()}")
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fake_quantize(w, method.weight_config), ref_group(w, 4, 32, symmetric))


def test_fake_quant_linear_computes_the_reference_w4a8():
    method = zeroquant()
    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(64, 16)
    layer = FakeQuantLinear.from_linear(linear, method.weight_config, method.act_config)
    x = torch.randn(3, 7, 64, generator=g)
    expected = F.linear(ref_token_int8(x), ref_group(linear.weight.detach(), 4, 32, True), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


# ---- mixed precision by layer pattern --------------------------------------------------------------


def bits_by_layer(student):
    return {n: (m.weight_cfg.bits if m.weight_cfg else 16) for n, m in student.named_modules()
            if isinstance(m, FakeQuantLinear)}


@pytest.mark.parametrize("name", ["zeroquant", "kd", "rtn"])
def test_weight_overrides_give_attention_8_bits_and_the_mlp_4(tiny_llama_model, name):
    method = Recipe(name, weight=W4_G32, weight_overrides=ATTN_W8)
    student = make_student(tiny_llama_model, method, "float32")
    bits = bits_by_layer(student)
    assert len(bits) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for layer, b in bits.items():
        assert b == (8 if ".self_attn." in layer else 4), layer
    q = student.get_submodule("model.layers.0.self_attn.q_proj").weight_cfg
    assert (q.group_size, q.symmetric) == (32, True)  # only the overridden key changes
    assert method.describe()["w_bits_label"] == "4/8"
    assert "w_bits_label" not in Recipe(name, weight=W4_G32).describe()  # unchanged without overrides


def test_first_matching_pattern_wins_and_null_means_full_precision(tiny_llama_model):
    overrides = {r"layers\.0\.mlp": None, "mlp": {"bits": 2, "symmetric": False}}
    method = Recipe("rtn", weight=W4_G32, weight_overrides=overrides)
    student = make_student(tiny_llama_model, method, "float32")
    bits = bits_by_layer(student)
    assert bits["model.layers.0.mlp.up_proj"] == 16 and bits["model.layers.1.mlp.up_proj"] == 2
    assert bits["model.layers.1.self_attn.v_proj"] == 4
    assert student.get_submodule("model.layers.1.mlp.down_proj").weight_cfg.symmetric is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"self_attn": {"bits": 9}}, r"weight_overrides\['self_attn'\].bits=9 is out of range"),
        ({"self_attn": {"bits": 16}}, r"weight_overrides\['self_attn'\].bits=16 is out of range; use 1-8 .*null"),
        ({"self_attn": {"bits": 99}}, r"weight_overrides\['self_attn'\].bits=99 is out of range"),
        ({"self_attn": {"bitz": 8}}, r"weight_overrides\['self_attn'\]: unknown key\(s\) \['bitz'\]"),
        ({"self_attn": 8}, r"must be a regex string mapped to weight keys \(e.g. \{self_attn: \{bits: 8\}\}\), or to null"),
        ({"self_attn": {"group_size": 0}}, r"weight_overrides\['self_attn'\].group_size=0 must be a positive"),
    ],
)
def test_bad_overrides_fail_at_construction(overrides, message):
    with pytest.raises(QatlabError, match=message):
        Recipe("zeroquant", weight=W4_G32, weight_overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"self_atn": {"bits": 8}}, r"pattern 'self_atn' matches none of the 14 quantized layers \(e.g. \['model"),
        ({"self_attn(": {"bits": 8}}, r"weight_overrides pattern 'self_attn\(' is not a valid regex"),
        ({"proj": {"bits": 8}, "q_proj": {"bits": 2}}, r"'q_proj' only matches layers an earlier pattern"),
        ({"mlp": {"group_size": 48}}, r"group_size=48 does not divide the input width 64 of layer 'model.layers.0.mlp"),
    ],
)
def test_bad_overrides_fail_at_convert_and_leave_the_model_untouched(tiny_llama_model, overrides, message):
    method = Recipe("zeroquant", weight=W4_G32, weight_overrides=overrides)
    with pytest.raises(QatlabError, match=message):
        method.convert(tiny_llama_model)
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_llama_model.modules())


def test_rtn_baseline_carries_the_overrides(tiny_llama_model, monkeypatch):
    seen = {}

    def fake_evaluate(model, *args):
        seen["bits"] = bits_by_layer(model)
        return 1.0

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    method = zeroquant()
    evaluate_rtn(tiny_llama_model, method, None, OmegaConf.create({"model": {"student_dtype": "float32"}}))
    assert sorted(set(seen["bits"].values())) == [4, 8]
    assert seen["bits"]["model.layers.1.self_attn.o_proj"] == 8


# ---- LKD ----------------------------------------------------------------------------------------


def one_block_at_a_time_adam(student, lr):
    """An Adam factory whose step() records: live optimizers, which block owns its params, stray grads."""
    live = weakref.WeakSet()
    block_params = [{id(p) for p in b.parameters()} for b in decoder_blocks(student)]
    record = []

    class CheckedAdam(torch.optim.Adam):
        def step(self, closure=None):
            mine = {id(p) for group in self.param_groups for p in group["params"]}
            with_grad = {id(p) for p in student.parameters() if p.grad is not None}
            with_state = sum(len(opt.state) for opt in live)
            owner = [k for k, ids in enumerate(block_params) if mine <= ids]
            record.append({"live": len(live), "owner": owner, "stray_grads": len(with_grad - mine),
                           "state_ok": with_state <= len(mine)})
            return super().step(closure)

    def factory(params):
        opt = CheckedAdam(params, lr=lr)
        live.add(opt)
        return opt

    return factory, record


def tiny_student(teacher):
    method = zeroquant()
    return method, make_student(teacher, method, "float32")


@pytest.mark.parametrize("inputs", [("student", "student"), ("teacher", "teacher"), ("student", "teacher")],
                         ids=lambda i: f"student_input={i[0]},target_input={i[1]}")
def test_blockwise_lowers_every_blocks_mse_with_one_optimizer_alive_at_a_time(tiny_llama_model, inputs):
    method, student = tiny_student(tiny_llama_model)
    config = BlockwiseConfig(steps=25, lr=3e-5, student_input=inputs[0], target_input=inputs[1], accelerator="cpu")
    factory, record = one_block_at_a_time_adam(student, config.lr)
    batches = random_token_batches(128, samples=6, seq_len=32, batch_size=2, seed=0)
    result = run_blockwise(student, tiny_llama_model, batches, config, optimizer=factory)

    blocks = result["per_block"]
    assert [b["block"] for b in blocks] == [0, 1] and result["steps"] == 50
    for b in blocks:
        assert b["mse_after"] < 0.8 * b["mse_before"], b
    assert len(record) == 50
    assert all(r["live"] == 1 and r["stray_grads"] == 0 and r["state_ok"] for r in record), record
    assert [r["owner"] for r in record] == [[0]] * 25 + [[1]] * 25
    assert all(p.grad is None for p in student.parameters())
    assert not any(p.requires_grad for b in decoder_blocks(student) for p in b.parameters())  # frozen


def test_blockwise_trains_only_the_chosen_parameters(tiny_llama_model):
    method, student = tiny_student(tiny_llama_model)
    norms = {n: p.detach().clone() for n, p in student.named_parameters() if "norm" in n}
    weights = {n: p.detach().clone() for n, p in student.named_parameters() if "proj" in n}
    run_blockwise(student, tiny_llama_model, random_token_batches(128, 2, 16, 2),
                  BlockwiseConfig(steps=3, lr=1e-3, train="weights"))
    assert all(torch.equal(p, norms[n]) for n, p in student.named_parameters() if n in norms)
    assert any(not torch.equal(p, weights[n]) for n, p in student.named_parameters() if n in weights)


def test_blockwise_options_are_checked():
    with pytest.raises(QatlabError, match=r"stages.lkd.data='wiki' is not known; use one of \['corpus', 'random'\]"):
        zeroquant("stages.lkd.data=wiki")
    with pytest.raises(QatlabError, match=r"stages.lkd: unknown key\(s\) \['step'\]"):
        zeroquant("+stages.lkd.step=10")
    with pytest.raises(QatlabError, match=r"stages.lkd.steps=0 must be a positive integer"):
        zeroquant("stages.lkd.steps=0")
    with pytest.raises(QatlabError, match=r"stages.lkd.precision='bf16-true' is not supported"):
        zeroquant("stages.lkd.precision=bf16-true")
    with pytest.raises(QatlabError, match=r"student_input=teacher with target_input=student"):
        zeroquant("stages.lkd.target_input=student")  # the default student_input is teacher
    with pytest.raises(QatlabError, match=r"stages.lkd.lr=inf must be a finite number > 0"):
        zeroquant("stages.lkd.lr=inf")
    assert zeroquant("stages.lkd.enabled=false").trains is False


# ---- calibration data ------------------------------------------------------------------------------


def test_random_tokens_are_uniform_seeded_and_batched():
    a = random_token_batches(vocab_size=50, samples=5, seq_len=400, batch_size=2, seed=3)
    b = random_token_batches(vocab_size=50, samples=5, seq_len=400, batch_size=2, seed=3)
    assert [x["input_ids"].shape for x in a] == [(2, 400), (2, 400), (1, 400)]
    ids = torch.cat([x["input_ids"] for x in a])
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert ids.min() >= 0 and ids.max() < 50 and len(ids.unique()) == 50  # 2000 draws cover all 50 ids
    assert not torch.equal(ids, torch.cat([x["input_ids"] for x in random_token_batches(50, 5, 400, 2, seed=4)]))
    assert all(bool(x["attention_mask"].all()) for x in a)


def test_corpus_calibration_takes_the_first_training_sequences_and_rebatches():
    loader = [{"input_ids": torch.arange(i * 30, i * 30 + 30).reshape(3, 10),
               "attention_mask": torch.ones(3, 10, dtype=torch.long)} for i in range(4)]
    datamodule = SimpleNamespace(train_dataloader=lambda: iter(loader))
    batches = calibration_batches(BlockwiseConfig(samples=5, batch_size=2), datamodule, vocab_size=1000)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.arange(50).reshape(5, 10))
    with pytest.raises(QatlabError, match=r"stages.lkd.samples=20 but the training data holds only 12"):
        calibration_batches(BlockwiseConfig(samples=20), datamodule, vocab_size=1000, key="stages.lkd")


def test_random_token_lkd_through_the_stage(tiny_llama_model, tmp_path):
    from qatlab.stages import StageContext

    method = zeroquant("stages.lkd.data=random", "stages.lkd.samples=4", "stages.lkd.seq_len=24",
                       "stages.lkd.steps=10", "stages.lkd.lr=3e-5")
    student = make_student(tiny_llama_model, method, "float32")
    ctx = StageContext(cfg=None, recipe=method, student=student, teacher=tiny_llama_model, tokenizer=None,
                       datamodule=None, trainer=None, output_dir=tmp_path)  # random data needs no corpus
    result = method.stages[0].run(ctx)
    assert result["lkd/mse_after"] < result["lkd/mse_before"]
    assert (tmp_path / "lkd" / "progress.json").is_file()


# ---- end to end ------------------------------------------------------------------------------------


def test_tiny_zeroquant_run_end_to_end(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=zeroquant_smollm2", "model=tiny_llama", "logger=csv", "callbacks=none",
                   "data.block_size=64", "data.eval_block_size=128", "data.max_train_blocks=64",
                   "data.max_eval_blocks=2", "data.max_test_blocks=4", "stages.lkd.samples=4",
                   "stages.lkd.steps=3")
    results = train(cfg)
    assert results["method"] == "zeroquant" and results["w_bits_label"] == "4/8" and results["a_bits"] == 8
    assert results["lkd/steps"] == 6 and len(results["lkd/per_block"]) == 2
    for key in ("test/ppl_teacher", "test/ppl_rtn", "test/ppl_student", "lkd/mse_after"):
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert "train/steps" not in results  # no whole-model fit
    assert "lkd/mse_after" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
