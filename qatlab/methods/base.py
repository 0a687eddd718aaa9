"""The method plugin interface every QAT / PTQ method implements.

A run calls, in order:
    method.convert(student)                      swap layers for fake-quant ones (in place)
    method.init(student, teacher, calibration)   one-time init (clip search, SVID, ...)
    method.loss(student_out, teacher_out, batch) per training step -> {"loss": ..., ...}
    method.trainable_parameters(student)         what the optimizer updates
    method.export(student, path)                 write what you would ship
    method.fit_blockwise(student, teacher, data) training_mode="blockwise" only: replaces the whole-model fit

Class flags tell the training code what a method needs:
    trains               False for PTQ methods (no optimizer, no fit)
    needs_hidden_states  ask both models for hidden states (e.g. OneBit's MSE term)
    training_mode        "whole_model" (one Lightning fit) or "blockwise" (e.g. ZeroQuant's LKD)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qatlab.errors import require
from qatlab.export import export_packed
from qatlab.quant import FakeQuantLinear, QuantConfig, fake_quantize, quantize_model
from qatlab.quant.kv import enable_kv_quant


class QuantMethod:
    name: str = "base"
    trains: bool = True
    needs_hidden_states: bool = False
    training_mode: str = "whole_model"

    def __init__(
        self,
        weight: Mapping[str, Any] | None = None,
        activation: Mapping[str, Any] | None = None,
        kv: Mapping[str, Any] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = ("lm_head",),
        trainable: str = "all",
        weight_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.weight_config = QuantConfig.from_dict(weight, "weight")
        # Mixed precision by layer: regex (re.search on the layer name) -> keys merged onto `weight`,
        # e.g. {"self_attn": {"bits": 8}}; the first matching pattern wins (qatlab.quant.swap).
        self.weight_overrides = {p: dict(o) for p, o in _check_overrides(weight_overrides).items()}
        self.weight_override_configs = {
            p: QuantConfig.from_dict({**(weight or {}), **o}, f"weight_overrides[{p!r}]")
            for p, o in self.weight_overrides.items()
        }
        # Activations and K/V are quantized per token unless the config says otherwise.
        self.act_config = QuantConfig.from_dict(_per_token(activation), "activation")
        self.kv_config = QuantConfig.from_dict(_per_token(kv), "kv")  # per token and head, post-RoPE
        self.include = list(include) if include else None
        self.exclude = list(exclude)
        require(
            trainable in ("all", "quantized"),
            f"method.trainable='{trainable}' is not known; use 'all' (every student parameter) "
            "or 'quantized' (only the latent weights of fake-quant layers)",
        )
        self.trainable = trainable
        self.quantized_layers: list[str] = []

    # -- the interface -------------------------------------------------------------------
    def convert(self, student: nn.Module) -> list[str]:
        """Swap the targeted Linear layers for fake-quant layers sharing their Parameters; hook K/V."""
        self.quantized_layers = quantize_model(
            student, self.weight_config, self.act_config, include=self.include, exclude=self.exclude,
            weight_overrides=self.weight_override_configs,
        )
        if self.kv_config is not None:
            enable_kv_quant(student, self.kv_config)
        return self.quantized_layers

    def init(self, student: nn.Module, teacher: nn.Module, calibration: Iterable[dict]) -> None:
        """One-time initialization before training; RTN-style methods need none."""

    def loss(self, student_out: Any, teacher_out: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError(f"method '{self.name}' does not train")

    def fit_blockwise(self, student: nn.Module, teacher: nn.Module, datamodule: Any,
                      progress_dir: Path | None = None, resume_dir: Path | None = None) -> dict[str, Any]:
        """Train block by block instead of one whole-model fit; returns metrics for results.json.

        progress_dir: where finished blocks are saved as they finish; resume_dir: a killed run's progress_dir."""
        raise NotImplementedError(f"method '{self.name}' has training_mode='{self.training_mode}'")

    def trainable_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        if self.trainable == "all":
            return [p for p in student.parameters() if p.requires_grad]
        return [m.weight for m in student.modules() if isinstance(m, FakeQuantLinear)]

    def export(self, student: nn.Module, path: str | Path, dtype: str = "float16") -> Path:
        """Write the packed checkpoint you would ship (qatlab.export; qatlab.export.load_packed reads it).

        Codes packed into int32 words with per-group scales (and zero points), the activation and K/V
        quantizers in the manifest; latent weights are not written. dtype: the scales' and the other
        floating tensors' storage (float32 reproduces the student's logits exactly on CPU).
        """
        return export_packed(student, path, dtype=dtype, method=self.name, facts=self.describe(), kv=self.kv_config)

    def export_dense(self, student: nn.Module, path: str | Path) -> Path:
        """Write a dense HF checkpoint holding the dequantized weights the student computes with.

        Any HF-compatible tool can load it to evaluate exactly what was trained (no packing).
        """
        path = Path(path)
        state = student.state_dict()
        for name, module in student.named_modules():
            if isinstance(module, FakeQuantLinear) and module.weight_cfg is not None:
                with torch.no_grad():
                    state[f"{name}.weight"] = fake_quantize(module.weight, module.weight_cfg)
        student.save_pretrained(path, state_dict=state)
        (path / "qatlab_manifest.json").write_text(json.dumps(self.describe(), indent=2))
        return path

    def bits_per_weight(self, student: nn.Module) -> float:
        """Average stored bits per weight of the quantized layers (codes + fp16 scales/zeros): the
        x axis of a PPL-vs-bits plot. 16.0 when nothing is quantized."""
        bits = count = 0
        for module in student.modules():
            if isinstance(module, FakeQuantLinear) and module.weight_cfg is not None:
                rows, width = module.weight.shape
                bits += module.weight_cfg.storage_bits(rows, width)
                count += rows * width
        return bits / count if count else 16.0

    def state_dict(self) -> dict[str, Any]:
        """State a resumed run needs beyond the student's weights (plain numbers; saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict() returned; methods without state have nothing to restore."""

    # -- helpers -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Flat facts about the quantization, for logs and the results table."""
        w, a, kv = self.weight_config, self.act_config, self.kv_config
        return {
            "method": self.name,
            "w_bits": w.bits if w else 16,
            "a_bits": a.bits if a else 16,
            "kv_bits": kv.bits if kv else 16,
            "group_size": w.group_size if w and w.granularity == "group" else None,
            "w_granularity": w.granularity if w else None,
            "w_symmetric": w.symmetric if w else None,
            "quantized_layers": len(self.quantized_layers),
            **self._describe_overrides(),
        }

    def _describe_overrides(self) -> dict[str, Any]:
        """Only with weight_overrides: a bits label like '4/8' and each pattern's quantizer."""
        if not self.weight_overrides:
            return {}
        configs = [self.weight_config, *self.weight_override_configs.values()]
        bits = sorted({c.bits if c else 16 for c in configs})
        return {
            "w_bits_label": "/".join(map(str, bits)),
            "weight_overrides": {p: c.describe() if c else "off" for p, c in self.weight_override_configs.items()},
        }


def _check_overrides(overrides: Mapping[str, Any] | None) -> Mapping[str, Mapping[str, Any]]:
    overrides = overrides or {}
    require(
        isinstance(overrides, Mapping),
        f"weight_overrides={overrides!r} must map layer-name regexes to weight keys, e.g. {{self_attn: {{bits: 8}}}}",
    )
    for pattern, options in overrides.items():
        require(
            isinstance(pattern, str) and isinstance(options, Mapping),
            f"weight_overrides entry {pattern!r}: {options!r} must be a regex string mapped to weight keys, "
            "e.g. {self_attn: {bits: 8}}",
        )
    return overrides


def _per_token(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if options is None else {"granularity": "token", **options}
