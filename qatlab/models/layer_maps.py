"""Where the decoder blocks and their quantizable linears live, per model family (no forked modeling code).

A map is keyed by `config.model_type`. Linear patterns are regexes that must FULLY match a module
name relative to one block (e.g. "self_attn.q_proj" inside `model.layers.3`).
To add a family: build a tiny model of it, print `[n for n, _ in block.named_modules()]`, add an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qatlab.errors import QatlabError, require


@dataclass(frozen=True)
class LayerMap:
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    attention: str  # name of the attention submodule inside a block
    linears: tuple[str, ...]  # regexes of quantizable linears inside a block


# Llama-style: q/k/v/o projections and a gated MLP.
_LLAMA = LayerMap("model.layers", "self_attn", (r"self_attn\.(q|k|v|o)_proj", r"mlp\.(gate|up|down)_proj"))

LAYER_MAPS: dict[str, LayerMap] = {
    **{t: _LLAMA for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "granite", "smollm3", "stablelm", "cohere",
    )},
    "phi3": LayerMap("model.layers", "self_attn", (r"self_attn\.(qkv|o)_proj", r"mlp\.(gate_up|down)_proj")),
    "phi": LayerMap("model.layers", "self_attn", (r"self_attn\.(q_proj|k_proj|v_proj|dense)", r"mlp\.fc(1|2)")),
    "starcoder2": LayerMap("model.layers", "self_attn", (r"self_attn\.(q|k|v|o)_proj", r"mlp\.c_(fc|proj)")),
    "opt": LayerMap("model.decoder.layers", "self_attn", (r"self_attn\.(q|k|v|out)_proj", r"fc(1|2)")),
    # GPT-2 uses transformers' Conv1D (weight stored as (in, out)), not nn.Linear.
    "gpt2": LayerMap("transformer.h", "attn", (r"attn\.c_(attn|proj)", r"mlp\.c_(fc|proj)")),
    "gpt_neox": LayerMap(
        "gpt_neox.layers", "attention", (r"attention\.(query_key_value|dense)", r"mlp\.dense_(h_to_4h|4h_to_h)")
    ),
    "falcon": LayerMap(
        "transformer.h", "self_attention", (r"self_attention\.(query_key_value|dense)", r"mlp\.dense_(h_to_4h|4h_to_h)")
    ),
}


def layer_map_for(model: nn.Module) -> LayerMap:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYER_MAPS:
        raise QatlabError(
            f"model_type '{model_type}' has no layer map; known: {', '.join(sorted(LAYER_MAPS))}; "
            "add a LayerMap entry to LAYER_MAPS in qatlab/models/layer_maps.py"
        )
    return LAYER_MAPS[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    path = layer_map_for(model).blocks
    try:
        blocks = model.get_submodule(path)
    except AttributeError as e:
        raise QatlabError(f"{type(model).__name__} has no '{path}'; fix its entry in LAYER_MAPS") from e
    require(isinstance(blocks, nn.ModuleList), f"'{path}' in {type(model).__name__} is not an nn.ModuleList")
    return blocks
