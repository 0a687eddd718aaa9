"""GPTQ (Frantar et al. 2022): Hessian-aware post-training quantization, the PTQ baseline next to RTN.

convert: fake-quant layers exactly as RTN. init: GPTQ on calibration activations (the first
`init_batches` training batches; GPTQ wants many: init_batches=64 is 32k tokens at block 512), block by block (qatlab.quant.gptq), writing the quantized values
into each layer's latent weight, so the fake-quant student computes exactly the GPTQ weights.
No training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch import nn

from qatlab.errors import require
from qatlab.methods.base import QuantMethod
from qatlab.methods.registry import register_method
from qatlab.quant import FakeQuantLinear
from qatlab.quant.clip_search import calibration_sequences
from qatlab.quant.gptq import GPTQConfig, GPTQReport, gptq_model

log = logging.getLogger("qatlab")

# Below ~16 calibration tokens per input feature GPTQ fits noise: on SmolLM2 (down_proj: 1536
# inputs) 2,048 tokens gave 0.34x RTN's output error on the calibration data but 1.9x on held-out
# text; 24,576 tokens gave 0.72x and 0.95x (experiments/gptq/README.md).
TOKENS_PER_INPUT = 16


@register_method("gptq")
class GPTQ(QuantMethod):
    trains = False

    def __init__(
        self,
        *,
        percdamp: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
        tokens: int | None = None,
        device: str = "auto",
        sink_share: float = 0.0,
        **quant: Any,
    ):
        super().__init__(**quant)
        self.gptq = GPTQConfig(percdamp=percdamp, block_size=block_size, act_order=act_order, device=device,
                               sink_share=sink_share)
        require(
            tokens is None or (isinstance(tokens, int) and tokens > 0),
            f"method.tokens={tokens!r} must be a positive integer (calibration tokens) or null for all",
        )
        self.tokens = tokens
        self.report: GPTQReport | None = None

    def init(self, student: nn.Module, teacher: nn.Module, calibration: Iterable[dict]) -> None:
        if self.weight_config is None:
            return
        layers = {n: student.get_submodule(n) for n in self.quantized_layers}
        layers = {n: m for n, m in layers.items() if isinstance(m, FakeQuantLinear) and m.weight_cfg is not None}
        sequences = calibration_sequences(calibration, self.tokens)
        require(bool(sequences), "GPTQ got no calibration batches; set init_batches >= 1 (e.g. 64)")
        tokens, width = sum(int(m.sum()) for _, m in sequences), max(m.in_features for m in layers.values())
        if tokens < TOKENS_PER_INPUT * width:
            log.warning("gptq: %d calibration tokens for layers with up to %d inputs: the Hessians are poorly "
                        "determined and GPTQ overfits them (held-out error can exceed RTN's); give it >= %d "
                        "tokens (raise init_batches)", tokens, width, TOKENS_PER_INPUT * width)
        self.report = gptq_model(student, layers, sequences, self.gptq)
        log.info("gptq: %d layers in %.1f s, output error x%.3f of RTN's on the calibration data "
                 "(fake_quantize(Q) drift %.1e)", self.report.layers, self.report.seconds,
                 self.report.error_ratio, self.report.idempotence)

    def describe(self) -> dict[str, Any]:
        facts = {**super().describe(), "act_order": self.gptq.act_order, "sink_share": self.gptq.sink_share}
        if self.report is not None:
            facts |= {"init/gptq_s": round(self.report.seconds, 2),
                      "init/gptq_error_ratio": round(self.report.error_ratio, 4)}
        return facts
