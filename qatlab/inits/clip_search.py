"""Asymmetric clipping init (BitDistiller): shrink each weight group's max and min separately, once.

For every targeted layer and every quantization group, try `grid x grid` pairs of shrink ratios
(r_max, r_min) in 1 - linspace(0, max_shrink, grid) (default 1.00, 0.95, ..., 0.55), and keep the
pair whose clipped-then-quantized group changes the layer's output least on calibration inputs
captured from the teacher; then clamp the latent weight to it: w_g <- clamp(w_g, min_g * r_min,
max_g * r_max). No trainable parameters are added; the quantizer keeps recomputing MinMax qparams
from the (now clipped) latent weight on every forward.

Output error, as in the reference (AWQ-style): each group is scored by its own share of the output,
    e_g = mean_n (x_n,g . (q(w_g') - w_g))^2 = d^T H_g d,   d = q(w_g') - w_g,   H_g = X_g^T X_g / N,
with X_g the (N, g) slice of the inputs that group multiplies. Every (row, group) therefore picks its
pair independently, and the (n_groups, g, g) Gram matrices replace the activations: the search
cost does not grow with the number of calibration tokens and no activations are kept beyond the
current block's hidden states.

Schedule: the teacher's inputs to decoder block 0 are captured once; then block by block the teacher
block moves to the search device, runs the calibration hidden states (hooks accumulate each linear's
Gram matrix), its layers are searched on the device (all candidate pairs of a chunk of rows batched
in one tensor), the student's latent weights are clamped, and the block's outputs feed the next one.

Chosen bounds (per layer: `<name>.min` / `<name>.max`, (out, n_groups) float32) are cached as
safetensors under a key hashing the model (architecture, weight fingerprints, quantizer settings),
the clip settings and the calibration tokens; a later run with the same key skips the search.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from qatlab.atomic import atomic_path
from qatlab.errors import require
from qatlab.models.embedded import default_cache_dir
from qatlab.models.layer_maps import decoder_blocks, layer_map_for
from qatlab.quantizers.spec import QuantConfig
from qatlab.quantizers.nf_grid import nf_codebook, nf_round
from qatlab.quantizers.primitives import compute_qparams, fake_quantize

log = logging.getLogger("qatlab")

CACHE_VERSION = "clip-v1"  # bump when the search's math changes, so old caches are not reused
# Attention projections whose outputs meet in q.k^T: the reference does not clip them.
QK_NAMES = ("q_proj", "k_proj", "query", "key", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
CHUNK_ELEMENTS = 2**24  # candidates x rows x in per batched step: 64 MB of fp32 per temporary


@dataclass(frozen=True)
class ClipConfig:
    enabled: bool = True
    grid: int = 10  # shrink steps per side: grid x grid (r_max, r_min) pairs
    max_shrink: float = 0.45  # largest shrink of a group's max or min (ratio 1 - max_shrink)
    skip_qk: bool = True  # leave q/k projections unclipped (as the reference does)
    tokens: int | None = 4096  # calibration tokens used (whole sequences, in order); null = all
    device: str = "auto"  # where the search runs: auto (this rank's GPU if any, else cpu) | cpu | cuda:N
    cache_dir: str | None = None  # null = $QATLAB_CACHE/clip (~/.cache/qatlab/clip)
    cache: bool = True  # read and write the cache

    def __post_init__(self) -> None:
        require(isinstance(self.grid, int) and self.grid >= 1, f"init.grid={self.grid!r} must be an integer >= 1 (e.g. 10)")
        require(
            0.0 <= self.max_shrink < 1.0,
            f"init.max_shrink={self.max_shrink} must lie in [0, 1) (0.45 shrinks a group's range by up to 45 %)",
        )
        require(
            self.tokens is None or (isinstance(self.tokens, int) and self.tokens > 0),
            f"init.tokens={self.tokens!r} must be a positive integer (e.g. 4096) or null for all",
        )

    @classmethod
    def from_dict(cls, d: Mapping | None) -> ClipConfig:
        d = dict(d or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        require(not unknown, f"init (clip): unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**d)

    def ratios(self) -> Tensor:
        """(grid,) shrink ratios, 1.0 first."""
        return 1 - torch.linspace(0, self.max_shrink, self.grid, dtype=torch.float32)


@dataclass
class ClipResult:
    lo: Tensor  # (out, n_groups) chosen lower bound per group
    hi: Tensor  # (out, n_groups) chosen upper bound per group
    error_minmax: float  # summed group output error with no clipping
    error: float  # the same with the chosen clipping (<= error_minmax)


@dataclass
class ClipReport:
    layers: int  # layers clipped
    seconds: float  # wall time of init (search, or cache load)
    cached: bool  # True if the bounds came from the cache
    path: Path | None  # the cache file
    error_ratio: float | None = None  # mean over layers of error / error_minmax (None when cached)


# ---- the search for one layer ------------------------------------------------------------------


def _group_size(cfg: QuantConfig, in_features: int) -> int:
    require(
        cfg.granularity in ("group", "channel"),
        f"{cfg.name}.granularity={cfg.granularity!r} cannot be clipped per group; use group or channel, "
        "or set init=none",
    )
    return cfg.group_size if cfg.granularity == "group" else in_features


@torch.no_grad()
def search_layer_clip(weight: Tensor, gram: Tensor, cfg: QuantConfig, ratios: Tensor) -> ClipResult:
    """Best (lo, hi) per group of weight (out, in), given the Gram matrices (n_groups, g, g) of its inputs."""
    out, width = weight.shape
    n_groups, g = gram.shape[0], gram.shape[1]
    w = weight.detach().float().reshape(out, n_groups, g)
    gram = gram.float()
    r_hi, r_lo = (r.reshape(-1, 1, 1, 1).to(w.device) for r in torch.meshgrid(ratios, ratios, indexing="ij"))
    pairs = r_hi.shape[0]  # (1, 1) first: ties keep MinMax
    rows = max(1, CHUNK_ELEMENTS // (pairs * width))
    lo_all, hi_all, err_minmax, err_best = [], [], 0.0, 0.0
    for start in range(0, out, rows):
        wc = w[start : start + rows]  # (r, G, g)
        hi = wc.amax(-1, keepdim=True) * r_hi  # (P, r, G, 1)
        lo = wc.amin(-1, keepdim=True) * r_lo
        d = quantize_clamped(wc, lo, hi, cfg).sub_(wc)  # (P, r, G, g)
        err = (torch.einsum("prgk,gkl->prgl", d, gram) * d).sum(-1)  # (P, r, G)
        best = err.argmin(0, keepdim=True)  # (1, r, G)
        lo_all.append(lo.squeeze(-1).expand_as(err).gather(0, best)[0])
        hi_all.append(hi.squeeze(-1).expand_as(err).gather(0, best)[0])
        err_minmax += err[0].sum().item()
        err_best += err.gather(0, best).sum().item()
    return ClipResult(torch.cat(lo_all), torch.cat(hi_all), err_minmax, err_best)


@torch.no_grad()
def quantize_clamped(w: Tensor, lo: Tensor, hi: Tensor, cfg: QuantConfig) -> Tensor:
    """fake_quantize(clamp(w, lo, hi), cfg) for groups w (..., g) and bounds (P, ..., 1): (P, ..., g).

    Bit-identical to the plain call, but cheaper: the clamped group's min/max are its own min/max
    clamped, so the MinMax qparams come from (P, ..., 2) extremes instead of a reduction over every
    candidate, and the grids are evaluated with few, mostly in-place passes (fresh CPU allocations
    of this size dominate); test_clip_search checks the bit-identity for int and NF grids.
    """
    clamped = torch.clamp(w, lo, hi)  # broadcasts to (P, ..., g)
    if cfg.binary:  # its scale is mean|x|, which the extremes do not give
        return fake_quantize(clamped, cfg)
    ends = torch.stack([w.amin(-1), w.amax(-1)], dim=-1)  # (..., 2)
    ends = torch.clamp(ends, lo, hi)  # (P, ..., 2)
    scale, zero = compute_qparams(ends.reshape(-1, 2), cfg)
    scale = scale.reshape(*ends.shape[:-1], -1)  # (P, ..., 1), or (P, ..., 2) for NF
    zero = None if zero is None else zero.reshape(*ends.shape[:-1], 1)
    if cfg.nf:  # as primitives' NF path: halves scaled by -min / max, nearest codebook value
        halves = torch.where(clamped < 0, scale[..., :1], scale[..., 1:])
        return nf_codebook(cfg.bits, w.device)[nf_round(clamped.div_(halves), cfg.bits)].mul_(halves)
    codes = clamped.div_(scale).round_()
    if zero is not None:
        codes.add_(zero)
    codes.clamp_(cfg.qmin, cfg.qmax)
    if zero is not None:
        codes.sub_(zero)
    return codes.mul_(scale)


@torch.no_grad()
def apply_clip(weight: Tensor, lo: Tensor, hi: Tensor) -> None:
    """Clamp weight (out, in) in place, group by group, to [lo, hi] (out, n_groups)."""
    out, n_groups = lo.shape
    groups = weight.view(out, n_groups, -1)
    groups.copy_(torch.clamp(groups, lo[..., None].to(groups), hi[..., None].to(groups)))


# ---- calibration statistics: Gram matrices of a linear's inputs --------------------------------


class GramHook:
    """Forward hook accumulating sum_n x_n,g x_n,g^T per group over the unmasked tokens: (G, g, g)."""

    def __init__(self, width: int, group: int, device: torch.device):
        self.group = group
        self.sum = torch.zeros(width // group, group, group, device=device)
        self.count = 0
        self.keep: Tensor | None = None  # (B*T,) bool of the current batch, set by the caller

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])  # (B*T, in)
        if self.keep is not None:
            x = x[self.keep]
        xg = x.float().reshape(x.shape[0], -1, self.group)  # (N, G, g)
        self.sum += torch.einsum("ngk,ngl->gkl", xg, xg)
        self.count += x.shape[0]

    def gram(self) -> Tensor:
        return self.sum / max(self.count, 1)


# ---- walking the teacher block by block ---------------------------------------------------------


class _Stop(Exception):
    """Raised by the pre-hook on block 0 once its inputs are caught."""


def to_device(obj: Any, device: torch.device) -> Any:
    """obj with every tensor inside (nested tuples, lists, dicts) moved to device."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def block0_inputs(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, tuple, dict]:
    """(hidden (B, T, H), other positional args, kwargs) that `model` passes to its first decoder block."""
    caught = {}

    def catch(module, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise _Stop

    device = next(model.parameters()).device
    handle = decoder_blocks(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    args, kwargs = caught["args"], dict(caught["kwargs"])
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, tuple(args[1:]), kwargs


def calibration_sequences(batches: Iterable[Mapping[str, Tensor]], tokens: int | None) -> list[tuple[Tensor, Tensor]]:
    """(input_ids, mask) pairs: whole sequences, in order, until `tokens` counted tokens."""
    pairs, seen = [], 0
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        for row in range(ids.shape[0]):
            if tokens is not None and seen >= tokens:
                return pairs
            pairs.append((ids[row : row + 1], mask[row : row + 1]))
            seen += int(mask[row].sum())
    return pairs


_calibration = calibration_sequences  # the older private name


@dataclass
class BlockInputs:
    """What the calibration sequences feed one decoder block: one entry per sequence."""

    hidden: list[Tensor]  # (1, T, H) each, on the walk's device; replaced by each block's outputs
    args: list[tuple]  # the other positional args the model passes its blocks (as caught)
    kwargs: list[dict]  # attention mask, position ids / rotary embeddings, ...
    keeps: list[Tensor]  # (T,) bool, on the walk's device: the tokens that count (not padding)


def capture_block_inputs(
    model: nn.Module, calibration: list[tuple[Tensor, Tensor]], device: torch.device
) -> BlockInputs:
    """Block 0's inputs for every (input_ids (1, T), mask (1, T)) sequence, hidden states moved to device."""
    states = [block0_inputs(model, ids, mask) for ids, mask in calibration]
    return BlockInputs(
        hidden=[to_device(h, device) for h, _, _ in states],
        args=[a for _, a, _ in states],
        kwargs=[k for _, _, k in states],
        keeps=[mask.reshape(-1).bool().to(device) for _, mask in calibration],
    )


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: BlockInputs, device: torch.device, hooks: Mapping[nn.Module, Any] | None = None
) -> list[Tensor]:
    """The block's output hidden states for every sequence (the next block's inputs).

    `block` must already be on `device`. `hooks` maps a module inside it to a forward hook with a
    `keep` attribute (e.g. GramHook), which is set to the current sequence's token mask.
    """
    hooks = hooks or {}
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    outputs = []
    try:
        for b, hidden in enumerate(inputs.hidden):
            for hook in hooks.values():
                hook.keep = inputs.keeps[b]
            out = block(hidden, *to_device(inputs.args[b], device), **to_device(inputs.kwargs[b], device))
            outputs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def clip_targets(layers: Mapping[str, nn.Module], skip_qk: bool) -> dict[str, nn.Module]:
    """The layers the search clips: all given ones, minus q/k projections when skip_qk."""
    return {n: m for n, m in layers.items() if not (skip_qk and n.rsplit(".", 1)[-1] in QK_NAMES)}


def layers_by_block(
    names: Iterable[str], prefix: str, n_blocks: int,
    who: str = "clip search", off: str = "set init=none",
) -> list[list[str]]:
    """Layer names grouped by the index N of their decoder block '<prefix>.N.'."""
    per_block = [[] for _ in range(n_blocks)]
    for name in names:
        head, _, rest = name.removeprefix(prefix + ".").partition(".")
        require(
            name.startswith(prefix + ".") and head.isdigit() and rest,
            f"layer '{name}' is outside the decoder blocks ('{prefix}.N'); {who} handles block layers "
            f"only: exclude it from method.include or {off}",
        )
        per_block[int(head)].append(name)
    return per_block


def search_model(
    teacher: nn.Module,
    targets: Mapping[str, nn.Module],
    calibration: list[tuple[Tensor, Tensor]],
    ratios: Tensor,
    device: torch.device,
) -> tuple[dict[str, ClipResult], float]:
    """Search and clamp every target layer (name -> student layer), block by block.

    Returns (results, mean over layers of error / error_minmax).
    """
    blocks = decoder_blocks(teacher)
    per_block = layers_by_block(targets, layer_map_for(teacher).blocks, len(blocks))
    last = max((i for i, names in enumerate(per_block) if names), default=-1)
    inputs = capture_block_inputs(teacher, calibration, device)
    results: dict[str, ClipResult] = {}
    bar = tqdm(total=len(targets), desc="clip search", unit="layer")
    for i in range(last + 1):
        block, home = blocks[i], next(blocks[i].parameters()).device
        block.to(device)
        hooks = {}
        for name in per_block[i]:
            layer = targets[name]
            hooks[name] = GramHook(layer.in_features, _group_size(layer.weight_cfg, layer.in_features), device)
        inputs.hidden = run_block(block, inputs, device, {teacher.get_submodule(n): h for n, h in hooks.items()})
        block.to(home)
        for name, hook in hooks.items():
            layer = targets[name]
            result = search_layer_clip(layer.weight.to(device), hook.gram(), layer.weight_cfg, ratios)
            apply_clip(layer.weight.data, result.lo, result.hi)
            results[name] = ClipResult(result.lo.cpu(), result.hi.cpu(), result.error_minmax, result.error)
            bar.update()
    bar.close()
    shares = [r.error / r.error_minmax for r in results.values() if r.error_minmax > 0]
    return results, (sum(shares) / len(shares) if shares else 1.0)


# ---- the cache ----------------------------------------------------------------------------------


def cache_key(
    student: nn.Module,
    teacher: nn.Module,
    targets: Mapping[str, nn.Module],
    calibration: list[tuple[Tensor, Tensor]],
    config: ClipConfig,
) -> str:
    """sha256 (24 hex chars) of model identity + quantizer settings + clip settings + calibration tokens."""
    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for part in parts:
            h.update(part if isinstance(part, bytes) else repr(part).encode())

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("cache_dir", "cache", "device")}
    add(CACHE_VERSION, type(student).__name__, getattr(student.config, "model_type", None), settings)
    add(str(next(teacher.parameters()).dtype))  # the calibration activations come from the teacher
    for name, layer in sorted(targets.items()):
        w = layer.weight.detach().reshape(-1)
        sample = w[:: max(1, w.numel() // 4096)].float().cpu()  # a weight fingerprint, cheap on 7B
        add(name, tuple(layer.weight.shape), layer.weight_cfg, sample.numpy().tobytes())
    for ids, mask in calibration:
        add(ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def save_clips(path: Path, results: Mapping[str, ClipResult], key: str) -> None:
    """Write `<name>.min` / `<name>.max` atomically (a temp file, then os.replace)."""
    tensors = {}
    for name, r in results.items():
        tensors[f"{name}.min"] = r.lo.contiguous()
        tensors[f"{name}.max"] = r.hi.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, "version": CACHE_VERSION})


def load_clips(path: Path, names: Iterable[str]) -> dict[str, tuple[Tensor, Tensor]] | None:
    """(lo, hi) per layer from the cache, or None when the file is missing or lacks a layer."""
    if not path.exists():
        return None
    tensors = load_file(str(path))
    try:
        return {n: (tensors[f"{n}.min"], tensors[f"{n}.max"]) for n in names}
    except KeyError:
        return None


# ---- the entry point ----------------------------------------------------------------------------


def search_device(name: str) -> torch.device:
    """auto: this process's GPU (LOCAL_RANK under a multi-GPU launcher), else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def asymmetric_clip_init(
    student: nn.Module,
    teacher: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, Tensor]],
    config: ClipConfig,
) -> ClipReport:
    """Clip the student's layers (name -> FakeQuantLinear) in place: from the cache, or by searching."""
    started = time.time()
    targets = clip_targets(layers, config.skip_qk)
    if not targets:
        return ClipReport(0, 0.0, False, None)
    calibration = calibration_sequences(batches, config.tokens)
    require(bool(calibration), "clip search got no calibration batches; set init_batches >= 1 or init=none")
    key = cache_key(student, teacher, targets, calibration, config)
    path = Path(config.cache_dir or default_cache_dir() / "clip") / f"{key}.safetensors"
    cached = load_clips(path, targets) if config.cache else None
    if cached is not None:
        for name, (lo, hi) in cached.items():
            apply_clip(targets[name].weight.data, lo, hi)
        log.info("clip: reused %d layers from %s", len(cached), path)
        return ClipReport(len(cached), time.time() - started, True, path)
    results, error_ratio = search_model(teacher, targets, calibration, config.ratios(), search_device(config.device))
    if config.cache:
        save_clips(path, results, key)
    seconds = time.time() - started
    log.info("clip: searched %d layers in %.1f s (%.2f s/layer), output error x%.3f of MinMax; cached at %s",
             len(results), seconds, seconds / len(results), error_ratio, path)
    return ClipReport(len(results), seconds, False, path if config.cache else None, error_ratio)


def describe_report(report: ClipReport) -> dict[str, Any]:
    """Flat numbers for the results table (`init/...`)."""
    facts = {"init/clip_layers": report.layers, "init/clip_s": round(report.seconds, 2),
             "init/clip_cached": int(report.cached)}
    if report.error_ratio is not None:
        facts["init/clip_error_ratio"] = round(report.error_ratio, 4)
    return facts

