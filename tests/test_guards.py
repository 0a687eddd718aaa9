"""Numerical guards: non-finite steps are skipped, counted and logged; too many in a row stop the run cleanly."""

import logging
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from qatlab.checkpointing import safe_load
from qatlab.errors import QatlabError
from qatlab.losses.objectives import Loss
from qatlab.train import train
from qatlab.validate import RiskySettingWarning, validate_config

CONF = Path(__file__).resolve().parent.parent / "conf"
TINY = ["experiment=tiny_smoke", "logger=csv", "trainer.max_steps=5", "eval.rtn_baseline=false",
        "callbacks=model_checkpoint", "trainer.enable_checkpointing=true",
        "callbacks.model_checkpoint.every_n_train_steps=1"]


def make_cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", f"results_file={out}/r.jsonl", *overrides])


def plant(monkeypatch, bad_calls, kind="loss"):
    """The loss goes bad on the given (0-based) calls: a NaN loss, or a finite loss with NaN gradients."""
    real = Loss.__call__
    calls = {"n": 0}

    def loss(self, student_out, teacher_out, batch):
        out = real(self, student_out, teacher_out, batch)
        n, calls["n"] = calls["n"], calls["n"] + 1
        if n not in bad_calls:
            return out
        if kind == "loss":
            return {**out, "loss": out["loss"] * float("nan")}
        logits = student_out.logits
        # value 0, gradient NaN: where() sends 0 * NaN back into the unselected branch
        poison = torch.where(torch.tensor(False), logits.sum() * float("nan"), torch.zeros(()))
        return {**out, "loss": out["loss"] + poison}

    monkeypatch.setattr(Loss, "__call__", loss)


def student_weights(results_dir):
    return safe_load(results_dir / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_planted_nan_step_is_skipped_counted_and_logged(tmp_path, monkeypatch, caplog, kind):
    plant(monkeypatch, bad_calls={2}, kind=kind)
    with caplog.at_level(logging.WARNING, logger="qatlab"):
        results = train(make_cfg(tmp_path, *TINY))
    assert results["train/steps"] == 5 and results["train/bad_steps"] == 1
    assert math.isfinite(results["test/ppl_student"]) and math.isfinite(results["train/loss"])
    assert "non-finite loss or gradient at step 2: step skipped (1 bad steps, 1 in a row)" in caplog.text
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/bad_steps" in metrics
    assert all(torch.isfinite(t).all() for t in student_weights(tmp_path).values())


def test_a_skipped_step_leaves_the_weights_as_they_were(tmp_path, monkeypatch):
    plant(monkeypatch, bad_calls={1})
    overrides = [*TINY, "trainer.max_steps=2", "callbacks.model_checkpoint.save_top_k=-1",
                 "+callbacks.model_checkpoint.filename='{step}'", "scheduler=constant"]
    train(make_cfg(tmp_path, *overrides))
    step1 = safe_load(tmp_path / "checkpoints" / "step=1.ckpt")
    step2 = safe_load(tmp_path / "checkpoints" / "step=2.ckpt")
    for key, value in step1["state_dict"].items():
        assert torch.equal(value, step2["state_dict"][key]), key
    assert step2["callbacks"]["NonFiniteGuard"] == {"bad_steps": 1, "bad_in_a_row": 1}


def test_n_bad_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    plant(monkeypatch, bad_calls=set(range(2, 100)))
    with pytest.raises(QatlabError, match=r"3 optimizer steps in a row had a non-finite loss or gradient .*"
                                          r"guard.max_bad_steps=3.*resume=auto"):
        train(make_cfg(tmp_path, *TINY, "trainer.max_steps=20", "guard.max_bad_steps=3"))
    last = safe_load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4  # steps 0-1 good, 2-3 skipped; the 3rd bad step stopped before its save
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert not (tmp_path / "results.json").exists()


def test_fp16_with_a_kl_loss_warns(tmp_path):
    with pytest.warns(RiskySettingWarning, match=r"fp16 with a KL distillation loss \(method=kd"):
        validate_config(make_cfg(tmp_path, "experiment=tiny_smoke", "model.student_dtype=float16"))
    with pytest.warns(RiskySettingWarning, match="prefer trainer.precision=bf16-mixed"):
        validate_config(make_cfg(tmp_path, "experiment=tiny_smoke", "trainer.precision=16-mixed"))


def test_bf16_and_ptq_do_not_warn(tmp_path, recwarn):
    validate_config(make_cfg(tmp_path, "experiment=tiny_smoke", "trainer.precision=bf16-mixed"))
    validate_config(make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", "model.dtype=float16"))
    assert not [w for w in recwarn if issubclass(w.category, RiskySettingWarning)]


def plant_inf_weights(monkeypatch, on_step):
    """The optimizer's `on_step`-th step (1-based) writes inf into a weight although loss and gradients were
    finite: what an overflowing update (a huge learning rate, issue 19.5's lr=inf run) does."""
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, closure=None):
        out = real(self, closure)
        calls["n"] += 1
        if calls["n"] == on_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_a_finite_step_that_writes_inf_weights_stops_before_any_checkpoint_holds_them(tmp_path, monkeypatch, caplog):
    """Issue 19.5: the guard never looked at the weights after a step, so last.ckpt got inf weights and the stop
    message said they were the last good ones; and its advice (lower lr, resume=auto) was refused on resume."""
    overrides = [*TINY, "trainer.max_steps=5", "scheduler=constant"]
    plant_inf_weights(monkeypatch, on_step=3)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(QatlabError, match=r"the optimizer step at global_step 2 left non-finite weights in the student "
                                          r"\(student\.model\.embed_tokens\.weight\) although its loss and gradients were "
                                          r"finite.*The run stopped before saving them: "
                                          rf"{last} holds the last good weights \(global_step 2\)\. Lower optimizer.lr, "
                                          r"then resume=auto \(optimizer.lr may change on resume\)"):
        train(make_cfg(tmp_path, *overrides))
    saved = safe_load(last)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert not (tmp_path / "results.json").exists()

    monkeypatch.undo()  # the advice, followed: a lower lr and resume=auto
    with caplog.at_level(logging.WARNING, logger="qatlab"):
        results = train(make_cfg(tmp_path, *overrides, "optimizer.lr=1e-4", "resume=auto"))
    assert "resume: changed since the run started, allowed on resume: optimizer.lr=0.001 there, 0.0001 now" in caplog.text
    assert "resume: optimizer.lr 0.001 -> 0.0001 from step 2" in caplog.text
    assert results["train/steps"] == 5 and math.isfinite(results["test/ppl_student"])
    resumed = safe_load(last)
    assert resumed["global_step"] == 5
    assert [g["lr"] for g in resumed["optimizer_states"][0]["param_groups"]] == [1e-4]  # applied, not the restored 1e-3


def test_a_changed_lr_on_resume_matches_a_run_that_had_it_from_the_start(tmp_path):
    """The restored cosine schedule is rescaled, not restarted: at every later step its lr equals the lr a run
    started with the new value has at that step."""
    keep = [*TINY, "trainer.max_steps=6", "callbacks.model_checkpoint.save_top_k=-1",
            "+callbacks.model_checkpoint.filename='{step}'"]
    train(make_cfg(tmp_path / "run", *keep, "trainer.max_steps=3"))
    train(make_cfg(tmp_path / "run", *keep, "optimizer.lr=2e-4", "resume=auto"))
    train(make_cfg(tmp_path / "reference", *keep, "optimizer.lr=2e-4"))
    for step in (4, 5):
        resumed = safe_load(tmp_path / "run" / "checkpoints" / f"step={step}.ckpt")["optimizer_states"][0]
        reference = safe_load(tmp_path / "reference" / "checkpoints" / f"step={step}.ckpt")["optimizer_states"][0]
        assert resumed["param_groups"][0]["lr"] == pytest.approx(reference["param_groups"][0]["lr"], rel=1e-12)
