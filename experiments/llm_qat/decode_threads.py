"""Time batched KV-cache decode steps of the embedded SmolLM2 at a given thread count.

    python experiments/llm_qat/decode_threads.py --threads 1
    python experiments/llm_qat/decode_threads.py --threads 2
"""

import argparse
import time

import torch

from qatlab.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_causal_lm("embedded:smollm2-135m")
    x = torch.randint(100, 40000, (args.batch_size, 1))
    past = None
    with torch.inference_mode():
        start = time.time()
        for _ in range(args.steps):
            out = model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            x = out.logits[:, -1].argmax(-1)[:, None]
        seconds = time.time() - start
    print(f"threads={args.threads} steps={args.steps} batch={args.batch_size}: {seconds:.2f} s, "
          f"{args.steps * args.batch_size / seconds:.1f} tok/s")


if __name__ == "__main__":
    main()
