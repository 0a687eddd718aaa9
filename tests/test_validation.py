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
    ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 must be a number > 0"),
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
]


@pytest.mark.parametrize(("overrides", "message"), BEFORE_ANY_MODEL, ids=[o for o, _ in BEFORE_ANY_MODEL])
def test_config_mistakes_fail_before_any_model_loads(tmp_path, no_model_loads, overrides, message):
    with fails_with(message):
        train(make_cfg(tmp_path, *overrides.split()))


def test_missing_corpus_file(tmp_path, no_model_loads):
    with fails_with(r"data.source_kwargs.path='/no/such.txt' does not exist; give a .txt"):
        train(make_cfg(tmp_path, "data=local", "data.source_kwargs.path=/no/such.txt"))


def test_empty_corpus_file(tmp_path, no_model_loads):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with fails_with(rf"data.source_kwargs.path='{empty}' has no text \(empty or blank\)"):
        train(make_cfg(tmp_path, "data=local", f"data.source_kwargs.path={empty}"))


def test_resume_dir_of_another_config_names_the_differing_keys(tmp_path, no_model_loads):
    run = tmp_path / "run"
    write_run_file(run, config_identity(make_cfg(run, "trainer.max_steps=6")))
    with fails_with(r"resume: the run in '.*run' was made by another config "
                                          r"\(.*trainer.max_steps=6 there, 7 now\); resume it with the same overrides"):
        train(make_cfg(tmp_path / "new", "trainer.max_steps=7", f"resume={run}"))


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
