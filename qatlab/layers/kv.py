"""KV-cache fake quantization, where the reference quantizes it or where a cache stores it (no forked modeling code).

Two placements (`method.kv.position`), two scopes (`method.kv.scope`):

  pre_rope   (LLM-QAT's reference, the default): the outputs of k_proj and v_proj, (B, S, H_kv * D), are
             fake-quantized by forward hooks on those layers, BEFORE rotary embeddings; the reference quantizes
             exactly there (models/modeling_llama_quant.py: act_quantizer_k on k_proj's output).
  post_rope  qatlab's alternative: every HF attention module (Llama, Qwen, Mistral, Gemma, ...) projects q/k/v,
             applies RoPE, appends to the KV cache, then calls ALL_ATTENTION_FUNCTIONS[impl](module, q, k, v, ...);
             qatlab registers one more implementation, "qatlab_kv", that fake-quantizes `key` and `value`
             (B, H_kv, S, D) and then calls the model's own (sdpa, eager, ...). Post-RoPE is what a KV cache
             stores at inference, so the student trains against the error it will really see.

  all_heads  one scale per token over all KV heads (H_kv * D values): the reference (its per-token max over the
             last dim of k_proj's output)
  per_head   one scale per token and KV head (D values): finer, so optimistic against the paper

Grouped-query attention needs nothing special: K/V are quantized before they are repeated for the query
heads. Re-quantizing cached tokens at each decode step gives the same values (per-token MinMax is
idempotent), so training and cached decoding agree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qatlab.errors import require
from qatlab.models.layer_maps import decoder_blocks, layer_map_for
from qatlab.quantizers.primitives import fake_quantize
from qatlab.quantizers.spec import QuantConfig

KV_IMPL = "qatlab_kv"
POSITIONS = ("pre_rope", "post_rope")
SCOPES = ("all_heads", "per_head")


@dataclass(frozen=True)
class KVPlacement:
    position: str = "pre_rope"
    scope: str = "all_heads"

    def __post_init__(self) -> None:
        require(self.position in POSITIONS, f"method.kv.position={self.position!r} is not known; use one of {list(POSITIONS)}")
        require(self.scope in SCOPES, f"method.kv.scope={self.scope!r} is not known; use one of {list(SCOPES)}")


def _inner_attention(module: nn.Module):
    """The attention function the model used before qatlab_kv took its place."""
    name = module.qatlab_inner_attention
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return sys.modules[type(module).__module__].eager_attention_forward  # "eager" lives in the modeling file


def _quantize_heads_major(x: Tensor, cfg: QuantConfig) -> Tensor:
    """(B, H, S, D) per token over all heads: the token's H x D values share one scale."""
    b, h, s, d = x.shape
    tokens = x.transpose(1, 2).reshape(b, s, h * d)
    return fake_quantize(tokens, cfg).reshape(b, s, h, d).transpose(1, 2)


def kv_quant_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Post-RoPE: fake-quantize K and V (B, H_kv, S, D) per token (and head, or over all heads), then attend."""
    cfg = getattr(module, "qatlab_kv_config", None)
    if cfg is not None and module.qatlab_kv_enabled:
        if module.qatlab_kv_scope == "all_heads":
            key, value = _quantize_heads_major(key, cfg), _quantize_heads_major(value, cfg)
        else:
            key, value = fake_quantize(key, cfg), fake_quantize(value, cfg)
    return _inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KV_IMPL, kv_quant_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention submodule of every decoder block, found through the model family's layer map."""
    attention = layer_map_for(model).attention
    return [block.get_submodule(attention) for block in decoder_blocks(model)]


def _projection_hook(attention: nn.Module, head_dim: int):
    """Pre-RoPE: quantize a k_proj / v_proj output (B, S, H_kv * D) as it leaves the layer."""
    def hook(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
        cfg = attention.qatlab_kv_config
        if cfg is None or not attention.qatlab_kv_enabled:
            return output
        if attention.qatlab_kv_scope == "all_heads":
            return fake_quantize(output, cfg)
        b, s, width = output.shape
        return fake_quantize(output.reshape(b, s, width // head_dim, head_dim), cfg).reshape(b, s, width)
    return hook


def enable_kv_quant(model: nn.Module, cfg: QuantConfig | None, placement: KVPlacement = KVPlacement()) -> int:
    """Quantize the model's K/V with `cfg` at `placement` (None: hooks installed, no quantization).

    Returns how many attention modules were hooked.
    """
    modules = attention_modules(model)
    for module in modules:
        module.qatlab_kv_config = cfg
        module.qatlab_kv_enabled = True
        module.qatlab_kv_scope = placement.scope
    if placement.position == "pre_rope":
        for module in modules:
            k, v = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
            require(k is not None and v is not None,
                    f"method.kv.position=pre_rope hooks the k_proj/v_proj outputs; {type(module).__name__} has a fused "
                    "projection instead: use method.kv.position=post_rope for this model")
            if not getattr(module, "qatlab_kv_hooked", False):
                head_dim = getattr(module, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
                k.register_forward_hook(_projection_hook(module, head_dim))
                v.register_forward_hook(_projection_hook(module, head_dim))
                module.qatlab_kv_hooked = True
        return len(modules)
    require(
        hasattr(model, "set_attn_implementation") and hasattr(model.config, "_attn_implementation"),
        f"kv quantization needs a model whose attention uses transformers' attention interface; "
        f"{type(model).__name__} has none (set method.kv=null for this model)",
    )
    inner = model.config._attn_implementation
    if inner != KV_IMPL:
        for module in modules:
            module.qatlab_inner_attention = inner
        model.set_attn_implementation(KV_IMPL)
    return len(modules)


def set_kv_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for module in attention_modules(model):
        if hasattr(module, "qatlab_kv_config"):
            module.qatlab_kv_enabled = enabled
