"""Lightning DataModule: packed token blocks for train (block_size) and validation/test (eval_block_size).

Train blocks always follow the pinned packing (qatlab.data.packing). Validation/test windows follow
`eval_protocol` (qatlab.eval.protocols: pinned | gptq | gptq_c4) on `eval_source` (null = `source`), so a run
can train on one corpus and be scored on a paper's test set (e.g. data=teacher_generated with
data.eval_source=wikitext2 data.eval_protocol=gptq data.eval_block_size=2048)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from qatlab.data.corpora import load_documents, load_records
from qatlab.data.logit_cache import CachedBlockDataset
from qatlab.data.packing import pack_documents
from qatlab.errors import QatlabError, require
from qatlab.eval.protocols import PROTOCOLS, protocol_windows
from qatlab.models.embedded import default_cache_dir


class BlockDataset(Dataset):
    """Rows of a (n_blocks, T) tensor as {"input_ids": (T,), "attention_mask": (T,)}; no padding exists."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TextDataModule(L.LightningDataModule):
    """Call `set_tokenizer(tok)` before `setup`. Caps (max_*_blocks) keep the FIRST n blocks of a split:
    a capped evaluation scores the first n windows of the split, always the same ones."""

    def __init__(
        self,
        source: str = "gensim_wiki",
        block_size: int = 512,
        eval_block_size: int = 1024,
        batch_size: int = 4,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = None,
        max_test_blocks: int | None = None,
        source_kwargs: dict | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        eval_source: str | None = None,
        eval_source_kwargs: dict | None = None,
        eval_protocol: str = "pinned",
        eval_windows: int = 256,
        eval_seed: int = 0,
        eval_min_tokens: int | None = None,
    ):
        super().__init__()
        require(eval_protocol in PROTOCOLS,
                f"data.eval_protocol='{eval_protocol}' is not known; use one of {list(PROTOCOLS)}")
        for key, value in (("block_size", block_size), ("eval_block_size", eval_block_size),
                           ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            require(value > 0, f"data.{key}={value} must be a positive integer")
        self.source = source
        self.block_size = block_size
        self.eval_block_size = eval_block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.caps = {"train": max_train_blocks, "validation": max_eval_blocks, "test": max_test_blocks}
        self.source_kwargs = dict(source_kwargs or {})
        self.cache_dir = str(cache_dir or default_cache_dir())
        self.seed = seed
        self.eval_source = eval_source or source
        # the eval corpus's options: its own when it is another corpus, else the train corpus's
        self.eval_source_kwargs = dict(eval_source_kwargs or {}) if eval_source else self.source_kwargs
        self.eval_protocol = eval_protocol
        self.eval_windows = eval_windows
        self.eval_seed = eval_seed
        self.eval_min_tokens = eval_min_tokens
        self.tokenizer = None
        self.teacher_cache = None  # a LogitCache of the train blocks (teacher_cache.enabled): batches carry the teacher's top-k
        self._blocks: dict[str, torch.Tensor] = {}

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._blocks.clear()  # blocks depend on the tokenizer

    def set_teacher_cache(self, cache) -> None:
        self.teacher_cache = cache

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}
        for split in splits.get(stage, ("train", "validation", "test")):
            self.blocks(split)

    def blocks(self, split: str) -> torch.Tensor:
        """(n_blocks, T) int64 for one split, packed on first use (and cached on disk)."""
        if split not in self._blocks:
            self._blocks[split] = self._pack(split)
        return self._blocks[split]

    def _pack(self, split: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise QatlabError("TextDataModule has no tokenizer; call datamodule.set_tokenizer(tokenizer) before setup")
        if split == "train":
            docs = load_documents(self.source, split, cache_dir=self.cache_dir, **self.source_kwargs)
            blocks = pack_documents(docs, self.tokenizer, self.block_size, cache_dir=self.cache_dir)
        elif self.eval_protocol == "pinned":
            docs = load_documents(self.eval_source, split, cache_dir=self.cache_dir, **self.eval_source_kwargs)
            blocks = pack_documents(docs, self.tokenizer, self.eval_block_size, cache_dir=self.cache_dir)
        else:
            records = load_records(self.eval_source, split, cache_dir=self.cache_dir, **self.eval_source_kwargs)
            blocks = protocol_windows(self.eval_protocol, records, self.tokenizer, self.eval_block_size,
                                      cache_dir=self.cache_dir, n=self.eval_windows, seed=self.eval_seed,
                                      min_tokens=self.eval_min_tokens)
        cap = self.caps[split]
        return blocks if cap is None else blocks[:cap]

    def val_blocks(self) -> torch.Tensor:
        return self.blocks("validation")

    def test_blocks(self) -> torch.Tensor:
        return self.blocks("test")

    @property
    def num_test_tokens(self) -> int:
        return self.test_blocks().numel()

    def train_dataloader(self) -> DataLoader:
        # A fresh generator per call: the same seed gives the same order of batches in every run.
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader("train", self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def _loader(self, split: str, batch_size: int, **kwargs) -> DataLoader:
        dataset = BlockDataset(self.blocks(split))
        if split == "train" and self.teacher_cache is not None:
            dataset = CachedBlockDataset(self.blocks(split), self.teacher_cache)
        return DataLoader(dataset, batch_size=batch_size,
                          num_workers=self.num_workers, **kwargs)
