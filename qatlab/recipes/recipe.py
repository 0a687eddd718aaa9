"""Recipe: WHAT is quantized (the specs, which layers) + HOW (quantizer, init, loss, stages).

Every method is a recipe (conf/method/<name>.yaml picks its quantizer, init, loss and stages from
the groups conf/quantizer/, conf/init/, conf/loss/, conf/stage/), and any piece can be swapped on
the command line (`method=bitdistiller quantizer=lsq`). A run calls, in order:

    recipe.convert(student)                          swap Linear layers (FakeQuantLinear / OneBitLinear), hook K/V
    recipe.initialize(student, teacher, calibration) the init (clip search, GPTQ, SVID), then learned
                                                     quantizers re-initialize from the latent weights
    for stage in recipe.stages: stage.run(ctx)       block-wise and/or whole-model training
and asks it for facts (describe, bits_per_weight) and for its RTN baseline (same specs, MinMax).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from qatlab.errors import require
from qatlab.inits.base import Init
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.layers.kv import KVPlacement, enable_kv_quant
from qatlab.layers.swap import assign_weight_configs, find_linears, quantize_model, swap_linears
from qatlab.losses.objectives import Loss
from qatlab.quantizers.base import QuantizerFactory
from qatlab.quantizers.minmax import minmax
from qatlab.quantizers.spec import QuantConfig


class Recipe:
    def __init__(
        self,
        name: str,
        weight: Mapping[str, Any] | None = None,
        activation: Mapping[str, Any] | None = None,
        kv: Mapping[str, Any] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = ("lm_head",),
        weight_overrides: Mapping[str, Mapping[str, Any] | None] | None = None,
        quantizer: QuantizerFactory | Any = minmax,
        init: Init | None = None,
        loss: Loss | None = None,
        stages: Sequence[Any] = (),
    ) -> None:
        self.name = name
        self.weight_config = QuantConfig.from_dict(weight, "method.weight")
        # Mixed precision by layer: regex (re.search on the layer name) -> keys merged onto `weight`, e.g.
        # {"self_attn": {"bits": 8}}; null turns the matching layers' weight quantizer off (they stay dense).
        self.weight_overrides = dict(_check_overrides(weight_overrides))
        self.weight_override_configs = {
            p: None if o is None else QuantConfig.from_dict({**(weight or {}), **o}, f"method.weight_overrides[{p!r}]")
            for p, o in self.weight_overrides.items()
        }
        # Activations and K/V are quantized per token unless the config says otherwise.
        self.act_config = QuantConfig.from_dict(_per_token(activation), "method.activation")
        kv = None if kv is None else dict(kv)
        self.kv_placement = None if kv is None else KVPlacement(kv.pop("position", "pre_rope"), kv.pop("scope", "all_heads"))
        self.kv_config = QuantConfig.from_dict(_per_token(kv), "method.kv")
        self.include = list(include) if include else None
        self.exclude = list(exclude)
        self.quantizer = quantizer
        self.init = init
        self.loss = loss
        self.stages = [s for s in stages if getattr(s, "enabled", True)]
        self.quantized_layers: list[str] = []

    # -- the pipeline ---------------------------------------------------------------------------------
    @property
    def trains(self) -> bool:
        return bool(self.stages)

    @property
    def makes_own_layers(self) -> bool:
        """True for layer factories (quantizer=onebit) rather than weight-quantizer factories."""
        return callable(getattr(self.quantizer, "layer", None))

    def convert(self, student: nn.Module) -> list[str]:
        """Swap the targeted Linear layers for quantized ones sharing their Parameters; hook K/V."""
        if self.makes_own_layers:
            specs = assign_weight_configs(list(find_linears(student, self.include, self.exclude)),
                                          self.weight_config, self.weight_override_configs)

            def make(name: str, linear: nn.Linear) -> nn.Module:
                return self.quantizer.layer(name, linear, specs[name], self.act_config)

            self.quantized_layers = swap_linears(student, make, self.include, self.exclude)
        else:
            self.quantized_layers = quantize_model(
                student, self.weight_config, self.act_config, include=self.include, exclude=self.exclude,
                weight_overrides=self.weight_override_configs, quantizer=self.quantizer,
            )
        if self.kv_config is not None:
            enable_kv_quant(student, self.kv_config, self.kv_placement)
        return self.quantized_layers

    def layers(self, student: nn.Module) -> dict[str, nn.Module]:
        return {n: student.get_submodule(n) for n in self.quantized_layers}

    def initialize(self, student: nn.Module, teacher: nn.Module, calibration: Iterable[dict]) -> dict[str, Any]:
        """The init (if any), then every learned quantizer re-reads its latent weight; returns init facts."""
        facts = {} if self.init is None else dict(self.init(student, teacher, self.layers(student), calibration))
        for layer in self.layers(student).values():
            if isinstance(layer, FakeQuantLinear) and layer.weight_quantizer is not None:
                layer.weight_quantizer.initialize(layer.weight)
        return facts

    # -- facts ----------------------------------------------------------------------------------------
    def bits_per_weight(self, student: nn.Module) -> float:
        """Average stored bits per weight of the quantized layers, as their quantizers ship them (codes +
        fp16 qparams; OneBit: signs + g, h): the x axis of a PPL-vs-bits plot. 16.0 when nothing is quantized."""
        layers = self.layers(student).values()
        count = sum(m.weight.numel() for m in layers)
        return sum(m.storage_bits() for m in layers) / count if count else 16.0

    def describe(self, student: nn.Module | None = None) -> dict[str, Any]:
        """Flat facts about the quantization for logs and the results row; with the student, what its
        layers really are (how many stayed full precision)."""
        w, a, kv = self.weight_config, self.act_config, self.kv_config
        facts = {
            "method": self.name,
            "w_bits": w.bits if w else 16,
            "a_bits": a.bits if a else 16,
            "kv_bits": kv.bits if kv else 16,
            "group_size": w.group_size if w and w.granularity == "group" else None,
            "w_granularity": w.granularity if w else None,
            "w_symmetric": w.symmetric if w else None,
            "w_grid": w.describe() if w else "full precision",
            **({"kv_position": self.kv_placement.position, "kv_scope": self.kv_placement.scope} if kv else {}),
            "quantized_layers": len(self.quantized_layers),
            "quantizer": _describe(self.quantizer),
            "init": self.init.name if self.init else None,
            "loss": self.loss.name if self.loss and self.trains else None,
            "stages": [s.name for s in self.stages],
            **self._describe_overrides(),
        }
        if self.init is not None:
            facts.update({k: v for k, v in self.init.describe().items() if k != "init"})
        if self.loss is not None and self.trains:
            facts.update({k: v for k, v in self.loss.describe().items() if k != "loss"})
        if student is not None:
            layers = self.layers(student).values()
            facts["dense_layers"] = sum(isinstance(m, FakeQuantLinear) and m.weight_quantizer is None for m in layers)
        return facts

    def _describe_overrides(self) -> dict[str, Any]:
        """Only with weight_overrides: a bits label like '4/8' (16 = left full precision) and each pattern's grid."""
        if not self.weight_overrides:
            return {}
        configs = [self.weight_config, *self.weight_override_configs.values()]
        bits = sorted({c.bits if c else 16 for c in configs})
        return {
            "w_bits_label": "/".join(map(str, bits)),
            "weight_overrides": {p: c.describe() if c else "full precision" for p, c in self.weight_override_configs.items()},
        }

    def rtn(self) -> Recipe:
        """The RTN baseline: the same specs and layers, MinMax quantizer, no init, no training."""
        kv = None if self.kv_config is None else {**self.kv_config.to_dict(), **dataclasses.asdict(self.kv_placement)}
        return Recipe("rtn", weight=_as_dict(self.weight_config), activation=_as_dict(self.act_config),
                      kv=kv, include=self.include, exclude=self.exclude,
                      weight_overrides=self.weight_overrides)

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State a resumed run needs beyond the student's weights (the loss's, e.g. CAKLD's gamma)."""
        return {"loss": self.loss.state_dict()} if self.loss is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.loss is not None:
            self.loss.load_state_dict(state.get("loss", {}))


def _describe(quantizer: Any) -> str:
    func = getattr(quantizer, "func", None)  # a functools.partial from Hydra (_partial_: true)
    if func is not None:
        options = ", ".join(f"{k}={v}" for k, v in quantizer.keywords.items())
        return f"{func.__name__}({options})" if options else func.__name__
    describe = getattr(quantizer, "describe", None)
    return describe() if callable(describe) else getattr(quantizer, "__name__", type(quantizer).__name__)


def _as_dict(config: QuantConfig | None) -> dict | None:
    return None if config is None else config.to_dict()


def _check_overrides(overrides: Mapping[str, Any] | None) -> Mapping[str, Mapping[str, Any] | None]:
    overrides = overrides or {}
    require(
        isinstance(overrides, Mapping),
        f"weight_overrides={overrides!r} must map layer-name regexes to weight keys, e.g. {{self_attn: {{bits: 8}}}}",
    )
    for pattern, options in overrides.items():
        require(
            isinstance(pattern, str) and (options is None or isinstance(options, Mapping)),
            f"weight_overrides entry {pattern!r}: {options!r} must be a regex string mapped to weight keys "
            "(e.g. {self_attn: {bits: 8}}), or to null to leave those layers in full precision",
        )
    return overrides


def _per_token(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if options is None else {"granularity": "token", **options}
