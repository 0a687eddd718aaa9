"""Blockwise: train the student one decoder block at a time against the teacher's block (MSE).

One stage serves ZeroQuant's LKD and EfficientQAT's Block-AP; they differ in its options:

For block k = 0 .. L-1, on N calibration sequences of T tokens (hidden width H):
    inputs   X_k (B, T, H) micro-batches of `batch_size` rows; X_0 = the embeddings (not quantized), then
             student_input=student: X_{k+1} = the trained student block k on X_k      (LKD as qatlab ran it;
                                                                                     Block-AP)
             student_input=teacher: X_{k+1} = the teacher block k on X_k               (ZeroQuant's reference)
    target   Y_k = teacher block k on its own input:
             target_input=student: on X_k, the student's input (both blocks see the same tensor)
             target_input=teacher: on the teacher's chain X^T_k (Block-AP: the FP block on the FP input)
    train    `steps` optimizer steps on MSE(student block k (X_k), Y_k) over micro-batches in a seeded
             shuffled order, updating block k's parameters chosen by `train` (qatlab.stages.params;
             the quantizers' own parameters at qparams_lr), with a fresh optimizer (adam | adamw) and an
             lr schedule within the block: cosine (lr toward lr / min_lr_factor; 0 when null) | constant
    then     freeze block k (requires_grad False), drop its optimizer and gradients, move on.
The MSE before and after is measured on the whole calibration set and logged per block.

Why Lightning Fabric and not `Trainer.fit` per block: a loop over blocks, each with its own optimizer,
over a few cached tensors; it has no epochs, validation or checkpoints, and one Trainer per block would
rebuild loggers, callbacks and progress machinery L times for a loop of a few dozen steps. Fabric keeps
that loop explicit while still giving device placement (`accelerator`) and mixed precision (`precision`).

Memory at any time, beyond the two models' weights (only block k of each is moved to the compute
device; the rest stays where it was):
    activations kept    X_k and Y_k (and X^T_k with target_input=teacher and student_input=student):
                        2-3 x N x T x H x bytes(student dtype) (SmolLM2, N=16, T=512, H=576, fp32: 38 MB per
                        tensor set; LLaMA-7B, N=128, T=2048, H=4096: 4.3 GB each), plus one micro-batch's
                        autograd activations through one block;
    gradients + Adam    block k only: 3 x its parameters (SmolLM2: 3.5M params, 42 MB; LLaMA-7B: 202M, 2.4 GB).
Whole-model KD instead holds gradients and Adam state for every parameter (SmolLM2: 1.6 GB), the
autograd activations of every block and the full-vocabulary logits of both models.
(experiments/zeroquant/peak_memory.py measures both.)

Resume: after each block its weights (quantizer parameters included) and the block index are saved in
the stage's progress dir (<run dir>/<stage name>/); a resumed run loads the finished blocks and replays
the data flow through them (no training) only if a block is left to train.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from qatlab.atomic import atomic_path, atomic_write_text
from qatlab.data.random_tokens import random_token_batches
from qatlab.errors import require
from qatlab.inits.clip_search import block0_inputs
from qatlab.models.layer_maps import decoder_blocks
from qatlab.stages.base import Stage, StageContext
from qatlab.stages.params import check_train, parameter_groups

log = logging.getLogger("qatlab")

DATA = ("corpus", "random")
INPUTS = ("student", "teacher")
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # "-true" modes would recast the student's weights
PROGRESS = "progress.json"  # in the progress dir: {"done": blocks finished, "report": their records}


@dataclass(frozen=True)
class BlockwiseConfig:
    data: str = "corpus"  # corpus: the run's training sequences | random: uniform token ids
    student_input: str = "student"  # block k's input: the trained student blocks < k | the teacher's blocks < k
    target_input: str = "student"  # the teacher block's input: the student's input | the teacher's own chain
    samples: int = 16  # calibration sequences
    seq_len: int = 512  # length of random-token sequences (corpus ones come at data.block_size)
    batch_size: int = 2  # sequences per optimizer step
    steps: int = 40  # optimizer steps per block
    lr: float = 2e-4  # the block's weights (and everything else `train` picks)
    qparams_lr: float | None = None  # the quantizers' own parameters; null = lr
    train: str = "all"  # qatlab.stages.params: all | weights | qparams | weights+qparams
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    schedule: str = "cosine"  # lr within each block: cosine | constant
    min_lr_factor: float | None = None  # cosine ends at lr / min_lr_factor (Block-AP: 20); null = at 0
    seed: int = 0  # random tokens and the micro-batch order
    accelerator: str = "auto"  # Fabric: auto | cpu | cuda
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed

    def __post_init__(self) -> None:
        k = "stages.<name>"
        require(self.data in DATA, f"{k}.data={self.data!r} is not known; use one of {list(DATA)}")
        for key in ("student_input", "target_input"):
            value = getattr(self, key)
            require(value in INPUTS, f"{k}.{key}={value!r} is not known; use one of {list(INPUTS)}")
        require(not (self.student_input == "teacher" and self.target_input == "student"),
                f"{k}: student_input=teacher with target_input=student would never compute the student's chain; "
                "use target_input=teacher (ZeroQuant's reference) or student_input=student")
        for key in ("samples", "seq_len", "batch_size", "steps"):
            value = getattr(self, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"{k}.{key}={value!r} must be a positive integer")
        for key in ("lr", "qparams_lr"):
            value = getattr(self, key)
            require((value is None and key == "qparams_lr") or (isinstance(value, (int, float)) and math.isfinite(value)
                                                                 and value > 0),
                    f"{k}.{key}={value!r} must be a finite number > 0 (e.g. 5e-5)")
        check_train(self.train, f"{k}.train")
        require(self.optimizer in OPTIMIZERS, f"{k}.optimizer={self.optimizer!r} is not known; use one of {list(OPTIMIZERS)}")
        require(self.schedule in SCHEDULES, f"{k}.schedule={self.schedule!r} is not known; use one of {list(SCHEDULES)}")
        require(self.min_lr_factor is None or (isinstance(self.min_lr_factor, (int, float)) and self.min_lr_factor >= 1),
                f"{k}.min_lr_factor={self.min_lr_factor!r} must be >= 1 (cosine to lr / factor) or null (to 0)")
        require(self.precision in PRECISIONS,
                f"{k}.precision={self.precision!r} is not supported; use one of {list(PRECISIONS)}")

    @property
    def split_inputs(self) -> bool:
        """The student trains on its own chain while the target comes from the teacher's (Block-AP)."""
        return self.student_input == "student" and self.target_input == "teacher"


class Blockwise(Stage):
    """The stage object (conf/stage/blockwise.yaml): its keys are BlockwiseConfig's, plus `enabled`."""

    name = "blockwise"

    def __init__(self, *, enabled: bool = True, **options: Any) -> None:
        valid = [f.name for f in dataclasses.fields(BlockwiseConfig)]
        unknown = sorted(set(options) - set(valid))
        require(not unknown, f"stages.<name>: unknown key(s) {unknown}; valid keys are {['enabled', *valid]}")
        self.config = BlockwiseConfig(**options)
        self.enabled = enabled

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Train every decoder block of ctx.student in place; block progress in <run dir>/<stage name>/."""
        vocab = ctx.student.get_input_embeddings().num_embeddings
        batches = calibration_batches(self.config, ctx.datamodule, vocab, key=f"stages.{self.name}")
        resume_dir = ctx.resume.run_dir / self.name if ctx.resume else None
        metrics = run_blockwise(ctx.student, ctx.teacher, batches, self.config,
                                progress_dir=ctx.output_dir / self.name, resume_dir=resume_dir)
        return {f"{self.name}/{k}": v for k, v in metrics.items()}

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


# ---- calibration data -----------------------------------------------------------------------------


def calibration_batches(config: BlockwiseConfig, datamodule: Any, vocab_size: int,
                        key: str = "stages.<name>") -> list[dict[str, Tensor]]:
    """`samples` sequences as micro-batches of `batch_size`: random tokens, or the run's training sequences."""
    if config.data == "random":
        return random_token_batches(vocab_size, config.samples, config.seq_len, config.batch_size, config.seed)
    ids, masks = [], []
    for batch in datamodule.train_dataloader():
        ids.append(batch["input_ids"])
        masks.append(batch.get("attention_mask", torch.ones_like(batch["input_ids"])))
        if sum(len(i) for i in ids) >= config.samples:
            break
    ids, masks = torch.cat(ids)[: config.samples], torch.cat(masks)[: config.samples]  # (N, T)
    require(
        len(ids) == config.samples,
        f"{key}.samples={config.samples} but the training data holds only {len(ids)} sequences; lower it",
    )
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(config.batch_size),
                                                                   masks.split(config.batch_size))]


# ---- the loop ------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """One micro-batch of the calibration set at the current block."""

    x: Tensor  # (B, T, H) the student block's input
    args: tuple  # the other positional arguments the model passes every block
    kwargs: dict  # masks, position ids/embeddings, ... (the same for every block)
    x_teacher: Tensor | None = None  # (B, T, H) the teacher chain's input (split inputs only)
    y: Tensor | None = None  # (B, T, H) the teacher block's output (the target)


def run_blockwise(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    config: BlockwiseConfig,
    progress_dir: str | Path | None = None,
    resume_dir: str | Path | None = None,
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
) -> dict[str, Any]:
    """Every decoder block of `student` trained in place; returns metrics for results.json.

    progress_dir: after each block, its weights and the block index are saved there (atomically);
    resume_dir: a progress_dir of a killed run with this config: its finished blocks are loaded, not retrained;
    optimizer(param_groups): builds each block's fresh optimizer (default: config.optimizer with lr, weight_decay).
    """
    fabric = Fabric(accelerator=config.accelerator, devices=1, precision=config.precision)
    s_blocks, t_blocks = decoder_blocks(student), decoder_blocks(teacher)
    require(len(s_blocks) == len(t_blocks), "student and teacher have different numbers of decoder blocks")
    started = time.time()
    chunks = [capture(student, b, fabric.device, config.split_inputs) for b in batches]
    report = resume_blocks(fabric, Path(resume_dir), s_blocks, t_blocks, chunks, config) if resume_dir else []
    if progress_dir is not None:
        start_progress(Path(progress_dir), s_blocks, report, resume_dir)
    for k in range(len(report), len(s_blocks)):
        report.append(distill_block(fabric, k, s_blocks, t_blocks, chunks, config, optimizer))
        if progress_dir is not None:
            save_block(Path(progress_dir), k, s_blocks[k], report)
    before = sum(r["mse_before"] for r in report) / len(report)
    after = sum(r["mse_after"] for r in report) / len(report)
    return {
        "steps": config.steps * len(report),
        "mse_before": before,  # mean over blocks
        "mse_after": after,
        "seconds": round(time.time() - started, 1),
        "per_block": report,
    }


@torch.no_grad()
def capture(student: nn.Module, batch: Mapping[str, Tensor], device: torch.device, split: bool) -> Chunk:
    """Block 0's inputs for one micro-batch (the embeddings are not quantized, so the student's serve)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    hidden, args, kwargs = block0_inputs(student, ids, mask)
    x = _move(hidden, device)
    return Chunk(x, _move(args, device), _move(kwargs, device), x_teacher=x.clone() if split else None)


def distill_block(
    fabric: Fabric,
    k: int,
    s_blocks: nn.ModuleList,
    t_blocks: nn.ModuleList,
    chunks: list[Chunk],
    config: BlockwiseConfig,
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
) -> dict[str, float]:
    """Targets, `steps` MSE steps on student block k alone, freeze, advance the inputs; returns its record."""
    started = time.time()
    s_block, t_block = s_blocks[k], t_blocks[k]
    s_home, t_home = _device_of(s_block), _device_of(t_block)
    s_block.to(fabric.device)
    t_block.to(fabric.device)
    mse_before = _targets(fabric, s_block, t_block, chunks)
    t_block.to(t_home)  # the teacher block is done with

    _train_block(fabric, s_block, chunks, config, k, len(s_blocks), optimizer)
    s_block.requires_grad_(False)  # frozen from now on
    gc.collect()  # the block's optimizer, its state and its gradients are gone before the next block's exist

    mse_after = _advance(fabric, s_block, chunks, config)
    s_block.to(s_home)
    seconds = time.time() - started
    log.info("blockwise %d/%d: mse %.4g -> %.4g (%d steps, %.1f s)",
             k + 1, len(s_blocks), mse_before, mse_after, config.steps, seconds)
    return {"block": k, "mse_before": mse_before, "mse_after": mse_after, "seconds": round(seconds, 2)}


def _train_block(fabric: Fabric, block: nn.Module, chunks: list[Chunk], config: BlockwiseConfig, k: int,
                 n_blocks: int, optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None) -> None:
    """`steps` MSE steps on the chosen parameters of one block, with a fresh optimizer that dies on return."""
    groups = parameter_groups(block, config.train, config.qparams_lr, key="stages.<name>.train")
    module = fabric.setup_module(block)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    raw = optimizer(groups) if optimizer else cls(groups, lr=config.lr, weight_decay=config.weight_decay)
    floor = 0.0 if config.min_lr_factor is None else 1.0 / config.min_lr_factor
    schedule = torch.optim.lr_scheduler.LambdaLR(raw, partial(_lr_factor, config.schedule, config.steps, floor))
    opt = fabric.setup_optimizers(raw)
    bar = tqdm(_order(len(chunks), config.steps, config.seed + k), desc=f"block {k + 1}/{n_blocks}",
               unit="step", leave=False)
    for i in bar:
        c = chunks[i]
        loss = F.mse_loss(_hidden(module(c.x, *c.args, **c.kwargs)).float(), c.y.float())
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        opt.step()
        schedule.step()
        bar.set_postfix(mse=f"{loss.item():.4g}")
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def _targets(fabric: Fabric, s_block: nn.Module, t_block: nn.Module, chunks: list[Chunk]) -> float:
    """Fill chunk.y with the teacher block's outputs on its input; return the student block's MSE to them."""
    dtype = next(t_block.parameters()).dtype  # e.g. a bf16 teacher under an fp32 student
    sse, count = 0.0, 0
    with fabric.autocast():
        for c in chunks:
            x_t = c.x_teacher if c.x_teacher is not None else c.x
            y = t_block(_move(x_t, dtype=dtype), *_move(c.args, dtype=dtype), **_move(c.kwargs, dtype=dtype))
            c.y = _hidden(y).to(c.x.dtype)
            sse += (_hidden(s_block(c.x, *c.args, **c.kwargs)).float() - c.y.float()).pow(2).sum().item()
            count += c.y.numel()
    return sse / count


@torch.no_grad()
def _advance(fabric: Fabric, s_block: nn.Module, chunks: list[Chunk], config: BlockwiseConfig) -> float:
    """Student block's MSE to the targets; move every chunk's inputs on to the next block."""
    sse, count = 0.0, 0
    with fabric.autocast():
        for c in chunks:
            out = _hidden(s_block(c.x, *c.args, **c.kwargs)).to(c.x.dtype)
            sse += (out.float() - c.y.float()).pow(2).sum().item()
            count += c.y.numel()
            if c.x_teacher is not None:  # split: the student's chain and the teacher's chain both advance
                c.x, c.x_teacher = out, c.y
            else:
                c.x = out if config.student_input == "student" else c.y
            c.y = None  # streamed: one target per chunk at a time
    return sse / count


# ---- progress: resume a killed run at the first unfinished block --------------------------------


def save_block(progress_dir: Path, k: int, block: nn.Module, report: list[dict]) -> None:
    """Block k's weights, then the index (atomically, in that order: the index never names a missing file)."""
    with atomic_path(progress_dir / f"block_{k:03d}.safetensors") as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in block.state_dict().items()}, str(tmp))
    atomic_write_text(progress_dir / PROGRESS, json.dumps({"done": k + 1, "report": report}))


def start_progress(progress_dir: Path, s_blocks: nn.ModuleList, report: list[dict], resume_dir: Any) -> None:
    """A fresh run forgets an older run's progress; one resumed from another dir copies its loaded blocks here."""
    if not resume_dir:
        (progress_dir / PROGRESS).unlink(missing_ok=True)
    elif Path(resume_dir).resolve() != progress_dir.resolve():
        for k in range(len(report)):
            save_block(progress_dir, k, s_blocks[k], report[: k + 1])


def resume_blocks(
    fabric: Fabric, resume_dir: Path, s_blocks: nn.ModuleList, t_blocks: nn.ModuleList, chunks: list[Chunk],
    config: BlockwiseConfig,
) -> list[dict]:
    """Load the finished blocks; move the calibration inputs past them only if a block is left to train."""
    path = resume_dir / PROGRESS
    if not path.is_file():
        return []
    progress = json.loads(path.read_text(encoding="utf-8"))
    for k in range(progress["done"]):
        s_blocks[k].load_state_dict(load_file(str(resume_dir / f"block_{k:03d}.safetensors")))
        s_blocks[k].requires_grad_(False)
        if progress["done"] < len(s_blocks):
            _replay_block(fabric, s_blocks[k], t_blocks[k], chunks, config)
    log.info("blockwise: resumed with %d/%d blocks done (%s)", progress["done"], len(s_blocks), resume_dir)
    return progress["report"]


def _replay_block(fabric: Fabric, s_block: nn.Module, t_block: nn.Module, chunks: list[Chunk],
                  config: BlockwiseConfig) -> None:
    """The data flow of distill_block without the training: the same next-block inputs, bit for bit."""
    s_home, t_home = _device_of(s_block), _device_of(t_block)
    s_block.to(fabric.device)
    t_block.to(fabric.device)
    _targets(fabric, s_block, t_block, chunks)
    t_block.to(t_home)
    _advance(fabric, s_block, chunks, config)
    s_block.to(s_home)


def _lr_factor(schedule: str, steps: int, floor: float, step: int) -> float:
    """Multiplier of lr at `step` (0-based) of a block's `steps`: cosine from 1 toward `floor`, or 1."""
    if schedule != "cosine":
        return 1.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _order(n: int, steps: int, seed: int) -> list[int]:
    """`steps` micro-batch indices: seeded permutations of range(n), back to back."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(n, generator=g).tolist()
    return order[:steps]


def _hidden(out: Any) -> Tensor:
    """A block's hidden states: Llama-style blocks return a tensor, GPT-2-style ones a tuple."""
    return out[0] if isinstance(out, tuple) else out


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _move(obj: Any, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Tensors inside obj (tuples, lists, dicts) to device; floating ones also to dtype."""
    if isinstance(obj, Tensor):
        return obj.to(device=device, dtype=dtype if dtype is not None and obj.is_floating_point() else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj
