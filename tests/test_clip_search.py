"""Asymmetric clipping search: the Gram-matrix error, a planted outlier, the block walker."""

import torch

from qatlab.quantizers import QuantConfig, fake_quantize
from qatlab.inits.clip_search import (
    ClipConfig,
    GramHook,
    apply_clip,
    clip_targets,
    quantize_clamped,
    search_layer_clip,
    search_model,
    _calibration,
)
from qatlab.train import make_student
from qatlab.recipes import compose_recipe

W2 = QuantConfig(bits=2, symmetric=False, granularity="group", group_size=32)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Summed over output rows: mean over tokens of the squared output change, (N, in) x (out, in)."""
    return ((x @ (w_hat - w).T) ** 2).mean(0).sum().item()


def gram_of(x: torch.Tensor, group: int) -> torch.Tensor:
    hook = GramHook(x.shape[-1], group, x.device)
    hook(None, (x,), None)
    return hook.gram()


def planted_layer():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.02
    w[3, 5] = 0.5  # one outlier stretches the range of row 3, group 0
    x = torch.randn(512, 64)
    return w, x


def test_group_error_is_the_groups_share_of_the_output_error():
    w, x = planted_layer()
    result = search_layer_clip(w, gram_of(x, 32), W2, torch.tensor([1.0]))  # only MinMax
    minmax = fake_quantize(w, W2)
    # per group: mean_n (x_g . d_g)^2, summed over rows and groups
    xg, dg = x.view(512, 2, 32), (minmax - w).view(16, 2, 32)
    direct = (torch.einsum("ngk,rgk->nrg", xg, dg) ** 2).mean(0).sum().item()
    assert abs(result.error_minmax - direct) < 1e-5 * direct
    assert torch.equal(result.hi, w.view(16, 2, 32).amax(-1)) and torch.equal(result.lo, w.view(16, 2, 32).amin(-1))


def test_planted_outlier_gets_clipped_and_the_output_error_drops():
    w, x = planted_layer()
    result = search_layer_clip(w, gram_of(x, 32), W2, ClipConfig().ratios())
    assert result.hi[3, 0] < 0.5  # the outlier's group shrinks its max
    assert result.error < 0.9 * result.error_minmax
    clipped = w.clone()
    apply_clip(clipped, result.lo, result.hi)
    assert clipped[3, 5] == result.hi[3, 0] and clipped.amax() < 0.5
    assert output_error(x, w, fake_quantize(clipped, W2)) < output_error(x, w, fake_quantize(w, W2))


def test_no_group_gets_worse_than_minmax():
    torch.manual_seed(1)
    w, x = torch.randn(8, 64), torch.randn(256, 64) * torch.linspace(0.1, 3, 64)  # uneven channel scales
    result = search_layer_clip(w, gram_of(x, 32), W2, ClipConfig().ratios())
    assert result.error <= result.error_minmax
    clipped = w.clone()
    apply_clip(clipped, result.lo, result.hi)
    assert output_error(x, w, fake_quantize(clipped, W2)) <= output_error(x, w, fake_quantize(w, W2)) * 1.0001


def test_quantize_clamped_is_bit_identical_to_clamp_then_fake_quantize():
    torch.manual_seed(0)
    w = torch.randn(9, 3, 16)
    w[1, 1] = w[1, 1].abs() + 0.5  # an all-positive group: clamp bounds can cross
    r = ClipConfig().ratios()
    r_hi, r_lo = (t.reshape(-1, 1, 1, 1) for t in torch.meshgrid(r, r, indexing="ij"))
    hi, lo = w.amax(-1, keepdim=True) * r_hi, w.amin(-1, keepdim=True) * r_lo
    for cfg in (QuantConfig(bits=2, symmetric=False, group_size=16), QuantConfig(bits=3, group_size=16),
                QuantConfig(bits=3, symmetric=False, group_size=16, grid="nf")):
        expected = fake_quantize(torch.minimum(torch.maximum(w, lo), hi), cfg)
        assert torch.equal(quantize_clamped(w, lo, hi, cfg), expected), cfg.describe()


def test_block_walker_sees_the_same_inputs_as_a_full_forward(tiny_llama_model):
    teacher = tiny_llama_model
    method = compose_recipe("bitdistiller", ["method.weight.group_size=32"])
    student = make_student(teacher, method, "float32")
    layers = {n: student.get_submodule(n) for n in method.quantized_layers}
    targets = clip_targets(layers, skip_qk=True)
    assert len(targets) == 10 and not any(n.endswith(("q_proj", "k_proj")) for n in targets)
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: those positions must not count
    batches = [{"input_ids": ids, "attention_mask": mask}]

    # reference: hooks on a plain teacher forward, Gram over the unmasked positions
    name = "model.layers.1.mlp.down_proj"
    seen = {}
    handle = teacher.get_submodule(name).register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
    handle.remove()
    x = seen["x"][mask.bool()]  # (20, 128)
    expected = search_layer_clip(layers[name].weight.detach().clone(), gram_of(x, 32), layers[name].weight_cfg,
                                 ClipConfig().ratios())

    results, ratio = search_model(teacher, targets, _calibration(batches, None), ClipConfig().ratios(),
                                  torch.device("cpu"))
    assert set(results) == set(targets) and ratio <= 1
    torch.testing.assert_close(results[name].hi, expected.hi)
    torch.testing.assert_close(results[name].lo, expected.lo)
    weight = student.get_submodule(name).weight
    assert torch.all(weight.view(-1, 4, 32).amax(-1) <= results[name].hi + 1e-7)  # the student got clamped
    assert teacher.get_submodule(name).weight.abs().max() > weight.abs().max() or ratio == 1


def test_calibration_takes_whole_sequences_up_to_the_token_budget():
    batches = [{"input_ids": torch.zeros(4, 10, dtype=torch.long)} for _ in range(3)]
    assert len(_calibration(batches, 25)) == 3  # 10 + 10 + 10 >= 25
    assert len(_calibration(batches, None)) == 12


def test_unknown_clip_key_is_one_clear_line():
    import pytest

    from qatlab.errors import QatlabError

    with pytest.raises(QatlabError, match=r"init \(clip\): unknown key\(s\) \['girds'\]; valid keys are .*'grid'"):
        ClipConfig.from_dict({"girds": 5})
    with pytest.raises(QatlabError, match=r"init.max_shrink=1.2 must lie in \[0, 1\)"):
        ClipConfig.from_dict({"max_shrink": 1.2})

