"""The serving study's second half, on a finished run that shipped gguf (and compressed_tensors):

  python experiments/serving/study.py RUN_DIR [--llama-cpp] [--decode-tokens 128]

RUN_DIR: a run of `python -m qatlab ... export=[...,gguf,...] eval.exports=true` (its results.json holds qatlab's
PPL of the student and of every reloaded export). This script rebuilds the same test windows from the run's
.hydra/config.yaml and
  1. writes the teacher as a dense F16 GGUF (RUN_DIR/export_f16/model.gguf, the same exporter: the baseline
     llama.cpp decodes against) and scores it through transformers' GGUF reader (a check of the metadata and the
     q/k row layout on the real model: it must give the teacher's PPL);
  2. checks the GGUF's tokenizer (transformers' GGUF tokenizer reader) against the run's tokenizer on the test text;
  3. with --llama-cpp (needs llama-cpp-python): llama.cpp's PPL on the same windows (logits of every position,
     the pinned protocol: tokens 2..T of each window), and decode tokens/s for the quantized GGUF vs the F16 GGUF
     on this CPU, one run each, side by side.
Prints a markdown table and writes RUN_DIR/serving.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from qatlab.eval.perplexity import perplexity
from qatlab.export import llama_cpp
from qatlab.export.gguf import GGUF_FILE, export_gguf
from qatlab.models import load_causal_lm
from qatlab.train import model_loader_args


def test_windows(cfg, tokenizer) -> torch.Tensor:
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    return datamodule.test_blocks()


def llama_cpp_decode_speed(gguf_path: Path, prompt: list[int], tokens: int, threads: int) -> float:
    """Greedy decode tokens/s after the prompt (prompt processing excluded)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=len(prompt) + tokens + 8, n_threads=threads, verbose=False)
    llm.eval(prompt)
    start, made = time.perf_counter(), 0
    for _token in llm.generate([], top_k=1, reset=False):  # generate() evaluates each sampled token itself
        made += 1
        if made >= tokens:
            break
    return made / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--llama-cpp", action="store_true", help="score and time the GGUFs with llama-cpp-python")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    run = args.run_dir
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    results = json.loads((run / "results.json").read_text())
    teacher, tokenizer = load_causal_lm(**model_loader_args(cfg.model))
    blocks = test_windows(cfg, tokenizer)
    assert len(blocks) == results["test/windows"], "the run scored a different number of windows"
    quant_gguf = run / "export" / "gguf" / GGUF_FILE

    f16_dir = run / "export_f16"
    f16_dir.mkdir(exist_ok=True)
    export_gguf(teacher, f16_dir, {}, tokenizer, dtype="float16", name="teacher f16")  # no plan: every tensor F16
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f16 = AutoModelForCausalLM.from_pretrained(f16_dir, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    out = {"test/windows": len(blocks), "test/ppl_teacher": results["test/ppl_teacher"],
           "test/ppl_teacher_f16_gguf": perplexity(f16, blocks, desc="ppl f16 gguf")}
    del f16
    for key in ("test/ppl_student", "test/ppl_packed", "test/ppl_hf", "test/ppl_compressed_tensors", "test/ppl_gguf"):
        if key in results:
            out[key] = results[key]

    text = tokenizer.decode(blocks[0])
    gguf_tok = AutoTokenizer.from_pretrained(quant_gguf.parent, gguf_file=GGUF_FILE)
    out["gguf_tokenizer_matches"] = gguf_tok(text, add_special_tokens=False).input_ids == \
        tokenizer(text, add_special_tokens=False).input_ids
    out["gguf_bytes"] = quant_gguf.stat().st_size
    out["f16_gguf_bytes"] = (f16_dir / GGUF_FILE).stat().st_size

    if args.llama_cpp:
        if not llama_cpp.available():
            sys.exit("--llama-cpp needs llama-cpp-python (pip install llama-cpp-python; it compiles llama.cpp from "
                     "source where no wheel fits the platform)")
        out["test/ppl_llama_cpp_gguf"] = llama_cpp.perplexity(quant_gguf, blocks, args.threads)
        out["test/ppl_llama_cpp_f16"] = llama_cpp.perplexity(f16_dir / GGUF_FILE, blocks, args.threads)
        prompt = blocks[0, :64].tolist()
        out["decode_tok_s_gguf"] = llama_cpp_decode_speed(quant_gguf, prompt, args.decode_tokens, args.threads)
        out["decode_tok_s_f16"] = llama_cpp_decode_speed(f16_dir / GGUF_FILE, prompt, args.decode_tokens, args.threads)

    (run / "serving.json").write_text(json.dumps(out, indent=2))
    print("| what | value |\n|---|---|")
    for key, value in out.items():
        print(f"| {key} | {round(value, 4) if isinstance(value, float) else value} |")


if __name__ == "__main__":
    main()
