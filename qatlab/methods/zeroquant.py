"""ZeroQuant (Yao et al. 2022): fine-grained PTQ plus layer-by-layer knowledge distillation (LKD).

- weights: symmetric MinMax per group (asymmetric with weight.symmetric=false); mixed precision
  by layer through the base option `weight_overrides`, e.g. the paper's W4/8: 4-bit MLP, 8-bit
  attention ({self_attn: {bits: 8}});
- activations: INT8 per token, one dynamic scale per token vector at every quantized Linear's input;
- LKD (qatlab.lkd): block by block, the quantized copy of block k learns to match the original
  block's output on the same input by MSE, with its own optimizer; then it is frozen. Only one
  block's optimizer state and gradients exist at any time. Calibration: the run's training text
  or uniform random tokens (`lkd.data`); no labels.
`lkd.enabled=false` leaves plain group-/token-wise RTN (the "without LKD" row).
The paper's fused INT8 kernels are an inference concern; qatlab simulates the numerics (fake quant).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from qatlab.lkd import LKDConfig, lkd_batches, run_lkd
from qatlab.methods.base import QuantMethod
from qatlab.methods.registry import register_method

W8_GROUP = {"bits": 8, "symmetric": True, "granularity": "group", "group_size": 64}
A8_PER_TOKEN = {"bits": 8, "symmetric": True, "granularity": "token"}


@register_method("zeroquant")
class ZeroQuant(QuantMethod):
    training_mode = "blockwise"

    def __init__(
        self,
        *,
        weight: Mapping[str, Any] | None = W8_GROUP,
        activation: Mapping[str, Any] | None = A8_PER_TOKEN,
        lkd: Mapping[str, Any] | None = None,
        **quant: Any,
    ):
        super().__init__(weight=weight, activation=activation, **quant)
        self.lkd = LKDConfig.from_dict(lkd)
        self.trains = self.lkd.enabled

    def fit_blockwise(self, student: nn.Module, teacher: nn.Module, datamodule: Any,
                      progress_dir: Any = None, resume_dir: Any = None) -> dict[str, Any]:
        """LKD on every decoder block (in place); its metrics for results.json. Block progress: qatlab.lkd.run_lkd."""
        vocab = student.get_input_embeddings().num_embeddings
        batches = lkd_batches(self.lkd, datamodule, vocab)
        return run_lkd(student, teacher, batches, self.lkd, trainable=self.trainable_parameters,
                       progress_dir=progress_dir, resume_dir=resume_dir)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lkd": dataclasses.asdict(self.lkd) if self.lkd.enabled else None}
