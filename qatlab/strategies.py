"""Lightning strategies for QAT: FSDP that knows where the teacher goes, DeepSpeed with a clear error.

Used by conf/trainer/{fsdp,deepspeed_zero2,deepspeed_zero3}.yaml (DDP needs nothing extra: the
frozen teacher has no gradients, so DDP neither buckets nor all-reduces it). Why the teacher never
gets optimizer state and why fake-quant scales stay exact under sharding: docs/SCALING.md.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from qatlab.errors import QatlabError, require

TEACHER_PLACEMENTS = ("shard", "replicate")
BLOCK_SUFFIXES = ("DecoderLayer", "Block")  # HF names: LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block, ...


def is_transformer_block(module: nn.Module) -> bool:
    """One FSDP unit per decoder layer: a layer's weights are gathered whole, then quantized."""
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


class QATFSDPStrategy(FSDPStrategy):
    """FSDP with one unit per decoder layer (teacher's and student's) and a teacher placement:
    'shard' (its layers are FSDP units too: 1/world of its weights per GPU, gathered layer by layer
    in its no-grad forward) or 'replicate' (left out of FSDP: a full copy per GPU, no all-gathers)."""

    def __init__(self, teacher: str = "shard", **kwargs: Any):
        require(teacher in TEACHER_PLACEMENTS,
                f"trainer.strategy.teacher='{teacher}' is not known; use one of {list(TEACHER_PLACEMENTS)}")
        kwargs.setdefault("auto_wrap_policy", functools.partial(lambda_auto_wrap_policy, lambda_fn=is_transformer_block))
        kwargs.setdefault("use_orig_params", True)  # frozen teacher + trainable student in one root unit
        super().__init__(**kwargs)
        self.teacher_placement = teacher

    def _setup_model(self, model: nn.Module) -> nn.Module:
        teacher = getattr(model, "teacher", None)
        if self.teacher_placement == "replicate" and teacher is not None:
            teacher.to(self.root_device)  # FSDP does not move ignored modules
            self.kwargs["ignored_states"] = list(teacher.parameters())
        return super()._setup_model(model)


def fsdp(teacher: str = "shard", **kwargs: Any) -> QATFSDPStrategy:
    """trainer=fsdp: kwargs go to Lightning's FSDPStrategy (sharding_strategy, cpu_offload, ...)."""
    return QATFSDPStrategy(teacher=teacher, **kwargs)


def deepspeed(stage: int, **kwargs: Any):
    """trainer=deepspeed_zero2|3: Lightning's DeepSpeedStrategy, after checking DeepSpeed is installed.

    ZeRO-2 shards gradients and optimizer state (the teacher, frozen, is replicated); ZeRO-3 also
    shards every parameter, the teacher's included, and gathers each module's weights for its forward.
    """
    require(stage in (2, 3), f"trainer.strategy.stage={stage} is not supported; use 2 or 3")
    if importlib.util.find_spec("deepspeed") is None:
        raise QatlabError(
            f"trainer=deepspeed_zero{stage} needs DeepSpeed, which is not installed: "
            "pip install deepspeed (or pip install -e '.[deepspeed]'), on a machine with CUDA; "
            "or use trainer=fsdp"
        )
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage, **kwargs)
