"""Packed W2 / W1 GEMV kernels vs bf16 cuBLAS, and packed SmolLM2 decode vs bf16, in one run.

    python experiments/kernels/bench.py --out experiments/kernels/results.json        # GPU
    python experiments/kernels/bench.py --tiny --out /tmp/bench.json                 # CPU smoke test

GEMV: weights (out x in) 4096x4096, 4096x11008, 11008x4096 at 1, 4 and 16 tokens; bf16 activations.
  bf16  torch.nn.functional.linear (cuBLAS)
  w2    PackedLinear, 2-bit asymmetric g64 (codes 16 per int32, fp16 scales, uint8 zeros)
  w1    PackedOneBitLinear's GEMV [(x * g) S^T] * h (signs 32 per int32, bf16 g and h)
  Time: triton.testing.do_bench (median, L2 flushed between runs) on CUDA; a wall-clock median on CPU.
  Bandwidth: bytes read (packed weights + scales / zeros or g / h + activations) / time, and that as
  a fraction of --peak-gbs (H100 SXM HBM3: 3350 GB/s). `impl` says whether a Triton kernel or the
  torch fallback ran (--tiny on CPU: the fallback).
Decode: greedy tokens/s at batch 1 with the KV cache, bf16 model vs the same model packed
  (RTN W2 g64 asymmetric; OneBit W1 after SVID init), plus how far the packed model's logits are
  from its fake-quant student's (fp32) on a 16-token prompt (so the kernels run).
Goals (issue 9): w2 and w1 >= 4x faster than bf16 at 1 token on 4096x11008; >= 60 % of peak bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from qatlab import kernels
from qatlab.export import load_packed
from qatlab.export.bitpack import pack_codes
from qatlab.export import export_packed
from qatlab.export.int_export import pack_codes_layer
from qatlab.export.manifest import grid_from_dict
from qatlab.export.packed_linear import PackedLinear
from qatlab.export.packed_onebit import PackedOneBitLinear
from qatlab.recipes import Recipe
from qatlab.quantizers import QuantConfig
from qatlab.layers import FakeQuantLinear

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (out, in)
BATCHES = [1, 4, 16]
TINY_SHAPES, TINY_BATCHES = [(64, 128), (128, 64)], [1, 4]
W2 = {"bits": 2, "symmetric": False, "granularity": "group", "group_size": 64}
GOAL_SHAPE, GOAL_SPEEDUP, GOAL_PEAK = "4096x11008", 4.0, 0.60


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds per call."""
    fn()  # compile / autotune outside the timing
    if device.type == "cuda" and kernels.HAVE_TRITON:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    if device.type == "cuda":
        return _cuda_events_ms(fn)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cuda_events_ms(fn: Callable[[], Any], reps: int = 100) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def linear_of(w: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(w)
    return linear


def gemv_cases(out_f: int, in_f: int, device: torch.device) -> dict[str, tuple[Callable, tuple]]:
    """name -> (fn(x), the weight-side tensors it reads) for one weight shape."""
    w = torch.randn(out_f, in_f, device=device) * 0.02  # (out, in) fp32
    w_bf16 = w.to(torch.bfloat16)
    cfg = QuantConfig(**W2)
    t, entry = pack_codes_layer(FakeQuantLinear.from_linear(linear_of(w), cfg))
    w2 = PackedLinear(t["qweight"], t["scales"].half(), t["zeros"], None, in_f, grid_from_dict(entry["grid"], "w2"),
                      entry["group_size"])
    g = torch.rand(in_f, device=device, dtype=torch.bfloat16) + 0.5
    h = torch.rand(out_f, device=device, dtype=torch.bfloat16) + 0.5
    w1 = PackedOneBitLinear(pack_codes((w >= 0).to(torch.uint8), 1), g, h, None, False, 1e-5)
    return {
        "bf16": (lambda x: F.linear(x, w_bf16), (w_bf16,)),
        "w2": (w2, (w2.qweight, w2.scales, w2.zeros)),
        "w1": (w1.project, (w1.qweight, g, h)),
    }


def gemv_rows(shapes: list[tuple[int, int]], batches: list[int], device: torch.device, peak_gbs: float) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        cases = gemv_cases(out_f, in_f, device)
        for batch in batches:
            x = torch.randn(batch, in_f, device=device, dtype=torch.bfloat16)
            base_ms = None
            for name, (fn, weights) in cases.items():
                ms = time_ms(lambda: fn(x), device)
                base_ms = base_ms or ms  # bf16 runs first
                gbs = nbytes(*weights, x) / ms / 1e6
                impl = "triton" if name != "bf16" and kernels.use_kernel(x, in_f) else "torch"  # bf16: cuBLAS on CUDA
                rows.append({"kernel": name, "impl": impl, "shape": f"{out_f}x{in_f}", "batch": batch,
                             "time_us": round(ms * 1e3, 2), "gbs": round(gbs, 1),
                             "pct_peak": round(100 * gbs / peak_gbs, 1), "speedup_vs_bf16": round(base_ms / ms, 2)})
                print(rows[-1], flush=True)
    return rows


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def load_teacher(args: argparse.Namespace) -> nn.Module:
    """fp32 teacher on the CPU: the tiny random Llama, or anything qatlab.models.load_causal_lm takes."""
    if args.tiny:
        return tiny_llama()
    from qatlab.models import load_causal_lm

    model, _ = load_causal_lm(args.model, gguf_file=args.gguf_file)
    return model


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Greedy decoding with the KV cache, batch 1; the prompt's prefill is not timed."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = model(input_ids=prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    return new_tokens / (time.perf_counter() - start)


def packed_variants(teacher: nn.Module, device: torch.device, tmp: Path) -> dict[str, tuple[nn.Module, nn.Module]]:
    """name -> (packed bf16 model on device, its fp32 fake-quant student on device)."""
    variants = {}
    from qatlab.quantizers.onebit import OneBitLayers

    w1 = Recipe("onebit", weight={"bits": 1, "symmetric": True, "granularity": "channel"}, quantizer=OneBitLayers())
    for name, method in (("w2", Recipe("rtn", weight=W2)), ("w1", w1)):
        student = copy.deepcopy(teacher).float().to(device)
        method.convert(student)
        method.initialize(student, teacher.to(device), [])
        path = export_packed(student.eval(), tmp / name, dtype="float16", method=method.name)
        variants[name] = (load_packed(path, dtype="bfloat16", device=device), student)
    return variants


@torch.no_grad()
def logit_gap(packed: nn.Module, student: nn.Module, prompt: torch.Tensor) -> dict[str, float]:
    """Packed (bf16, kernels on CUDA) vs fake-quant student (fp32) logits on one prompt."""
    a, b = packed(input_ids=prompt).logits.float(), student(input_ids=prompt).logits.float()
    return {"max_abs_logit_diff": round((a - b).abs().max().item(), 4),
            "logit_std": round(b.std().item(), 4),
            "top1_agreement": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)}


def decode_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    teacher = load_teacher(args)
    vocab = teacher.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        variants = packed_variants(teacher, device, Path(tmp))
    bf16 = teacher.to(device=device, dtype=torch.bfloat16)
    base = decode_tokens_per_s(bf16, prompt, args.decode_tokens, device)
    rows = [{"model": "bf16", "tokens_per_s": round(base, 1)}]
    for name, (packed, student) in variants.items():
        tps = decode_tokens_per_s(packed, prompt, args.decode_tokens, device)
        rows.append({"model": name, "tokens_per_s": round(tps, 1), "speedup_vs_bf16": round(tps / base, 2),
                     **logit_gap(packed, student, prompt)})
    for row in rows:
        print(row, flush=True)
    return rows


def goals(rows: list[dict]) -> dict[str, Any]:
    """The issue's targets, read off the 1-token rows of GOAL_SHAPE."""
    found = {r["kernel"]: r for r in rows if r["shape"] == GOAL_SHAPE and r["batch"] == 1}
    result = {}
    for name in ("w2", "w1"):
        if name in found:
            r = found[name]
            result[name] = {"speedup_vs_bf16": r["speedup_vs_bf16"], "pct_peak": r["pct_peak"],
                            "met": r["speedup_vs_bf16"] >= GOAL_SPEEDUP and r["pct_peak"] >= 100 * GOAL_PEAK}
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/kernels/results.json"))
    parser.add_argument("--peak-gbs", type=float, default=3350.0, help="HBM peak in GB/s (H100 SXM: 3350)")
    parser.add_argument("--model", default="embedded:smollm2-135m", help="what qatlab.models.load_causal_lm takes")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-gemv", action="store_true", help="decode part only (the GPU kit runs the parts in two calls)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes and a tiny random Llama")
    args = parser.parse_args(argv)
    if args.tiny:
        args.decode_tokens = min(args.decode_tokens, 4)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    shapes, batches = (TINY_SHAPES, TINY_BATCHES) if args.tiny else (SHAPES, BATCHES)
    rows = [] if args.skip_gemv else gemv_rows(shapes, batches, device, args.peak_gbs)
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": kernels.HAVE_TRITON, "peak_gbs": args.peak_gbs, "tiny": args.tiny,
        "gemv": rows, "goals": goals(rows),
        "decode": [] if args.skip_decode else decode_rows(args, device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
