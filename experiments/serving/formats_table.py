"""Method x format: which export holds each method's default student exactly, and why the others refuse.

  python experiments/serving/formats_table.py            (CPU, ~1 min: one random layer of SmolLM2's widths)

Each method's default recipe (conf/method/<name>.yaml) converts a 1-layer random Llama with SmolLM2-135M's widths
(hidden 576, MLP 1536, 9 heads / 3 KV heads); qatlab.export.ship.plan asks every format, as `export=` does before
writing. Prints the markdown table (the refusal's own first clause as the reason).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qatlab.errors import QatlabError
from qatlab.export import ship
from qatlab.recipes import compose_recipe
from qatlab.train import make_student

METHODS = ("rtn", "gptq", "kd", "lsq", "llm_qat", "bitdistiller", "efficientqat", "paretoq", "zeroquant", "onebit")
EXTRA = {"rtn (++method.weight.range=full method.weight.group_size=32)": ("rtn", ["++method.weight.range=full",
                                                                                 "method.weight.group_size=32"]),
         "paretoq (ternary: ++method.weight.range=restricted)": ("paretoq", ["++method.weight.range=restricted"]),
         "rtn (method.weight.bits=8 method.weight.group_size=32)": ("rtn", ["method.weight.bits=8",
                                                                           "method.weight.group_size=32"]),
         "rtn (W3 asym g16)": ("rtn", ["method.weight.bits=3", "method.weight.symmetric=false",
                                       "method.weight.group_size=16"]),
         "rtn (NF3 g32: +method.weight.grid=nf)": ("rtn", ["method.weight.bits=3", "+method.weight.grid=nf",
                                                           "method.weight.symmetric=false", "method.weight.group_size=32"])}


def smollm2_layer() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)).eval()


def verdict(fmt: str, student: torch.nn.Module) -> str:
    try:
        plans = ship.plan(ship.ExportOptions(formats=(fmt,)), student)
    except QatlabError as e:
        reason = str(e).split(": ", 1)[-1].split(";")[0]  # "layer 'L' ... which <format> ..." up to the advice
        return "refused: " + reason.replace("model.layers.0.", "").replace("|", "/")
    if fmt == "gguf":
        return "codes exact (" + ", ".join(sorted({kind.name.upper() for kind, _ in plans["gguf"].values()})) + \
            "), fp16 block scales"
    return "exact"


def main() -> None:
    teacher = smollm2_layer()
    rows = [(m, m, []) for m in METHODS] + [(label, m, o) for label, (m, o) in EXTRA.items()]
    print("| method (default grid) | " + " | ".join(ship.FORMATS) + " |")
    print("|---" * (len(ship.FORMATS) + 1) + "|")
    for label, method, overrides in rows:
        recipe = compose_recipe(method, overrides)
        student = make_student(teacher, recipe, "float32").eval()
        grid = recipe.describe().get("w_grid")
        cells = [verdict(fmt, student) for fmt in ship.FORMATS]
        print(f"| {label} ({grid}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
