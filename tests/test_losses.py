import math

import pytest
import torch

from qatlab.losses import forward_kl, reference_forward_kl


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
