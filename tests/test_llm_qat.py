"""LLM-QAT: per-token activation and KV quantizers where its reference puts them, the ±2 gradient rule, a tiny run."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qatlab.recipes import compose_recipe
from qatlab.stages.params import parameter_groups
from qatlab.quantizers import QuantConfig, fake_quantize
from qatlab.layers.kv import KVPlacement, enable_kv_quant, set_kv_quant_enabled
import pytest
from qatlab.train import make_student


def test_per_token_activation_quantizer_hand_computed():
    # Two tokens, 8-bit symmetric: scale = max|x| / 127 per token (row).
    x = torch.tensor([[1.27, -0.5, 0.0], [0.0, 2.54, -1.0]])
    cfg = QuantConfig(bits=8, granularity="token", name="activation")
    # token 1: s = 0.01 -> codes [127, -50, 0]; token 2: s = 0.02 -> codes [0, 127, -50]
    expected = torch.tensor([[127 * 0.01, -50 * 0.01, 0.0], [0.0, 127 * 0.02, -50 * 0.02]])
    torch.testing.assert_close(fake_quantize(x, cfg), expected, rtol=0, atol=1e-7)


def test_kv_quantizer_scales_per_token_and_head():
    # (B=1, H=2, S=2, D=2) 2-bit symmetric: qmax = 1, so every value becomes sign * max|row|
    # or 0 when |x| < max/2.
    k = torch.tensor([[[[4.0, 1.0], [0.5, -0.2]], [[-3.0, 2.0], [0.1, 0.0]]]])
    cfg = QuantConfig(bits=2, granularity="token", name="kv")
    expected = torch.tensor([[[[4.0, 0.0], [0.5, 0.0]], [[-3.0, 3.0], [0.1, 0.0]]]])
    assert torch.equal(fake_quantize(k, cfg), expected)


def tiny_gqa_llama(init_std: float = 0.02):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,  # grouped-query attention
                      initializer_range=init_std)
    return LlamaForCausalLM(cfg).eval()


PLACEMENTS = [KVPlacement("pre_rope", "all_heads"), KVPlacement("pre_rope", "per_head"),
              KVPlacement("post_rope", "all_heads"), KVPlacement("post_rope", "per_head")]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: f"{p.position}-{p.scope}")
def test_kv_hook_without_quantization_is_bit_identical(placement):
    model = tiny_gqa_llama()
    ids = torch.randint(0, 128, (2, 9))
    reference = model(ids).logits
    assert enable_kv_quant(model, None, placement) == 2
    assert (model.config._attn_implementation == "qatlab_kv") == (placement.position == "post_rope")
    assert torch.equal(model(ids).logits, reference)


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: f"{p.position}-{p.scope}")
def test_kv_at_4_bits_changes_logits_and_can_be_switched_off(placement):
    model = tiny_gqa_llama()
    ids = torch.randint(0, 128, (2, 9))
    reference = model(ids).logits
    enable_kv_quant(model, QuantConfig(bits=4, granularity="token", name="kv"), placement)
    assert not torch.allclose(model(ids).logits, reference)
    set_kv_quant_enabled(model, False)
    assert torch.equal(model(ids).logits, reference)


def test_pre_rope_all_heads_is_the_references_kv_quantizer():
    """LLM-QAT's modeling_llama_quant.py quantizes k_proj's output (B, S, H_kv x D) per token over all heads, before
    rotary embeddings: scale = max|k_t| over the token's H_kv x D values."""
    model = tiny_gqa_llama()
    attention = model.model.layers[0].self_attn
    seen = {}
    attention.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("raw", out.detach().clone()))
    cfg = QuantConfig(bits=4, granularity="token", name="kv")
    enable_kv_quant(model, cfg)  # the default placement: pre_rope, all_heads
    quantized = {}
    attention.k_proj.register_forward_hook(lambda m, a, out: quantized.__setitem__("k", out.detach()))
    model(torch.randint(0, 128, (1, 6)))
    raw = seen["raw"]  # (1, 6, 2 heads x 16): the hook order puts qatlab's quantizer between the two recorders
    s = raw.abs().amax(-1, keepdim=True) / 7  # 4-bit restricted: qmax = 7, one scale per token
    torch.testing.assert_close(quantized["k"], torch.clamp(torch.round(raw / s), -7, 7) * s, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["weight", "activation", "kv"])
def test_the_reference_zeroes_the_gradient_where_x_reaches_plus_minus_2(kind):
    """LLM-QAT's SymQuantizer.backward: grad[input >= 2] = 0 and grad[input <= -2] = 0, elsewhere passed unchanged."""
    x = torch.tensor([[1.9, -2.0, 2.0, 0.3, -3.5, 2.5]], requires_grad=True)
    cfg = QuantConfig(bits=4, granularity="token", grad_clip=2.0, name=kind)
    fake_quantize(x, cfg).backward(torch.ones_like(x))
    assert x.grad.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]]
    recipe = compose_recipe("llm_qat")
    assert {recipe.weight_config.grad_clip, recipe.act_config.grad_clip, recipe.kv_config.grad_clip} == {2.0}
    assert (recipe.kv_placement.position, recipe.kv_placement.scope) == ("pre_rope", "all_heads")


def test_kv_null_means_off_and_teacher_is_never_hooked():
    teacher = tiny_gqa_llama()
    method = compose_recipe("llm_qat", ["method.kv=null"])
    student = make_student(teacher, method, "float32")
    assert method.kv_config is None and not hasattr(student.model.layers[0].self_attn, "qatlab_kv_config")
    method = compose_recipe("llm_qat")
    student = make_student(teacher, method, "float32")
    assert student.model.layers[0].self_attn.qatlab_kv_hooked
    assert not hasattr(teacher.model.layers[0].self_attn, "qatlab_kv_config")
    post = make_student(teacher, compose_recipe("llm_qat", ["method.kv.position=post_rope"]), "float32")
    assert post.config._attn_implementation == "qatlab_kv" and teacher.config._attn_implementation != "qatlab_kv"
    assert method.describe()["kv_bits"] == 4 and method.describe()["a_bits"] == 8


def test_kv_quantization_matches_quantized_cache_decoding():
    # Cached decoding re-quantizes stored keys each step; per-token MinMax is idempotent, so the
    # last position's logits equal those of a full forward pass.
    model = tiny_gqa_llama()
    enable_kv_quant(model, QuantConfig(bits=4, granularity="token", name="kv"))
    ids = torch.randint(0, 128, (1, 8))
    full = model(ids).logits[:, -1]
    out = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_tiny_llm_qat_lowers_its_loss():
    teacher = tiny_gqa_llama(init_std=0.2)  # peaked logits, so W4A8KV4 has a real error to remove
    method = compose_recipe("llm_qat")
    student = make_student(teacher, method, "float32")
    optimizer = torch.optim.AdamW(parameter_groups(student, "all", None), lr=1e-3)
    batch = {"input_ids": torch.randint(0, 128, (4, 32))}
    with torch.no_grad():
        teacher_out = teacher(input_ids=batch["input_ids"])
    losses = []
    for _ in range(25):
        loss = method.loss(student(input_ids=batch["input_ids"]), teacher_out, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
