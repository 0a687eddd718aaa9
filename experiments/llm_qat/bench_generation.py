r"""Tokens/s of qatlab's batched KV-cache generator versus a plain one-sample-at-a-time HF generate loop.

Both make the same number of samples of the same length from the same random start tokens.
The plain loop samples (do_sample=True, same temperature, no top-k/top-p) from the FIRST new token on,
while qatlab decodes the first --greedy tokens by argmax: the work per token is the same.

    PYTHONPATH=. python experiments/llm_qat/bench_generation.py        # CPU defaults, ~30 s on 2 idle cores
    PYTHONPATH=. python experiments/llm_qat/bench_generation.py --device cuda --dtype bfloat16 \
        --samples 256 --length 2048 --batch-size 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from qatlab.data.generation import GenerationConfig, generate_dataset, load_generated, start_tokens
from qatlab.models import load_causal_lm


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m", help="anything qatlab.models.load_causal_lm takes")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--length", type=int, default=64, help="tokens per sample, the start token included")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--greedy", type=int, default=4, help="greedy (top-1) tokens in the batched generator")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def bench_batched(model, tokenizer, args) -> float:
    """Seconds for generate_dataset to write all samples into a fresh folder."""
    cfg = GenerationConfig(num_samples=args.samples, length=args.length, batch_size=args.batch_size,
                           greedy_tokens=args.greedy, temperature=args.temperature, seed=args.seed,
                           shard_size=args.samples, start="random", top_k=None, stop_at_eos=False,
                           retokenize=False)  # fixed-length samples from random starts: the same work as the loop
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        generate_dataset(model, tokenizer, out, cfg)
        elapsed = time.perf_counter() - started
        assert load_generated(out).shape == (args.samples, args.length)
    return elapsed


def bench_plain(model, tokenizer, args) -> float:
    """Seconds for one model.generate call per sample (batch 1), forced to the full length."""
    new = args.length - 1
    settings = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                    max_new_tokens=new, min_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    with torch.inference_mode():
        for tok in start_tokens(tokenizer, args.samples, args.seed).tolist():
            out = model.generate(torch.tensor([[tok]], device=device), **settings)
            assert out.shape == (1, args.length)
    return time.perf_counter() - started


def warm_up(model, tokenizer, args) -> None:
    """One short run of each path, so one-time costs (allocations, lazy init) are not timed."""
    small = argparse.Namespace(**{**vars(args), "samples": 1, "length": 8, "batch_size": 1})
    bench_batched(model, tokenizer, small)
    bench_plain(model, tokenizer, small)


def main() -> None:
    args = parse_args()
    model, tokenizer = load_causal_lm(args.model, dtype=args.dtype)
    model.to(args.device)
    warm_up(model, tokenizer, args)
    tokens = args.samples * (args.length - 1)  # new tokens, the start token excluded
    batched = bench_batched(model, tokenizer, args)
    plain = bench_plain(model, tokenizer, args)
    print(f"model={args.model} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"samples={args.samples} length={args.length} new_tokens={tokens}")
    print(f"batched generate_dataset (batch {args.batch_size}): {batched:7.1f} s  {tokens / batched:8.1f} tok/s")
    print(f"plain model.generate (batch 1):        {plain:7.1f} s  {tokens / plain:8.1f} tok/s")
    print(f"speed-up: {plain / batched:.2f}x")


if __name__ == "__main__":
    main()
