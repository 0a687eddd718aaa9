"""Train on text the teacher wrote itself (LLM-QAT / BitDistiller); validate and test on the corpus.

Validation/test blocks follow TextDataModule's pinned PPL protocol unchanged. The train blocks are the
generated samples (generation.length == data.block_size), made once on the first setup and cached
under <cache_dir>/generated/<key>/ (see qatlab.data.generation); later runs and resumes reuse them.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

from qatlab.data.corpora import load_documents
from qatlab.data.datamodule import TextDataModule
from qatlab.data.generation import (
    GenerationConfig,
    generate_dataset,
    generation_dir,
    is_complete,
    load_generated,
    model_identity,
)
from qatlab.data.packing import pack_documents
from qatlab.errors import require


class TeacherGeneratedDataModule(TextDataModule):
    """Call `set_tokenizer(tok)` and `set_teacher(model)` before `setup`. `generation` holds
    GenerationConfig fields (length defaults to block_size); `model_id` names the teacher in the cache
    key (default: its config._name_or_path; a digest of its weights is always added)."""

    def __init__(self, *args, generation: dict | None = None, model_id: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation = generation_config(dict(generation or {}), self.block_size)
        self.model_id = model_id
        self.teacher = None

    def set_teacher(self, model: torch.nn.Module) -> None:
        self.teacher = model
        self._blocks.pop("train", None)  # the train blocks depend on the teacher

    def _pack(self, split: str) -> torch.Tensor:
        if split != "train":
            return super()._pack(split)
        blocks = self._generated()
        cap = self.caps["train"]
        return blocks if cap is None else blocks[:cap]

    def _generated(self) -> torch.Tensor:
        """(num_samples, block_size): generated now if any shard is missing, else read from the cache."""
        require(self.tokenizer is not None,
                "TeacherGeneratedDataModule has no tokenizer; call datamodule.set_tokenizer(tokenizer) before setup")
        require(self.teacher is not None,
                "data=teacher_generated needs the teacher to write its train text; "
                "call datamodule.set_teacher(model) before setup")
        cfg = self.generation
        prompts = self.prompts() if cfg.prompt_tokens else None
        identity = model_identity(self.teacher, self.model_id)
        out = generation_dir(self.cache_dir, identity, cfg, self.tokenizer, prompts)
        rank, world_size = self._rank()
        if not is_complete(out):
            with on_device(self.teacher, self._device()):
                generate_dataset(self.teacher, self.tokenizer, out, cfg, prompts, rank, world_size, self.model_id)
        if world_size > 1:  # on every rank, generating or not: all shards are written before anyone reads
            self.trainer.strategy.barrier("teacher_generated")
        return load_generated(out)

    def prompts(self) -> torch.Tensor:
        """(n, prompt_tokens): consecutive chunks of the packed train split, one prompt per row."""
        docs = load_documents(self.source, "train", cache_dir=self.cache_dir, **self.source_kwargs)
        return pack_documents(docs, self.tokenizer, self.generation.prompt_tokens, cache_dir=self.cache_dir)

    def _rank(self) -> tuple[int, int]:
        """(rank, world_size) from the attached Trainer; (0, 1) before one is attached."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _device(self) -> torch.device:
        """The Trainer's device if attached, else the GPU when there is one: generation is the slow part."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generation_config(fields: dict, block_size: int) -> GenerationConfig:
    """GenerationConfig from the data.generation mapping, checked against data.block_size."""
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(fields) - known)
    require(not unknown, f"data.generation has {unknown}, unknown keys; valid: {sorted(known)}")
    fields.setdefault("length", block_size)
    require(
        fields["length"] == block_size,
        f"data.generation.length={fields['length']} differs from data.block_size={block_size}; "
        "the generated samples are the train blocks, so set them equal",
    )
    return GenerationConfig(**fields)


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device):
    """Move a module to `device` for the block, then back where it was (train.py decides placement)."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
