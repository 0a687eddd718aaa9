"""Peak memory of ZeroQuant's LKD versus whole-model KD at the same bits, model and batch.

    flock /tmp/qatlab_cpu.lock env OMP_NUM_THREADS=2 python experiments/zeroquant/peak_memory.py \
        --out experiments/zeroquant/peak_memory.json

Each mode runs in its own process (peak RSS is per process and never goes down):
    load  teacher + W4/8A8 student built, one no-grad student forward: the floor both share
    kd    whole-model KD: QATModule + Lightning Trainer, AdamW, `--kd-steps` steps
    lkd   ZeroQuant's LKD over every block (qatlab.stages.blockwise.run_lkd), Adam, `--lkd-steps` steps per block
Reported per mode: peak RSS (resource.getrusage ru_maxrss), the largest gradients + optimizer
state seen after any optimizer step (exact, summed over tensors), and on CUDA
torch.cuda.max_memory_allocated. Both trainers see micro-batches of `--batch-size` x `--seq-len`
random tokens (memory does not depend on which tokens); LKD keeps `--samples` sequences' block inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from functools import partial

import torch

MODES = ("load", "kd", "lkd")
W4_8_A8 = {
    "weight": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64},
    "weight_overrides": {"self_attn": {"bits": 8}},
    "activation": {"bits": 8, "symmetric": True, "granularity": "token"},
}


class MeasuredAdamW(torch.optim.AdamW):
    """AdamW that records, after each step, the bytes of every gradient in `watch` plus its own state."""

    watch: list[torch.nn.Parameter] = []
    peak_bytes = 0

    def step(self, closure=None):
        loss = super().step(closure)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.watch if p.grad is not None)
        state = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        MeasuredAdamW.peak_bytes = max(MeasuredAdamW.peak_bytes, grads + state)
        return loss


def build(args):
    from qatlab.recipes import Recipe
    from qatlab.losses import ForwardKL
    from qatlab.stages.blockwise import BlockwiseConfig
    from qatlab.models import load_causal_lm
    from qatlab.train import make_student

    teacher, _ = load_causal_lm(args.model, dtype="float32")
    method = Recipe("zeroquant" if args.mode == "lkd" else "kd", **W4_8_A8, loss=ForwardKL())
    method.blockwise = BlockwiseConfig(samples=args.samples, batch_size=args.batch_size, steps=args.lkd_steps,
                                       seq_len=args.seq_len, data="random", lr=1e-5)
    student = make_student(teacher, method, "float32")
    return teacher, student, method


def measure(args) -> dict:
    from qatlab.data.random_tokens import random_token_batches

    teacher, student, method = build(args)
    vocab = student.get_input_embeddings().num_embeddings
    batches = random_token_batches(vocab, args.samples, args.seq_len, args.batch_size, seed=0)
    MeasuredAdamW.watch = list(student.parameters())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.mode == "load":
        with torch.no_grad():
            student(input_ids=batches[0]["input_ids"])
    elif args.mode == "kd":
        run_kd(teacher, student, method, batches, args.kd_steps)
    else:
        from qatlab.stages.blockwise import run_blockwise

        run_blockwise(student, teacher, batches, method.blockwise, optimizer=partial(MeasuredAdamW, lr=1e-5))
    return {
        "mode": args.mode,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "grads_plus_optimizer_state_mb": MeasuredAdamW.peak_bytes / 2**20,
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def run_kd(teacher, student, method, batches, steps: int) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from qatlab.stages.qat_module import QATModule

    module = QATModule(teacher, student, method.loss, optimizer=partial(MeasuredAdamW, lr=1e-5))
    trainer = L.Trainer(max_steps=steps, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, help="measure one mode in this process (default: all, one process each)")
    p.add_argument("--model", default="embedded:smollm2-135m", help="model.name_or_path (tiny-llama to try it)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--kd-steps", type=int, default=3)
    p.add_argument("--lkd-steps", type=int, default=3)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("mode", "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    floor = rows[0]["peak_rss_mb"]
    print(f"{args.model}: batch {args.batch_size} x {args.seq_len} tokens, LKD calibration {args.samples} sequences")
    print("| mode | peak RSS (MB) | over the load floor (MB) | grads + optimizer state (MB) | CUDA max allocated (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        cuda = "n/a" if r["cuda_max_allocated_mb"] is None else f"{r['cuda_max_allocated_mb']:.0f}"
        print(f"| {r['mode']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - floor:.0f} | "
              f"{r['grads_plus_optimizer_state_mb']:.1f} | {cuda} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
