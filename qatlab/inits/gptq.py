"""GPTQ (Frantar et al. 2022) as an Init: Hessian-aware PTQ written into the latent weights.

Calibration = the first `init_batches` training batches (GPTQ wants many: init_batches=64 is 32k
tokens at block 512), solved block by block (qatlab.inits.gptq_solver). With the MinMax quantizer
the fake-quant student then computes exactly the GPTQ weights.
"""

from __future__ import annotations

import logging
from typing import Any

from qatlab.errors import require
from qatlab.inits.base import Init
from qatlab.inits.clip_search import calibration_sequences
from qatlab.inits.gptq_solver import GPTQConfig, gptq_model
from qatlab.layers.fake_linear import FakeQuantLinear

log = logging.getLogger("qatlab")

# Below ~16 calibration tokens per input feature GPTQ fits noise: on SmolLM2 (down_proj: 1536
# inputs) 2,048 tokens gave 0.34x RTN's output error on the calibration data but 1.9x on held-out
# text; 24,576 tokens gave 0.72x and 0.95x (experiments/gptq/README.md).
TOKENS_PER_INPUT = 16


class GPTQ(Init):
    name = "gptq"

    def __init__(self, *, percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
                 tokens: int | None = None, device: str = "auto", sink_share: float = 0.0) -> None:
        self.config = GPTQConfig(percdamp=percdamp, block_size=block_size, act_order=act_order, device=device,
                                 sink_share=sink_share)
        require(tokens is None or (isinstance(tokens, int) and tokens > 0),
                f"init.tokens={tokens!r} must be a positive integer (calibration tokens) or null for all")
        self.tokens = tokens

    def __call__(self, student, teacher, layers, calibration):
        layers = {n: m for n, m in layers.items() if isinstance(m, FakeQuantLinear) and m.weight_cfg is not None}
        sequences = calibration_sequences(calibration, self.tokens)
        require(bool(sequences), "GPTQ got no calibration batches; set init_batches >= 1 (e.g. 64)")
        tokens, width = sum(int(m.sum()) for _, m in sequences), max(m.in_features for m in layers.values())
        if tokens < TOKENS_PER_INPUT * width:
            log.warning("gptq: %d calibration tokens for layers with up to %d inputs: the Hessians are poorly "
                        "determined and GPTQ overfits them (held-out error can exceed RTN's); give it >= %d "
                        "tokens (raise init_batches)", tokens, width, TOKENS_PER_INPUT * width)
        report = gptq_model(student, layers, sequences, self.config)
        log.info("gptq: %d layers in %.1f s, output error x%.3f of RTN's on the calibration data "
                 "(fake_quantize(Q) drift %.1e)", report.layers, report.seconds, report.error_ratio, report.idempotence)
        return {"init/gptq_s": round(report.seconds, 2), "init/gptq_error_ratio": round(report.error_ratio, 4)}

    def describe(self) -> dict[str, Any]:
        return {"init": self.name, "act_order": self.config.act_order, "sink_share": self.config.sink_share}
