"""OneBit's SVID init (Xu et al. 2024) as an Init, for OneBitLinear layers (quantizer=onebit).

Per layer: sign(W) and a rank-1 non-negative factorization |W| ~ h g^T (qatlab.inits.nmf; `method: svd`
for the ablation), h on the output side, g on the input side; then the latent weight becomes
sign(W) * latent_scale (the reference's 0.01: near zero, so the tanh surrogate starts as a plain
straight-through gradient).
norm_init=calibrate (an extension, not in the paper; needs the layers' norm_affine): fit each layer's
LayerNorm weight and bias per output feature by least squares so the normalized output matches the
teacher layer's output on the calibration batches. Without it every layer emits unit-variance
features and the residual stream's scales are lost.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from qatlab.errors import QatlabError, require
from qatlab.inits.base import Init
from qatlab.inits.nmf import INITS, svid
from qatlab.layers.onebit_linear import OneBitLinear

log = logging.getLogger("qatlab")

NORM_INITS = ("none", "calibrate")


class SVID(Init):
    name = "svid"

    def __init__(self, *, method: str = "svid", nmf_iters: int = 50, latent_scale: float = 0.01,
                 norm_init: str = "none", device: str = "auto") -> None:
        require(method in INITS, f"init.method='{method}' is not known; use one of {list(INITS)}")
        require(isinstance(latent_scale, (int, float)) and math.isfinite(latent_scale) and latent_scale > 0,
                f"init.latent_scale={latent_scale!r} must be > 0 (the reference uses 0.01)")
        require(isinstance(nmf_iters, int) and nmf_iters >= 1, f"init.nmf_iters={nmf_iters!r} must be an integer >= 1")
        require(norm_init in NORM_INITS, f"init.norm_init='{norm_init}' is not known; use one of {list(NORM_INITS)}")
        require(device in ("auto", "cpu", "cuda"), f"init.device='{device}' must be auto, cpu or cuda")
        self.method, self.nmf_iters, self.latent_scale = method, nmf_iters, float(latent_scale)
        self.norm_init, self.device = norm_init, device

    def __call__(self, student, teacher, layers, calibration):
        bad = next((n for n, m in layers.items() if not isinstance(m, OneBitLinear)), None)
        if bad is not None:
            raise QatlabError(f"init=svid factorizes OneBit layers, but '{bad}' is {type(layers[bad]).__name__} "
                              "(quantizer=onebit makes OneBit layers; with another quantizer use init=none)")
        if self.norm_init == "calibrate":
            require(all(m.norm.elementwise_affine for m in layers.values()),
                    "init.norm_init=calibrate fits the LayerNorm's weight and bias: set quantizer.norm_affine=true")
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.device == "auto" else self.device)
        started = time.time()
        with torch.no_grad():
            for layer in layers.values():
                init_layer(layer, self.method, self.latent_scale, self.nmf_iters, device)
        if self.norm_init == "calibrate":
            calibrate_norms(student, teacher, list(layers), calibration)
        seconds = time.time() - started
        log.info("onebit: %s init of %d layers in %.1f s", self.method, len(layers), seconds)
        return {"init/svid_s": round(seconds, 2)}

    def describe(self) -> dict[str, Any]:
        return {"init": self.name, "svid_method": self.method, "latent_scale": self.latent_scale,
                "norm_init": self.norm_init}


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
    require(bool(stats), "init.norm_init=calibrate needs calibration batches (init_batches >= 1)")
    for name, (count, sn, so, snn, sno) in stats.items():
        mean_n, mean_o = sn / count, so / count
        var_n = (snn / count - mean_n**2).clamp_min(1e-12)
        weight = (sno / count - mean_n * mean_o) / var_n
        norm = layers[name].norm
        norm.weight.copy_(weight)
        norm.bias.copy_(mean_o - weight * mean_n)
