"""GPTQ: beats RTN on correlated inputs, equals RTN without correlations, idempotent grid, end to end."""

import math

import pytest
import torch

from qatlab.errors import QatlabError
from qatlab.recipes import compose_recipe
from qatlab.quantizers import QuantConfig, fake_quantize
from qatlab.inits.clip_search import calibration_sequences
from qatlab.inits.gptq_solver import GPTQConfig, SinkAwareGram, gptq_model, gptq_quantize, output_error, with_sink
from qatlab.quantizers.primitives import quantize
from qatlab.train import make_student, train
from tests.test_train import make_cfg

W4_G32 = QuantConfig(bits=4, symmetric=False, group_size=32)
CONFIGS = [
    W4_G32,
    QuantConfig(bits=3, symmetric=True, group_size=32),
    QuantConfig(bits=2, symmetric=False, granularity="channel"),
    QuantConfig(bits=3, symmetric=False, group_size=32, grid="nf"),
    QuantConfig(bits=1, symmetric=True, group_size=32),
]


def correlated_layer(seed=0, out=32, width=128, n=2048):
    """W (out, in) and the Hessian of inputs that live near a 16-dim subspace (as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g) * 0.05
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, width, generator=g) + 0.1 * torch.randn(n, width, generator=g)
    return w, x.T @ x / n


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(cfg, act_order):
    w, h = correlated_layer()
    q = gptq_quantize(w, h, cfg, act_order=act_order)
    rtn = output_error(w, fake_quantize(w, cfg), h)
    assert output_error(w, q, h) < 0.5 * rtn  # measured: 0.05-0.25 x RTN


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_identity_hessian_reduces_to_rtn_exactly(cfg):
    # H = I: the inverse Hessian is diagonal, so no error is fed to other columns and every
    # group's MinMax scale is the one RTN computes: GPTQ and RTN agree bit for bit.
    w, _ = correlated_layer()
    assert torch.equal(gptq_quantize(w, torch.eye(w.shape[1]), cfg), fake_quantize(w, cfg))


def test_uncorrelated_inputs_stay_close_to_rtn():
    # Sampled white inputs: the Hessian is only near-identity, so a little feedback remains (it
    # also nudges the group scales): nearly every value stays within half a step of RTN's, and
    # the output error is RTN's (measured: 99 % of values, error x0.997).
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=g) * 0.05
    x = torch.randn(20000, 128, generator=g)
    h = x.T @ x / len(x)
    q, rtn = gptq_quantize(w, h, W4_G32), fake_quantize(w, W4_G32)
    _, scale, _ = quantize(w, W4_G32)  # (32 * 4, 1): RTN's step per group
    steps = (q - rtn).abs().view(-1, 32) / scale
    assert (steps < 0.5).float().mean() > 0.97 and steps.max() < 1.5
    assert 0.95 * output_error(w, rtn, h) <= output_error(w, q, h) <= 1.01 * output_error(w, rtn, h)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_quantized_weights_are_a_fixed_point_of_the_students_fake_quant(cfg, act_order):
    # The student recomputes MinMax qparams from its latent weight: the same codes must come back
    # and the values may move by float rounding of the scale only.
    w, h = correlated_layer(seed=2)
    q = gptq_quantize(w, h, cfg, act_order=act_order)
    codes, scale, zero = quantize(q, cfg)
    again, _, _ = quantize(fake_quantize(q, cfg), cfg)
    assert torch.equal(codes, again)
    torch.testing.assert_close(fake_quantize(q, cfg), q, rtol=0, atol=1e-6 * q.abs().max().item())


def test_every_group_has_its_own_scale_on_the_rtn_grid():
    # Groups of 32 whose magnitudes differ 100x keep scales of their own (a small group's scale
    # may grow: error fed over from a large neighbour widens its range; measured up to x4.4),
    # and each (row, group) holds at most 2^4 distinct values.
    w, h = correlated_layer(seed=3)
    w = w * torch.tensor([1.0, 10.0, 0.1, 3.0]).repeat_interleave(32)
    q = gptq_quantize(w, h, W4_G32)
    _, scale_q, _ = quantize(q, W4_G32)  # (32 * 4, 1)
    _, scale_w, _ = quantize(w, W4_G32)
    by_group_q, by_group_w = scale_q.view(32, 4), scale_w.view(32, 4)
    assert torch.all(by_group_q[:, 1] > 10 * by_group_q[:, 2])  # the 10x group vs the 0.1x group
    assert torch.allclose(by_group_q[:, 0], by_group_w[:, 0])  # the first group sees no feedback yet
    assert max(row.unique().numel() for row in q.view(-1, 32)) <= 16


def test_ragged_or_tensor_granularity_is_one_clear_error():
    w, h = correlated_layer()
    with pytest.raises(QatlabError, match="not supported by GPTQ"):
        gptq_quantize(w, h, QuantConfig(bits=4, granularity="tensor"))
    with pytest.raises(QatlabError, match="percdamp"):
        GPTQConfig(percdamp=-1)


def test_dead_inputs_are_zeroed_and_the_rest_is_finite():
    w, h = correlated_layer()
    h[5, :] = 0
    h[:, 5] = 0  # input 5 never fires in the calibration data
    q = gptq_quantize(w, h, W4_G32, act_order=True)
    assert torch.isfinite(q).all()
    assert torch.all(q[:, 5].abs() <= fake_quantize(w, W4_G32).abs().max())


def test_model_walk_beats_rtn_and_students_compute_gptq_weights(tiny_llama_model):
    teacher = tiny_llama_model
    w3 = ["method.weight.bits=3", "method.weight.symmetric=false", "method.weight.group_size=32"]
    method = compose_recipe("gptq", w3)
    student = make_student(teacher, method, "float32")
    rtn_student = make_student(teacher, compose_recipe("rtn", w3), "float32")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 32), generator=g)} for _ in range(4)]
    layers = {n: student.get_submodule(n) for n in method.quantized_layers}
    report = gptq_model(student, layers, calibration_sequences(batches, None), GPTQConfig(act_order=True))
    assert report.layers == 14 and report.error_ratio < 1 and report.idempotence < 1e-6
    ids = torch.randint(0, 128, (2, 32), generator=g)
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
        err_gptq = (student(input_ids=ids).logits - ref).pow(2).mean()
        err_rtn = (rtn_student(input_ids=ids).logits - ref).pow(2).mean()
    assert err_gptq < err_rtn


def test_tiny_gptq_run_end_to_end(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=gptq", "method.weight.group_size=32",
                   "init.act_order=true", "logger=none")
    results = train(cfg)
    assert results["method"] == "gptq" and "train/steps" not in results
    for key in ("test/ppl_teacher", "test/ppl_rtn", "test/ppl_student"):
        assert math.isfinite(results[key]) and results[key] > 1, key
    assert results["init/gptq_error_ratio"] < 1


# ---- sink_share: protect the first token's input directions (a qatlab extension) -----------------


def test_with_sink_gives_the_first_tokens_their_share_of_the_trace():
    torch.manual_seed(0)
    a, b = torch.randn(50, 6), torch.randn(3, 6) * 10
    H, H0 = a.T @ a / 50, b.T @ b / 3
    mixed = with_sink(H, H0, 0.25)
    added = mixed - H
    assert torch.allclose(added.trace() / mixed.trace(), torch.tensor(0.25))
    assert torch.allclose(added / added.trace(), H0 / H0.trace())
    assert torch.equal(with_sink(H, H0, 0.0), H)


def test_first_token_gram_sees_only_each_sequences_first_kept_token():
    hook = SinkAwareGram(3, 3, torch.device("cpu"))
    x = torch.tensor([[[9.0, 9, 9], [1, 2, 3], [4, 5, 6]]])  # (1, T=3, in=3); position 0 is padding
    hook.keep = torch.tensor([False, True, True])
    hook(None, (x,), None)
    first, kept = torch.tensor([1.0, 2, 3]), x[0, 1:]
    assert hook.first.count == 1 and torch.allclose(hook.first.gram()[0], first[:, None] * first[None, :])
    assert hook.count == 2 and torch.allclose(hook.gram()[0], kept.T @ kept / 2)


def test_sink_share_is_validated():
    with pytest.raises(QatlabError, match=r"init.sink_share=1.0 must lie in \[0, 1\)"):
        GPTQConfig(sink_share=1.0)


def test_sink_share_lowers_the_first_token_error_in_a_model_walk(tiny_llama_model):
    """With the first tokens' Gram mixed in, the quantized layers' error on first-token inputs drops."""
    weight = ["method.weight.bits=3", "method.weight.symmetric=false", "method.weight.group_size=32"]
    g = torch.Generator().manual_seed(0)
    sequences = calibration_sequences([{"input_ids": torch.randint(0, 128, (8, 32), generator=g)}], None)
    errors = {}
    for share in (0.0, 0.5):
        method = compose_recipe("gptq", weight)
        student = make_student(tiny_llama_model, method, "float32")
        layers = {n: student.get_submodule(n) for n in method.quantized_layers}
        first_inputs = {}

        def keep_first(name):
            def hook(module, args, output):
                first_inputs[name] = args[0][:, 0].float()  # (sequences, in)
            return hook

        handles = [tiny_llama_model.get_submodule(n).register_forward_hook(keep_first(n)) for n in layers]
        with torch.no_grad():
            tiny_llama_model(input_ids=torch.cat([ids for ids, _ in sequences]))
        for h in handles:
            h.remove()
        gptq_model(student, layers, sequences, GPTQConfig(sink_share=share))
        errors[share] = sum(
            (first_inputs[n] @ (layers[n].weight - tiny_llama_model.get_submodule(n).weight).T).pow(2).sum().item()
            for n in layers)
    assert errors[0.5] < errors[0.0]
