"""OneBit: the layer, its sign surrogates, SVID, the loss, the packed export, a tiny run end to end."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from qatlab.callbacks.nonfinite_guard import NonFiniteGuard
from qatlab.callbacks.surrogate_schedule import sharpness_at
from qatlab.errors import QatlabError
from qatlab.export import export_packed, load_packed, storage_report
from qatlab.export.packed_onebit import PackedOneBitLinear
from qatlab.losses.divergences import normalized_hidden_mse
from qatlab.recipes import compose_recipe
from qatlab.stages.params import parameter_groups
from qatlab.stages.qat_module import QATModule
from qatlab.inits.nmf import rank1_nmf, rank1_svd, svid
from qatlab.layers.onebit_linear import OneBitLinear, SignSTE, SignTanhGrad
from qatlab.train import make_student, train
from tests.test_train import CONF


def layer_from(weight, bias=None, **options):
    return OneBitLinear(nn.Parameter(torch.tensor(weight)), None if bias is None else nn.Parameter(torch.tensor(bias)),
                        **options)


def onebit_student(teacher, *overrides, calibration=()):
    recipe = compose_recipe("onebit", list(overrides))
    student = make_student(teacher, recipe, "float32")
    recipe.initialize(student, teacher, list(calibration))
    return recipe, student


# ---- the layer -------------------------------------------------------------------------------------


def test_forward_against_a_hand_computed_example():
    # W has a 0: sign(0) = +1, so S = [[1, -1], [-1, 1], [1, 1]]
    layer = layer_from([[0.5, -2.0], [-1.0, 0.0], [3.0, 0.1]], bias=[0.5, -0.5, 0.0], norm_eps=1e-5)
    with torch.no_grad():
        layer.g.copy_(torch.tensor([2.0, 1.0]))
        layer.h.copy_(torch.tensor([1.0, 3.0, 0.5]))
    x = torch.tensor([[1.0, 1.0]])
    # x * g = [2, 1]; (x * g) S^T = [1, -1, 3]; * h = [1, -3, 1.5]
    # LayerNorm: mean -1/6, biased variance ((7/6)^2 + (17/6)^2 + (10/6)^2) / 3 = 73/18
    z = torch.tensor([1.0, -3.0, 1.5])
    expected = (z + 1 / 6) / math.sqrt(73 / 18 + 1e-5) + torch.tensor([0.5, -0.5, 0.0])
    assert torch.allclose(layer(x)[0], expected, atol=1e-6), (layer(x), expected)


def test_affine_norm_and_options():
    layer = layer_from([[1.0, -1.0]], norm_affine=True)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "g", "h", "norm.weight", "norm.bias"]
    with pytest.raises(QatlabError, match=r"quantizer.surrogate='sign' is not known; use one of \['tanh', 'ste'\]"):
        layer_from([[1.0]], surrogate="sign")


def test_tanh_surrogate_gradient_is_the_reference_formula_exactly():
    w = torch.tensor([-2.0, -0.3, 0.0, 0.01, 0.7, 5.0], requires_grad=True)
    out = SignTanhGrad.apply(w, 1.0)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    out.backward(torch.full_like(w, 2.0))
    assert torch.equal(w.grad, 2.0 * (1.001 - torch.tanh(w.detach()) ** 2))
    w.grad = None
    SignTanhGrad.apply(w, 10.0).sum().backward()  # a sharpened surrogate narrows the band
    assert torch.equal(w.grad, 1.001 - torch.tanh(10.0 * w.detach()) ** 2)


def test_ste_surrogate_passes_the_gradient_inside_the_clip():
    w = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.5], requires_grad=True)
    SignSTE.apply(w).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]


@pytest.mark.parametrize("surrogate", ["tanh", "ste"])
def test_gradients_reach_latent_weight_g_and_h(surrogate):
    torch.manual_seed(0)
    layer = OneBitLinear(nn.Parameter(torch.randn(5, 4) * 0.8), nn.Parameter(torch.randn(5)), surrogate=surrogate)
    with torch.no_grad():
        layer.g.uniform_(0.5, 1.5)
        layer.h.uniform_(0.5, 1.5)
    x, r = torch.randn(3, 4), torch.randn(3, 5)
    (layer(x) * r).sum().backward()

    # reference: the same math with S a plain leaf, so dL/dS is the gradient before the surrogate
    s = torch.where(layer.weight >= 0, 1.0, -1.0).requires_grad_(True)
    g, h = layer.g.detach().requires_grad_(True), layer.h.detach().requires_grad_(True)
    y = torch.nn.functional.layer_norm((x * g) @ s.T * h, (5,), eps=layer.norm.eps) + layer.bias.detach()
    (y * r).sum().backward()
    w = layer.weight.detach()
    surrogate_grad = 1.001 - torch.tanh(w) ** 2 if surrogate == "tanh" else (w.abs() <= 1).float()
    assert torch.allclose(layer.weight.grad, s.grad * surrogate_grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.g.grad, g.grad, rtol=1e-5, atol=1e-6) and layer.g.grad.abs().sum() > 0
    assert torch.allclose(layer.h.grad, h.grad, rtol=1e-5, atol=1e-6) and layer.h.grad.abs().sum() > 0
    assert layer.bias.grad is not None


# ---- SVID --------------------------------------------------------------------------------------


def test_rank1_nmf_recovers_an_exactly_rank1_nonnegative_matrix():
    torch.manual_seed(0)
    a, b = torch.rand(30) + 0.1, torch.rand(70) + 0.1
    u, v = rank1_nmf(torch.outer(a, b))
    assert (u >= 0).all() and (v >= 0).all()
    assert torch.allclose(torch.outer(u, v), torch.outer(a, b), rtol=1e-5)
    assert torch.allclose(u.mean(), v.mean())  # the scale is split evenly
    assert torch.allclose(u / u.norm(), a / a.norm(), atol=1e-6)


def test_rank1_nmf_of_a_weight_magnitude_equals_the_rank1_svd_product():
    # for rank 1 the non-negative optimum is the leading singular pair (Perron-Frobenius)
    torch.manual_seed(0)
    m = torch.randn(48, 96).abs()
    nmf, svd = torch.outer(*rank1_nmf(m, iters=200)), torch.outer(*rank1_svd(m))
    assert torch.allclose(nmf, svd, rtol=1e-3, atol=1e-5)
    with pytest.raises(QatlabError, match="non-negative"):
        rank1_nmf(torch.randn(4, 4))


@pytest.mark.parametrize("init", ["svid", "svd"])
def test_svid_init_of_a_layer(tiny_llama_model, init):
    teacher = tiny_llama_model
    method, student = onebit_student(teacher, f"init.method={init}", "init.latent_scale=0.02")
    name = "model.layers.1.mlp.down_proj"
    w0 = teacher.get_submodule(name).weight.detach()  # (64, 128): out 64, in 128
    layer = student.get_submodule(name)
    signs, h, g = svid(w0, init)
    assert layer.h.shape == (64,) and layer.g.shape == (128,)
    assert torch.equal(layer.h, h) and torch.equal(layer.g, g)  # h output side, g input side
    assert torch.equal(layer.weight, torch.where(w0 >= 0, 0.02, -0.02))
    assert torch.equal(layer.signs(), signs)
    a, b = (rank1_nmf if init == "svid" else rank1_svd)(w0.abs())
    assert torch.allclose(torch.outer(layer.h, layer.g), torch.outer(a, b))
    assert len(method.quantized_layers) == 14 and isinstance(student.lm_head, nn.Linear)


# ---- loss ------------------------------------------------------------------------------------------


def test_normalized_hidden_mse_by_hand():
    s = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # (B=1, T=2, C=2)
    t = torch.tensor([[[4.0, 3.0], [0.0, 2.0]]])
    # token 1: (0.6, 0.8) vs (0.8, 0.6) -> 0.08; token 2: (1, 0) vs (0, 1) -> 2
    assert normalized_hidden_mse([s], [t]).item() == pytest.approx(1.04)
    assert normalized_hidden_mse([s, s], [t, t], torch.tensor([[1, 0]])).item() == pytest.approx(0.16)


def test_loss_parts_and_hidden_states_switch():
    torch.manual_seed(0)
    logits = [torch.randn(1, 3, 11) for _ in range(2)]
    hidden = [tuple(torch.randn(1, 3, 4) for _ in range(3)) for _ in range(2)]
    student = SimpleNamespace(logits=logits[0], hidden_states=hidden[0])
    teacher = SimpleNamespace(logits=logits[1], hidden_states=hidden[1])
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
    loss = compose_recipe("onebit", ["loss.hidden_mse=0.5"]).loss
    out = loss(student, teacher, batch)
    assert loss.needs_hidden_states and set(out) == {"loss", "forward_kl", "hidden_mse"}
    assert out["hidden_mse"] == pytest.approx(normalized_hidden_mse(hidden[0][1:], hidden[1][1:]).item())
    # the reference's total: 0.01 x the KL summed over a sequence's 3 tokens (batch mean) + beta x hidden
    assert (loss.scale, loss.reduction) == (0.01, "sequence_sum")
    kl = out["forward_kl"].item() * 3
    assert out["loss"].item() == pytest.approx(0.01 * kl + 0.5 * out["hidden_mse"].item())
    off = compose_recipe("onebit", ["loss.hidden_mse=0"]).loss
    assert not off.needs_hidden_states and set(off(student, teacher, batch)) == {"loss", "forward_kl"}


def test_non_finite_loss_is_caught_by_the_guard(tiny_llama_model):
    """A NaN in OneBit's value vectors gives a non-finite fp32 loss, which NonFiniteGuard flags (the step is
    then skipped and counted; tests/test_guards.py covers the skipping and the stop after N in a row)."""
    method, student = onebit_student(tiny_llama_model)
    with torch.no_grad():
        student.get_submodule("model.layers.0.mlp.up_proj").g.fill_(float("nan"))
    module = QATModule(tiny_llama_model, student, method.loss, optimizer=lambda p: torch.optim.AdamW(p))
    batch = {"input_ids": torch.randint(0, 128, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    loss = module.training_step(batch, 0)
    assert loss.dtype == torch.float32 and not torch.isfinite(loss)
    guard = NonFiniteGuard(max_bad_steps=1)
    guard.on_before_backward(None, module, loss)
    assert not guard._loss_finite


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantizer.surrogate=sigmoid"], r"quantizer.surrogate='sigmoid' is not known"),
        (["loss.hidden_mse=-1.0"], r"loss.hidden_mse=-1.0 must be a finite number >= 0"),
        (["init.method=kmeans"], r"init.method='kmeans' is not known; use one of \['svid', 'svd'\]"),
        (["init.latent_scale=0"], r"init.latent_scale=0 must be > 0"),
        (["method.weight.bits=2"], r"keep method.weight \{bits: 1, symmetric: true\}"),
        (["method.activation={bits: 8}"], r"weight-only \(W1A16\)"),
        (["+method.weight_overrides.q_proj={bits: 2}"], r"keep method.weight \{bits: 1"),
        (["init.norm_init=data"], r"init.norm_init='data' is not known"),
        (["+loss.betta=0.1"], r"loss \(qatlab.losses.ForwardKL\): .*betta"),
        (["init.norm_init=calibrate"], r"set quantizer.norm_affine=true"),
    ],
)
def test_bad_options_are_one_clear_line(tiny_llama_model, overrides, message):
    with pytest.raises(QatlabError, match=message):
        onebit_student(tiny_llama_model, *overrides, calibration=[{"input_ids": torch.randint(0, 128, (1, 8))}])


# ---- packing and export ----------------------------------------------------------------------------


def train_a_little(student, method, steps=3):
    """Move the latent weights far enough that many signs flip, so the export must follow training."""
    optimizer = torch.optim.Adam(parameter_groups(student, "all", None), lr=0.05)
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(steps):
        optimizer.zero_grad()
        student(input_ids=ids).logits.float().pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("model", ["tiny_llama_model", "tiny_gpt2_model"])
def test_export_round_trip_gives_the_students_logits(tmp_path, model, request):
    teacher = request.getfixturevalue(model)
    method, student = onebit_student(teacher, "quantizer.norm_affine=true")
    before = [layer.signs().clone() for layer in student.modules() if isinstance(layer, OneBitLinear)]
    torch.manual_seed(1)
    train_a_little(student, method)
    after = [layer.signs() for layer in student.modules() if isinstance(layer, OneBitLinear)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    student.eval()
    ids = torch.randint(0, 100, (2, 16))
    path = export_packed(student, tmp_path / "export", dtype="float32", method="onebit")
    loaded = load_packed(path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)
        half = load_packed(export_packed(student, tmp_path / "fp16", method="onebit"), dtype="float32")
        assert torch.allclose(half(input_ids=ids).logits, student(input_ids=ids).logits, atol=5e-2)
    manifest = json.loads((path / "qatlab.json").read_text())
    assert sorted(manifest["layers"]) == method.quantized_layers and manifest["method"] == "onebit"
    assert {e["kind"] for e in manifest["layers"].values()} == {"onebit"}
    packed = [layer for layer in loaded.modules() if isinstance(layer, PackedOneBitLinear)]
    assert len(packed) == len(after) and all(layer.qweight.dtype == torch.int32 for layer in packed)
    assert all(torch.equal(layer.signs(), s) for layer, s in zip(packed, after))  # signs 32 per int32 word
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bits_per_weight_of_the_packed_tiny_llama(tmp_path, tiny_llama_model):
    method, student = onebit_student(tiny_llama_model)  # float16 export
    report = storage_report(export_packed(student, tmp_path, method="onebit"))
    unique = {p.data_ptr(): p.numel() for p in tiny_llama_model.parameters()}
    assert report["params"] == sum(unique.values())
    layers = [m for m in student.modules() if isinstance(m, OneBitLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    layer_bytes = sum(4 * m.out_features * math.ceil(m.in_features / 32) + 2 * (m.in_features + m.out_features)
                      for m in layers)
    assert report["bits_per_weight_linear"] == pytest.approx(8 * layer_bytes / weights)
    assert 1.0 < report["bits_per_weight_linear"] < 2.0  # width 64: the vectors still cost half a bit
    assert 1.0 < report["bits_per_weight_all"] < 16.0 and report["compression_vs_bf16"] > 1
    assert method.bits_per_weight(student) == pytest.approx(report["bits_per_weight_linear"])


# ---- end to end ------------------------------------------------------------------------------------


def make_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def test_tiny_onebit_run_end_to_end_with_export(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=onebit", "trainer.max_steps=2", "export=true")
    results = train(cfg)
    assert results["method"] == "onebit" and results["train/steps"] == 2 and results["w_bits"] == 1
    for key in ("test/ppl_teacher", "test/ppl_rtn", "test/ppl_student"):
        assert math.isfinite(results[key]) and results[key] > 1, key
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/forward_kl" in metrics and "train/hidden_mse" in metrics
    assert load_packed(results["export_dir"]) is not None


def test_svid_only_run_skips_training(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=onebit", "stages.train.enabled=false",
                   "eval.rtn_baseline=false")
    results = train(cfg)
    assert "train/steps" not in results and math.isfinite(results["test/ppl_student"])


def test_surrogate_schedule_is_geometric():
    assert sharpness_at(0, 100, 1.0, 100.0) == 1.0
    assert sharpness_at(50, 100, 1.0, 100.0) == pytest.approx(10.0)
    assert sharpness_at(200, 100, 1.0, 100.0) == pytest.approx(100.0)


def test_calibrated_norm_fits_the_teacher_layer_outputs_better(tiny_llama_model):
    teacher = tiny_llama_model
    batches = [{"input_ids": torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    name = "model.layers.0.self_attn.o_proj"
    seen = []
    hook = teacher.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        for batch in batches:
            teacher(**batch)
    hook.remove()

    def error(student):
        layer = student.get_submodule(name)
        with torch.no_grad():
            return sum(((layer(x) - out) ** 2).sum() for x, out in seen).item()

    _, plain = onebit_student(teacher, "quantizer.norm_affine=true")
    method, calibrated = onebit_student(teacher, "quantizer.norm_affine=true", "init.norm_init=calibrate",
                                        calibration=batches)
    assert error(calibrated) < 0.5 * error(plain)  # least squares per feature; (1, 0) was a candidate
    assert method.describe()["norm_init"] == "calibrate"
