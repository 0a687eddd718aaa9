"""Which student parameters a stage trains, and their optimizer groups.

train (a stage key):
  all              every parameter that is not the teacher's: latent weights, norms, biases, embeddings,
                   and the quantizers' own parameters (ParetoQ trains all of them)
  weights          the latent weights of the quantized layers only
  qparams          the quantizers' parameters only (LSQ steps, SEQ alphas, zero points; OneBit's g, h, norm):
                   EfficientQAT's E2E-QP
  weights+qparams  both of the above
Quantizer parameters always get their own group: lr x qparams_lr_scale (or qparams_lr), no weight decay.
Parameters a stage does not train get requires_grad=False, so no gradient is computed for them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qatlab.errors import require
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.layers.onebit_linear import OneBitLinear

TRAIN = ("all", "weights", "qparams", "weights+qparams")


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The quantizers' own parameters in `model`: weight quantizers' (LSQ, SEQ) and OneBit's value vectors."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            for q in (module.weight_quantizer, module.input_quantizer):
                if q is not None:
                    params += list(q.parameters())
        elif isinstance(module, OneBitLinear):
            params += module.quantizer_parameters()
    return params


def latent_weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, (FakeQuantLinear, OneBitLinear))]


def check_train(train: str, key: str) -> None:
    require(train in TRAIN, f"{key}={train!r} is not known; use one of {list(TRAIN)}")


def parameter_groups(model: nn.Module, train: str, qparams_lr: float | None, key: str = "stage.train") -> list[dict[str, Any]]:
    """Optimizer groups for `train`; sets requires_grad on `model` to match. Raises if nothing would train.

    A quantizer parameter marked `qatlab_frozen` (a zero point after freeze_codes) never trains."""
    check_train(train, key)
    owned = quantizer_parameters(model)
    frozen = {id(p) for p in owned if getattr(p, "qatlab_frozen", False)}
    qparams = {id(p): p for p in owned if id(p) not in frozen}
    if train == "all":
        others = {id(p): p for p in model.parameters() if id(p) not in qparams and id(p) not in frozen}
    elif train == "qparams":
        others = {}
    else:
        others = {id(p): p for p in latent_weights(model)}
    if train == "weights":
        qparams = {}
    keep = set(others) | set(qparams)
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    groups = []
    if others:
        groups.append({"params": list(others.values()), "name": "weights"})
    if qparams:
        q_group = {"params": list(qparams.values()), "name": "qparams", "weight_decay": 0.0}
        if qparams_lr is not None:
            q_group["lr"] = qparams_lr
        groups.append(q_group)
    require(bool(groups), f"{key}={train!r} leaves nothing to train here (this quantizer has no parameters of its "
                          "own: quantizer=minmax recomputes its qparams; use quantizer=lsq, efficientqat or seq)")
    return groups
