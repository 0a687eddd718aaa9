"""Bad input fails up front, with a message that names the key, the bad value and what is allowed.

One test per bad input. Config-only mistakes must fail before any model loads (load_causal_lm is
replaced by a tripwire for them); the rest fail right after the tiny model loads.
"""

import contextlib
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import BloomConfig, BloomForCausalLM

import qatlab.train
from qatlab.__main__ import user_error
from qatlab.callbacks.resume_state import ResumeState
from qatlab.checkpointing import config_identity, write_run_file
from qatlab.recipes import Recipe
from qatlab.train import train
from qatlab.validate import check_loaded

CONF = Path(__file__).resolve().parent.parent / "conf"


def make_cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", "experiment=tiny_smoke", "logger=none",
                                           *overrides])


@contextlib.contextmanager
def fails_with(message):
    """The user error the CLI would print (Hydra wraps errors raised while instantiating) matches `message`."""
    with pytest.raises(Exception) as info:
        yield
    error = user_error(info.value)
    assert error is not None, repr(info.value)
    assert re.search(message, str(error)), str(error)


@pytest.fixture
def no_model_loads(monkeypatch):
    def tripwire(**kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(qatlab.train, "load_causal_lm", tripwire)


# Config-only mistakes: caught before any model loads.
BEFORE_ANY_MODEL = [
    ("trainer.strategy=fsdpp", r"trainer.strategy='fsdpp' is not known; use one of \[.*'ddp'.*'fsdp'"),
    ("trainer.precision=8-mixed", r"trainer.precision='8-mixed' is not known; use one of \[.*'bf16-mixed'"),
    ("trainer.accelerator=npu", r"trainer.accelerator='npu' is not known; use one of \[.*'cpu'"),
    ("trainer.max_steps=0", r"trainer.max_steps=0 must be a positive integer"),
    ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches=0 must be a positive integer"),
    ("trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val=-1 must be a number >= 0, or null"),
    ("data.source=wikipedia", r"data.source='wikipedia' is not known; use one of \[.*'gensim_wiki'"),
    ("data.block_size=0", r"data.block_size=0 must be a positive integer"),
    ("data.max_test_blocks=-2", r"data.max_test_blocks=-2 must be a positive integer \(or null for no cap\)"),
    ("model.dtype=float8", r"model.dtype='float8' is not known; use one of \['float32', 'bfloat16', 'float16'\]"),
    ("model.student_dtype=int4", r"model.student_dtype='int4' is not known; use one of"),
    ("guard.max_bad_steps=0", r"guard.max_bad_steps=0 must be a positive integer"),
    ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 must be a finite number in \(0, 1.0\]"),
    ("init_batches=-1", r"init_batches=-1 must be an integer >= 0"),
    ("eval.batch_size=0", r"eval.batch_size=0 must be a positive integer"),
    ("resume=/no/such/run", r"resume='/no/such/run' does not exist; give a run dir, a .ckpt file, or resume=auto"),
    ("method.name=onebitt", r"method.name='onebitt' is not a recipe; pick one with method=<name> .*kd"),
    ("method.weight.bits=9", r"weight.bits=9 is out of range; use 1-8"),
    ("+method.foo=1", r"method: unknown key\(s\) \['foo'\]; a method holds"),
    ("+quantizer.initt=lsq", r"quantizer \(qatlab.quantizers.minmax\) has no option\(s\) \['initt'\]"),
    ("stages.train.train=everything", r"stages.train.train='everything' is not known; use one of"),
    ("method=zeroquant stages.lkd.samples=0", r"stages.lkd.samples=0 must be a positive integer"),
    ("method=bitdistiller loss.gamma_batches=0", r"loss.gamma_batches=0 must be an integer >= 1"),
    ("method=onebit init.method=kmeans", r"init.method='kmeans' is not known"),
    ("method.weight.granularity=row", r"weight.granularity='row' is not supported; use one of tensor, channel"),
    ("+method.weight.grid=nf method.weight.bits=6", r"weight.bits=6 has no normal-float codebook; use bits 2-4"),
    # issue 19.4: non-finite and absurd hyperparameters (lr=inf used to run to an "ok" row with PPL inf)
    ("optimizer.lr=inf", r"optimizer.lr=inf is not a finite number; give a finite value"),
    ("optimizer.lr=nan", r"optimizer.lr=nan is not a finite number"),
    ("optimizer.lr=1e9", r"optimizer.lr=1000000000.0 must be a finite number in \(0, 1.0\] \(QAT fine-tuning uses"),
    ("trainer.gradient_clip_val=inf", r"trainer.gradient_clip_val=inf is not a finite number.*gradient_clip_val=null"),
    ("optimizer.weight_decay=-1", r"optimizer.weight_decay=-1 must be a number in \[0, 1\]"),
    ("optimizer.betas=[0.9,1.5]", r"optimizer.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ("+optimizer.eps=0", r"optimizer.eps=0 must be a number in \(0, 1\)"),
    ("scheduler.num_warmup_steps=-3", r"scheduler.num_warmup_steps=-3 must be an integer >= 0"),
    ("method=bitdistiller init.grid=inf", r"init.grid=inf is not a finite number"),
    ("checkpoint.every_minutes=0", r"checkpoint.every_minutes=0 must be a number of minutes > 0, or null"),
    # issue 19.11: teacher_cache.k=0 used to fail only after the teacher and RTN evaluations
    ("teacher_cache.enabled=true teacher_cache.k=0", r"teacher_cache.k=0 must be a positive integer"),
    ("teacher_cache.enabled=true teacher_cache.dtype=int8", r"teacher_cache.dtype='int8' is not known; use one of"),
]


@pytest.mark.parametrize(("overrides", "message"), BEFORE_ANY_MODEL, ids=[o for o, _ in BEFORE_ANY_MODEL])
def test_config_mistakes_fail_before_any_model_loads(tmp_path, no_model_loads, overrides, message):
    with fails_with(message):
        train(make_cfg(tmp_path, *overrides.split()))


def test_gpu_asked_for_on_a_machine_without_one(tmp_path, no_model_loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with fails_with(r"trainer.accelerator='gpu' but no CUDA device is visible; use trainer=cpu or a GPU machine"):
        train(make_cfg(tmp_path, "trainer.accelerator=gpu"))


def test_missing_corpus_file(tmp_path, no_model_loads):
    with fails_with(r"data.source_kwargs.path='/no/such.txt' does not exist; give a .txt"):
        train(make_cfg(tmp_path, "data=local", "data.source_kwargs.path=/no/such.txt"))


def test_empty_corpus_file(tmp_path, no_model_loads):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with fails_with(rf"data.source_kwargs.path='{empty}' has no text \(empty or blank\)"):
        train(make_cfg(tmp_path, "data=local", f"data.source_kwargs.path={empty}"))


# ---- issue 19.10: local corpora that are not UTF-8 or not JSONL ------------------------------------


def test_a_non_utf8_text_file_names_the_file_and_line(tmp_path, no_model_loads):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("first document\n\nsecond line\ncaf\u00e9 au lait\n".encode("latin-1"))
    with fails_with(rf"data.source_kwargs.path: '{corpus}' is not UTF-8 text \(line 4, byte 31: b'\\xe9' invalid "
                    r"continuation byte\); convert it, e.g. iconv -f latin1 -t utf-8"):
        train(make_cfg(tmp_path, "data=local", f"data.source_kwargs.path={corpus}"))
    assert not (tmp_path / "qatlab_run.json").exists()  # refused before the run started


def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path, no_model_loads):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three\n')
    with fails_with(rf"data.source_kwargs.path: {corpus}:3 is not valid JSON \(Unterminated string starting at, "
                    r"column 10\); every line of a .jsonl file must be one JSON object.*fix or delete"):
        train(make_cfg(tmp_path, "data=local", f"data.source_kwargs.path={corpus}"))


def test_a_jsonl_line_that_is_not_an_object(tmp_path, no_model_loads):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "one"}\n["two"]\n')
    with fails_with(rf"{corpus}:2 is a JSON list, not an object"):
        train(make_cfg(tmp_path, "data=local", f"data.source_kwargs.path={corpus}"))


def test_a_non_utf8_file_in_a_split_folder(tmp_path, no_model_loads):
    folder = tmp_path / "train_docs"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n")
    (folder / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    splits = f"{{train: {folder}, validation: {folder / 'a.txt'}, test: {folder / 'a.txt'}}}"
    with fails_with(rf"data.source_kwargs.splits.train: '{folder / 'b.txt'}' is not UTF-8 text \(line 1, byte 0"):
        train(make_cfg(tmp_path, "data=local", f"+data.source_kwargs.splits={splits}"))


# ---- issue 19.11: model paths that are not a model ----------------------------------------------


def test_an_empty_model_folder(tmp_path, no_model_loads):
    (tmp_path / "empty_model").mkdir()
    with fails_with(rf"model.name_or_path='{tmp_path / 'empty_model'}' has no config.json \(the folder is empty\); "
                    r"give a folder written by save_pretrained"):
        train(make_cfg(tmp_path, f"model.name_or_path={tmp_path / 'empty_model'}"))


def test_a_text_file_as_model_path(tmp_path, no_model_loads):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with fails_with(rf"model.name_or_path='{notes}' is a file, not a model folder; give the folder that holds "
                    r"config.json"):
        train(make_cfg(tmp_path, f"model.name_or_path={notes}"))


def test_a_gguf_file_as_model_path_says_how_to_name_it(tmp_path, no_model_loads):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    with fails_with(rf"is a file, not a model folder; for a GGUF file set model.name_or_path=<its folder> and "
                    r"model.gguf_file=m.Q4.gguf"):
        train(make_cfg(tmp_path, f"model.name_or_path={gguf}"))


def test_a_truncated_model_safetensors_names_the_file(tmp_path, tiny_llama_model, no_model_loads):
    folder = tmp_path / "model"
    tiny_llama_model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with fails_with(rf"model.name_or_path='{folder}': weights file '{weights}' is damaged \(truncated: {size // 2} "
                    rf"bytes, its header says {size}\); download or save the model again"):
        train(make_cfg(tmp_path, f"model.name_or_path={folder}"))


def test_teacher_cache_k_larger_than_the_vocabulary(tmp_path, tiny_llama_model):
    method = Recipe("kd")
    with fails_with(r"teacher_cache.k=200 is more than the model's vocabulary \(128 tokens\); use teacher_cache.k <= 128"):
        check_loaded(make_cfg(tmp_path, "teacher_cache.enabled=true", "teacher_cache.k=200"), method,
                     tiny_llama_model, tokenizer=range(128))


# ---- issue 19.8: output locations, checked before any model loads ---------------------------------


def test_results_file_that_is_a_folder(tmp_path, no_model_loads):
    with fails_with(rf"results_file='{tmp_path}' is a folder; give a file path \(e.g. results_file={tmp_path}/results.jsonl\)"):
        train(make_cfg(tmp_path / "run", f"results_file={tmp_path}"))
    assert not (tmp_path / "run" / "qatlab_run.json").exists()


def test_results_file_in_a_read_only_place(tmp_path, no_model_loads):
    with fails_with(r"results_file='/proc/qatlab/r.jsonl' cannot be written: its folder '/proc/qatlab' is not writable"):
        train(make_cfg(tmp_path, "results_file=/proc/qatlab/r.jsonl"))


def test_results_file_under_a_file(tmp_path, no_model_loads):
    (tmp_path / "a_file").write_text("x")
    with fails_with(rf"results_file='{tmp_path}/a_file/r.jsonl' cannot be written: its folder '{tmp_path}/a_file' is a "
                    r"file, not a folder"):
        train(make_cfg(tmp_path, f"results_file={tmp_path}/a_file/r.jsonl"))


def test_output_dir_that_is_a_file(tmp_path, no_model_loads):
    (tmp_path / "out").write_text("x")
    with fails_with(rf"paths.output_dir='{tmp_path}/out' is a file, not a folder"):
        train(make_cfg(tmp_path / "out"))


def test_teacher_cache_dir_not_writable(tmp_path, no_model_loads):
    with fails_with(r"teacher_cache.dir='/proc/qatlab_cache' is not writable"):
        train(make_cfg(tmp_path, "teacher_cache.enabled=true", "teacher_cache.dir=/proc/qatlab_cache"))


# ---- issue 19.7: a run dir of another config is not taken over by a fresh run -----------------------


def test_a_fresh_run_in_another_configs_run_dir_is_refused(tmp_path, no_model_loads):
    run = tmp_path / "run"
    write_run_file(run, config_identity(make_cfg(run, "data.batch_size=2")))
    before = (run / "qatlab_run.json").read_bytes()
    with fails_with(rf"paths.output_dir='{run}' holds a run of another config \(data.batch_size=2 there, 3 now\); a "
                    r"fresh run there would overwrite its qatlab_run.json and checkpoints and neither could resume: pass "
                    r"a new hydra.run.dir \(or paths.output_dir\) for this run, or continue that run with its own "
                    r"overrides and resume=auto"):
        train(make_cfg(run, "data.batch_size=3"))
    assert (run / "qatlab_run.json").read_bytes() == before  # the old run's file is untouched
    assert sorted(p.name for p in run.iterdir()) == ["qatlab_run.json"]


def test_a_fresh_run_whose_config_differs_only_in_resumable_keys_suggests_resume(tmp_path, no_model_loads):
    run = tmp_path / "run"
    write_run_file(run, config_identity(make_cfg(run, "trainer.max_steps=6")))
    with fails_with(r"holds a run of another config \(scheduler.num_training_steps=6 there, 9 now; trainer.max_steps=6 "
                    r"there, 9 now\).*or continue it with resume=auto \(the keys that differ may change on resume\)"):
        train(make_cfg(run, "trainer.max_steps=9"))


def test_a_fresh_run_of_the_same_config_may_reuse_its_dir(tmp_path):
    from qatlab.validate import validate_config

    run = tmp_path / "run"
    write_run_file(run, config_identity(make_cfg(run)))
    assert validate_config(make_cfg(run)) is None
    assert validate_config(make_cfg(run, "results_file=elsewhere.jsonl")) is None  # paths are not the config


def test_resume_dir_of_another_config_names_the_differing_keys(tmp_path, no_model_loads):
    run = tmp_path / "run"
    write_run_file(run, config_identity(make_cfg(run, "data.batch_size=2")))
    with fails_with(r"resume: the run in '.*run' was made by another config "
                    r"\(data.batch_size=2 there, 3 now\); resume it with the same overrides.*"
                    r"A resume may change only optimizer.lr, trainer.max_steps, .*guard.\*"):
        train(make_cfg(tmp_path / "new", "data.batch_size=3", f"resume={run}"))


def test_resume_dir_that_holds_no_run(tmp_path, no_model_loads):
    (tmp_path / "empty_dir").mkdir()
    with fails_with(r"resume='.*empty_dir' holds no qatlab run \(no qatlab_run.json"):
        train(make_cfg(tmp_path, f"resume={tmp_path / 'empty_dir'}"))


def test_resume_checkpoint_of_another_config():
    state = ResumeState("aaaa").state_dict()
    with fails_with(r"the checkpoint was written by another config \(hash aaaa, this run bbbb\)"):
        ResumeState("bbbb").load_state_dict(state)


# After the (tiny) model loads: what needs its config or tokenizer, or the quantized layers.


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.block_size=4096", r"data.block_size=4096 is longer than the model's context \(2048 tokens\)"),
        ("method.weight.group_size=48", r"weight.group_size=48 does not divide the input width 64 .*e.g. "),
        ("model.name_or_path=/no/such/model", r"model.name_or_path='/no/such/model' does not exist"),
        ("+method.weight_overrides={nope: {bits: 8}}",
         r"weight_overrides pattern 'nope' matches none of the 14 quantized layers"),
    ],
    ids=["block_size_longer_than_context", "group_size_not_dividing_width", "model_path_missing",
         "weight_override_matching_no_layer"],
)
def test_bad_input_found_once_the_model_loads(tmp_path, override, message):
    with fails_with(message):
        train(make_cfg(tmp_path, override))


def test_kv_bits_on_a_model_without_attention_hooks(tmp_path):
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=2))
    method = Recipe("kd", weight={"bits": 4, "group_size": 32}, kv={"bits": 4})
    with fails_with(r"method.kv.bits=4 needs attention hooks .*BloomForCausalLM "
                                          r"\(model_type 'bloom'\).*set method.kv=null"):
        check_loaded(make_cfg(tmp_path), method, bloom, tokenizer=range(100))


def test_tokenizer_that_does_not_fit_the_model(tmp_path, tiny_llama_model):
    method = Recipe("kd")
    with fails_with(r"the tokenizer of 'other-tokenizer' has 49152 tokens but the model's "
                                          r"embedding has 128 rows.*set model.tokenizer"):
        check_loaded(make_cfg(tmp_path, "+model.tokenizer=other-tokenizer"), method, tiny_llama_model,
                     tokenizer=range(49152))
