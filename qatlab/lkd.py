"""LKD: ZeroQuant's layer-by-layer knowledge distillation, one decoder block at a time.

For block k = 0 .. L-1, on N calibration sequences of T tokens (hidden width H):
    X_k  the hidden states entering block k, (N, T, H), kept as micro-batches of `batch_size` rows;
         X_0 comes from the (unquantized) embeddings, then
         inputs="student" (the paper): X_{k+1} = quantized student block k, after its LKD, on X_k
         inputs="teacher":             X_{k+1} = Y_k, the teacher's own activations
    Y_k  = teacher block k on X_k: the target, computed once per block
    train: `steps` optimizer steps on MSE(student block k (x), y) over micro-batches (x, y) in a
           seeded shuffled order, updating block k's parameters only, with its own fresh optimizer
           (lr cosine-decayed to 0 over the block's steps, or constant);
    then:  freeze block k (requires_grad False), drop its optimizer and gradients, move on.
The MSE before and after is measured on the whole calibration set and logged per block.

Why Lightning Fabric and not `Trainer.fit` per block: LKD is a loop over blocks, each with its
own optimizer, over a few cached tensors; it has no epochs, validation or checkpoints, and one
Trainer per block would rebuild loggers, callbacks and progress machinery L times for a loop of
a few dozen steps. Fabric keeps that loop explicit while still giving what Lightning is for here:
device placement (`accelerator`), mixed precision (`precision`: autocast, fp16 loss scaling via
`fabric.backward`). The run's own Trainer is still built by train.py and logs LKD's summary metrics.

Memory at any time, beyond the two models' weights (only block k of each is moved to the
compute device; the rest stays where it was):
    activations kept    X_k and Y_k for the calibration set: 2 * N * T * H * bytes(student dtype)
                        (SmolLM2, N=16, T=512, H=576, fp32: 38 MB; LLaMA-7B, N=128, T=2048, H=4096: 8.6 GB)
                        plus one micro-batch's autograd activations through one block;
    gradients + Adam    block k only: 3 x its parameters (SmolLM2: 3.5M params, 42 MB;
                        LLaMA-7B: 202M params, 2.4 GB in fp32).
Whole-model KD instead holds gradients and Adam state for every parameter (SmolLM2: 1.6 GB), the
autograd activations of every block and the full-vocabulary logits of both models.
(experiments/zeroquant/peak_memory.py measures both.)
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
from qatlab.models.layer_maps import decoder_blocks
from qatlab.quant.clip_search import block0_inputs

log = logging.getLogger("qatlab")

DATA = ("corpus", "random")
INPUTS = ("student", "teacher")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # "-true" modes would recast the student's weights
PROGRESS = "progress.json"  # in the progress dir: {"done": blocks finished, "report": their records}


@dataclass(frozen=True)
class LKDConfig:
    enabled: bool = True  # false: quantize and evaluate only (no LKD)
    data: str = "corpus"  # corpus: the run's training sequences | random: uniform token ids
    inputs: str = "student"  # block k's input: from the quantized student blocks < k | the teacher's
    samples: int = 16  # calibration sequences
    seq_len: int = 512  # length of random-token sequences (corpus ones come at data.block_size)
    batch_size: int = 2  # sequences per optimizer step
    steps: int = 40  # optimizer steps per block
    lr: float = 2e-4
    schedule: str = "cosine"  # lr within each block: cosine (from lr toward 0 over its steps) | constant
    weight_decay: float = 0.0
    seed: int = 0  # random tokens and the micro-batch order
    accelerator: str = "auto"  # Fabric: auto | cpu | cuda
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed

    def __post_init__(self) -> None:
        require(self.data in DATA, f"method.lkd.data={self.data!r} is not known; use one of {list(DATA)}")
        require(self.inputs in INPUTS, f"method.lkd.inputs={self.inputs!r} is not known; use one of {list(INPUTS)}")
        for key in ("samples", "seq_len", "batch_size", "steps"):
            value = getattr(self, key)
            require(isinstance(value, int) and value > 0, f"method.lkd.{key}={value!r} must be a positive integer")
        require(self.lr > 0, f"method.lkd.lr={self.lr} must be positive (e.g. 5e-5)")
        require(
            self.schedule in SCHEDULES,
            f"method.lkd.schedule={self.schedule!r} is not known; use one of {list(SCHEDULES)}",
        )
        require(
            self.precision in PRECISIONS,
            f"method.lkd.precision={self.precision!r} is not supported; use one of {list(PRECISIONS)}",
        )

    @classmethod
    def from_dict(cls, d: Mapping | None) -> LKDConfig:
        d = dict(d or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        require(not unknown, f"method.lkd: unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**d)


# ---- calibration data -----------------------------------------------------------------------------


def lkd_batches(config: LKDConfig, datamodule: Any, vocab_size: int) -> list[dict[str, Tensor]]:
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
        f"method.lkd.samples={config.samples} but the training data holds only {len(ids)} sequences; lower it",
    )
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(config.batch_size),
                                                                   masks.split(config.batch_size))]


# ---- the loop ------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """One micro-batch of the calibration set at the current block."""

    x: Tensor  # (B, T, H) input to block k
    args: tuple  # the other positional arguments the model passes every block
    kwargs: dict  # masks, position ids/embeddings, ... (the same for every block)
    y: Tensor | None = None  # (B, T, H) the teacher block's output on x


def run_lkd(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    config: LKDConfig,
    trainable: Callable[[nn.Module], list[nn.Parameter]] | None = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    progress_dir: str | Path | None = None,
    resume_dir: str | Path | None = None,
) -> dict[str, Any]:
    """LKD over every decoder block of `student` (in place); returns metrics for results.json.

    trainable(block) picks a block's trained parameters (default: all of them); optimizer(params)
    builds each block's fresh optimizer (default: Adam with config.lr / weight_decay).
    progress_dir: after each block, its weights and the block index are saved there (atomically);
    resume_dir: a progress_dir of a killed run with this config: its finished blocks are loaded, not retrained.
    """
    fabric = Fabric(accelerator=config.accelerator, devices=1, precision=config.precision)
    s_blocks, t_blocks = decoder_blocks(student), decoder_blocks(teacher)
    require(len(s_blocks) == len(t_blocks), "student and teacher have different numbers of decoder blocks")
    trainable = trainable or (lambda block: list(block.parameters()))
    optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay))
    started = time.time()
    chunks = [capture(student, b, fabric.device) for b in batches]
    report = resume_blocks(fabric, Path(resume_dir), s_blocks, t_blocks, chunks, config) if resume_dir else []
    if progress_dir is not None:
        start_progress(Path(progress_dir), s_blocks, report, resume_dir)
    for k in range(len(report), len(s_blocks)):
        report.append(distill_block(fabric, k, s_blocks, t_blocks, chunks, config, trainable, optimizer))
        if progress_dir is not None:
            save_block(Path(progress_dir), k, s_blocks[k], report)
    before = sum(r["mse_before"] for r in report) / len(report)
    after = sum(r["mse_after"] for r in report) / len(report)
    return {
        "lkd/steps": config.steps * len(report),
        "lkd/mse_before": before,  # mean over blocks
        "lkd/mse_after": after,
        "lkd/seconds": round(time.time() - started, 1),
        "lkd/per_block": report,
    }


@torch.no_grad()
def capture(student: nn.Module, batch: Mapping[str, Tensor], device: torch.device) -> Chunk:
    """Block 0's inputs for one micro-batch (the embeddings are not quantized, so the student's serve)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    hidden, args, kwargs = block0_inputs(student, ids, mask)
    return Chunk(_move(hidden, device), _move(args, device), _move(kwargs, device))


def distill_block(
    fabric: Fabric,
    k: int,
    s_blocks: nn.ModuleList,
    t_blocks: nn.ModuleList,
    chunks: list[Chunk],
    config: LKDConfig,
    trainable: Callable[[nn.Module], list[nn.Parameter]],
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
) -> dict[str, float]:
    """Targets, `steps` MSE steps on student block k alone, freeze, advance the inputs; returns its record."""
    started = time.time()
    s_block, t_block = s_blocks[k], t_blocks[k]
    s_home, t_home = _device_of(s_block), _device_of(t_block)
    s_block.to(fabric.device)
    t_block.to(fabric.device)
    mse_before = _targets(fabric, s_block, t_block, chunks)
    t_block.to(t_home)  # the teacher block is done with

    _train_block(fabric, s_block, trainable(s_block), chunks, config, optimizer, k, len(s_blocks))
    s_block.requires_grad_(False)  # frozen from now on
    gc.collect()  # the block's optimizer, its state and its gradients are gone before the next block's exist

    mse_after = _advance(fabric, s_block, chunks, use_student=config.inputs == "student")
    s_block.to(s_home)
    seconds = time.time() - started
    log.info("LKD block %d/%d: mse %.4g -> %.4g (%d steps, %.1f s)",
             k + 1, len(s_blocks), mse_before, mse_after, config.steps, seconds)
    return {"block": k, "mse_before": mse_before, "mse_after": mse_after, "seconds": round(seconds, 2)}


def _train_block(
    fabric: Fabric,
    block: nn.Module,
    params: list[nn.Parameter],
    chunks: list[Chunk],
    config: LKDConfig,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    k: int,
    n_blocks: int,
) -> None:
    """`steps` MSE steps on `params` of one block, with a fresh optimizer that dies on return."""
    chosen = {id(p) for p in params}
    for p in block.parameters():  # nothing else in the block may collect gradients
        p.requires_grad_(id(p) in chosen)
    module = fabric.setup_module(block)
    raw = optimizer(params)
    schedule = torch.optim.lr_scheduler.LambdaLR(raw, partial(_lr_factor, config.schedule, config.steps))
    opt = fabric.setup_optimizers(raw)
    bar = tqdm(_order(len(chunks), config.steps, config.seed + k), desc=f"LKD block {k + 1}/{n_blocks}",
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
    """Fill chunk.y with the teacher block's outputs; return the student block's MSE to them."""
    dtype = next(t_block.parameters()).dtype  # e.g. a bf16 teacher under an fp32 student
    sse, count = 0.0, 0
    with fabric.autocast():
        for c in chunks:
            y = t_block(_move(c.x, dtype=dtype), *_move(c.args, dtype=dtype), **_move(c.kwargs, dtype=dtype))
            c.y = _hidden(y).to(c.x.dtype)
            sse += (_hidden(s_block(c.x, *c.args, **c.kwargs)).float() - c.y.float()).pow(2).sum().item()
            count += c.y.numel()
    return sse / count


@torch.no_grad()
def _advance(fabric: Fabric, s_block: nn.Module, chunks: list[Chunk], use_student: bool) -> float:
    """Student block's MSE to the targets; replace each chunk's x by the next block's input."""
    sse, count = 0.0, 0
    with fabric.autocast():
        for c in chunks:
            out = _hidden(s_block(c.x, *c.args, **c.kwargs)).to(c.x.dtype)
            sse += (out.float() - c.y.float()).pow(2).sum().item()
            count += c.y.numel()
            c.x, c.y = (out if use_student else c.y), None  # streamed: one (x, y) pair per chunk at a time
    return sse / count


# ---- progress: resume a killed LKD at the first unfinished block --------------------------------


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
    config: LKDConfig,
) -> list[dict]:
    """Load the finished blocks and move the calibration inputs past them; their records, or [] if none."""
    path = resume_dir / PROGRESS
    if not path.is_file():
        return []
    progress = json.loads(path.read_text(encoding="utf-8"))
    for k in range(progress["done"]):
        s_blocks[k].load_state_dict(load_file(str(resume_dir / f"block_{k:03d}.safetensors")))
        s_blocks[k].requires_grad_(False)
        _replay_block(fabric, s_blocks[k], t_blocks[k], chunks, use_student=config.inputs == "student")
    log.info("LKD: resumed with %d/%d blocks done (%s)", progress["done"], len(s_blocks), resume_dir)
    return progress["report"]


def _replay_block(fabric: Fabric, s_block: nn.Module, t_block: nn.Module, chunks: list[Chunk], use_student: bool) -> None:
    """The data flow of distill_block without the training: the same next-block inputs, bit for bit."""
    s_home, t_home = _device_of(s_block), _device_of(t_block)
    s_block.to(fabric.device)
    t_block.to(fabric.device)
    _targets(fabric, s_block, t_block, chunks)
    t_block.to(t_home)
    _advance(fabric, s_block, chunks, use_student)
    s_block.to(s_home)


def _lr_factor(schedule: str, steps: int, step: int) -> float:
    """Multiplier of lr at `step` (0-based) of a block's `steps`."""
    return 0.5 * (1 + math.cos(math.pi * step / steps)) if schedule == "cosine" else 1.0


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
