"""QAT step throughput and peak memory: qatlab's step vs a plain eager fake-quant loop.

    python experiments/scale/bench.py --model 1b --seq 2048 --batch 4          # H100: tokens/s, MFU, peak
    python experiments/scale/bench.py --model 7b --bits 2 --optimizer adamw8bit \
        --student-dtype bfloat16 --checkpointing --batch 1 --skip-reference    # 7B W2 QAT step peak memory
    python experiments/scale/bench.py --tiny                                   # CPU smoke run (tested)

--out PATH also writes the JSON to a file (the GPU kit, experiments/gpu/, reads it from there).

Random weights in the Llama architecture (no download). One step = teacher forward (no grad) +
student forward/backward + AdamW; "qatlab" uses FakeQuantLinear and the chunked fp32 KL,
"reference" the plain loop: every Linear's weight fake-quantized by a hand-written per-group
MinMax with a straight-through estimator, and full-vocabulary fp32 KL via F.kl_div.
MFU = (6 x student params + 2 x teacher params) x tokens / step time / peak FLOP/s (attention FLOPs
not counted; --peak-tflops defaults to the H100's dense bf16 989). Prints one JSON object, which
also holds qatlab.estimate's prediction for the qatlab step.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qatlab.estimate import ModelShape, Setup, estimate_peak
from qatlab.losses.divergences import forward_kl
from qatlab.recipes import Recipe
from qatlab.stages.params import parameter_groups
from qatlab.stages.qat_module import freeze

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "tiny": (64, 128, 2, 4, 2, 512, True),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "7b": (4096, 11008, 32, 32, 32, 32000, False),  # Llama-2-7B
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(name: str, dtype: torch.dtype, device) -> LlamaForCausalLM:
    h, i, n, heads, kv, vocab, tied = SHAPES[name]
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


# ---- the plain eager reference -------------------------------------------------------------------


def ste_minmax(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-group asymmetric MinMax fake-quant of a (out, in) weight, straight-through gradient."""
    g = w.reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    q = ((g - lo) / scale).round().clamp(0, 2**bits - 1) * scale + lo
    return w + (q.reshape(w.shape) - w).detach()


class EagerFakeQuant(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int, group: int):
        super().__init__()
        self.linear, self.bits, self.group = linear, bits, group

    def forward(self, x):
        return F.linear(x, ste_minmax(self.linear.weight, self.bits, self.group), self.linear.bias)


def eager_student(teacher: nn.Module, bits: int, group: int, dtype) -> nn.Module:
    student = copy.deepcopy(teacher).to(dtype)
    for layer in student.model.layers:
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], EagerFakeQuant(child, bits, group))
    return student.requires_grad_(True).train()


def eager_loss(student_logits, teacher_logits):
    return F.kl_div(torch.log_softmax(student_logits.float(), -1), torch.log_softmax(teacher_logits.float(), -1),
                    log_target=True, reduction="batchmean") / student_logits.shape[1]


# ---- one timed loop --------------------------------------------------------------------------------


def run(teacher, student, loss_fn, optimizer, ids, steps: int, device) -> dict:
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the reserved peak then starts from live tensors, not from blocks freed earlier
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 1):  # the first step warms up (allocations, kernels, optimizer state)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            t = teacher(input_ids=ids).logits
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            s = student(input_ids=ids).logits
        loss_fn(s, t).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del s, t
        sync(device)
        times.append(time.perf_counter() - start)
    step = sum(times[1:]) / steps
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() if cuda else None
    reserved = torch.cuda.max_memory_reserved() if cuda else None  # what the allocator took from the card
    return {"step_s": round(step, 4), "tokens_per_s": round(ids.numel() / step, 1),
            "peak_gib": None if peak is None else round(peak / 2**30, 3),
            "peak_reserved_gib": None if reserved is None else round(reserved / 2**30, 3)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_optimizer(name: str, params):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--student-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, seq 32, batch 2, 2 steps")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.seq, a.batch, a.steps, a.group = "tiny", 32, 2, 2, 32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = freeze(build_model(a.model, teacher_dtype, device))
    ids = torch.randint(0, teacher.config.vocab_size, (a.batch, a.seq), device=device)
    params = sum(p.numel() for p in teacher.parameters())
    flops = (6 + 2) * params * ids.numel()
    result = {"model": a.model, "params": params, "seq": a.seq, "batch": a.batch, "bits": a.bits,
              "group": a.group, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    setup = Setup(a.batch, a.seq, teacher_dtype=str(teacher_dtype).split(".")[1], student_dtype=a.student_dtype,
                  activation_dtype="bfloat16" if device.type == "cuda" else a.student_dtype,
                  optimizer=a.optimizer, gradient_checkpointing=a.checkpointing)
    result["estimate_gib"] = round(estimate_peak(ModelShape.of(teacher), setup).total / 2**30, 3)

    def timed(student, loss_fn, optimizer) -> dict:
        row = run(teacher, student, loss_fn, optimizer, ids, a.steps, device)
        return {**row, "mfu": round(flops / row["step_s"] / (a.peak_tflops * 1e12), 5)}

    method = Recipe("kd", weight={"bits": a.bits, "group_size": a.group, "symmetric": False})
    student = copy.deepcopy(teacher).to(DTYPES[a.student_dtype]).requires_grad_(True).train()
    method.convert(student)
    if a.checkpointing:
        student.config.use_cache = False
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(a.optimizer, parameter_groups(student, "all", None))
    result["qatlab"] = timed(student, forward_kl, optimizer)
    del student, optimizer
    if not a.skip_reference:
        write(a.out, {**result, "partial": "the reference loop has not finished"})  # kept if the reference fails
        student = eager_student(teacher, a.bits, a.group, DTYPES[a.student_dtype])
        optimizer = make_optimizer(a.optimizer, list(student.parameters()))
        result["reference"] = timed(student, eager_loss, optimizer)
        del student, optimizer
    print(json.dumps(result, indent=2))
    write(a.out, result)
    return result


def write(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
