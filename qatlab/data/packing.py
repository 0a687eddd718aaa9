"""Documents -> fixed-length token blocks: the pinned protocol behind every train batch and PPL window.

Protocol: documents, in the given order, joined with `separator`; tokenized without special tokens;
cut into non-overlapping windows of `block_size` tokens; the final partial window dropped.
(add_bos=True puts BOS first in each block, followed by block_size - 1 text tokens.)

Tokenization is per document with the separator PREPENDED to every document but the first
("doc0", "\\n\\ndoc1", "\\n\\ndoc2", ...), ids concatenated in order. For byte-level BPE tokenizers
whose pre-tokenizer splits before a newline (GPT-2 style, e.g. SmolLM2) this gives exactly the ids of
tokenizing the whole joined string (checked on gensim_wiki in tests/test_data.py). Appending the
separator instead would not: a trailing "\\n\\n" merges into one token that the joined string never has.
Tokenizers that merge punctuation with following newlines (Llama-3, Qwen2 regexes) may differ by a
token at some document boundaries; the result is still deterministic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qatlab.atomic import atomic_path
from qatlab.errors import require

PROTOCOL = "pack-v1"  # bump when the protocol changes, so old caches are not reused


def pack_documents(
    docs: list[str],
    tokenizer,
    block_size: int,
    cache_dir: str | None = None,
    separator: str = "\n\n",
    add_bos: bool = False,
) -> torch.Tensor:
    """(n_blocks, block_size) int64. With cache_dir, the blocks are cached under <cache_dir>/blocks/."""
    require(block_size > (1 if add_bos else 0), f"data.block_size={block_size} must be a positive number of tokens")
    path = None
    if cache_dir is not None:
        key = cache_key(docs, tokenizer, block_size, separator, add_bos)
        path = Path(cache_dir).expanduser() / "blocks" / f"{key}.safetensors"
        if path.is_file():
            return load_file(path)["blocks"]
    bos = tokenizer.bos_token_id if add_bos else None
    require(not add_bos or bos is not None, "add_bos=True but the tokenizer has no bos_token; set add_bos=False")
    blocks = cut_blocks(tokenize_stream(docs, tokenizer, separator), block_size, bos)
    if path is not None:
        save_atomic(blocks, path)
    return blocks


def tokenize_stream(docs: list[str], tokenizer, separator: str) -> torch.Tensor:
    """(N,) int64: the ids of separator.join(docs), tokenized per document (see module docstring)."""
    if not docs:
        return torch.zeros(0, dtype=torch.int64)
    texts = [doc if i == 0 else separator + doc for i, doc in enumerate(docs)]
    try:
        import datasets
    except ImportError:  # e.g. the GPU machine (experiments/gpu): the same ids from one batched tokenizer call
        rows = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor([i for row in rows for i in row], dtype=torch.int64)

    def tokenize(batch: dict) -> dict:
        return {"ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]}

    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize")
    flat = ds.with_format("arrow")["ids"].combine_chunks().flatten()  # row order is kept
    return torch.from_numpy(flat.to_numpy().astype("int64"))


def cut_blocks(ids: torch.Tensor, block_size: int, bos: int | None = None) -> torch.Tensor:
    """(N,) -> (N // width, block_size), width = block_size (- 1 when a BOS is prepended)."""
    width = block_size - (bos is not None)
    n_blocks = len(ids) // width
    require(
        n_blocks > 0,
        f"the split has only {len(ids)} tokens, fewer than one block of {block_size}; "
        f"lower data.block_size / data.eval_block_size to at most {len(ids)} or use more text",
    )
    blocks = ids[: n_blocks * width].view(n_blocks, width)
    if bos is not None:
        blocks = torch.cat([torch.full((n_blocks, 1), bos, dtype=blocks.dtype), blocks], dim=1)
    return blocks.contiguous()


def cache_key(docs: list[str], tokenizer, block_size: int, separator: str, add_bos: bool) -> str:
    """sha1 over the protocol version, the tokenizer's content, the text and the packing options."""
    h = hashlib.sha1()
    for part in (PROTOCOL, tokenizer_fingerprint(tokenizer), str(block_size), separator, str(add_bos)):
        h.update(f"{len(part)}:{part};".encode())
    for doc in docs:  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        h.update(f"{len(doc)}:{doc};".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The full tokenizer definition (vocab, merges, normalizer, pre-tokenizer) plus its BOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha1(spec.encode()).hexdigest()
    return f"{type(tokenizer).__name__}:{digest}:bos={tokenizer.bos_token_id}"


def save_atomic(blocks: torch.Tensor, path: Path) -> None:
    """safetensors via a temp file and rename: a killed run never leaves a half-written cache."""
    with atomic_path(path) as tmp:
        save_file({"blocks": blocks}, str(tmp))
