"""Resume: a run killed at any point continues from its last checkpoint to the same numbers, bit for bit (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from qatlab.checkpointing import AtomicCheckpointIO, safe_load
from qatlab.errors import Interrupted, QatlabError
from qatlab.train import train

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# A tiny run that checkpoints every step and keeps each one (step=<k>.ckpt), deterministic on the CPU.
CHECKPOINT_EVERY_STEP = [
    "experiment=tiny_smoke", "logger=none", "callbacks=model_checkpoint", "trainer.enable_checkpointing=true",
    "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.deterministic=true", "trainer.accelerator=cpu",
]
KEEP_EACH = ["callbacks.model_checkpoint.save_top_k=-1", "+callbacks.model_checkpoint.filename='{step}'"]
# 4 blocks of batch 2: an epoch is 2 steps, so 6 steps cross two epoch boundaries.
SHORT_EPOCHS = ["data.max_train_blocks=4"]
BITDISTILLER = ["method=bitdistiller", "loss.gamma=running", "loss.gamma_batches=4", "init.grid=2", "init_batches=1"]


def make_cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", f"results_file={out}/r.jsonl", *overrides])


@pytest.fixture(autouse=True)
def _no_global_determinism_leak():
    """trainer.deterministic=true switches torch's global flag on; other tests expect it off."""
    yield
    torch.use_deterministic_algorithms(False)


def final_numbers(results):
    return results["train/loss"], results["test/ppl_student"], results["train/steps"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full run per setting, every step's checkpoint kept: the reference and the resume points."""
    runs = {}

    def run(name, *overrides):
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            runs[name] = (out, train(make_cfg(out, *CHECKPOINT_EVERY_STEP, *KEEP_EACH, *overrides)))
            torch.use_deterministic_algorithms(False)
        return runs[name]

    return run


@pytest.mark.parametrize(
    ("setting", "overrides", "step"),
    [
        ("kd_short_epochs", SHORT_EPOCHS, 3),  # mid-epoch, just after a validation point
        ("kd_short_epochs", SHORT_EPOCHS, 4),  # at an epoch boundary
        ("bitdistiller", BITDISTILLER, 2),  # CAKLD gamma still being measured (4 batches), clip init done
    ],
)
def test_resume_from_step_k_matches_the_uninterrupted_run(tmp_path, uninterrupted, setting, overrides, step):
    ref_dir, reference = uninterrupted(setting, *overrides)
    checkpoint = ref_dir / "checkpoints" / f"step={step}.ckpt"
    saved = safe_load(checkpoint)
    assert saved["global_step"] == step
    if setting == "bitdistiller":
        assert saved["qatlab_recipe"]["loss"]["gamma_steps"] == step  # gamma's running state is in the checkpoint

    resumed = train(make_cfg(tmp_path, *CHECKPOINT_EVERY_STEP, *KEEP_EACH, *overrides, f"resume='{checkpoint}'"))
    assert final_numbers(resumed) == final_numbers(reference)  # exact: same batches, same gamma, same RNG


def run_cli(run_dir, *overrides, env):
    return subprocess.Popen(
        [sys.executable, "-m", "qatlab", *CHECKPOINT_EVERY_STEP, f"hydra.run.dir={run_dir}", *overrides],
        cwd=run_dir.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def last_step(checkpoint: Path) -> int:
    try:
        return safe_load(checkpoint)["global_step"]
    except (QatlabError, FileNotFoundError):  # not written yet
        return -1


def test_sigkill_mid_run_then_resume_auto_matches_the_uninterrupted_run(tmp_path):
    steps = ["trainer.max_steps=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "QATLAB_RESULTS": str(tmp_path / "r.jsonl")}
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, *steps, env=env)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while last_step(last) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    killed_at = last_step(last)
    assert 3 <= killed_at < 8 and not (run_dir / "results.json").exists()

    resumed = train(make_cfg(run_dir, *CHECKPOINT_EVERY_STEP, *steps, "resume=auto"))
    torch.use_deterministic_algorithms(False)
    reference = train(make_cfg(tmp_path / "reference", *CHECKPOINT_EVERY_STEP, *steps))
    assert final_numbers(resumed) == final_numbers(reference)
    assert json.loads((run_dir / "results.json").read_text())["test/ppl_student"] == reference["test/ppl_student"]


def test_resume_auto_without_a_checkpoint_starts_from_step_0(tmp_path):
    results = train(make_cfg(tmp_path, "experiment=tiny_smoke", "logger=none", "trainer.max_steps=2", "resume=auto"))
    assert results["train/steps"] == 2


BLOCKWISE = {
    "lkd": ["method=zeroquant", "stages.lkd.samples=4", "stages.lkd.steps=3", "stages.lkd.batch_size=2"],
    # Block-AP: the student's chain and the teacher's chain both replay; E2E-QP runs after it
    "block_ap": ["method=efficientqat", "method.weight.group_size=32", "stages.block_ap.samples=4",
                 "stages.block_ap.steps=3", "trainer.max_steps=2"],
}


@pytest.mark.parametrize("stage", BLOCKWISE)
def test_a_blockwise_stage_resumes_at_the_first_unfinished_block(tmp_path, monkeypatch, stage):
    import qatlab.stages.blockwise as lkd

    overrides = ["experiment=tiny_smoke", "logger=none", *BLOCKWISE[stage], "eval.rtn_baseline=false"]
    reference = train(make_cfg(tmp_path / "reference", *overrides))

    trained = []
    real = lkd.distill_block

    def killed_after_block_0(fabric, k, *args):
        if k == 1:
            raise KeyboardInterrupt("killed")  # what a kill during block 1 leaves: block 0 saved, no more
        trained.append(k)
        return real(fabric, k, *args)

    monkeypatch.setattr(lkd, "distill_block", killed_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(tmp_path / "run", *overrides))
    assert json.loads((tmp_path / "run" / stage / "progress.json").read_text())["done"] == 1

    monkeypatch.setattr(lkd, "distill_block", lambda fabric, k, *args: trained.append(k) or real(fabric, k, *args))
    resumed = train(make_cfg(tmp_path / "run", *overrides, "resume=auto"))
    assert trained == [0, 1]  # block 0 was loaded on resume, not trained again
    assert resumed["test/ppl_student"] == reference["test/ppl_student"]

    def without_seconds(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    # block 1 starts from inputs replayed through the loaded block 0: the same MSEs to the last bit
    assert without_seconds(resumed[f"{stage}/per_block"]) == without_seconds(reference[f"{stage}/per_block"])


# ---- atomic writes and safe loading -------------------------------------------------------------


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["QATLAB_TEST_MARKER"]),))


def test_a_checkpoint_with_pickled_code_is_refused_unrun(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("QATLAB_TEST_MARKER", str(marker))
    path = tmp_path / "handed_to_me.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(QatlabError, match="holds pickled objects beyond tensors"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(QatlabError, match="is not a readable checkpoint"):
        safe_load(path)


def test_read_rows_skips_a_torn_last_line_and_recovers_a_row_appended_after_it(tmp_path):
    from qatlab.results import append_row, read_rows

    store = tmp_path / "results.jsonl"
    append_row(store, {"status": "ok", "method": "kd"})
    with open(store, "a") as f:
        f.write('{"status": "ok", "meth')  # a writer killed mid-line (no newline)
    assert [r["method"] for r in read_rows(store)] == ["kd"]
    append_row(store, {"status": "ok", "method": "rtn"})  # lands on the torn line
    assert [r["method"] for r in read_rows(store)] == ["kd", "rtn"]


# ---- issue 19.6: a signal, a timer and the end of training save last.ckpt ------------------------

# The checkpoint settings a user gets by default (model_checkpoint every 200 steps, checkpoint.every_minutes=5),
# on a run far shorter than either: before issue 19.6 such a run saved nothing before it ended.
DEFAULT_SAVES = ["experiment=tiny_smoke", "logger=none", "callbacks=model_checkpoint", "trainer.enable_checkpointing=true",
                 "trainer.deterministic=true", "trainer.accelerator=cpu", "trainer.max_steps=5", "eval.rtn_baseline=false"]


def signal_at(step, signum):
    return ["+callbacks.probe._target_=probes.SignalAt", f"+callbacks.probe.step={step}", f"+callbacks.probe.signum={signum}"]


def test_the_default_config_saves_on_a_timer_a_signal_and_at_the_end(tmp_path):
    cfg = make_cfg(tmp_path)
    assert 0 < cfg.checkpoint.every_minutes <= 10 and cfg.checkpoint.on_signal and cfg.checkpoint.at_end
    assert cfg.trainer.max_steps < cfg.callbacks.model_checkpoint.every_n_train_steps  # why the timer/signal/end matter
    assert cfg.callbacks.model_checkpoint.enable_version_counter is False  # never a last-v1.ckpt


def test_sigint_mid_training_saves_last_ckpt_and_the_resume_matches(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as info:
        train(make_cfg(run, *DEFAULT_SAVES, *signal_at(2, "SIGINT")))
    last = run / "checkpoints" / "last.ckpt"
    assert info.value.exit_code == 130
    assert str(info.value) == (f"interrupted by SIGINT during training at global_step 2; {last} holds global_step 2. "
                               f"Continue with: train(cfg) with paths.output_dir={run} and resume=auto")
    assert safe_load(last)["global_step"] == 2 and not (run / "results.json").exists()

    resumed = train(make_cfg(run, *DEFAULT_SAVES, *signal_at(2, "SIGINT"), "resume=auto"))  # resumes at 2: no signal
    torch.use_deterministic_algorithms(False)
    reference = train(make_cfg(tmp_path / "reference", *DEFAULT_SAVES))
    assert final_numbers(resumed) == final_numbers(reference)


def test_sigterm_from_the_command_line_saves_exits_143_and_prints_how_to_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "QATLAB_RESULTS": str(tmp_path / "r.jsonl")}
    run = tmp_path / "run"
    args = [*DEFAULT_SAVES, "data.max_test_blocks=1", *signal_at(3, "SIGTERM")]
    proc = subprocess.run([sys.executable, "-m", "qatlab", *args, f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qatlab: ")]
    last = run / "checkpoints" / "last.ckpt"
    assert lines == [f"qatlab: interrupted by SIGTERM during training at global_step 3; {last} holds global_step 3. "
                     f"Continue with: python -m qatlab {' '.join(args)} hydra.run.dir={run} resume=auto"], proc.stderr[-3000:]
    assert safe_load(last)["global_step"] == 3 and not (run / "results.json").exists()


def test_a_signal_before_training_stops_at_once_with_the_same_advice(tmp_path, monkeypatch):
    import qatlab.train as train_module

    real = train_module.evaluate

    def teacher_evaluation_interrupted(model, blocks, cfg, who):
        if who == "teacher":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, blocks, cfg, who)

    monkeypatch.setattr(train_module, "evaluate", teacher_evaluation_interrupted)
    with pytest.raises(Interrupted, match=r"^interrupted by SIGTERM before training \(finished cache shards and "
                                          r"checkpoints are kept\); no checkpoint was saved yet\. Continue with: "):
        train(make_cfg(tmp_path, *DEFAULT_SAVES))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone again


def test_a_timer_saves_last_ckpt_during_training(tmp_path):
    saves = ["callbacks=none", "checkpoint.every_minutes=1e-9", "checkpoint.at_end=false"]  # "due" after every step
    train(make_cfg(tmp_path, *DEFAULT_SAVES, *saves, "trainer.max_steps=3",
                   "+callbacks.probe._target_=probes.StepMarker", f"+callbacks.probe.path={tmp_path}/step"))
    assert safe_load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_the_end_of_training_saves_last_ckpt_so_a_kill_in_evaluation_does_not_retrain(tmp_path, monkeypatch):
    import qatlab.train as train_module
    from qatlab.stages.qat_module import QATModule

    overrides = [*DEFAULT_SAVES, "callbacks=none", "checkpoint.every_minutes=null"]
    real = train_module.evaluate

    def killed_in_student_evaluation(model, blocks, cfg, who):
        if who == "student":
            raise KeyboardInterrupt("killed")
        return real(model, blocks, cfg, who)

    monkeypatch.setattr(train_module, "evaluate", killed_in_student_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(tmp_path / "run", *overrides))
    assert safe_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 5
    monkeypatch.undo()

    steps = []
    real_step = QATModule.training_step
    monkeypatch.setattr(QATModule, "training_step", lambda self, *a: steps.append(1) or real_step(self, *a))
    resumed = train(make_cfg(tmp_path / "run", *overrides, "resume=auto"))
    assert steps == []  # nothing trained again
    monkeypatch.undo()
    torch.use_deterministic_algorithms(False)
    reference = train(make_cfg(tmp_path / "reference", *overrides))
    assert final_numbers(resumed) == final_numbers(reference)  # train/loss too: the checkpoint kept it
