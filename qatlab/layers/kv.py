"""KV-cache fake quantization through transformers' attention interface (no forked modeling code).

Where it hooks: every HF attention module (Llama, Qwen, Mistral, Gemma, ...) projects q/k/v,
applies RoPE, appends to the KV cache, then calls
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)`.
qatlab registers one more implementation, "qatlab_kv", that fake-quantizes `key` and `value`
and then calls the implementation the model had (sdpa, eager, flash, ...).

Keys are therefore quantized POST-RoPE, shape (B, n_kv_heads, S, head_dim), one scale per
token per KV head (a reduction over head_dim). Post-RoPE is what a KV cache stores at
inference, so the student trains against the error it will really see; grouped-query attention
needs nothing special because K/V arrive before they are repeated for the query heads.
Re-quantizing cached tokens at each decode step gives the same values (per-token MinMax is
idempotent), so training and cached decoding agree.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qatlab.errors import require
from qatlab.models.layer_maps import decoder_blocks, layer_map_for
from qatlab.quantizers.spec import QuantConfig
from qatlab.quantizers.primitives import fake_quantize

KV_IMPL = "qatlab_kv"


def _inner_attention(module: nn.Module):
    """The attention function the model used before qatlab_kv took its place."""
    name = module.qatlab_inner_attention
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return sys.modules[type(module).__module__].eager_attention_forward  # "eager" lives in the modeling file


def kv_quant_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Fake-quantize K and V (B, H_kv, S, D) per token and head, then attend as before."""
    cfg = getattr(module, "qatlab_kv_config", None)
    if cfg is not None and module.qatlab_kv_enabled:
        key, value = fake_quantize(key, cfg), fake_quantize(value, cfg)
    return _inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KV_IMPL, kv_quant_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention submodule of every decoder block, found through the model family's layer map."""
    attention = layer_map_for(model).attention
    return [block.get_submodule(attention) for block in decoder_blocks(model)]


def enable_kv_quant(model: nn.Module, cfg: QuantConfig | None) -> int:
    """Route the model's attention through qatlab_kv with `cfg` (None: hook installed, no quantization).

    Returns how many attention modules were hooked.
    """
    modules = attention_modules(model)
    require(
        hasattr(model, "set_attn_implementation") and hasattr(model.config, "_attn_implementation"),
        f"kv quantization needs a model whose attention uses transformers' attention interface; "
        f"{type(model).__name__} has none (set the kv bits to 16 for this model)",
    )
    inner = model.config._attn_implementation
    if inner != KV_IMPL:
        for module in modules:
            module.qatlab_inner_attention = inner
        model.set_attn_implementation(KV_IMPL)
    for module in modules:
        module.qatlab_kv_config = cfg
        module.qatlab_kv_enabled = True
    return len(modules)


def set_kv_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for module in attention_modules(model):
        if hasattr(module, "qatlab_kv_config"):
            module.qatlab_kv_enabled = enabled
