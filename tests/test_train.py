"""End-to-end: configs compose, runs finish, bad input fails with one clear line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import re

import pytest
from hydra import compose, initialize_config_dir

from qatlab.train import train

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def make_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, experiment):
    cfg = make_cfg(tmp_path, f"experiment={experiment}")
    assert cfg.method.name and cfg.model.name_or_path and cfg.trainer.max_steps > 0


def test_experiment_keys_override_the_top_level_defaults(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=bitdistiller_smollm2_w2")
    assert cfg.task_name == "bitdistiller_smollm2_w2" and cfg.init_batches == 8  # train.yaml says train / 4
    assert make_cfg(tmp_path, "experiment=bitdistiller_smollm2_w2", "init_batches=3").init_batches == 3


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_sweep_presets_name_real_options(tmp_path, sweep):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"sweep={sweep}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params
    for experiment in str(params.get("experiment", "")).split(","):
        assert not experiment or (CONF / "experiment" / f"{experiment}.yaml").exists(), experiment


def test_tiny_kd_run_end_to_end(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke")
    results = train(cfg)
    assert results["train/steps"] == cfg.trainer.max_steps
    for key in ("test/ppl_teacher", "test/ppl_rtn", "test/ppl_student"):
        assert math.isfinite(results[key]) and results[key] > 1, key
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "kd"
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "test/ppl_student" in metrics


def test_tiny_run_logs_to_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "logger=wandb", "trainer.max_steps=2", f"results_file={tmp_path}/r.jsonl")
    assert cfg.logger.wandb.group == "tiny_smoke" and cfg.logger.wandb.job_type == "kd"
    assert list(cfg.logger.wandb.tags) == ["kd", "w4", "tiny-llama"]
    train(cfg)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert json.loads((tmp_path / "r.jsonl").read_text())["method"] == "kd"


def test_rtn_at_8_bits_is_within_one_percent_of_the_teacher_on_smollm2(tmp_path):
    cfg = make_cfg(tmp_path, "method=rtn", "method.weight.bits=8", "method.weight.granularity=channel",
                   "logger=none", "callbacks=none", "data.max_test_blocks=2")
    results = train(cfg)
    teacher, student = results["test/ppl_teacher"], results["test/ppl_student"]
    print(f"teacher {teacher:.3f}  rtn-w8 {student:.3f}")
    assert teacher < 50
    assert abs(student - teacher) / teacher < 0.01


def run_cli(*args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "qatlab", *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multi"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )


def test_multirun_runs_two_jobs(tmp_path):
    proc = run_cli("-m", "experiment=tiny_smoke", "method=rtn,kd", "trainer.max_steps=2", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "multi").glob("*/results.json"))
    assert [json.loads(p.read_text())["method"] for p in results] == ["rtn", "kd"]


def test_a_failed_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    store = tmp_path / "results.jsonl"
    proc = run_cli("-m", "experiment=tiny_smoke", "method=rtn", "method.weight.bits=9,4", f"results_file={store}",
                   tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job failed, sweep continues" in proc.stderr
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "bits=9 is out of range" in rows[0]["error"] and "method.weight.bits=9" in rows[0]["overrides"]
    ok = rows[1]
    assert ok["method"] == "rtn" and ok["w_bits"] == 4 and ok["device"] == "cpu"
    assert 4 < ok["bits_per_weight"] < 5 and math.isfinite(ok["test/ppl_student"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.weight.group_size=48", r"group_size=48 does not divide .*(64|128)"),
        ("method.weight.bits=9", r"bits=9 is out of range"),
        ("model.name_or_path=/no/such/model", r"'/no/such/model' does not exist"),
        ("method.name=bitdistiller", r"method.name='bitdistiller' but the composed recipe is method=kd"),
        ("optimizer.lr=inf", r"optimizer.lr=inf is not a finite number"),  # issue 19.4
        ("results_file=/proc/qatlab/r.jsonl", r"results_file='/proc/qatlab/r.jsonl' cannot be written"),  # 19.8
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    proc = run_cli("experiment=tiny_smoke", override, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("qatlab: error:")]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    assert re.search(message, error_lines[0]), error_lines[0]


@pytest.mark.parametrize("bad", ["latin1_corpus", "empty_model_folder"])
def test_bad_files_are_one_clear_line_naming_the_file(tmp_path, bad):
    """Issue 19.10/19.11: these were a raw UnicodeDecodeError and a 26-line trace."""
    if bad == "latin1_corpus":
        path = tmp_path / "corpus.txt"
        path.write_bytes("caf\u00e9\n".encode("latin-1"))
        args, message = ["data=local", f"data.source_kwargs.path={path}"], rf"'{path}' is not UTF-8 text \(line 1, byte 3"
    else:
        path = tmp_path / "model"
        path.mkdir()
        args, message = [f"model.name_or_path={path}"], rf"model.name_or_path='{path}' has no config.json"
    proc = run_cli("experiment=tiny_smoke", *args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("qatlab: error:")]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "qatlab_run.json").exists()  # refused before the run started


def test_unknown_config_choice_lists_the_options(tmp_path):
    proc = run_cli("method=onebitt", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'method/onebitt'" in proc.stderr and "kd" in proc.stderr


def test_empty_corpus_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    proc = run_cli("experiment=tiny_smoke", "data=local", f"data.source_kwargs.path={empty}", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"qatlab: error: .*has no text", proc.stderr), proc.stderr[-2000:]


# ---- issue 19.4 and 19.8: what finish() records and in which order -------------------------------


def test_a_run_whose_student_ppl_is_not_finite_is_recorded_as_failed(tmp_path, monkeypatch, capsys):
    """The lr=inf run used to end 'ok' with student PPL inf, listed by the report as a normal run."""
    import qatlab.train as train_module
    from qatlab.errors import RunFailed
    from qatlab.results import read_rows

    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate",
                        lambda model, blocks, cfg, who: float("inf") if who == "student" else real(model, blocks, cfg, who))
    store = tmp_path / "r.jsonl"
    with pytest.raises(RunFailed, match=r"the run finished with a non-finite PPL \(test/ppl_student=inf\), so it is "
                                        r"recorded as failed: .*lower optimizer.lr"):
        train(make_cfg(tmp_path, "experiment=tiny_smoke", "trainer.max_steps=1", f"results_file={store}"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and saved["test/ppl_student"] == float("inf")
    (row,) = read_rows(store)
    assert row["status"] == "failed" and "non-finite PPL" in row["error"] and math.isfinite(row["test/ppl_teacher"])
    assert "| kd (student) | W4A16 g64 | inf |" in capsys.readouterr().out  # the table is still printed


def test_a_failing_results_store_write_loses_no_numbers(tmp_path, monkeypatch, capsys):
    """An unwritable store used to surface only after all the work, as a traceback, with no table printed."""
    import errno

    import qatlab.results as results_module
    from qatlab.errors import QatlabError

    def disk_full(path, row):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results_module, "append_row", disk_full)
    store = tmp_path / "r.jsonl"
    with pytest.raises(QatlabError, match=rf"results_file='{store}' could not be written \(No space left on device\); "
                                          rf"the run's numbers are in {tmp_path}/results.json and the table above"):
        train(make_cfg(tmp_path, "experiment=tiny_smoke", "trainer.max_steps=1", "method=rtn", f"results_file={store}"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert math.isfinite(saved["test/ppl_student"])
    assert "| rtn (student) | W4A16 g64 | " in capsys.readouterr().out


def test_a_failing_export_write_loses_no_numbers(tmp_path, monkeypatch, capsys):
    import errno

    import qatlab.export.ship as ship_module
    from qatlab.errors import QatlabError

    def disk_full(student, path, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ship_module, "export_packed", disk_full)
    with pytest.raises(QatlabError, match=rf"export to '{tmp_path}/export' failed \(No space left on device\); the run's "
                                          rf"numbers are in {tmp_path}/results.json and the table above"):
        train(make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", "export=true", f"results_file={tmp_path}/r.jsonl"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and math.isfinite(saved["test/ppl_student"])
    assert "| rtn (student) | W4A16 g64 | " in capsys.readouterr().out
    assert not (tmp_path / "export").exists() and not (tmp_path / "r.jsonl").exists()  # no half export, no ok row
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # the temp folder is cleaned up
