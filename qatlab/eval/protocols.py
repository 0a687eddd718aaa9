"""The papers' perplexity test sets as data options (data.eval_protocol), next to qatlab's pinned one.

  pinned    qatlab's protocol (qatlab.eval.perplexity, README "The perplexity protocol"): the split's
            documents joined with "\\n\\n", tokenized per document without special tokens, cut into
            non-overlapping eval_block_size windows. The default, and the protocol of the embedded corpus.
  gptq      GPTQ's WikiText-2 protocol (IST-DASLab/gptq datautils.get_wikitext2 + llama_eval), which
            BitDistiller (test/general/wiki_ppl.py), OneBit (evaluation/lm_eval/datautils.py) and EfficientQAT
            (datautils_block.get_wikitext2 + test_ppl) copy: the split's RAW records (WikiText-2: the
            dataset's lines, empty ones included, not regrouped into articles) joined with "\\n\\n" into ONE
            string, tokenized in one call with the tokenizer's default special tokens (LLaMA: one BOS at the
            very start of the stream); windows i = ids[i*T:(i+1)*T] for i < len // T, the rest dropped.
  gptq_c4   GPTQ's C4 protocol (datautils.get_c4, the validation half): Python's random seeded with 0;
            `eval_windows` (256) times: draw a record index with randint(0, n - 1) until the record tokenizes
            (default special tokens) to at least `min_tokens` ids (GPTQ, EfficientQAT: T; OneBit: T + 1),
            then a start with randint(0, len - T - 1) and keep ids[start:start + T]. The windows are scored
            one by one, as the reference scores its hstack of them. The records are C4's
            en/c4-validation.00000-of-00008.json.gz in file order (qatlab.data.corpora.load_records).
The score is the same in every protocol: qatlab.eval.perplexity (every window on its tokens 2..T,
exp(total NLL / predicted tokens)); with windows of equal length that equals the references'
exp(sum_i mean-loss_i * T / (n T)).

NAMED protocols are what a recipe card's `protocol` names: each maps to the data keys that select it.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from qatlab.errors import require

PROTOCOLS = ("pinned", "gptq", "gptq_c4")
VERSION = "eval-protocols-v1"  # bump when a protocol's windows change, so old caches are not reused

# A card's `protocol` -> the data keys that make it (the eval corpus is data.eval_source, or data.source).
NAMED = {
    "wikitext2-gptq-2048": {"eval_corpus": "wikitext2", "eval_protocol": "gptq", "eval_block_size": 2048,
                            "max_test_blocks": None},
    "wikitext2-gptq-1024": {"eval_corpus": "wikitext2", "eval_protocol": "gptq", "eval_block_size": 1024,
                            "max_test_blocks": None},
    "c4-gptq-2048": {"eval_corpus": "c4", "eval_protocol": "gptq_c4", "eval_block_size": 2048, "eval_windows": 256,
                     "eval_seed": 0, "max_test_blocks": None},
}


def protocol_facts(data) -> dict:
    """The data config's facts a NAMED protocol is checked against (eval_corpus = eval_source or source)."""
    facts = {key: data.get(key) for key in ("eval_protocol", "eval_block_size", "eval_windows", "eval_seed",
                                            "max_test_blocks")}
    facts["eval_corpus"] = data.get("eval_source") or data.get("source")
    return facts


def gptq_windows(records: list[str], tokenizer, window: int) -> torch.Tensor:
    """(len // window, window) int64: "\\n\\n".join(records) tokenized in one call, cut into windows."""
    from qatlab.data.packing import cut_blocks  # here: qatlab.data imports this module

    require(window > 0, f"data.eval_block_size={window} must be a positive number of tokens")
    ids = tokenizer("\n\n".join(records), verbose=False)["input_ids"]
    return cut_blocks(torch.tensor(ids, dtype=torch.int64), window)


def gptq_c4_windows(records: list[str], tokenizer, window: int, n: int = 256, seed: int = 0,
                    min_tokens: int | None = None, max_draws: int = 1_000_000) -> torch.Tensor:
    """(n, window) int64: the reference's sampled windows (see the module docstring)."""
    min_tokens = window if min_tokens is None else min_tokens
    require(n > 0, f"data.eval_windows={n} must be a positive number of windows")
    require(min_tokens >= window, f"data.eval_min_tokens={min_tokens} must be >= data.eval_block_size={window}")
    require(records, "the C4 protocol got no records; check data.eval_source / data.source")
    rng = random.Random(seed)  # the same stream as the reference's random.seed(seed) + random.randint
    out, draws = [], 0
    for _ in range(n):
        while True:
            draws += 1
            require(draws <= max_draws, f"the C4 protocol drew {max_draws} records without finding {n} of >= "
                                        f"{min_tokens} tokens; lower data.eval_block_size or use longer records")
            ids = tokenizer(records[rng.randint(0, len(records) - 1)], verbose=False)["input_ids"]
            if len(ids) >= min_tokens:
                break
        require(len(ids) > window, f"the C4 protocol drew a record of exactly {window} tokens: the reference's "
                                   f"randint(0, {len(ids) - window - 1}) fails there (GPTQ crashes); set "
                                   f"data.eval_min_tokens={window + 1} (OneBit's rule)")
        start = rng.randint(0, len(ids) - window - 1)
        out.append(ids[start : start + window])
    return torch.tensor(out, dtype=torch.int64)


def protocol_windows(protocol: str, records: list[str], tokenizer, window: int, cache_dir: str | None = None,
                     n: int = 256, seed: int = 0, min_tokens: int | None = None) -> torch.Tensor:
    """The windows of a `gptq` / `gptq_c4` split, cached under <cache_dir>/blocks/ like packed blocks."""
    from qatlab.data.packing import save_atomic, tokenizer_fingerprint

    require(protocol in ("gptq", "gptq_c4"), f"data.eval_protocol='{protocol}' has no windows here; use gptq or gptq_c4")
    path = None
    if cache_dir is not None:
        h = hashlib.sha1()
        for part in (VERSION, protocol, tokenizer_fingerprint(tokenizer), str(window), str(n), str(seed),
                     str(min_tokens)):
            h.update(f"{len(part)}:{part};".encode())
        for record in records:
            h.update(f"{len(record)}:{record};".encode())
        path = Path(cache_dir).expanduser() / "blocks" / f"{protocol}-{h.hexdigest()}.safetensors"
        if path.is_file():
            return load_file(path)["blocks"]
    if protocol == "gptq":
        blocks = gptq_windows(records, tokenizer, window)
    else:
        blocks = gptq_c4_windows(records, tokenizer, window, n, seed, min_tokens)
    if path is not None:
        save_atomic(blocks, path)
    return blocks
