"""GPTQ (Frantar et al. 2022): quantize each Linear column by column, feeding every column's rounding
error back into the columns not yet quantized, weighted by the inverse Hessian of the layer's
output error on calibration inputs.

Per layer, weight W (out, in), calibration inputs X (N, in) of this layer in the partly quantized model:
  H = X^T X / N (the paper's 2 X^T X up to a constant, which cancels: dampening is relative)
  dead inputs (H_jj = 0): H_jj <- 1, W[:, j] <- 0 (no calibration signal; the column cannot matter)
  H += percdamp * mean(diag H) * I; U = upper Cholesky factor of H^-1
  for each column j (in blocks of `block_size` columns, the rest updated once per block):
      q_j = quantize(w_j)                      with its group's scale/zero (qatlab's grid and rounding)
      e_j = (w_j - q_j) / U_jj
      w_k -= e_j * U_jk  for k > j             (the error feedback)

Grid: the scale/zero of a group are qatlab's MinMax `compute_qparams` of the group's values, taken
when the group's first column is reached (so they see the error feedback so far), or from the
original weights up front for per-channel scales and with act_order ("static groups": qatlab's
groups are contiguous in the ORIGINAL column order, which act_order's permutation breaks up).
Rounding is `fake_quantize` with those qparams: the same grid, clamp and round-half-even as RTN.

Idempotence: the student's FakeQuantLinear recomputes MinMax qparams from its latent weight on
every forward. GPTQ writes the quantized values Q into the latent weight, so MinMax(Q) must
give back the same grid. Error feedback can pull a group's extreme element inward by a step,
which would shrink MinMax(Q) and re-quantize Q onto a finer grid. So the element that set a
group's max (min, for asymmetric grids; max |w| for symmetric ones) is pinned to the top (bottom)
code, and its extra error is fed back like any other. Then fake_quantize(Q) == Q up to float
rounding of the scale (~1e-7 relative), with the same integer codes.

act_order: columns are processed in order of decreasing H_jj (most active inputs first).

sink_share (a qatlab extension; 0 = the paper): the first token of every sequence is the model's
attention sink, whose inputs point in directions almost no other token visits. Plain GPTQ minimizes
the error averaged over tokens, so it pushes the rounding error into exactly those directions: on the
embedded SmolLM2 (W3 g64, teacher-input Hessians) its error on first-token inputs was 3.7x RTN's
on average and 32x in the worst layer, and test PPL rose from 59.0 (RTN) to 131.3, although every
layer's average output error fell to 0.3-0.7x RTN's. With sink_share = s, the Gram of the first
tokens alone (H0) is added with weight s of the total trace, H' = H + s / (1 - s) * tr(H) / tr(H0) * H0:
s = 0.25 gave 47.1 (first-token error 0.07x RTN's). experiments/gptq/README.md has the study.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qatlab.errors import QatlabError, require
from qatlab.models.layer_maps import decoder_blocks, layer_map_for
from qatlab.inits.clip_search import (
    GramHook,
    capture_block_inputs,
    layers_by_block,
    run_block,
    search_device,
)
from qatlab.quantizers.spec import QuantConfig
from qatlab.quantizers.primitives import compute_qparams, dequantize, fake_quantize

log = logging.getLogger("qatlab")


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal (static groups)
    device: str = "auto"  # where blocks run and layers are solved: auto (GPU if any) | cpu | cuda:N
    sink_share: float = 0.0  # share of the Hessian's trace given to first-token inputs; 0 = the paper

    def __post_init__(self) -> None:
        require(
            isinstance(self.sink_share, (int, float)) and 0.0 <= self.sink_share < 1.0,
            f"init.sink_share={self.sink_share!r} must lie in [0, 1) (0 = the paper's Hessian, 0.25 protects "
            "the attention-sink token; see qatlab/inits/gptq_solver.py)",
        )
        require(
            0.0 <= self.percdamp < 1.0,
            f"init.percdamp={self.percdamp} must lie in [0, 1) (0.01 = 1 % of the mean Hessian diagonal)",
        )
        require(
            isinstance(self.block_size, int) and self.block_size >= 1,
            f"init.block_size={self.block_size!r} must be a positive integer (e.g. 128)",
        )


# ---- one group's grid ----------------------------------------------------------------------------


@dataclass
class GroupGrid:
    """The qparams of one group of columns for every row, plus which element pins each end."""

    scale: Tensor  # (out, 1), or (out, 2) for NF grids
    zero: Tensor | None  # (out, 1) for asymmetric int grids
    top: Tensor  # (out,) value of the largest code
    bottom: Tensor  # (out,) value of the smallest code
    pin_top: Tensor  # (out,) long: the column (original index) forced to `top`; -1 = none
    pin_bottom: Tensor  # (out,) long: the column forced to `bottom`; -1 = none

    def quantize(self, w: Tensor, col: int, col_cfg: QuantConfig) -> Tensor:
        """Quantized values of column `col` (out,) on this grid, pinned ends included."""
        q = fake_quantize(w[:, None], col_cfg, self.scale, self.zero)[:, 0]
        q = torch.where(self.pin_top == col, self.top, q)
        return torch.where(self.pin_bottom == col, self.bottom, q)


def group_grid(values: Tensor, cfg: QuantConfig, first: int) -> GroupGrid:
    """MinMax grid of a group whose columns (out, g) start at original column index `first`."""
    scale, zero = compute_qparams(values, cfg)
    out = values.shape[0]
    ends = torch.tensor([cfg.qmin, cfg.qmax], device=values.device).expand(out, 2)
    bottom, top = dequantize(ends, scale, zero, cfg, (out, 2)).unbind(-1)
    none = torch.full((out,), -1, dtype=torch.long, device=values.device)
    if cfg.binary:  # its scale, mean |w|, comes back from any pattern of +-s: nothing to pin
        pin_top, pin_bottom = none, none
    elif cfg.symmetric:  # the scale comes from max |w|: pin that element to its sign's end
        at = values.abs().argmax(-1)
        positive = values.gather(-1, at[:, None])[:, 0] >= 0
        pin_top = torch.where(positive, first + at, none)
        pin_bottom = torch.where(positive, none, first + at)
    else:  # min and max (widened to include 0): pin each end that is not the zero itself
        pin_top = torch.where(values.amax(-1) > 0, first + values.argmax(-1), none)
        pin_bottom = torch.where(values.amin(-1) < 0, first + values.argmin(-1), none)
    return GroupGrid(scale, zero, top, bottom, pin_top, pin_bottom)


# ---- one layer ---------------------------------------------------------------------------------------


def group_size_of(cfg: QuantConfig, width: int) -> int:
    require(
        cfg.granularity in ("group", "channel"),
        f"{cfg.name}.granularity={cfg.granularity!r} is not supported by GPTQ; use group or channel",
    )
    return cfg.group_size if cfg.granularity == "group" else width


def inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U); damp grows x10 while H is not positive definite."""
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for _ in range(4):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        damp = damp * 10 if damp > 0 else 1e-6 * hessian.diagonal().mean().item() + 1e-12
    raise QatlabError("GPTQ: the calibration Hessian is not positive definite even after dampening; "
                      "raise init.percdamp (e.g. 0.1) or give more calibration data (init_batches)")


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, cfg: QuantConfig,
    percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
) -> Tensor:
    """GPTQ-quantized copy of weight (out, in), float32, given the inputs' Hessian (in, in)."""
    W = weight.detach().float().clone()  # (out, in)
    H = hessian.detach().float().clone()  # (in, in)
    width = W.shape[1]
    gs = group_size_of(cfg, width)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = act_order or gs == width  # qparams from the original weights, all groups up front
    grids: list[GroupGrid | None] = [None] * (width // gs)
    if static:
        grids = [group_grid(W[:, g * gs : (g + 1) * gs], cfg, g * gs) for g in range(width // gs)]
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(width, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, percdamp * H.diagonal().mean().item())

    # Dynamic groups must lie inside one block, so that W1 holds their error-updated values.
    step = block_size if static else max(1, block_size // gs) * gs
    col_cfg = dataclasses.replace(cfg, granularity="channel")  # a column (out, 1): one given scale per row
    order = perm.tolist()
    Q = torch.zeros_like(W)
    for i1 in range(0, width, step):
        i2 = min(i1 + step, width)
        W1 = W[:, i1:i2].clone()  # (out, b) this block, updated column by column
        E1 = torch.zeros_like(W1)  # (out, b) scaled errors, applied to the rest once per block
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            if grids[col // gs] is None:  # a group's first column (columns are in order here)
                grids[col // gs] = group_grid(W1[:, i : i + gs], cfg, col)
            w = W1[:, i]
            q = grids[col // gs].quantize(w, col, col_cfg)
            Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


class SinkAwareGram(GramHook):
    """GramHook that also keeps the Gram of each sequence's first kept token (the attention sink), in one pass."""

    def __init__(self, width: int, group: int, device: torch.device):
        super().__init__(width, group, device)
        self.first = GramHook(width, group, device)  # (G, g, g) over the first tokens only

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        super().__call__(module, args, output)
        x = args[0].reshape(-1, args[0].shape[-1])  # (T, in): run_block feeds one sequence at a time
        if self.keep is not None:
            x = x[self.keep]
        self.first(module, (x[:1],), output)


def with_sink(hessian: Tensor, first: Tensor, share: float) -> Tensor:
    """H + share / (1 - share) * tr(H) / tr(H0) * H0: the first tokens get `share` of the trace."""
    if share == 0 or first.trace() <= 0:
        return hessian
    return hessian + first * (share / (1 - share) * hessian.trace() / first.trace())


def output_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """sum over rows of d H d^T, d = quantized - weight: the layer's mean squared output change (x N / N)."""
    d = quantized.float() - weight.float()  # (out, in)
    return (d @ hessian * d).sum().item()


# ---- the model, block by block ---------------------------------------------------------------------


@dataclass
class GPTQReport:
    layers: int
    seconds: float
    error_ratio: float  # mean over layers of output error (GPTQ / RTN), on the calibration Hessian
    idempotence: float  # max over layers of max|fake_quantize(Q) - Q| / max|Q| (float rounding only)


@torch.no_grad()
def gptq_model(
    student: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: list[tuple[Tensor, Tensor]],
    config: GPTQConfig,
) -> GPTQReport:
    """GPTQ every layer (name -> FakeQuantLinear of `student`) in place, block by block, sequentially.

    Block i's inputs come from the already-quantized blocks 0..i-1; its layers see full-precision
    weights of block i while their Hessians are collected (all at once, as the reference's default),
    then are quantized, and the quantized block's outputs become block i+1's inputs.
    """
    started = time.time()
    device = search_device(config.device)
    blocks = decoder_blocks(student)
    per_block = layers_by_block(layers, layer_map_for(student).blocks, len(blocks),
                                who="GPTQ", off="use method=rtn for it")
    last = max((i for i, names in enumerate(per_block) if names), default=-1)
    inputs = capture_block_inputs(student, calibration, device)
    ratios, idempotence = [], 0.0
    for i in tqdm(range(last + 1), desc="gptq", unit="block"):
        block, home = blocks[i], next(blocks[i].parameters()).device
        block.to(device)
        gram = SinkAwareGram if config.sink_share else GramHook
        hooks = {layers[n]: gram(layers[n].in_features, layers[n].in_features, device) for n in per_block[i]}
        for layer in hooks:
            layer.enabled = False  # this block's Hessians come from its full-precision weights
        run_block(block, inputs, device, hooks)
        for layer, hook in hooks.items():
            require(hook.count > 0, "GPTQ got no calibration tokens (all masked); set init_batches >= 1")
            H = hook.gram()[0]  # (in, in)
            if config.sink_share:
                H = with_sink(H, hook.first.gram()[0], config.sink_share)
            W = layer.weight.detach().float()
            Q = gptq_quantize(W, H, layer.weight_cfg, config.percdamp, config.block_size, config.act_order)
            rtn = output_error(W, fake_quantize(W, layer.weight_cfg), H)
            if rtn > 0:
                ratios.append(output_error(W, Q, H) / rtn)
            drift = (fake_quantize(Q, layer.weight_cfg) - Q).abs().max() / Q.abs().max().clamp_min(1e-12)
            idempotence = max(idempotence, drift.item())
            layer.weight.data.copy_(Q)
            layer.enabled = True
        inputs.hidden = run_block(block, inputs, device)  # the quantized block feeds the next
        block.to(home)
    error_ratio = sum(ratios) / len(ratios) if ratios else 1.0
    return GPTQReport(len(layers), time.time() - started, error_ratio, idempotence)
