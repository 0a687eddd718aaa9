"""Expected peak memory per device of a QAT run, before launching it.

    python -m qatlab.estimate model=llama2_7b method=bitdistiller trainer=fsdp trainer.devices=8 \
        data.batch_size=4 data.block_size=2048 [teacher_cache.enabled=true]

Takes the same Hydra overrides as `python -m qatlab` and reads only the model's config (no weights).
The model, one row per part (bytes per device):
    teacher weights     P x teacher bytes               / world if sharded (fsdp teacher=shard, zero3); 0 with the cache
    student weights     P x student bytes               / world under fsdp, zero3
    gradients           P_train x student bytes         / world under fsdp, zero2, zero3
    optimizer state     P_train x 8 (AdamW: 2 fp32 moments) or x 2 (8-bit AdamW) / world under fsdp, zero2, zero3
    fake-quant copies   P_quant x student bytes: each quantized layer's w_q = Q(w), kept for backward
                        (one layer's worth with gradient checkpointing)
    activations         kept for backward: tokens x layers x (ACT_H x hidden + ACT_I x intermediate) x
                        activation bytes; with checkpointing only each layer's input (tokens x hidden)
    peak phase          the larger of: the loss (student logits, their gradient, the teacher's logits or
                        top-k, and the chunked fp32 working set, LOSS_CHUNK_COPIES x chunk x vocab x 4)
                        and, with checkpointing, one layer's recomputed activations
The constants count the tensors the implementation keeps (HF Llama layers, qatlab.losses) and were
checked against PyTorch's MemTracker on CPU (tests/test_estimate.py); on a GPU run
experiments/scale/bench.py, which prints the estimate next to torch.cuda.max_memory_allocated.
Not counted: the CUDA context and allocator fragmentation (add ~1-2 GB on a GPU), framework buffers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from qatlab.errors import QatlabError, require

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACT_H, ACT_I = 14, 5  # tensors of width hidden / intermediate a Llama decoder layer keeps for backward, per token
LOSS_CHUNK_COPIES = 7  # fp32 (chunk, vocab) arrays alive at once in the chunked loss's backward
GIB = 1024**3


@dataclass
class ModelShape:
    params: int  # all parameters (tied weights once)
    quantized: int  # weights of the decoder layers' Linear layers (what fake-quant copies)
    layer_params: int  # one decoder layer
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    qparams: int = 0  # the quantizers' own parameters (LSQ steps, SEQ alphas, OneBit's g and h): asked of them

    @classmethod
    def of(cls, model: nn.Module, qparams: int = 0) -> ModelShape:
        c = model.config
        layers = model.model.layers
        linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear))
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            quantized=linear,
            layer_params=sum(p.numel() for p in layers[0].parameters()),
            hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers, vocab=c.vocab_size,
            qparams=qparams,
        )


@dataclass
class Setup:
    batch_size: int
    seq_len: int
    teacher_dtype: str = "float32"
    student_dtype: str = "float32"
    activation_dtype: str = "float32"  # bfloat16 under bf16-mixed
    optimizer: str = "adamw"  # adamw | adamw8bit
    trainable: str = "all"  # all | weights | qparams | weights+qparams (qatlab.stages.params)
    frozen_codes: bool = False  # freeze_codes: an int16 code per quantized weight is kept
    teacher: bool = True  # False when the loss reads no teacher (ce)
    strategy: str = "ddp"  # ddp (also: auto, one device) | fsdp | deepspeed_zero2 | deepspeed_zero3
    world_size: int = 1
    teacher_placement: str = "shard"  # fsdp only
    gradient_checkpointing: bool = False
    chunk_size: int = 1024
    teacher_cache_k: int | None = None  # top-k from the cache: no teacher weights or logits on the device


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes per device

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self) -> str:
        rows = [f"  {name:<20} {value / GIB:9.3f} GiB" for name, value in self.parts.items()]
        return "\n".join(["expected peak memory per device:", *rows, f"  {'total':<20} {self.total / GIB:9.3f} GiB"])


def estimate_peak(shape: ModelShape, s: Setup) -> Estimate:
    require(s.strategy in ("auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"),
            f"strategy '{s.strategy}' is not known to the estimator")
    require(s.optimizer in ("adamw", "adamw8bit"), f"optimizer '{s.optimizer}' is not known; use adamw or adamw8bit")
    w = s.world_size
    shard_weights = s.strategy in ("fsdp", "deepspeed_zero3")
    shard_states = shard_weights or s.strategy == "deepspeed_zero2"
    teacher_shard = s.strategy == "deepspeed_zero3" or (s.strategy == "fsdp" and s.teacher_placement == "shard")
    sb, tb, ab = BYTES[s.student_dtype], BYTES[s.teacher_dtype], BYTES[s.activation_dtype]
    trainable = {"all": shape.params + shape.qparams, "weights": shape.quantized, "qparams": shape.qparams,
                 "weights+qparams": shape.quantized + shape.qparams}[s.trainable]
    tokens = s.batch_size * s.seq_len
    per_layer_act = tokens * (ACT_H * shape.hidden + ACT_I * shape.intermediate) * ab
    if s.gradient_checkpointing:
        activations = tokens * shape.layers * shape.hidden * ab
        quant_copies = shape.quantized / shape.layers * sb
    else:
        activations = shape.layers * per_layer_act
        quant_copies = shape.quantized * sb
    cached = s.teacher_cache_k is not None
    teacher_logits = tokens * s.teacher_cache_k * 12 if cached else tokens * shape.vocab * tb  # int64 ids + fp32
    if not s.teacher:
        teacher_logits = 0
    loss = (tokens * shape.vocab * (ab + sb) + teacher_logits  # student logits + their gradient + teacher's
            + LOSS_CHUNK_COPIES * min(tokens, s.chunk_size) * shape.vocab * 4)
    parts = {
        "teacher weights": 0 if cached or not s.teacher else shape.params * tb / (w if teacher_shard else 1),
        "student weights": (shape.params * sb + shape.qparams * 4) / (w if shard_weights else 1),
        "gradients": trainable * sb / (w if shard_states else 1),
        "optimizer state": trainable * (8 if s.optimizer == "adamw" else 2) / (w if shard_states else 1),
        "fake-quant copies": quant_copies,
        "activations": activations,
        "peak phase": max(loss, per_layer_act if s.gradient_checkpointing else 0),
    }
    if s.frozen_codes:
        parts["frozen codes"] = shape.quantized * 2 / (w if shard_weights else 1)
    if shard_weights:  # FSDP / ZeRO-3 gather one layer at a time (plus one prefetched)
        parts["gathered layers"] = 2 * shape.layer_params * sb
    return Estimate(parts)


# ---- from a composed run config --------------------------------------------------------------------


def whole_model_stage(cfg: DictConfig) -> DictConfig:
    """The recipe's whole-model stage config ({} when it has none: a PTQ or block-wise-only recipe)."""
    for stage in (cfg.get("stages") or {}).values():
        if str(stage.get("_target_", "")).endswith("WholeModel"):
            return stage
    return DictConfig({})


def setup_from_cfg(cfg: DictConfig, world_size: int | None = None) -> Setup:
    trainer, stage, loss = cfg.trainer, whole_model_stage(cfg), cfg.get("loss") or {}
    cache = cfg.get("teacher_cache") or {}
    return Setup(
        batch_size=cfg.data.batch_size, seq_len=cfg.data.block_size,
        teacher_dtype=cfg.model.dtype, student_dtype=cfg.model.student_dtype,
        activation_dtype="bfloat16" if str(trainer.precision).startswith("bf16") else cfg.model.student_dtype,
        optimizer="adamw8bit" if "8bit" in cfg.optimizer._target_ else "adamw",
        trainable=stage.get("train", "all"),
        frozen_codes=bool(stage.get("freeze_codes", False)),
        teacher=not str(loss.get("_target_", "")).endswith("CrossEntropy") or loss.get("hidden_mse", 0) > 0,
        strategy=strategy_name(trainer.get("strategy")),
        world_size=world_size or _world_size(trainer),
        teacher_placement=(trainer.get("strategy") or {}).get("teacher", "shard") if isinstance(trainer.get("strategy"), DictConfig) else "shard",
        gradient_checkpointing=bool(stage.get("gradient_checkpointing", False)),
        chunk_size=loss.get("chunk_size", 1024),
        teacher_cache_k=cache.get("k") if cache.get("enabled") else None,
    )


def strategy_name(strategy) -> str:
    """The preset's name from trainer.strategy: a string ('ddp', 'auto') or a _target_ mapping."""
    if strategy is None or isinstance(strategy, str):
        return "ddp" if strategy in (None, "auto") else str(strategy).replace("deepspeed_stage_", "deepspeed_zero")
    target = strategy.get("_target_", "")
    if target.endswith("deepspeed"):
        return f"deepspeed_zero{strategy.get('stage', 2)}"
    return "fsdp" if "fsdp" in target.lower() else "ddp"


def _world_size(trainer) -> int:
    devices = trainer.get("devices", 1)
    if devices in ("auto", -1):
        devices = max(torch.cuda.device_count(), 1)
    return int(devices) * int(trainer.get("num_nodes", 1))


def model_shape(model_cfg: DictConfig, recipe=None) -> ModelShape:
    """The model's shape from its config alone (weights on the meta device: nothing is allocated).

    With a recipe, its layers are swapped in on the meta device and its quantizers asked how many
    parameters of their own they hold."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qatlab.models.loading import EMBEDDED, TINY, _load_tokenizer
    from qatlab.models.embedded import materialize_smollm2
    from qatlab.models.tiny import build_tiny_llama

    name = model_cfg.name_or_path
    with torch.device("meta"):
        if name == TINY or name.startswith(TINY + ":"):
            model = build_tiny_llama(_load_tokenizer(str(materialize_smollm2(model_cfg.get("cache_dir")))))
        else:
            folder = str(materialize_smollm2(model_cfg.get("cache_dir"))) if name == EMBEDDED else name
            try:
                config = AutoConfig.from_pretrained(folder, revision=model_cfg.get("revision"),
                                                    trust_remote_code=model_cfg.get("trust_remote_code", False))
            except OSError as err:
                raise QatlabError(
                    f"model.name_or_path={name!r}: its config.json could not be read ({type(err).__name__}; offline "
                    "or not downloaded). The estimate needs only the config: point model.name_or_path at a local "
                    "folder that holds config.json (no weights needed)") from None
            model = AutoModelForCausalLM.from_config(config)
        shape = ModelShape.of(model)
        if recipe is None:
            return shape
        from qatlab.stages.params import quantizer_parameters

        recipe.convert(model)
        shape.qparams = sum(p.numel() for p in quantizer_parameters(model))
    return shape


def main(argv: list[str] | None = None) -> Estimate:
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=list(sys.argv[1:] if argv is None else argv))
    setup = setup_from_cfg(cfg)
    try:
        from qatlab.recipes import build_recipe

        estimate = estimate_peak(model_shape(cfg.model, build_recipe(cfg)), setup)
    except QatlabError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{cfg.model.name_or_path}, method={cfg.method.name}, strategy={setup.strategy} x {setup.world_size}, "
          f"batch {setup.batch_size} x {setup.seq_len} tokens per device")
    print(estimate.table())
    return estimate


if __name__ == "__main__":
    main()
