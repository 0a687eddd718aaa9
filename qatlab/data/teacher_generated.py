"""Train on text the teacher wrote itself (LLM-QAT / BitDistiller); validate and test on the corpus.

Validation/test blocks follow TextDataModule's evaluation protocol unchanged (data.eval_protocol,
data.eval_source). The samples are made once on the first setup and cached under
<cache_dir>/generated/<key>/ (see qatlab.data.generation); later runs and resumes reuse them. The train
blocks come from the samples (`pack_samples`):
  retokenize (the reference): each sample decoded with skip_special_tokens and tokenized again with the
      tokenizer's own special tokens (LLaMA: a BOS per sample), + EOS if append_eos; all samples
      concatenated in order and cut into data.block_size blocks, the last partial block dropped
      (LLM-QAT's CustomJsonDataset.group_texts; OneBit's llama_factory pretrain preprocessing adds EOS);
  retokenize=false: the sample ids themselves (+ EOS if append_eos), concatenated and cut the same way;
  fixed length (stop_at_eos, retokenize and append_eos all false): every sample is one block as it is
      (generation.length == data.block_size), qatlab's earlier behaviour.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from qatlab.data.corpora import load_documents
from qatlab.data.datamodule import TextDataModule

from qatlab.data.generation import (
    GenerationConfig,
    eos_token_ids,
    generate_dataset,
    generation_dir,
    is_complete,
    load_samples,
    model_identity,
)
from qatlab.data.packing import cut_blocks, pack_documents, save_atomic, tokenizer_fingerprint
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
        """(n_blocks, block_size): the samples generated now if any shard is missing, else read from the
        cache, then packed (`pack_samples`, cached next to the samples)."""
        require(self.tokenizer is not None,
                "TeacherGeneratedDataModule has no tokenizer; call datamodule.set_tokenizer(tokenizer) before setup")
        require(self.teacher is not None,
                "data=teacher_generated needs the teacher to write its train text; "
                "call datamodule.set_teacher(model) before setup")
        cfg = self.generation
        prompts = self.prompts() if cfg.prompt_tokens else None
        identity = model_identity(self.teacher, self.model_id)
        eos = eos_token_ids(self.teacher, self.tokenizer) if cfg.stop_at_eos else ()
        out = generation_dir(self.cache_dir, identity, cfg, self.tokenizer, prompts, eos)
        rank, world_size = self._rank()
        if not is_complete(out):
            with on_device(self.teacher, self._device()):
                generate_dataset(self.teacher, self.tokenizer, out, cfg, prompts, rank, world_size, self.model_id)
        if world_size > 1:  # on every rank, generating or not: all shards are written before anyone reads
            self.trainer.strategy.barrier("teacher_generated")
        return packed_blocks(out, self.tokenizer, self.block_size, cfg)

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
    if not isinstance(fields.get("greedy_tokens", 0), int):  # a Hydra ListConfig
        fields["greedy_tokens"] = tuple(fields["greedy_tokens"])
    cfg = GenerationConfig(**fields)
    require(
        not cfg.fixed_length or cfg.length == block_size,
        f"data.generation.length={cfg.length} differs from data.block_size={block_size}; with stop_at_eos, "
        "retokenize and append_eos all false the samples are the train blocks, so set them equal",
    )
    return cfg


def pack_samples(samples: list[torch.Tensor], tokenizer, block_size: int, cfg: GenerationConfig) -> torch.Tensor:
    """(n_blocks, block_size) train blocks from the samples (see the module docstring)."""
    if cfg.fixed_length:
        return torch.stack(samples)
    eos = [tokenizer.eos_token_id] if cfg.append_eos else []
    require(not cfg.append_eos or tokenizer.eos_token_id is not None,
            "data.generation.append_eos=true but the tokenizer has no eos_token; set append_eos=false")
    if cfg.retokenize:
        texts = tokenizer.batch_decode([s.tolist() for s in samples], skip_special_tokens=True)
        pieces = [ids + eos for ids in tokenizer(texts, verbose=False)["input_ids"]]
    else:
        pieces = [s.tolist() + eos for s in samples]
    stream = torch.tensor([t for piece in pieces for t in piece], dtype=torch.int64)
    return cut_blocks(stream, block_size)


def packed_blocks(out: Path, tokenizer, block_size: int, cfg: GenerationConfig) -> torch.Tensor:
    """pack_samples of the samples in `out`, cached there per tokenizer, block size and packing switches."""
    key = hashlib.sha1(json.dumps([tokenizer_fingerprint(tokenizer), block_size, cfg.fixed_length, cfg.retokenize,
                                   cfg.append_eos]).encode()).hexdigest()[:16]
    path = Path(out) / f"blocks_{key}.safetensors"
    if path.is_file():
        return load_file(path)["blocks"]
    blocks = pack_samples(load_samples(out), tokenizer, block_size, cfg)
    save_atomic(blocks, path)
    return blocks


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device):
    """Move a module to `device` for the block, then back where it was (train.py decides placement)."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
