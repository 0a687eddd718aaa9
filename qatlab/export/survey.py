"""What a student holds that an exporter must write or refuse: asked of its layers, never recomputed.

Survey(student) walks the model once: every FakeQuantLinear's QuantizedWeight (layer.encode()) and its
activation spec, every OneBitLinear, the K/V quantizer. Exporters check the survey before writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

from torch import nn

from qatlab.errors import QatlabError
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.layers.onebit_linear import OneBitLinear
from qatlab.quantizers.codes import QuantizedWeight
from qatlab.quantizers.spec import QuantConfig


@dataclass
class Survey:
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # quantized FakeQuantLinears
    dense: list[str] = field(default_factory=list)  # FakeQuantLinears whose weight stays full precision
    onebit: dict[str, OneBitLinear] = field(default_factory=dict)
    activations: dict[str, QuantConfig] = field(default_factory=dict)  # layer -> its input quantizer's spec
    kv: QuantConfig | None = None

    @classmethod
    def of(cls, student: nn.Module) -> Survey:
        survey = cls()
        for name, module in student.named_modules():
            if isinstance(module, OneBitLinear):
                survey.onebit[name] = module
            elif isinstance(module, FakeQuantLinear):
                qw = module.encode()
                if qw is None:
                    survey.dense.append(name)
                else:
                    survey.weights[name] = qw
                if module.act_cfg is not None:
                    survey.activations[name] = module.act_cfg
            kv = getattr(module, "qatlab_kv_config", None)
            if kv is not None:
                survey.kv = kv
        if not (survey.weights or survey.onebit or survey.dense):
            raise QatlabError(f"{type(student).__name__} has no quantized layers to export; export a converted student")
        return survey

    @property
    def quantizes_inputs(self) -> bool:
        return bool(self.activations) or self.kv is not None

    def weights_only_note(self) -> str:
        """What a weights-only export leaves out (for the model card), '' when nothing."""
        parts = []
        if self.activations:
            specs = sorted({a.describe() for a in self.activations.values()})
            parts.append(f"input activations ({', '.join(specs)})")
        if self.kv is not None:
            parts.append(f"the K/V cache ({self.kv.describe()})")
        if not parts:
            return ""
        return (f"The student also quantized {' and '.join(parts)}; this export ships the weights only, so those run "
                "in floating point here: its PPL is not the student's.")


def refuse(message: str) -> NoReturn:
    raise QatlabError(message)
