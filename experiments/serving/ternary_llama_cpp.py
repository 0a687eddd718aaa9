"""llama.cpp on ternary GGUFs (TQ2_0, TQ1_0): SmolLM2's 576-wide inputs do not fill TQ's 256-column blocks, so this
uses a random 1-layer Llama of widths 256/512 with the SmolLM2 tokenizer (llama.cpp needs one) and compares the PPL
of random token windows: qatlab's evaluator on the ternary student, transformers' GGUF reader, llama.cpp.
  PYTHONPATH=. python experiments/serving/ternary_llama_cpp.py        # needs llama-cpp-python
"""
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qatlab.eval.perplexity import perplexity
from qatlab.export import llama_cpp, ship
from qatlab.models.loading import load_causal_lm
from tests.test_ship import F32, TERNARY, student_of


def main() -> None:
    _, tokenizer = load_causal_lm("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    student = student_of(LlamaForCausalLM(config).eval(), *TERNARY)  # symmetric restricted 2-bit per channel
    blocks = torch.randint(0, len(tokenizer), (4, 64))
    print(f"| student, qatlab's evaluator | {perplexity(student, blocks, desc='student'):.4f} |")
    for kind in ("tq2_0", "tq1_0"):
        options = F32(formats=("gguf",), dtype="float32", gguf_type=kind)
        path = ship.write(options, ship.plan(options, student), student, Path(tempfile.mkdtemp()), tokenizer=tokenizer)["gguf"]
        reader = perplexity(ship.load("gguf", path, dtype="float32"), blocks, desc=kind)
        print(f"| {kind}, transformers' GGUF reader | {reader:.4f} |")
        print(f"| {kind}, llama.cpp | {llama_cpp.perplexity(path / ship.GGUF_FILE, blocks, 2):.4f} |")


if __name__ == "__main__":
    main()
