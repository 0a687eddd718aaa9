"""llama.cpp's own PPL of a GGUF export, through llama-cpp-python where it is installed (never required).

Scored under qatlab's pinned protocol (qatlab.eval.perplexity): each window alone from an empty context, the
NLL of tokens 2..T from llama.cpp's logits at every position (logits_all), no BOS added; PPL = exp(total NLL /
total tokens). So it is comparable with test/ppl_student on the same windows, unlike llama-perplexity's default
(BOS, second half of each window only).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from qatlab.eval.perplexity import next_token_nll


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def perplexity(gguf_path: str | Path, blocks: torch.Tensor, threads: int | None = None) -> float:
    """(N, T) windows -> llama.cpp's PPL of the GGUF file at `gguf_path`."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=blocks.shape[1], logits_all=True, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for window in blocks:  # (T,)
        llm.reset()
        llm.eval(window.tolist())
        logits = torch.as_tensor(llm.scores[: len(window)], dtype=torch.float32)[None]  # (1, T, V)
        token_nll = next_token_nll(logits, window[None])  # (1, T - 1)
        nll, count = nll + float(token_nll.double().sum()), count + token_nll.numel()
    return math.exp(nll / count)
