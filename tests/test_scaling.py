"""Strategy presets: DDP on 2 CPU processes (gloo) matches 1 process at the same global batch;
the frozen teacher never gets optimizer state; FSDP/DeepSpeed presets compose and fail clearly.

Run as a script, this file is the training worker the DDP test launches (Lightning's launcher
starts the second rank by running the same command again).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from qatlab.__main__ import user_error

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_presets_compose_on_gpu_defaults(strategy):
    cfg = make_cfg(f"trainer={strategy}")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.strategy._target_ and cfg.trainer.num_nodes == 1


@pytest.mark.parametrize("stage", (2, 3))
def test_deepspeed_missing_is_a_clear_error(stage, monkeypatch):
    import importlib.util

    import hydra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    cfg = make_cfg(f"trainer=deepspeed_zero{stage}")
    with pytest.raises(Exception) as failure:  # Hydra wraps it; the CLI prints the QatlabError inside
        hydra.utils.instantiate(cfg.trainer.strategy)
    assert "pip install deepspeed" in str(user_error(failure.value))


def test_fsdp_preset_builds_a_strategy_with_one_unit_per_decoder_layer(tiny_llama_model):
    import hydra

    from qatlab.strategies import QATFSDPStrategy, is_transformer_block

    strategy = hydra.utils.instantiate(make_cfg("trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, QATFSDPStrategy) and strategy.teacher_placement == "shard"
    assert strategy.kwargs["use_orig_params"]
    blocks = [m for m in tiny_llama_model.modules() if is_transformer_block(m)]
    assert len(blocks) == tiny_llama_model.config.num_hidden_layers
    with pytest.raises(Exception) as failure:
        hydra.utils.instantiate(make_cfg("trainer=fsdp", "trainer.strategy.teacher=copy").trainer.strategy)
    assert "teacher='copy' is not known" in str(user_error(failure.value))


def test_gpu_benchmark_script_runs_tiny_on_cpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "scale" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny"])
    for key in ("qatlab", "reference"):
        assert result[key]["tokens_per_s"] > 0 and result[key]["mfu"] >= 0
    assert result["estimate_gib"] > 0


# ---- DDP, 2 processes on gloo ------------------------------------------------------------------------

STEPS, PER_RANK_BATCH, BLOCK = 3, 2, 32


def run_worker(tmp_path, devices: int) -> dict:
    out = tmp_path / f"result_{devices}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        env.pop(key, None)  # a clean launch, whatever the test runner's environment says
    cmd = [sys.executable, str(Path(__file__).resolve()), str(devices), str(out), str(tmp_path / f"run{devices}")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_ddp_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """2 ranks x batch 2 vs 1 rank x batch 4, 3 AdamW steps (lr 1e-4, grad clip 1.0) on the tiny Llama.

    The ranks see blocks {0, 2}, {1, 3} where the single process sees {0, 1, 2, 3} (DistributedSampler
    without shuffling), and DDP averages the ranks' mean-loss gradients: the same gradient as the mean
    over all 4 blocks, up to fp32 summation order. Tolerance: 1e-4 relative on the first step's loss
    and on the KL of a held-out batch after the steps (observed: ~1e-5, the KL being ~1.5e-3),
    1e-5 absolute on the weights (AdamW steps are ~lr = 1e-4).
    """
    worker(1, str(tmp_path / "single.json"), str(tmp_path / "run1"))  # the reference, in this process
    single, ddp = json.loads((tmp_path / "single.json").read_text()), run_worker(tmp_path, 2)
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["steps"] == single["steps"] == STEPS
    assert ddp["backend"] == "gloo"
    assert abs(ddp["eval_loss"] - single["eval_loss"]) <= 1e-4 * single["eval_loss"]
    assert abs(ddp["first_loss"] - single["first_loss"]) <= 1e-4 * single["first_loss"]
    assert ddp["eval_loss"] < ddp["first_loss"]  # it trained
    assert ddp["weight_max_diff_vs_start"] > 1e-5
    torch.testing.assert_close(torch.tensor(ddp["weights"]), torch.tensor(single["weights"]), atol=1e-5, rtol=0)
    for result in (single, ddp):  # the frozen teacher is never an optimizer's business
        assert result["teacher_params_in_optimizer"] == 0 and result["teacher_grads"] == 0
        assert result["optimizer_params"] == result["student_params"]


def tiny_teacher():
    """conftest's tiny Llama (2 layers, width 64, vocab 128), seeded: the same weights in every process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def worker(devices: int, out: str, output_dir: str) -> None:
    """Train the tiny KD setup through conf/trainer/ddp.yaml on `devices` CPU processes; rank 0 writes out."""
    import hydra
    from torch.utils.data import DataLoader

    from qatlab.losses.divergences import forward_kl
    from qatlab.recipes import compose_recipe
    from qatlab.stages.qat_module import QATModule
    from qatlab.train import build_trainer, make_student

    cfg = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", f"trainer.devices={devices}",
                   f"trainer.max_steps={STEPS}", "+trainer.enable_checkpointing=false",
                   "+trainer.enable_progress_bar=false", "logger=none", "callbacks=none", f"paths.output_dir={output_dir}")
    teacher = tiny_teacher()
    method = compose_recipe("kd", ["method.weight.group_size=32"])
    student = make_student(teacher, method, "float32")
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    module = QATModule(teacher, student, method.loss, optimizer=hydra.utils.instantiate(cfg.optimizer, lr=1e-4))
    blocks = torch.randint(0, 128, (STEPS * 4, BLOCK), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks]
    batch = PER_RANK_BATCH * 2 // devices  # the same global batch of 4 blocks
    losses = []
    module.on_train_batch_end = lambda outputs, *a: losses.append(float(outputs["loss"]))
    trainer = build_trainer(cfg)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=batch, shuffle=False))
    first = torch.tensor(losses[0])
    if trainer.world_size > 1:  # the mean over ranks of each rank's mean = the global mean (equal token counts)
        torch.distributed.all_reduce(first)
        first /= trainer.world_size
    if trainer.global_rank != 0:
        return
    held_out = torch.randint(0, 128, (4, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eval_loss = forward_kl(student(input_ids=held_out).logits, teacher(input_ids=held_out).logits)
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    teacher_params = list(teacher.parameters())
    Path(out).write_text(json.dumps({
        "world_size": trainer.world_size,
        "backend": torch.distributed.get_backend() if trainer.world_size > 1 else "gloo",
        "steps": trainer.global_step,
        "first_loss": float(first),
        "eval_loss": float(eval_loss),
        "weights": student.model.layers[0].self_attn.q_proj.weight[:4, :8].tolist(),
        "weight_max_diff_vs_start": max((p - start[n]).abs().max().item() for n, p in student.named_parameters()),
        "teacher_params_in_optimizer": sum(id(p) in in_optimizer for p in teacher_params),
        "teacher_grads": sum(p.grad is not None for p in teacher_params),
        "optimizer_params": len(in_optimizer),
        "student_params": len(list(student.parameters())),
    }))


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
