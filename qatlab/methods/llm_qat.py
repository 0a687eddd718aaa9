"""LLM-QAT (Liu et al. 2023): data-free QAT with W/A/KV fake quantization, default W4A8KV4.

- weights: symmetric MinMax per output channel, no clipping (outliers matter);
- activations: symmetric MinMax per token, on the fly, at the input of every quantized Linear;
- K and V: symmetric MinMax per token and KV head, post-RoPE (qatlab.quant.kv);
- STE everywhere, gradients zeroed outside the representable range;
- loss: cross-entropy against the teacher's soft labels on every position, computed as
  KL(teacher || student) (the same gradient: they differ by the teacher's entropy);
- data: the teacher's own generations (data=teacher_generated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qatlab.methods.kd import KD
from qatlab.methods.registry import register_method

W4_PER_CHANNEL = {"bits": 4, "symmetric": True, "granularity": "channel"}
A8_PER_TOKEN = {"bits": 8, "symmetric": True, "granularity": "token"}
KV4_PER_TOKEN = {"bits": 4, "symmetric": True, "granularity": "token"}


@register_method("llm_qat")
class LLMQAT(KD):
    """KD with the paper's quantizer defaults (W4 per channel, A8 per token, KV4 per token)."""

    def __init__(
        self,
        *,
        weight: Mapping[str, Any] | None = W4_PER_CHANNEL,
        activation: Mapping[str, Any] | None = A8_PER_TOKEN,
        kv: Mapping[str, Any] | None = KV4_PER_TOKEN,
        **options: Any,
    ):
        super().__init__(weight=weight, activation=activation, kv=kv, **options)
