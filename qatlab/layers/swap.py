"""Swap the Linear layers of any HF causal LM for quantized stand-ins, and back."""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from qatlab.errors import QatlabError, require
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.quantizers.base import QuantizerFactory
from qatlab.quantizers.minmax import minmax
from qatlab.quantizers.spec import QuantConfig

DEFAULT_EXCLUDE = ("lm_head",)


def _compile(patterns: Sequence[str], key: str) -> list[re.Pattern]:
    require(
        not isinstance(patterns, str),
        f"{key}={patterns!r} must be a list of regex patterns, e.g. [{patterns!r}]",
    )
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise QatlabError(f"{key} pattern {p!r} is not a valid regex ({e}); fix or escape it") from None
    return compiled


def _tied_embedding(model: nn.Module) -> nn.Parameter | None:
    """The input embedding weight, whose users (a tied lm_head) must stay full precision."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return getattr(emb, "weight", None)


def find_linears(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, nn.Module]:
    """Qualified name -> nn.Linear / GPT-2 Conv1D module, filtered by regex (re.search) on the name.

    include=None selects every Linear; any exclude match drops it; so does sharing the input
    embedding's weight (a tied lm_head under another name).
    """
    inc = None if include is None else _compile(include, "include")
    exc = _compile(exclude, "exclude")
    embedding = _tied_embedding(model)
    chosen = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if inc is not None and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc) or module.weight is embedding:
            continue
        chosen[name] = module
    return chosen


def conv1d_to_linear(conv: Conv1D) -> nn.Linear:
    """GPT-2 Conv1D (weight (in, out)) as nn.Linear (weight (out, in)).

    Unlike every other path here this COPIES the weight (a transposed new Parameter),
    so build optimizers after swapping. The bias Parameter is reused.
    """
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, device="meta")
    weight = conv.weight.detach().t().contiguous()  # (out, in)
    linear.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    linear.bias = conv.bias
    return linear.train(conv.training)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def swap_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Replace each chosen layer by make(name, linear) in place; returns the names, sorted.

    All replacements are built before any is installed, so a failing `make` (e.g. a group
    size that does not divide a layer) leaves the model untouched.
    """
    found = find_linears(model, include, exclude)
    require(
        bool(found),
        f"no Linear layers matched include={include!r} exclude={list(exclude)!r} in "
        f"{type(model).__name__}; check the layer map / patterns",
    )
    new = {}
    for name, module in found.items():
        linear = conv1d_to_linear(module) if isinstance(module, Conv1D) else module
        new[name] = make(name, linear)
    for name, module in new.items():
        _set_submodule(model, name, module)
    return sorted(new)


def assign_weight_configs(
    names: Sequence[str],
    default: QuantConfig | None,
    overrides: Mapping[str, QuantConfig | None] | None = None,
) -> dict[str, QuantConfig | None]:
    """Layer name -> its weight config: the first override pattern (re.search) matching it, else default.

    Mixed precision by layer (e.g. ZeroQuant's W4/8: {"self_attn": 8-bit config}). Every pattern
    must match at least one of `names`, so a typo cannot silently leave the default in place.
    """
    overrides = dict(overrides or {})
    compiled = list(zip(_compile(list(overrides), "weight_overrides"), overrides.values()))
    chosen, used = {}, set()
    for name in names:
        chosen[name] = default
        for i, (pattern, cfg) in enumerate(compiled):
            if pattern.search(name):
                chosen[name] = cfg
                used.add(i)
                break
    for i, (pattern, _) in enumerate(compiled):
        if i in used:
            continue
        if any(pattern.search(n) for n in names):
            raise QatlabError(
                f"weight_overrides pattern {pattern.pattern!r} only matches layers an earlier pattern already "
                "takes (the first matching pattern wins); reorder or narrow the patterns"
            )
        raise QatlabError(
            f"weight_overrides pattern {pattern.pattern!r} matches none of the {len(names)} quantized layers "
            f"(e.g. {list(names)[:3]}); patterns are regexes searched in the full layer name"
        )
    return chosen


def quantize_model(
    model: nn.Module,
    weight_cfg: QuantConfig | None,
    act_cfg: QuantConfig | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    weight_overrides: Mapping[str, QuantConfig | None] | None = None,
    quantizer: QuantizerFactory = minmax,
) -> list[str]:
    """Swap the chosen Linear layers for FakeQuantLinear; returns their names, sorted.

    quantizer(spec, weight) builds each layer's weight quantizer (MinMax by default; LSQ, SEQ, ...).
    weight_overrides: regex -> weight config for the layers it matches (see assign_weight_configs).
    """
    weights = assign_weight_configs(list(find_linears(model, include, exclude)), weight_cfg, weight_overrides)

    def make(name: str, linear: nn.Linear) -> FakeQuantLinear:
        return FakeQuantLinear.from_linear(linear, weights.get(name, weight_cfg), act_cfg, name, quantizer)

    return swap_linears(model, make, include, exclude)


def unswap(model: nn.Module) -> int:
    """Put back nn.Linear (via `to_linear()`) for every swapped layer; returns how many."""
    swapped = [n for n, m in model.named_modules() if n and callable(getattr(m, "to_linear", None))]
    for name in swapped:
        _set_submodule(model, name, model.get_submodule(name).to_linear())
    return len(swapped)


def set_quant_enabled(model: nn.Module, enabled: bool) -> int:
    """Turn fake quantization on/off in every FakeQuantLinear; returns how many were set."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    for layer in layers:
        layer.enabled = enabled
    return len(layers)
