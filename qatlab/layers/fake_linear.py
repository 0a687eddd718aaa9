"""FakeQuantLinear: an nn.Linear stand-in that owns a weight quantizer (and optionally an input quantizer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.errors import require
from qatlab.quantizers.activation import DynamicQuantizer
from qatlab.quantizers.base import QuantizerFactory, WeightQuantizer
from qatlab.quantizers.codes import QuantizedWeight
from qatlab.quantizers.minmax import minmax
from qatlab.quantizers.spec import QuantConfig


class FakeQuantLinear(nn.Module):
    """Linear layer whose `weight`/`bias` are the original nn.Linear's Parameter objects.

    Sharing (not copying) keeps memory flat and lets optimizers, checkpoints ("<name>.weight"
    keys are unchanged) and tied weights keep working. The quantizers are submodules, so their
    learned qparams live at "<name>.weight_quantizer.*". `enabled=False` gives exactly nn.Linear.
    weight_quantizer None: the weight stays full precision (an override set it to null).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        weight_quantizer: WeightQuantizer | None,
        input_quantizer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_parameter("weight", weight)  # (out, in)
        self.register_parameter("bias", bias)  # (out,) or None, like nn.Linear
        self.out_features, self.in_features = weight.shape
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.enabled = True

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_cfg: QuantConfig | None,
        act_cfg: QuantConfig | None = None,
        name: str = "",
        quantizer: QuantizerFactory = minmax,
    ) -> FakeQuantLinear:
        """Wrap `linear`'s own Parameters; quantizer(weight_cfg, weight) builds the weight quantizer.

        Group sizes are checked against the input width first, so a bad one names the layer."""
        require(
            isinstance(linear, nn.Linear),
            f"layer '{name}' is {type(linear).__name__}, not nn.Linear; only Linear layers can be quantized",
        )
        for cfg in (weight_cfg, act_cfg):
            if cfg is not None:
                cfg.check_width(linear.in_features, name)
        if weight_cfg is not None:
            weight_cfg.check_numel(linear.weight.numel(), name)
        wq = None if weight_cfg is None else quantizer(weight_cfg, linear.weight)
        aq = None if act_cfg is None else DynamicQuantizer(act_cfg)
        return cls(linear.weight, linear.bias, wq, aq)

    # -- what the rest of qatlab asks -------------------------------------------------------------
    @property
    def weight_cfg(self) -> QuantConfig | None:
        """The weight quantizer's grid (None: full precision)."""
        return None if self.weight_quantizer is None else self.weight_quantizer.spec

    @property
    def act_cfg(self) -> QuantConfig | None:
        return None if self.input_quantizer is None else self.input_quantizer.spec

    def quantized_weight(self) -> Tensor:
        """(out, in): the weight values the forward pass uses (the latent weight if unquantized)."""
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    @torch.no_grad()
    def encode(self) -> QuantizedWeight | None:
        """Codes + qparams to ship, from the quantizer itself (None: the weight ships dense)."""
        return None if self.weight_quantizer is None else self.weight_quantizer.encode(self.weight)

    def storage_bits(self) -> int:
        """Bits this layer's weight costs when shipped (no bias)."""
        if self.weight_quantizer is None:
            return 16 * self.weight.numel()
        return self.weight_quantizer.storage_bits(self.weight.shape)

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
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)  # per-token dynamic scales when granularity=token
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, enabled={self.enabled}"
                + ("" if self.weight_quantizer is not None else ", weight=full precision"))
