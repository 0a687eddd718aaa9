"""Issue 17: the papers' reference code is the default; each test pins the reference's arithmetic, written out
here from its code (not from qatlab's own functions), on cases small enough to check by hand."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qatlab.losses import CAKLD, ForwardKL, ReverseKL
from qatlab.quantizers import QuantConfig, minmax
from qatlab.recipes import compose_recipe

torch.manual_seed(0)


def out(logits):
    return SimpleNamespace(logits=logits)


# ---- loss reductions -----------------------------------------------------------------------------------


def test_sequence_sum_is_bitdistillers_masked_sum_over_the_sequence_then_batch_mean():
    """BitDistiller mytrainer.py ce_loss: kl_div(log_softmax(s), softmax(t), reduction="none").sum(-1) * mask,
    then .sum(-1).mean()."""
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    per_token = F.kl_div(F.log_softmax(s, 2), F.softmax(t, 2), reduction="none").sum(-1) * mask
    reference = per_token.sum(-1).mean()
    loss = ForwardKL(reduction="sequence_sum")(out(s), out(t), {"input_ids": torch.zeros(2, 5, dtype=torch.long),
                                                               "attention_mask": mask})
    torch.testing.assert_close(loss["loss"], reference)
    assert loss["forward_kl"] == pytest.approx((per_token.sum() / mask.sum()).item(), rel=1e-5)  # logged: token mean


def test_sequence_sum_is_llm_qats_batchmean():
    """LLM-QAT kd_trainer.py: F.kl_div(log_softmax(s, 2), softmax(t, 2), reduction="batchmean") over (B, T, V)."""
    s, t = torch.randn(3, 4, 9), torch.randn(3, 4, 9)
    reference = F.kl_div(F.log_softmax(s, 2), F.softmax(t, 2), reduction="batchmean")
    loss = ForwardKL(reduction="sequence_sum")(out(s), out(t), {"input_ids": torch.zeros(3, 4, dtype=torch.long)})
    torch.testing.assert_close(loss["loss"], reference)


def test_reverse_kl_and_onebits_scale():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    reverse = F.kl_div(F.log_softmax(t, 2), F.softmax(s, 2), reduction="none").sum(-1).sum(-1).mean()  # BitDistiller re_loss
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    torch.testing.assert_close(ReverseKL(reduction="sequence_sum", scale=0.01)(out(s), out(t), batch)["loss"],
                               0.01 * reverse)


def test_each_recipe_uses_its_references_reduction():
    assert compose_recipe("bitdistiller").loss.reduction == "sequence_sum"
    assert compose_recipe("llm_qat").loss.reduction == "sequence_sum"
    onebit = compose_recipe("onebit").loss
    assert (onebit.reduction, onebit.scale, onebit.hidden_mse) == ("sequence_sum", 0.01, 1.0)
    assert compose_recipe("kd").loss.reduction == "token_mean"  # qatlab's own generic QAT


# ---- CAKLD's gamma: the reference's pre-pass ------------------------------------------------------------


class FixedTeacher(torch.nn.Module):
    """Returns the logits of the batch it is given (batch i -> logits[i]), like a frozen teacher."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.calls = logits, 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        out_ = SimpleNamespace(logits=self.logits[self.calls])
        self.calls += 1
        return out_


def test_gamma_prepass_is_the_references_loop():
    """BitDistiller train.py: for step, batch in enumerate(loader): if step > S: break; prob += max softmax .mean();
    mean_prob = prob / S. That is S + 1 batches over S, every position counted (padding too)."""
    S = 3
    logits = [torch.randn(2, 4, 6) * k for k in (1, 2, 3, 4, 5, 6)]
    batches = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)} for _ in logits]
    loss = CAKLD(gamma_batches=S, gamma="prepass")
    teacher = FixedTeacher(logits)
    loss.prepare(teacher, batches)
    reference = sum(F.softmax(logits[i], -1).max(-1).values.mean().item() for i in range(S + 1)) / S
    assert teacher.calls == S + 1
    assert loss.gamma == pytest.approx(reference, rel=1e-6) and loss.gamma_fixed
    value = loss(out(torch.randn(2, 4, 6)), out(torch.randn(2, 4, 6)), batches[0])
    assert value["cakld_gamma"].item() == pytest.approx(reference, rel=1e-6)
    restored = CAKLD(gamma_batches=S)
    restored.load_state_dict(loss.state_dict())
    assert restored.gamma == loss.gamma


def test_cakld_is_bitdistillers_mix():
    """mytrainer.py cakld_loss: beta * reverse + (1 - beta) * forward per token, * mask, .sum(-1).mean()."""
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    beta = 0.37
    reverse = F.kl_div(F.log_softmax(t, 2), F.softmax(s, 2), reduction="none").sum(-1)
    forward = F.kl_div(F.log_softmax(s, 2), F.softmax(t, 2), reduction="none").sum(-1)
    reference = (beta * reverse + (1 - beta) * forward).sum(-1).mean()
    loss = CAKLD(gamma_batches=1, reduction="sequence_sum")
    loss._prepass_gamma = beta
    got = loss(out(s), out(t), {"input_ids": torch.zeros(2, 3, dtype=torch.long)})["loss"]
    torch.testing.assert_close(got, reference)


# ---- BitDistiller's quantizer --------------------------------------------------------------------------


def bitdistiller_reference_int2(x, group):
    """SteInt2AsymQuantizer.forward with its Round (sign * floor(|x| + 0.5), identity backward), scales and zeros
    from the group's own min/max (not detached, not widened), clamp to [0, 3]."""
    class Round(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return torch.sign(v) * torch.floor(torch.abs(v) + 0.5)

        @staticmethod
        def backward(ctx, g):
            return g

    w = x.reshape(-1, group)
    max_val, min_val = w.amax(1, keepdim=True), w.amin(1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 3
    zeros = (-torch.round(min_val / scales)).clamp_(0, 3)
    return ((torch.clamp(Round.apply(w / scales) + zeros, 0, 3) - zeros) * scales).reshape(x.shape)


def test_bitdistiller_quantizer_values_and_gradients_match_the_reference():
    recipe = compose_recipe("bitdistiller", ["method.weight.group_size=8"])
    spec = recipe.weight_config
    assert (spec.rounding, spec.widen) == ("half_away", False)
    x = (torch.randn(4, 16) * 0.1 + 0.03).requires_grad_(True)
    q = recipe.quantizer(spec, x.detach())
    assert q.scale_grad
    ref_x = x.detach().clone().requires_grad_(True)
    dy = torch.randn(4, 16)
    q(x).backward(dy)
    reference = bitdistiller_reference_int2(ref_x, 8)
    reference.backward(dy)
    torch.testing.assert_close(q(x).detach(), reference.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)  # incl. the min/max elements' scale terms
    detached = minmax(QuantConfig(bits=2, symmetric=False, group_size=8, rounding="half_away", widen=False), x.detach())
    assert torch.equal(detached(x.detach()), q(x).detach())  # same values; only the gradient differs


def test_half_away_rounding_by_hand():
    c = QuantConfig(bits=4, granularity="channel", rounding="half_away")
    x = torch.tensor([[7.0, 0.5, 1.5, -2.5, -0.5]])  # max 7, qmax 7: scale 1
    assert minmax(c, x)(x).tolist() == [[7.0, 1.0, 2.0, -3.0, -1.0]]
    even = minmax(QuantConfig(bits=4, granularity="channel"), x)(x)
    assert even.tolist() == [[7.0, 0.0, 2.0, -2.0, -0.0]]


# ---- ZeroQuant's quantizer: DeepSpeed's SymQuantizer over num_groups chunks of the flattened weight -------


def test_zeroquant_weight_is_deepspeeds_symquantizer_over_flattened_chunks():
    """deepspeed/compression/utils.py SymQuantizer.forward: input.reshape(num_groups, -1); scale = 2 max|x| / 2^b;
    round, clamp(-2^(b-1), 2^(b-1) - 1), times scale; backward: the gradient unchanged."""
    recipe = compose_recipe("zeroquant")
    spec = recipe.weight_config
    assert (spec.granularity, spec.num_groups, spec.range, spec.ste) == ("chunks", 64, "full", "identity")
    w = torch.randn(128, 96, requires_grad=True)  # 64 chunks of 192 weights = 2 rows each
    chunks = w.detach().reshape(64, -1)
    scale = 2 * chunks.abs().amax(-1, keepdim=True) / 2**4
    reference = (torch.round(chunks / scale).clamp(-8, 7) * scale).reshape(w.shape)
    q = recipe.quantizer(spec, w.detach())
    torch.testing.assert_close(q(w).detach(), reference, rtol=0, atol=0)
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # identity STE: the clipped +max keeps its gradient
    qw = q.encode(w.detach())
    assert qw.scale.shape == (1, 64) and qw.group_size == 192


def test_zeroquant_lkd_uses_the_teachers_hidden_states_and_adamw():
    stage = compose_recipe("zeroquant").stages[0].config
    assert (stage.student_input, stage.target_input) == ("teacher", "teacher")
    assert (stage.optimizer, stage.weight_decay, stage.schedule, stage.steps) == ("adamw", 0.01, "constant", 100)


def test_llm_qat_and_paretoq_recipes_keep_their_references_grids():
    llm = compose_recipe("llm_qat")
    assert llm.weight_config.range == "restricted" and llm.weight_config.grad_clip == 2.0
    assert compose_recipe("paretoq").quantizer.keywords["grad_scale"] == "layer"  # N = the whole matrix
