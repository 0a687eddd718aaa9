"""FakeQuantLinear: an nn.Linear stand-in that fake-quantizes its weight (and optionally its input)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.errors import require
from qatlab.quant.config import QuantConfig
from qatlab.quant.primitives import fake_quantize


class FakeQuantLinear(nn.Module):
    """Linear layer whose `weight`/`bias` are the original nn.Linear's Parameter objects.

    Sharing (not copying) keeps memory flat and lets optimizers, checkpoints ("<name>.weight"
    keys are unchanged) and tied weights keep working. `enabled=False` gives exactly nn.Linear.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        weight_cfg: QuantConfig | None,
        act_cfg: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        self.register_parameter("weight", weight)  # (out, in)
        self.register_parameter("bias", bias)  # (out,) or None, like nn.Linear
        self.out_features, self.in_features = weight.shape
        self.weight_cfg = weight_cfg
        self.act_cfg = act_cfg
        self.enabled = True

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_cfg: QuantConfig | None,
        act_cfg: QuantConfig | None = None,
        name: str = "",
    ) -> FakeQuantLinear:
        """Wrap `linear`'s own Parameters; checks group sizes against its input width first."""
        require(
            isinstance(linear, nn.Linear),
            f"layer '{name}' is {type(linear).__name__}, not nn.Linear; only Linear layers can be quantized",
        )
        for cfg in (weight_cfg, act_cfg):
            if cfg is not None:
                cfg.check_width(linear.in_features, name)
        return cls(linear.weight, linear.bias, weight_cfg, act_cfg)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the same Parameter objects (built on meta, so nothing is allocated)."""
        has_bias = self.bias is not None
        linear = nn.Linear(self.in_features, self.out_features, bias=has_bias, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        x = fake_quantize(x, self.act_cfg)  # per-token dynamic scales when granularity=token
        w = fake_quantize(self.weight, self.weight_cfg)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        w = self.weight_cfg.describe() if self.weight_cfg else "off"
        a = self.act_cfg.describe() if self.act_cfg else "off"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight={w}, act={a}, enabled={self.enabled}"
        )
