"""LLM-QAT: per-token activation and per-head KV quantizers, the attention hook, a tiny run."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qatlab.recipes import compose_recipe
from qatlab.stages.params import parameter_groups
from qatlab.quantizers import QuantConfig, fake_quantize
from qatlab.layers.kv import enable_kv_quant, set_kv_quant_enabled
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


def test_kv_hook_without_quantization_is_bit_identical():
    model = tiny_gqa_llama()
    ids = torch.randint(0, 128, (2, 9))
    reference = model(ids).logits
    assert enable_kv_quant(model, None) == 2
    assert model.config._attn_implementation == "qatlab_kv"
    assert torch.equal(model(ids).logits, reference)


def test_kv_at_4_bits_changes_logits_and_can_be_switched_off():
    model = tiny_gqa_llama()
    ids = torch.randint(0, 128, (2, 9))
    reference = model(ids).logits
    enable_kv_quant(model, QuantConfig(bits=4, granularity="token", name="kv"))
    assert not torch.allclose(model(ids).logits, reference)
    set_kv_quant_enabled(model, False)
    assert torch.equal(model(ids).logits, reference)


def test_kv_null_means_off_and_teacher_is_never_hooked():
    teacher = tiny_gqa_llama()
    method = compose_recipe("llm_qat", ["method.kv=null"])
    student = make_student(teacher, method, "float32")
    assert method.kv_config is None and student.config._attn_implementation != "qatlab_kv"
    method = compose_recipe("llm_qat")
    student = make_student(teacher, method, "float32")
    assert student.config._attn_implementation == "qatlab_kv"
    assert teacher.config._attn_implementation != "qatlab_kv"
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
