"""Per-layer GPTQ output error on calibration vs held-out text, relative to RTN's (the open question of
experiments/gptq/README.md: GPTQ beats RTN per layer on its calibration data but not at model level).

    python experiments/gptq/heldout_error.py [--bits 3] [--calib 64] [--heldout 32] [--blocks 0 10 20 29]

Each listed decoder block of the embedded SmolLM2 gets its inputs from the full-precision teacher;
for every Linear in it, H_cal = X^T X / N on `--calib` train blocks of 512 tokens and H_held on
`--heldout` other train blocks. Output error of a quantized W' on H: sum over rows of d H d^T,
d = W' - W. Printed: error / RTN's error on H_cal and on H_held, for GPTQ variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from qatlab.data.corpora import load_gensim_wiki
from qatlab.data.packing import pack_documents
from qatlab.models import load_causal_lm
from qatlab.models.layer_maps import decoder_blocks
from qatlab.inits import gptq_solver as G
from qatlab.inits.clip_search import GramHook, capture_block_inputs, run_block
from qatlab.quantizers.spec import QuantConfig
from qatlab.quantizers.primitives import fake_quantize


def hessians(model, block_index: int, sequences, linears) -> dict[str, torch.Tensor]:
    """name -> (in, in) Gram matrix of that Linear's inputs in block `block_index`, teacher inputs."""
    cpu = torch.device("cpu")
    inputs = capture_block_inputs(model, sequences, cpu)
    blocks = decoder_blocks(model)
    for i in range(block_index):
        inputs.hidden = run_block(blocks[i], inputs, cpu)
    hooks = {m: GramHook(m.in_features, m.in_features, cpu) for m in linears.values()}
    unit = {m: UnitGramHook(m.in_features) for m in linears.values()}
    run_block(blocks[block_index], inputs, cpu, hooks)
    run_block(blocks[block_index], inputs, cpu, unit)
    grams = {n: hooks[m].gram()[0] for n, m in linears.items()}
    grams |= {n + "#norms": torch.cat(unit[m].norms) for n, m in linears.items()}
    return grams | {n + "#unit": unit[m].gram() for n, m in linears.items()}


class UnitGramHook:
    """Gram of the inputs scaled to unit norm: every token weighs the same (H is dominated by the
    few tokens with massive activations otherwise); also records the largest/median token norm."""

    def __init__(self, width: int):
        self.sum, self.count, self.keep, self.norms = torch.zeros(width, width), 0, None, []

    def __call__(self, module, args, output) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        norms = x.norm(dim=-1, keepdim=True)
        self.norms.append(norms[:, 0])
        x = x / norms.clamp_min(1e-12)
        self.sum += x.T @ x
        self.count += x.shape[0]

    def gram(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def unpinned_grid(values, cfg, first):
    grid = PINNED_GRID(values, cfg, first)
    none = torch.full_like(grid.pin_top, -1)
    return dataclasses.replace(grid, pin_top=none, pin_bottom=none)


PINNED_GRID = G.group_grid


def variants(W, H, cfg):
    def gptq(pin: bool, **kw):
        G.group_grid = PINNED_GRID if pin else unpinned_grid
        try:
            return G.gptq_quantize(W, H, cfg, **kw)
        finally:
            G.group_grid = PINNED_GRID
    return {"gptq": gptq(True), "gptq_act_order": gptq(True, act_order=True)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--model-ppl", action="store_true",
                        help="GPTQ every layer on teacher-input Hessians (not sequential) and compare test PPL with RTN")
    parser.add_argument("--model-level", action="store_true",
                        help="run method=gptq on the whole student (sequential, as a run does) and score every layer")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm("embedded:smollm2-135m")
    data = pack_documents(load_gensim_wiki("train"), tokenizer, 512)
    perm = torch.randperm(len(data))
    ones = lambda ids: (ids[None], torch.ones_like(ids)[None])
    calib = [ones(data[i]) for i in perm[: args.calib]]
    held = [ones(data[i]) for i in perm[args.calib : args.calib + args.heldout]]
    cfg = QuantConfig(bits=args.bits, symmetric=False, granularity="group", group_size=args.group)
    if args.model_level:
        return model_level(model, calib, held, args)
    if args.model_ppl:
        return model_ppl(model, tokenizer, calib, cfg, args)
    blocks = decoder_blocks(model)
    rows = []
    for b in args.blocks:
        linears = {n: m for n, m in blocks[b].named_modules() if isinstance(m, torch.nn.Linear)}
        H_cal, H_held = hessians(model, b, calib, linears), hessians(model, b, held, linears)
        for name, layer in linears.items():
            W = layer.weight.detach().float()
            rtn = fake_quantize(W, cfg)
            scored = (("cal", H_cal[name]), ("held", H_held[name]), ("held_unit", H_held[name + "#unit"]))
            base = {k: G.output_error(W, rtn, H) for k, H in scored}
            norms = H_held[name + "#norms"]
            row = {"block": b, "layer": name, "norm max/median": round((norms.max() / norms.median()).item(), 1)}
            for label, Q in variants(W, H_cal[name], cfg).items():
                for k, H in scored:
                    row[f"{label}/{k}"] = round(G.output_error(W, Q, H) / base[k], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if "/" in k]
    print("mean over layers:", json.dumps({k: round(sum(r[k] for r in rows) / len(rows), 3) for k in keys}))


class FirstTokenGram:
    """Gram of each sequence's first-position input only (the attention-sink token)."""

    def __init__(self, width: int):
        self.sum, self.count = torch.zeros(width, width), 0

    def __call__(self, module, args, output) -> None:
        x = args[0][:, 0].float()  # (B, in)
        self.sum += x.T @ x
        self.count += x.shape[0]

    def gram(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1))[None]


def all_grams(model, sequences, first_token: bool = False) -> dict[str, torch.Tensor]:
    """name -> (in, in) input Gram of every decoder Linear of `model`, from one pass over `sequences`."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    hooks = {n: FirstTokenGram(m.in_features) if first_token else GramHook(m.in_features, m.in_features, torch.device("cpu"))
             for n, m in linears.items()}
    handles = [linears[n].register_forward_hook(h) for n, h in hooks.items()]
    with torch.no_grad():
        for ids, _ in sequences:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: h.gram()[0] for n, h in hooks.items()}


def model_level(model, calib, held, args) -> None:
    """GPTQ the whole student as `python -m qatlab method=gptq` does; score each layer on teacher-input Grams."""
    from qatlab.recipes import compose_recipe
    from qatlab.train import make_student

    method = compose_recipe("gptq", [f"method.weight.bits={args.bits}", "method.weight.symmetric=false",
                                     f"method.weight.group_size={args.group}"])
    student = make_student(model, method, "float32")
    method.initialize(student, model, [{"input_ids": ids, "attention_mask": m} for ids, m in calib])
    grams = {"cal": all_grams(model, calib), "held": all_grams(model, held)}
    worst = []
    for name, H in grams["held"].items():
        layer = student.get_submodule(name)
        W = model.get_submodule(name).weight.detach().float()
        Q = fake_quantize(layer.weight.detach().float(), layer.weight_cfg)  # what the student computes
        rtn = fake_quantize(W, layer.weight_cfg)
        row = {k: G.output_error(W, Q, g[name]) / G.output_error(W, rtn, g[name]) for k, g in grams.items()}
        worst.append((row["held"], row["cal"], name))
    worst.sort(reverse=True)
    for held_ratio, cal_ratio, name in worst[:12]:
        print(f"{name:45s} cal {cal_ratio:.3f} held {held_ratio:.3f}")
    print("mean held", sum(w[0] for w in worst) / len(worst), "layers >1:", sum(w[0] > 1 for w in worst))


def model_ppl(model, tokenizer, calib, cfg, args) -> None:
    """Test PPL (first 2 windows of 1024) of RTN and of GPTQ on teacher-input Hessians, layer by layer."""
    import copy

    from qatlab.eval.perplexity import perplexity

    test = pack_documents(load_gensim_wiki("test"), tokenizer, 1024)[:2]
    grams, firsts = all_grams(model, calib), all_grams(model, calib, first_token=True)
    print("teacher", perplexity(model, test, batch_size=1))
    for label in ("rtn", "gptq", "gptq_sink"):
        quantized = copy.deepcopy(model)
        ratios = []
        for name, H in grams.items():
            layer = quantized.get_submodule(name)
            W = layer.weight.detach().float()
            H0 = firsts[name]
            if label == "rtn":
                Q = fake_quantize(W, cfg)
            elif label == "gptq":
                Q = G.gptq_quantize(W, H, cfg)
            else:  # first-position tokens get a third of the Hessian's trace
                Q = G.gptq_quantize(W, H + H0 * (H.trace() / H0.trace() / 3), cfg)
            ratios.append(G.output_error(W, Q, H0) / G.output_error(W, fake_quantize(W, cfg), H0))
            layer.weight.data.copy_(Q)
        print(label, perplexity(quantized, test, batch_size=1), "first-token error / RTN's: mean",
              sum(ratios) / len(ratios), "max", max(ratios), flush=True)


if __name__ == "__main__":
    main()
