"""Teacher-generated data: KV-cache decoding, determinism, resume, rank sharding, the DataModule."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

import qatlab.data.generation as generation
import qatlab.data.teacher_generated as teacher_generated
from qatlab.data import GenerationConfig, TeacherGeneratedDataModule, TextDataModule, generate_dataset, load_generated
from qatlab.data.generation import decode, generation_dir, model_identity, sample_noise, special_ids, start_tokens
from qatlab.errors import QatlabError
from qatlab.models import load_causal_lm

SMALL = dict(num_samples=7, length=12, batch_size=4, greedy_tokens=2, shard_size=3)  # 3 shards: 3 + 3 + 1


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm("tiny-llama")  # SmolLM2 tokenizer, vocab 49152


def generate(lm, out, **overrides):
    model, tok = lm
    return load_generated(generate_dataset(model, tok, out, GenerationConfig(**{**SMALL, **overrides})))


# ---- decoding -----------------------------------------------------------------------------------


def test_greedy_tokens_match_a_full_forward_argmax_and_ignore_the_seed(lm):
    model, tok = lm
    starts = start_tokens(tok, 3, seed=0)[:, None]  # (3, 1)
    rows = range(3)
    outs = [decode(model, starts, cfg, sample_noise(cfg, rows), len(tok))
            for cfg in (GenerationConfig(length=10, greedy_tokens=9, seed=s) for s in (0, 1))]
    assert torch.equal(outs[0], outs[1])
    ref = starts
    with torch.no_grad():
        for _ in range(9):  # no KV cache: the whole prefix every step
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(outs[0], ref)


def test_same_seed_same_samples_other_seed_other_samples(lm, tmp_path):
    a = generate(lm, tmp_path / "a")
    assert a.shape == (7, 12) and a.dtype == torch.int64
    assert torch.equal(a, generate(lm, tmp_path / "b"))
    assert not torch.equal(a, generate(lm, tmp_path / "c", seed=1))


def test_batch_size_does_not_change_the_samples(lm, tmp_path):
    assert torch.equal(generate(lm, tmp_path / "a", batch_size=4), generate(lm, tmp_path / "b", batch_size=1))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)  # p = 0.64, 0.24, 0.09, 0.03
    u = torch.linspace(0, 0.999, 200, dtype=torch.float64)
    for top_p, kept in ((None, {0, 1, 2, 3}), (0.85, {0, 1}), (0.5, {0})):
        assert set(generation.sample_token(logits, 1.0, top_p, u).tolist()) == kept


# ---- resume and sharding ------------------------------------------------------------------------


def test_resume_after_a_kill_equals_an_uninterrupted_run(lm, tmp_path, monkeypatch):
    full = generate(lm, tmp_path / "full")
    out = tmp_path / "killed"
    real_save, saved = generation.save_shard, []

    def save_then_die(ids, path):
        if len(saved) == 2:
            (path.parent / f".{path.stem}-leftover.tmp").write_bytes(b"half a shard")  # a kill mid-write
            raise KeyboardInterrupt("killed")
        real_save(ids, path)
        saved.append(path)

    monkeypatch.setattr(generation, "save_shard", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(lm, out)
    monkeypatch.undo()
    with pytest.raises(QatlabError, match=r"lacks 1 of 3 shards \(first: \[2\]\); rerun the generation"):
        load_generated(out)
    mtimes = [os.stat(p).st_mtime_ns for p in saved]
    assert torch.equal(generate(lm, out), full)  # no sample lost or duplicated
    assert [os.stat(p).st_mtime_ns for p in saved] == mtimes  # finished shards were not redone
    assert sorted(p.name for p in out.glob("shard_*")) == [f"shard_0000{k}.safetensors" for k in range(3)]


def test_a_truncated_shard_is_named_on_load_and_generated_again_on_rerun(lm, tmp_path, caplog, monkeypatch):
    """Issue 19.9: a truncated generated-data shard crashed with a SafetensorError naming no file; a rerun kept it."""
    out = tmp_path / "gen"
    full = generate(lm, out)
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(QatlabError, match=rf"generated-data shard '{shard}' is damaged \(truncated: 64 bytes, its "
                                          r"header [^)]*\); run again with data=teacher_generated"):
        load_generated(out)
    assert not generation.is_complete(out)  # so the datamodule generates again
    real, decoded = generation.decode, []
    monkeypatch.setattr(generation, "decode", lambda *a: decoded.append(1) or real(*a))
    with caplog.at_level("WARNING", logger="qatlab"):
        again = generate(lm, out)
    assert f"generated-data shard {shard} is damaged (truncated" in caplog.text
    assert len(decoded) == 1  # only that shard (3 samples, batch 4) was decoded again
    assert torch.equal(again, full)


def test_two_ranks_together_make_the_single_rank_dataset(lm, tmp_path):
    model, tok = lm
    cfg = GenerationConfig(**SMALL)
    generate_dataset(model, tok, tmp_path / "split", cfg, rank=0, world_size=2)
    assert sorted(p.name for p in (tmp_path / "split").glob("shard_*")) == ["shard_00000.safetensors",
                                                                            "shard_00002.safetensors"]
    generate_dataset(model, tok, tmp_path / "split", cfg, rank=1, world_size=2)
    assert torch.equal(load_generated(tmp_path / "split"), generate(lm, tmp_path / "one"))


def test_a_folder_of_other_settings_is_refused(lm, tmp_path):
    generate(lm, tmp_path)
    with pytest.raises(QatlabError, match=r"holds samples made with other settings"):
        generate(lm, tmp_path, temperature=0.7)


def test_generation_dir_keys_on_model_and_settings_but_not_batch_size(lm, tmp_path):
    model, tok = lm
    cfg = GenerationConfig(**SMALL)
    ident = model_identity(model)
    assert ident != model_identity(load_causal_lm("tiny-llama:1")[0])  # same name, other weights
    base = generation_dir(tmp_path, ident, cfg, tok)
    assert base == generation_dir(tmp_path, ident, dataclasses.replace(cfg, batch_size=1), tok)
    assert base != generation_dir(tmp_path, ident, dataclasses.replace(cfg, seed=1), tok)
    assert base != generation_dir(tmp_path, ident + "x", cfg, tok)


# ---- start tokens and prompts -------------------------------------------------------------------


def test_start_tokens_are_never_special(lm):
    _, tok = lm
    specials = special_ids(tok)
    assert set(range(17)) <= specials  # SmolLM2: <|endoftext|>, <|im_start|>, ..., <empty_output>
    starts = start_tokens(tok, 5000, seed=0)
    assert not set(starts.tolist()) & specials and starts.max() < len(tok)
    assert torch.equal(starts, start_tokens(tok, 5000, seed=0))


def test_prompt_mode_starts_each_sample_with_its_prompt(lm, tmp_path):
    model, tok = lm
    prompts = torch.randint(100, 1000, (3, 4))
    cfg = GenerationConfig(**{**SMALL, "prompt_tokens": 4})
    out = load_generated(generate_dataset(model, tok, tmp_path, cfg, prompts=prompts))
    assert torch.equal(out[:, :4], prompts[[0, 1, 2, 0, 1, 2, 0]])  # fewer prompts than samples: reused
    with pytest.raises(QatlabError, match=r"generation.prompt_tokens=4 needs prompts of shape \(n, 4\); got None"):
        generate_dataset(model, tok, tmp_path / "x", cfg)


# ---- the DataModule -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"Document {i} talks about the number {i} and its friends." for i in range(60)))
    return str(path)


def datamodule(corpus, cache_dir, max_train_blocks=None, **generation_fields):
    return TeacherGeneratedDataModule(
        source="local", source_kwargs={"path": corpus}, block_size=12, eval_block_size=16, batch_size=2,
        max_train_blocks=max_train_blocks, max_eval_blocks=2, max_test_blocks=2, cache_dir=str(cache_dir),
        generation={"num_samples": 5, "batch_size": 4, "shard_size": 4, **generation_fields},
    )


def test_datamodule_trains_on_generated_text_and_evaluates_on_the_corpus(lm, corpus, tmp_path, monkeypatch):
    model, tok = lm
    dm = datamodule(corpus, tmp_path)
    dm.set_tokenizer(tok)
    with pytest.raises(QatlabError, match=r"call datamodule.set_teacher\(model\) before setup"):
        dm.setup("fit")
    dm.set_teacher(model)
    dm.setup("fit")
    cfg = GenerationConfig(num_samples=5, length=12, batch_size=4, shard_size=4)
    generated = load_generated(generation_dir(tmp_path, model_identity(model), cfg, tok))
    assert torch.equal(dm.blocks("train"), generated)
    rows = {tuple(r) for r in generated.tolist()}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 12) and all(tuple(r) in rows for r in batch["input_ids"].tolist())
    plain = TextDataModule(source="local", source_kwargs={"path": corpus}, eval_block_size=16,
                           max_eval_blocks=2, max_test_blocks=2, cache_dir=str(tmp_path))
    plain.set_tokenizer(tok)
    assert torch.equal(dm.val_blocks(), plain.val_blocks()) and torch.equal(dm.test_blocks(), plain.test_blocks())
    monkeypatch.setattr(teacher_generated, "generate_dataset", None)  # cached now: must not generate again
    again = datamodule(corpus, tmp_path, max_train_blocks=3, batch_size=1)  # batch_size: same samples
    again.set_tokenizer(tok)
    again.set_teacher(model)
    assert torch.equal(again.blocks("train"), generated[:3])


def test_datamodule_prompts_come_from_the_train_split(lm, corpus, tmp_path):
    model, tok = lm
    dm = datamodule(corpus, tmp_path, prompt_tokens=4)
    dm.set_tokenizer(tok)
    dm.set_teacher(model)
    prompts = dm.prompts()
    assert prompts.shape[1] == 4 and len(prompts) >= 5
    assert torch.equal(dm.blocks("train")[:, :4], prompts[:5])


def test_datamodule_splits_generation_across_the_trainers_ranks(lm, corpus, tmp_path):
    model, tok = lm
    barriers = []

    def rank_module(rank):
        dm = datamodule(corpus, tmp_path)
        dm.set_tokenizer(tok)
        dm.set_teacher(model)
        strategy = SimpleNamespace(root_device=torch.device("cpu"), barrier=barriers.append)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=strategy)  # as Lightning attaches it
        return dm

    with pytest.raises(QatlabError, match=r"lacks 1 of 2 shards \(first: \[0\]\)"):
        rank_module(1).blocks("train")  # alone, rank 1 writes shard 1 only (the barrier is a no-op here)
    assert len(rank_module(0).blocks("train")) == 5 and len(barriers) == 2


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"temperature": 0.0}, r"generation.temperature=0.0 must be > 0"),
    ({"length": 8, "greedy_tokens": 8}, r"generation.greedy_tokens=8 must be >= 0 and < generation.length=8"),
    ({"num_samples": 0}, r"generation.num_samples=0 must be a positive integer"),
    ({"prompt_tokens": 512}, r"generation.prompt_tokens=512 must be >= 0 and < generation.length=512"),
    ({"top_p": 1.5}, r"generation.top_p=1.5 must be in \(0, 1\] or null"),
])
def test_bad_generation_config_is_one_clear_line(fields, message):
    with pytest.raises(QatlabError, match=message):
        GenerationConfig(**fields)


def test_datamodule_checks_length_and_keys(corpus, tmp_path):
    with pytest.raises(QatlabError, match=r"data.generation.length=32 differs from data.block_size=12; "):
        datamodule(corpus, tmp_path, length=32)
    with pytest.raises(QatlabError, match=r"data.generation has \['temp'\], unknown keys; valid: "):
        datamodule(corpus, tmp_path, temp=0.7)


# ---- the Hydra config ---------------------------------------------------------------------------


def test_data_teacher_generated_runs_end_to_end(tmp_path):
    from hydra import compose, initialize_config_dir

    from qatlab.train import train

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "experiment=tiny_smoke",
                                          "data=teacher_generated", "data.generation.num_samples=6"])
    assert cfg.data.generation.length == cfg.data.block_size == 64
    results = train(cfg)
    assert results["train/steps"] == cfg.trainer.max_steps
