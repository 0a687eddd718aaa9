"""OneBit (Xu et al. 2024): 1-bit sign matrices with two value vectors, distilled from the teacher.

- convert: every targeted Linear becomes OneBitLinear, Y = LayerNorm([(X * g) sign(W)^T] * h) + bias,
  sharing the original weight Parameter as the latent weight (qatlab.quant.onebit_linear).
- init: SVID, sign(W) and a rank-1 non-negative factorization |W| ~ h g^T (qatlab.quant.nmf;
  `init: svd` for the ablation), then the latent weight becomes sign(W) * latent_scale (the
  reference's 0.01: near zero, so the tanh surrogate starts as a plain straight-through gradient).
- norm_init: calibrate (an extension, not in the paper; needs norm_affine): after SVID, fit each
  layer's LayerNorm weight and bias per output feature by least squares so the normalized output
  matches the teacher layer's output on the calibration batches (teacher activations, one forward).
  Without it every layer emits unit-variance features and the residual stream's scales are lost.
- loss: KL(teacher || student) per token on the logits (fp32, chunked) plus
  beta * sum over decoder layers of ||t/|t| - s/|s|||^2 per token on the hidden states.

beta default 0.05: the reference (kd_loss_scale 0.01, kd_beta 1) sums its KL over the 2048 tokens of
a sequence (`batchmean`) and scales it by 0.01, i.e. weighs its hidden term 1 / (0.01 * 2048) ~ 0.05
against a per-token mean KL, which is what this loss uses. The reference matches hidden_states[0:n]
(embedding output and the first n-1 blocks); here hidden_states[1:] (the outputs of all n blocks,
the last one after the final norm), since the embedding output is not quantized.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qatlab.errors import require
from qatlab.export import export_packed
from qatlab.export.manifest import DTYPES
from qatlab.export.onebit import layer_storage_bits
from qatlab.losses import forward_kl, normalized_hidden_mse
from qatlab.methods.base import QuantMethod
from qatlab.methods.registry import register_method
from qatlab.quant.kv import enable_kv_quant
from qatlab.quant.nmf import INITS, svid
from qatlab.quant.onebit_linear import SURROGATES, OneBitLinear
from qatlab.quant.swap import swap_linears

log = logging.getLogger("qatlab")

BINARY = {"bits": 1, "symmetric": True, "granularity": "channel"}
NORM_INITS = ("none", "calibrate")


@register_method("onebit")
class OneBit(QuantMethod):
    def __init__(
        self,
        *,
        init: str = "svid",
        nmf_iters: int = 50,
        latent_scale: float = 0.01,
        surrogate: str = "tanh",
        norm_affine: bool = False,
        norm_eps: float = 1e-5,
        norm_init: str = "none",
        beta: float = 0.05,
        chunk_size: int = 1024,
        train: bool = True,
        gradient_checkpointing: bool = False,
        init_device: str = "auto",
        export_dtype: str = "float16",
        weight: dict | None = None,
        **quant: Any,
    ):
        super().__init__(weight=BINARY if weight is None else weight, **quant)
        w = self.weight_config
        require(
            w is not None and w.bits == 1 and w.symmetric,
            "method.weight describes OneBit's 1-bit signs (and the RTN baseline row: sign(W) x mean|W| "
            "per channel); keep bits: 1, symmetric: true",
        )
        require(not self.weight_overrides,
                "method.weight_overrides does not apply to OneBit (every chosen layer is 1-bit); "
                "pick layers with method.include / method.exclude")
        require(self.act_config is None, "OneBit is weight-only (W1A16) here; set method.activation=null")
        require(init in INITS, f"method.init='{init}' is not known; use one of {list(INITS)}")
        require(surrogate in SURROGATES, f"method.surrogate='{surrogate}' is not known; use one of {list(SURROGATES)}")
        require(
            isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0,
            f"method.beta={beta!r} must be a number >= 0 (the hidden-state MSE weight; 0 turns it off)",
        )
        require(
            isinstance(latent_scale, (int, float)) and latent_scale > 0,
            f"method.latent_scale={latent_scale!r} must be > 0 (the reference uses 0.01)",
        )
        require(isinstance(nmf_iters, int) and nmf_iters >= 1, f"method.nmf_iters={nmf_iters!r} must be an integer >= 1")
        require(norm_init in NORM_INITS, f"method.norm_init='{norm_init}' is not known; use one of {list(NORM_INITS)}")
        require(norm_init == "none" or norm_affine,
                "method.norm_init=calibrate fits the LayerNorm's weight and bias: set method.norm_affine=true")
        require(norm_eps > 0, f"method.norm_eps={norm_eps} must be > 0 (e.g. 1e-5)")
        require(init_device in ("auto", "cpu", "cuda"), f"method.init_device='{init_device}' must be auto, cpu or cuda")
        require(export_dtype in DTYPES, f"method.export_dtype='{export_dtype}' is not known; use one of {sorted(DTYPES)}")
        self.init_name = init
        self.nmf_iters = nmf_iters
        self.latent_scale = float(latent_scale)
        self.layer_options = {"surrogate": surrogate, "norm_affine": bool(norm_affine), "norm_eps": float(norm_eps)}
        self.norm_init = norm_init
        self.beta = float(beta)
        self.needs_hidden_states = self.beta > 0  # hidden states cost memory: ask only when used
        self.chunk_size = chunk_size
        self.trains = train  # false: SVID init only, then evaluate
        self.gradient_checkpointing = gradient_checkpointing
        self.init_device = init_device
        self.export_dtype = export_dtype

    # -- the interface -------------------------------------------------------------------
    def convert(self, student: nn.Module) -> list[str]:
        """Swap the targeted Linear layers for OneBitLinear sharing their weight and bias."""

        def make(name: str, linear: nn.Linear) -> OneBitLinear:
            return OneBitLinear.from_linear(linear, name, **self.layer_options)

        self.quantized_layers = swap_linears(student, make, self.include, self.exclude)
        if self.kv_config is not None:
            enable_kv_quant(student, self.kv_config)
        if self.gradient_checkpointing:
            student.config.use_cache = False
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return self.quantized_layers

    @torch.no_grad()
    def init(self, student: nn.Module, teacher: nn.Module, calibration: Iterable[dict]) -> None:
        """SVID (or SVD) of every OneBit layer's weight; then latent W <- sign(W) * latent_scale."""
        device = torch.device("cuda" if self.init_device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.init_device == "auto" else self.init_device)
        started = time.time()
        for name in self.quantized_layers:
            init_layer(student.get_submodule(name), self.init_name, self.latent_scale, self.nmf_iters, device)
        if self.norm_init == "calibrate":
            calibrate_norms(student, teacher, self.quantized_layers, calibration)
        log.info("onebit: %s init of %d layers in %.1f s", self.init_name, len(self.quantized_layers),
                 time.time() - started)

    def loss(self, student_out: Any, teacher_out: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask = batch.get("attention_mask")
        kl = forward_kl(student_out.logits, teacher_out.logits, mask, chunk_size=self.chunk_size)
        parts = {"kl": kl.detach()}
        total = kl
        if self.beta > 0:
            hidden = normalized_hidden_mse(student_out.hidden_states[1:], teacher_out.hidden_states[1:], mask)
            total = total + self.beta * hidden
            parts["hidden_mse"] = hidden.detach()
        return {"loss": total, **parts}

    def trainable_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        if self.trainable == "all":
            return super().trainable_parameters(student)
        layers = [m for m in student.modules() if isinstance(m, OneBitLinear)]
        return [p for m in layers for p in m.parameters() if p.requires_grad]  # latent W, g, h, norm, bias

    def export(self, student: nn.Module, path: str | Path, dtype: str | None = None) -> Path:
        """Signs packed 32 per int32 + g, h, norm + every other weight (qatlab.export; load_packed reads it).

        dtype defaults to method.export_dtype."""
        return export_packed(student, path, dtype=dtype or self.export_dtype, method=self.name,
                             facts=self.describe(), kv=self.kv_config)

    def bits_per_weight(self, student: nn.Module) -> float:
        """Stored bits per weight of the OneBit layers: 1-bit signs + g, h (+ norm) in export_dtype, no bias."""
        float_bits = 32 if self.export_dtype == "float32" else 16
        layers = [m for m in student.modules() if isinstance(m, OneBitLinear)]
        bits = sum(layer_storage_bits(m.out_features, m.in_features, m.norm.elementwise_affine, float_bits)
                   for m in layers)
        count = sum(m.out_features * m.in_features for m in layers)
        return bits / count if count else 16.0

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "init": self.init_name,
            "surrogate": self.layer_options["surrogate"],
            "norm_affine": self.layer_options["norm_affine"],
            "norm_init": self.norm_init,
            "beta": self.beta,
            "latent_scale": self.latent_scale,
        }


def init_layer(layer: OneBitLinear, init: str, latent_scale: float, iters: int, device: torch.device) -> None:
    """Write SVID's signs and vectors into one layer: h <- a (output side), g <- b (input side)."""
    signs, h, g = svid(layer.weight.detach().to(device), init, iters)
    layer.h.copy_(h)
    layer.g.copy_(g)
    layer.weight.copy_(signs * latent_scale)


@torch.no_grad()
def calibrate_norms(student: nn.Module, teacher: nn.Module, names: list[str], batches: Iterable[dict]) -> None:
    """Per output feature j, fit o_j ~ w_j n_j + b_j over calibration tokens; write w, b into the norm.

    n = the layer's normalized output LayerNorm((X * g) S^T * h) (no affine), o = the teacher layer's
    output minus the layer's bias (added after the norm), both for the teacher's input X of that layer.
    Only sums are kept: (count, sum n, sum o, sum n^2, sum n o), each (out,).
    """
    stats: dict[str, Tensor] = {}

    def hook_for(name: str, layer: OneBitLinear):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].float().to(layer.g.device)
            n = nn.functional.layer_norm(
                nn.functional.linear(x * layer.g.float(), layer.signs().float()) * layer.h.float(),
                (layer.out_features,), eps=layer.norm.eps,
            ).reshape(-1, layer.out_features)  # (N, out)
            o = output.float().to(n.device).reshape(-1, layer.out_features)
            if layer.bias is not None:
                o = o - layer.bias.float()
            sums = torch.stack([torch.ones_like(n).sum(0), n.sum(0), o.sum(0), (n * n).sum(0), (n * o).sum(0)])
            stats[name] = stats.get(name, 0) + sums
        return hook

    layers = {name: student.get_submodule(name) for name in names}
    hooks = [teacher.get_submodule(name).register_forward_hook(hook_for(name, layer)) for name, layer in layers.items()]
    try:
        for batch in batches:
            device = next(teacher.parameters()).device
            teacher(input_ids=batch["input_ids"].to(device))
    finally:
        for h in hooks:
            h.remove()
    require(bool(stats), "method.norm_init=calibrate needs calibration batches (init_batches >= 1)")
    for name, (count, sn, so, snn, sno) in stats.items():
        mean_n, mean_o = sn / count, so / count
        var_n = (snn / count - mean_n**2).clamp_min(1e-12)
        weight = (sno / count - mean_n * mean_o) / var_n
        norm = layers[name].norm
        norm.weight.copy_(weight)
        norm.bias.copy_(mean_o - weight * mean_n)
