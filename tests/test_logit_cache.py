"""Teacher top-k logit cache: sparse KL math, the on-disk cache, and training from it."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import default_collate

from qatlab.data.logit_cache import (
    KEYS, CachedBlockDataset, LogitCache, build_logit_cache, cache_dir_for, cache_info, cached_teacher_output,
)
from qatlab.errors import QatlabError
from qatlab.losses.divergences import cakld, forward_kl, jsd, reverse_kl, top1_probability_sum
from qatlab.losses.topk import TopKLogits, topk_from_logits

CONF = Path(__file__).resolve().parent.parent / "conf"
LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "cakld": lambda s, t, m: cakld(s, t, m, gamma=0.3)}


class FakeTokenizer:
    name_or_path = "fake"

    def get_vocab(self):
        return {f"t{i}": i for i in range(128)}


def logits_pair(vocab=50):
    torch.manual_seed(0)
    student = torch.randn(2, 7, vocab, requires_grad=True)
    teacher = 3 * torch.randn(2, 7, vocab)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    return student, teacher, mask


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_topk_with_k_equal_vocab_is_the_full_divergence(name):
    """Values and gradients: the rest buckets are empty, so the sparse form is exact (fp32 rounding)."""
    s, t, mask = logits_pair()
    loss = LOSSES[name]
    full = loss(s, t, mask)
    (g_full,) = torch.autograd.grad(full, s)
    sparse = loss(s, topk_from_logits(t, t.shape[-1]), mask)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sparse, g_full, rtol=1e-4, atol=1e-7)


def test_topk_is_the_kl_between_k_plus_one_buckets():
    """Hand-written reference: teacher and student collapsed onto the top-k tokens plus one rest bucket."""
    s, t, _ = logits_pair()
    k = 5
    top = topk_from_logits(t, k)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    p_k, q_k = ls.exp().gather(-1, top.indices), lt.exp().gather(-1, top.indices)
    p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    reference = (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(forward_kl(s, top), reference, rtol=1e-5, atol=1e-6)
    assert forward_kl(s, top) < forward_kl(s, t)  # merging tokens can only lose divergence


def test_top1_probability_and_jsd_on_topk():
    _, t, mask = logits_pair()
    top = topk_from_logits(t, 3)
    total, count = top1_probability_sum(top, mask)
    full_total, full_count = top1_probability_sum(t, mask)
    assert count == full_count == 12
    torch.testing.assert_close(total, full_total)
    with pytest.raises(QatlabError, match="jsd has no top-k form"):
        jsd(torch.zeros(2, 7, 50), top)


# ---- the cache on disk -----------------------------------------------------------------------------


class CountingTeacher(torch.nn.Module):
    """The tiny Llama, counting forwards (to see which shards a resumed build recomputes)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.config = model, 0, model.config

    def forward(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


def build(teacher, blocks, tmp_path, k, shard_size=2):
    info = cache_info(teacher, FakeTokenizer(), blocks, k, "float32", shard_size)
    return build_logit_cache(teacher, blocks, cache_dir_for(tmp_path, info), info, batch_size=2)


def blocks_for(model, n=5, length=12):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(1))


def test_cache_kl_equals_the_live_topk_kl_and_the_full_kl_at_k_vocab(tmp_path, tiny_llama_model):
    blocks = blocks_for(tiny_llama_model)  # 5 blocks in shards of 2: the last shard is partial
    with torch.no_grad():
        live = tiny_llama_model(input_ids=blocks).logits  # (5, 12, 128)
    student = torch.randn_like(live)
    for k in (8, 128):
        cache = build(tiny_llama_model, blocks, tmp_path, k)
        assert len(cache) == 5 and len(list(cache.folder.glob("shard_*.safetensors"))) == 3
        batch = default_collate([CachedBlockDataset(blocks, cache)[i] for i in range(5)])
        cached = cached_teacher_output(batch).logits
        assert torch.equal(cached.indices, topk_from_logits(live, k).indices)
        for name, loss in LOSSES.items():
            from_cache = loss(student, cached, None)
            torch.testing.assert_close(from_cache, loss(student, topk_from_logits(live, k), None), rtol=1e-6, atol=1e-7)
            if k == 128:  # k = vocab: the full-vocabulary divergence
                torch.testing.assert_close(from_cache, loss(student, live, None), rtol=1e-5, atol=1e-6)


def test_cache_key_resume_and_mismatch(tmp_path, tiny_llama_model):
    teacher = CountingTeacher(tiny_llama_model)
    blocks = blocks_for(tiny_llama_model)
    cache = build(teacher, blocks, tmp_path, 4)
    assert teacher.calls == 3  # 5 blocks, batch 2: 2 + 2 + 1 rows in 3 shards
    before = cache[4][KEYS[1]].clone()
    (cache.folder / "shard_00002.safetensors").unlink()  # a build killed before its last shard
    resumed = build(teacher, blocks, tmp_path, 4)
    assert teacher.calls == 4 and torch.equal(resumed[4][KEYS[1]], before)
    assert not list(cache.folder.glob(".*.tmp"))  # atomic writes leave no temp files behind
    assert build(teacher, blocks, tmp_path, 8).folder != cache.folder  # k is part of the key
    assert build(teacher, blocks[:4], tmp_path, 4).folder != cache.folder  # so is the data
    manifest = cache.folder / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "k": 5}))
    with pytest.raises(QatlabError, match="other settings"):
        build(teacher, blocks, tmp_path, 4)
    with pytest.raises(QatlabError, match="other data"):
        CachedBlockDataset(blocks[:3], resumed)


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])  # what a cut copy or a full disk leaves


def test_a_truncated_shard_is_named_on_open_and_made_again_on_rerun(tmp_path, tiny_llama_model, caplog):
    """Issue 19.9: a truncated shard crashed later with a SafetensorError naming no file; a rerun kept it."""
    teacher = CountingTeacher(tiny_llama_model)
    blocks = blocks_for(tiny_llama_model)
    cache = build(teacher, blocks, tmp_path, 4)
    before = [{k: v.clone() for k, v in cache[i].items()} for i in range(5)]  # copies: reads are memory-mapped
    shard = cache.folder / "shard_00001.safetensors"
    truncate(shard)
    with pytest.raises(QatlabError, match=rf"teacher cache shard '{shard}' is damaged \(truncated: 100 bytes, its "
                                          r"header [^)]*\); run the training again with teacher_cache.enabled=true"):
        LogitCache(cache.folder)
    calls = teacher.calls
    with caplog.at_level("WARNING", logger="qatlab"):
        rebuilt = build(teacher, blocks, tmp_path, 4)
    assert f"teacher cache shard {shard} is damaged (truncated" in caplog.text
    assert teacher.calls == calls + 1  # that shard only (2 blocks in one batch of 2)
    for i in range(5):
        for key in KEYS:
            assert torch.equal(rebuilt[i][key], before[i][key]), (i, key)
    assert LogitCache(cache.folder) is not None  # whole again: size and checksum


def test_a_corrupted_shard_of_the_right_size_fails_its_checksum(tmp_path, tiny_llama_model):
    cache = build(tiny_llama_model, blocks_for(tiny_llama_model), tmp_path, 4)
    shard = cache.folder / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the data, size unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(QatlabError, match=rf"'{shard}' is damaged \(checksum mismatch"):
        LogitCache(cache.folder)


def test_a_method_that_needs_hidden_states_cannot_use_the_cache(tiny_llama_model):
    from qatlab.losses import ForwardKL
    from qatlab.stages.qat_module import QATModule

    module = QATModule(None, tiny_llama_model, ForwardKL(), optimizer=torch.optim.AdamW)
    top = topk_from_logits(torch.randn(1, 4, 128), 3)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), **dict(zip(KEYS, (top.indices, top.logprobs, top.log_rest)))}
    assert isinstance(module.teacher_outputs(batch, {}).logits, TopKLogits)
    with pytest.raises(QatlabError, match="hidden states"):
        module.teacher_outputs(batch, {"output_hidden_states": True})
    with pytest.raises(QatlabError, match="no teacher"):
        module.teacher_outputs({"input_ids": batch["input_ids"]}, {})


def test_a_tiny_run_trains_from_the_cache_without_the_teacher(tmp_path, monkeypatch, caplog):
    """End to end: the cache is built once, the fit never calls the teacher, a second run reuses it."""
    from qatlab.stages.qat_module import QATModule
    from qatlab.train import train

    seen = []
    original = QATModule.teacher_outputs

    def spy(self, batch, hidden):
        seen.append((self.teacher is None, KEYS[0] in batch))
        return original(self, batch, hidden)

    monkeypatch.setattr(QATModule, "teacher_outputs", spy)
    overrides = ["experiment=tiny_smoke", "method=bitdistiller", "init=none",
                 "method.weight.group_size=64", "trainer.max_steps=2", "data.max_train_blocks=6",
                 "teacher_cache.enabled=true", "teacher_cache.k=16", f"teacher_cache.dir={tmp_path}/cache",
                 "eval.rtn_baseline=false", f"results_file={tmp_path}/r.jsonl"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}/run", *overrides])
    results = train(cfg)
    assert results["train/steps"] == 2 and seen == [(True, True), (True, True)]
    (folder,) = (tmp_path / "cache" / "teacher_topk").iterdir()
    assert LogitCache(folder).info["k"] == 16 and LogitCache(folder).info["num_blocks"] == 6

    # issue 19.9: a shard cut short (a copy, a full disk) used to crash this rerun with an anonymous SafetensorError
    shard = folder / "shard_00000.safetensors"
    truncate(shard, keep=shard.stat().st_size // 3)
    with caplog.at_level("WARNING", logger="qatlab"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            again = train(compose("train", overrides=[f"paths.output_dir={tmp_path}/run2", *overrides]))
    assert f"teacher cache shard {shard} is damaged (truncated" in caplog.text
    assert again["test/ppl_student"] == results["test/ppl_student"] and again["train/loss"] == results["train/loss"]
