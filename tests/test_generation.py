"""Teacher-generated data: the LLM-QAT reference's schedule (hand-computed), KV-cache decoding, determinism,
resume, rank sharding, packing into train blocks, the DataModule."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import qatlab.data.generation as generation
import qatlab.data.teacher_generated as teacher_generated
from qatlab.data import GenerationConfig, TeacherGeneratedDataModule, TextDataModule, generate_dataset, load_generated
from qatlab.data.generation import (decode, eos_token_ids, generation_dir, load_samples, model_identity, sample_noise,
                                    schedule, special_ids, start_tokens, vocab_walk)
from qatlab.data.teacher_generated import generation_config, pack_samples
from qatlab.errors import QatlabError
from qatlab.models import load_causal_lm

SMALL = dict(num_samples=7, length=12, batch_size=4, shard_size=3)  # 3 shards: 3 + 3 + 1
OLD = dict(start="random", greedy_tokens=4, top_k=None, stop_at_eos=False, retokenize=False)  # qatlab's earlier schedule


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm("tiny-llama")  # SmolLM2 tokenizer, vocab 49152


def generate(lm, out, **overrides):
    model, tok = lm
    return load_samples(generate_dataset(model, tok, out, GenerationConfig(**{**SMALL, **overrides})))


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---- the reference's schedule, by hand ------------------------------------------------------------


def test_vocab_walk_is_the_reference_loop_order_by_hand():
    """LLM-QAT generate_data.py on GPU c: for j in 3, 4, 5 (max_length; j - 1 greedy tokens): for i in the chunk's
    ids. Vocabulary of 7 ids in chunks of 3: chunk 0 = ids 0-2, chunk 1 = ids 3-5, chunk 2 = id 6 (short)."""
    greedy = (2, 3, 4)
    expected = [(0, 2), (1, 2), (2, 2), (0, 3), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4),   # chunk 0 ("GPU 0")
                (3, 2), (4, 2), (5, 2), (3, 3), (4, 3), (5, 3), (3, 4), (4, 4), (5, 4),   # chunk 1
                (6, 2), (6, 3), (6, 4),                                                   # chunk 2: one id
                (0, 2), (1, 2)]                                                           # 21 = 3 x 7: again
    assert [vocab_walk(k, 7, 3, greedy) for k in range(23)] == expected
    cfg = GenerationConfig(num_samples=23, length=8, vocab_chunk=3, shard_size=5)
    starts, counts = schedule(None, cfg, 7)
    assert starts.shape == (23, 1) and [(int(s), int(g)) for s, g in zip(starts[:, 0], counts)] == expected
    # the reference's own numbers: 64 GPUs x 500 ids x 3 = 96,000 samples cover LLaMA's 32,000 ids three times
    assert vocab_walk(500 * 3 * 63 + 2 * 500 + 499, 32000, 500, greedy) == (31999, 4)


class TableLM(nn.Module):
    """A causal LM whose next-token logits are a fixed table row of the LAST input token (so a KV cache changes
    nothing): hand-computable decoding. Vocabulary 5, EOS = 4."""

    TABLE = torch.tensor([  # logits[previous token] over tokens 0..4
        [0.0, 3.0, 1.0, 2.0, -9.0],   # after 0: argmax 1
        [0.0, 0.0, 4.0, 1.0, 2.0],    # after 1: argmax 2
        [5.0, 0.0, 0.0, 1.0, 3.0],    # after 2: argmax 0, then 4 (EOS), then 3
        [1.0, 1.0, 1.0, 0.0, 2.0],    # after 3: argmax 4 (EOS)
        [0.0, 2.0, 1.0, 0.0, 0.0],    # after 4 (EOS): argmax 1
    ])

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=5, eos_token_id=4)
        self.calls = 0

    def forward(self, input_ids, use_cache=False, past_key_values=None):
        self.calls += 1
        return SimpleNamespace(logits=self.TABLE[input_ids] + 0 * self.dummy, past_key_values=("cache", self.calls))


def test_decode_follows_the_reference_schedule_by_hand():
    """Start 0 with 2 greedy tokens: 0 -> 1 -> 2 (argmax). Then sampling from the top-2 of the row after 2,
    {0: e^5, 4: e^3} / (e^5 + e^3) = {0: 0.8808, 4: 0.1192}: u = 0.5 -> 0, then after 0 the top-2 {1: e^3, 3: e^2}
    = {1: 0.7311, 3: 0.2689}: u = 0.9 -> 3, then after 3 the top-2 are 4 (e^2) and the three tied at e^1
    (HF's top-k keeps every token tied with the k-th): {0, 1, 2: e/(e^2+3e) = 0.1749, 4: e^2/(e^2+3e) = 0.4754},
    cumulative over ids 0..4 0.1749, 0.3498, 0.5246, 0.5246, 1.0: u = 0.8 -> 4 = EOS: the sample ends (EOS kept)."""
    model = TableLM()
    cfg = GenerationConfig(num_samples=1, length=10, greedy_tokens=2, top_k=2)
    noise = torch.tensor([[0.0, 0.0, 0.5, 0.9, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # per new token
    out = decode(model, torch.tensor([[0]]), torch.tensor([2]), cfg, noise, vocab=5, eos=(4,))
    assert [s.tolist() for s in out] == [[0, 1, 2, 0, 3, 4]]
    # the same draws without the EOS stop run to `length` tokens: after EOS (4), top-2 {1: e^2, 2: e^1}, u = 0 -> 1
    full = decode(model, torch.tensor([[0]]), torch.tensor([2]), dataclasses.replace(cfg, stop_at_eos=False), noise,
                  vocab=5)
    assert full[0].tolist()[:7] == [0, 1, 2, 0, 3, 4, 1] and len(full[0]) == 10
    # the full softmax (top_k=null) at u = 0.5 after 2: p = softmax([5, 0, 0, 1, 3]) = .8568, .0058, .0058, .0157, .1160,
    # cumulative .8568: u = 0.5 -> 0; at u = 0.9 after 0, softmax([0, 3, 1, 2, -9]) = .0321 .6439 .0871 .2369 ~0:
    # cumulative .0321 .6760 .7631 1.0: u = 0.9 -> 3
    no_k = decode(model, torch.tensor([[0]]), torch.tensor([2]), dataclasses.replace(cfg, top_k=None), noise, 5, (4,))
    assert no_k[0].tolist()[:5] == [0, 1, 2, 0, 3]


def test_a_greedy_eos_ends_the_greedy_part_and_sampling_goes_on():
    """The reference's first generate call (greedy, max_length=j) stops at EOS; its second call samples on
    from there. Start 3 with 3 greedy tokens: 3 -> 4 (EOS, greedy) -> then sampled, not greedy: after 4, top-2
    {1: e^2, 2: e^1}: u = 0.95 -> 2 (greedy would give 1); then after 2, top-2 {0, 4}: u = 0.99 -> 4 = EOS: end."""
    model = TableLM()
    cfg = GenerationConfig(num_samples=1, length=8, greedy_tokens=3, top_k=2)
    noise = torch.tensor([[0.0, 0.95, 0.99, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = decode(model, torch.tensor([[3]]), torch.tensor([3]), cfg, noise, vocab=5, eos=(4,))
    assert out[0].tolist() == [3, 4, 2, 4]


def test_rows_of_a_batch_keep_their_own_schedule_and_end():
    model = TableLM()
    cfg = GenerationConfig(num_samples=2, length=10, greedy_tokens=2, top_k=2)
    noise = torch.tensor([[0.0, 0.0, 0.5, 0.9, 0.8, 0, 0, 0, 0, 0], [0.0, 0.95, 0.99, 0, 0, 0, 0, 0, 0, 0]],
                         dtype=torch.float64)
    out = decode(model, torch.tensor([[0], [3]]), torch.tensor([2, 3]), cfg, noise, vocab=5, eos=(4,))
    assert [s.tolist() for s in out] == [[0, 1, 2, 0, 3, 4], [3, 4, 2, 4]]


def test_eos_ids_come_from_the_models_generation_config():
    model = TableLM()
    assert eos_token_ids(model) == (4,)
    model.generation_config = SimpleNamespace(eos_token_id=[4, 2])
    assert eos_token_ids(model) == (2, 4)


# ---- decoding the tiny Llama ---------------------------------------------------------------------


def test_greedy_tokens_match_a_full_forward_argmax_and_ignore_the_seed(lm):
    model, tok = lm
    starts = start_tokens(tok, 3, seed=0)[:, None]  # (3, 1)
    rows = range(3)
    outs = [decode(model, starts, 9, cfg, sample_noise(cfg, rows), len(tok))
            for cfg in (GenerationConfig(length=10, greedy_tokens=9, seed=s) for s in (0, 1))]
    assert same(outs[0], outs[1])
    ref = starts
    with torch.no_grad():
        for _ in range(9):  # no KV cache: the whole prefix every step
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(torch.stack(outs[0]), ref)


def test_same_seed_same_samples_other_seed_other_samples(lm, tmp_path):
    a = generate(lm, tmp_path / "a")
    assert len(a) == 7 and all(s.dtype == torch.int64 and 1 < len(s) <= 12 for s in a)
    assert same(a, generate(lm, tmp_path / "b"))
    assert not same(a, generate(lm, tmp_path / "c", seed=1))
    assert [int(s[0]) for s in a] == [0, 1, 2, 3, 4, 5, 6]  # the vocabulary walk from id 0


def test_batch_size_does_not_change_the_samples(lm, tmp_path):
    assert same(generate(lm, tmp_path / "a", batch_size=4), generate(lm, tmp_path / "b", batch_size=1))


def test_qatlabs_earlier_schedule_is_still_there(lm, tmp_path):
    a = load_generated(generate_dataset(*lm, tmp_path, GenerationConfig(**SMALL, **OLD)))
    assert a.shape == (7, 12) and not set(a[:, 0].tolist()) & special_ids(lm[1])
    assert torch.equal(a[:, 0], start_tokens(lm[1], 7, seed=0))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)  # p = 0.64, 0.24, 0.09, 0.03
    u = torch.linspace(0, 0.999, 200, dtype=torch.float64)
    for top_p, kept in ((None, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}), (0.85, {0, 1}), (0.5, {0})):
        assert set(generation.sample_token(logits, 1.0, top_p, u).tolist()) == kept
    assert set(generation.sample_token(logits, 1.0, None, u, top_k=3).tolist()) == {0, 1, 2}


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
        load_samples(out)
    mtimes = [os.stat(p).st_mtime_ns for p in saved]
    assert same(generate(lm, out), full)  # no sample lost or duplicated
    assert [os.stat(p).st_mtime_ns for p in saved] == mtimes  # finished shards were not redone
    assert sorted(p.name for p in out.glob("shard_*")) == [f"shard_0000{k}.safetensors" for k in range(3)]


def test_a_truncated_shard_is_named_on_load_and_generated_again_on_rerun(lm, tmp_path, caplog, monkeypatch):
    """Issue 19.9: a truncated generated-data shard crashed with a SafetensorError naming no file; a rerun kept it."""
    out = tmp_path / "gen"
    full = [s.clone() for s in generate(lm, out)]  # copies: load_file maps the file, which is cut below
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(QatlabError, match=rf"generated-data shard '{shard}' is damaged \(truncated: 64 bytes, its "
                                          r"header [^)]*\); run again with data=teacher_generated"):
        load_samples(out)
    assert not generation.is_complete(out)  # so the datamodule generates again
    real, decoded = generation.decode, []
    monkeypatch.setattr(generation, "decode", lambda *a: decoded.append(1) or real(*a))
    with caplog.at_level("WARNING", logger="qatlab"):
        again = generate(lm, out)
    assert f"generated-data shard {shard} is damaged (truncated" in caplog.text
    assert len(decoded) == 1  # only that shard (3 samples, batch 4) was decoded again
    assert same(again, full)


def test_two_ranks_together_make_the_single_rank_dataset(lm, tmp_path):
    model, tok = lm
    cfg = GenerationConfig(**SMALL)
    generate_dataset(model, tok, tmp_path / "split", cfg, rank=0, world_size=2)
    assert sorted(p.name for p in (tmp_path / "split").glob("shard_*")) == ["shard_00000.safetensors",
                                                                            "shard_00002.safetensors"]
    generate_dataset(model, tok, tmp_path / "split", cfg, rank=1, world_size=2)
    assert same(load_samples(tmp_path / "split"), generate(lm, tmp_path / "one"))


def test_a_folder_of_other_settings_is_refused(lm, tmp_path):
    generate(lm, tmp_path)
    with pytest.raises(QatlabError, match=r"holds samples made with other settings"):
        generate(lm, tmp_path, temperature=0.7)


def test_generation_dir_keys_on_model_and_settings_but_not_batch_size(lm, tmp_path):
    model, tok = lm
    cfg = GenerationConfig(**SMALL)
    ident = model_identity(model)
    assert ident != model_identity(load_causal_lm("tiny-llama:1")[0])  # same name, other weights
    base = generation_dir(tmp_path, ident, cfg, tok, eos=(2,))
    for same_samples in (dict(batch_size=1), dict(retokenize=False), dict(append_eos=True)):  # packing only
        assert base == generation_dir(tmp_path, ident, dataclasses.replace(cfg, **same_samples), tok, eos=(2,))
    for other in (dict(seed=1), dict(top_k=None), dict(start="random"), dict(greedy_tokens=4), dict(vocab_chunk=3),
                  dict(stop_at_eos=False)):
        assert base != generation_dir(tmp_path, ident, dataclasses.replace(cfg, **other), tok, eos=(2,)), other
    assert base != generation_dir(tmp_path, ident + "x", cfg, tok, eos=(2,))
    assert base != generation_dir(tmp_path, ident, cfg, tok, eos=(0,))


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
    out = load_samples(generate_dataset(model, tok, tmp_path, cfg, prompts=prompts))
    assert torch.equal(torch.stack([s[:4] for s in out]), prompts[[0, 1, 2, 0, 1, 2, 0]])  # fewer prompts: reused
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
    samples = load_samples(generation_dir(tmp_path, model_identity(model), cfg, tok, eos=eos_token_ids(model)))
    packed = pack_samples(samples, tok, 12, cfg)
    assert torch.equal(dm.blocks("train"), packed) and len(packed) >= 3
    batch = next(iter(dm.train_dataloader()))
    rows = {tuple(r) for r in packed.tolist()}
    assert batch["input_ids"].shape == (2, 12) and all(tuple(r) in rows for r in batch["input_ids"].tolist())
    plain = TextDataModule(source="local", source_kwargs={"path": corpus}, eval_block_size=16,
                           max_eval_blocks=2, max_test_blocks=2, cache_dir=str(tmp_path))
    plain.set_tokenizer(tok)
    assert torch.equal(dm.val_blocks(), plain.val_blocks()) and torch.equal(dm.test_blocks(), plain.test_blocks())
    monkeypatch.setattr(teacher_generated, "generate_dataset", None)  # cached now: must not generate again
    monkeypatch.setattr(teacher_generated, "pack_samples", None)  # the packed blocks are cached too
    again = datamodule(corpus, tmp_path, max_train_blocks=3, batch_size=1)  # batch_size: same samples
    again.set_tokenizer(tok)
    again.set_teacher(model)
    assert torch.equal(again.blocks("train"), packed[:3])


def test_retokenized_samples_are_concatenated_and_cut_like_the_reference(lm):
    """LLM-QAT's CustomJsonDataset: tokenizer(text) per decoded sample (with the tokenizer's own special tokens),
    all concatenated, cut into block_size chunks, the remainder dropped; append_eos adds EOS per sample (OneBit)."""
    _, tok = lm
    texts = ["Hello there, general.", "A second sample ends here", "And a third one."]
    samples = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for t in texts]
    cfg = GenerationConfig(length=16)
    stream = [i for t in texts for i in tok(t)["input_ids"]]  # decoding skipped the EOS tokens
    blocks = pack_samples(samples, tok, 4, cfg)
    assert blocks.flatten().tolist() == stream[: len(stream) // 4 * 4] and blocks.shape[1] == 4
    with_eos = pack_samples(samples, tok, 4, dataclasses.replace(cfg, append_eos=True))
    stream = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    assert with_eos.flatten().tolist() == stream[: len(stream) // 4 * 4]
    raw = pack_samples(samples, tok, 4, dataclasses.replace(cfg, retokenize=False))
    stream = [i for s in samples for i in s.tolist()]
    assert raw.flatten().tolist() == stream[: len(stream) // 4 * 4]
    fixed = [torch.arange(16) + i for i in range(3)]
    assert torch.equal(pack_samples(fixed, tok, 16, GenerationConfig(length=16, **OLD)), torch.stack(fixed))


def test_datamodule_prompts_come_from_the_train_split(lm, corpus, tmp_path):
    model, tok = lm
    dm = datamodule(corpus, tmp_path, prompt_tokens=4, **{k: v for k, v in OLD.items() if k != "start"})
    dm.set_tokenizer(tok)
    dm.set_teacher(model)
    prompts = dm.prompts()
    assert prompts.shape[1] == 4 and len(prompts) >= 5
    assert torch.equal(dm.blocks("train")[:, :4], prompts[:5])


def test_datamodule_splits_generation_across_the_trainers_ranks(lm, corpus, tmp_path):
    model, tok = lm
    barriers = []

    def rank_module(rank):
        dm = datamodule(corpus, tmp_path, **OLD)
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
    ({"top_k": 0}, r"generation.top_k=0 must be a positive integer or null"),
    ({"start": "walk"}, r"generation.start='walk' is not known; use one of \['vocab', 'random'\]"),
    ({"greedy_tokens": ()}, r"generation.greedy_tokens=\(\) must be an integer or a non-empty list"),
    ({"length": 4, "greedy_tokens": (2, 4)}, r"generation.greedy_tokens=\(2, 4\) must be >= 0 and < generation.length=4"),
    ({"vocab_chunk": 0}, r"generation.vocab_chunk=0 must be a positive integer"),
])
def test_bad_generation_config_is_one_clear_line(fields, message):
    with pytest.raises(QatlabError, match=message):
        GenerationConfig(**fields)


def test_datamodule_checks_length_and_keys(corpus, tmp_path):
    with pytest.raises(QatlabError, match=r"data.generation.length=32 differs from data.block_size=12; with stop_at"):
        datamodule(corpus, tmp_path, length=32, **OLD)
    assert datamodule(corpus, tmp_path, length=32).generation.length == 32  # packed samples may be longer
    assert generation_config({"greedy_tokens": [2, 3]}, 8).greedy_tokens == (2, 3)
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
