import math

import pytest
import torch

from qatlab.losses.divergences import forward_kl, reference_forward_kl


def test_forward_kl_matches_hand_computed_two_token_example():
    # token 1: p_T = softmax([0, ln 3]) = [1/4, 3/4], p_S = [1/2, 1/2]
    # token 2: identical distributions -> 0
    teacher = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])
    student = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    kl_token1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    expected = kl_token1 / 2
    assert forward_kl(student, teacher).item() == pytest.approx(expected, abs=1e-7)


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(2, 5, 11)
    assert forward_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_chunked_equals_unchunked_value_and_gradient(chunk):
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 13)
    student = torch.randn(2, 5, 13, requires_grad=True)
    ref_student = student.detach().clone().requires_grad_(True)
    loss = forward_kl(student, teacher, chunk_size=chunk)
    ref = reference_forward_kl(ref_student, teacher)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-5, atol=1e-7)


def test_mask_drops_padded_tokens():
    torch.manual_seed(0)
    teacher, student = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0]])
    masked = forward_kl(student, teacher, mask)
    assert masked.item() == pytest.approx(reference_forward_kl(student[:, :2], teacher[:, :2]).item(), rel=1e-6)


def test_bf16_logits_are_scored_in_fp32():
    torch.manual_seed(0)
    teacher, student = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    low = forward_kl(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32
    ref = reference_forward_kl(student.bfloat16().float(), teacher.bfloat16().float())
    assert low.item() == pytest.approx(ref.item(), rel=1e-5)


def test_mismatched_vocabularies_say_so():
    with pytest.raises(ValueError, match="share a tokenizer"):
        forward_kl(torch.randn(1, 2, 5), torch.randn(1, 2, 6))


# ---- reverse KL, CAKLD, JSD ---------------------------------------------------------------------

from qatlab.losses.divergences import (  # noqa: E402
    cakld,
    jsd,
    reference_cakld,
    reference_jsd,
    reference_reverse_kl,
    reverse_kl,
    top1_probability_sum,
)

# token 1: p_T = [1/4, 3/4], p_S = [1/2, 1/2]; token 2: identical -> 0 for every divergence
HAND_T = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])
HAND_S = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
FWD_1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(T||S), token 1
REV_1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(S||T), token 1


def test_reverse_kl_matches_hand_computed_example():
    assert reverse_kl(HAND_S, HAND_T).item() == pytest.approx(REV_1 / 2, abs=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.75, 1.0])
def test_cakld_is_the_hand_computed_mix(gamma):
    expected = (gamma * REV_1 + (1 - gamma) * FWD_1) / 2
    assert cakld(HAND_S, HAND_T, gamma=gamma).item() == pytest.approx(expected, abs=1e-7)


def test_jsd_matches_hand_computed_example():
    m = [0.5 * 0.25 + 0.5 * 0.5, 0.5 * 0.75 + 0.5 * 0.5]  # M = [3/8, 5/8]
    to_t = 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    to_s = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    assert jsd(HAND_S, HAND_T).item() == pytest.approx((0.5 * to_t + 0.5 * to_s) / 2, abs=1e-7)


def test_cakld_endpoints_are_forward_and_reverse_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert cakld(student, teacher, gamma=0.0).item() == pytest.approx(forward_kl(student, teacher).item(), rel=1e-6)
    assert cakld(student, teacher, gamma=1.0).item() == pytest.approx(reverse_kl(student, teacher).item(), rel=1e-6)


@pytest.mark.parametrize("loss", [reverse_kl, lambda s, t: cakld(s, t, gamma=0.4), jsd])
def test_divergence_of_identical_distributions_is_zero(loss):
    logits = torch.randn(2, 5, 11)
    assert loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


LOSSES = {
    "reverse_kl": (lambda s, t, m=None, c=1024: reverse_kl(s, t, m, chunk_size=c), reference_reverse_kl),
    "cakld": (lambda s, t, m=None, c=1024: cakld(s, t, m, gamma=0.37, chunk_size=c),
              lambda s, t: reference_cakld(s, t, 0.37)),
    "jsd": (lambda s, t, m=None, c=1024: jsd(s, t, m, chunk_size=c), reference_jsd),
    "jsd_beta": (lambda s, t, m=None, c=1024: jsd(s, t, m, beta=0.2, chunk_size=c),
                 lambda s, t: reference_jsd(s, t, 0.2)),
}


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_new_losses_chunked_equal_unchunked_value_and_gradient(name, chunk):
    chunked, reference = LOSSES[name]
    torch.manual_seed(0)
    teacher = 3 * torch.randn(2, 5, 13)  # peaked distributions exercise the small-probability terms
    student = (3 * torch.randn(2, 5, 13)).requires_grad_(True)
    ref_student = student.detach().clone().requires_grad_(True)
    loss = chunked(student, teacher, None, chunk)
    ref = reference(ref_student, teacher)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_new_losses_mask_drops_padded_tokens(name):
    chunked, reference = LOSSES[name]
    torch.manual_seed(0)
    teacher, student = torch.randn(1, 4, 6), torch.randn(1, 4, 6, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 0]])
    loss = chunked(student, teacher, mask, 1)
    assert loss.item() == pytest.approx(reference(student[:, ::2], teacher[:, ::2]).item(), rel=1e-6)
    loss.backward()
    assert student.grad[0, 1].abs().sum() == 0 and student.grad[0, 3].abs().sum() == 0
    assert student.grad[0, 0].abs().sum() > 0


def test_new_losses_score_bf16_logits_in_fp32():
    torch.manual_seed(0)
    teacher, student = torch.randn(1, 3, 8).bfloat16(), torch.randn(1, 3, 8).bfloat16()
    for name, (chunked, reference) in LOSSES.items():
        value = chunked(student, teacher)
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(reference(student.float(), teacher.float()).item(), rel=1e-5), name


def test_teacher_gets_no_gradient_and_weights_are_checked():
    teacher = torch.randn(1, 2, 5, requires_grad=True)
    cakld(torch.randn(1, 2, 5, requires_grad=True), teacher, gamma=0.5).backward()
    assert teacher.grad is None
    with pytest.raises(ValueError, match=r"gamma=1.5 must lie in \[0, 1\]"):
        cakld(torch.randn(1, 2, 5), teacher, gamma=1.5)


def test_top1_probability_sum_counts_kept_tokens_only():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 0.0]]])  # top-1: 3/4, 1/2, masked
    total, count = top1_probability_sum(logits, torch.tensor([[1, 1, 0]]), chunk_size=1)
    assert count == 2 and total.item() == pytest.approx(0.75 + 0.5, abs=1e-6)
