import json

import pytest
import torch

import qatlab.data.packing as packing
from qatlab.data import TextDataModule, load_documents, pack_documents
from qatlab.data.corpora import SPLITS, assign_splits
from qatlab.errors import QatlabError
from qatlab.models import load_causal_lm


@pytest.fixture(scope="module")
def tok():
    return load_causal_lm("tiny-llama")[1]  # the SmolLM2 tokenizer


# ---- corpora ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, total, min_test", [("gensim_wiki", 106, 5), ("gensim_lee", 293, 20)])
def test_gensim_splits_are_disjoint_deterministic_nonempty(source, total, min_test):
    splits = {s: load_documents(source, s) for s in SPLITS}
    assert splits == {s: load_documents(source, s) for s in SPLITS}  # same docs, same order
    sizes = {s: len(d) for s, d in splits.items()}
    assert all(sizes.values()) and sizes["test"] >= min_test
    assert sizes["train"] > sizes["validation"] and sizes["train"] > sizes["test"]
    assert abs(sum(sizes.values()) - total) <= 5, sizes
    seen = [doc for docs in splits.values() for doc in docs]
    assert len(set(seen)) == len(seen)  # disjoint


def test_wiki_text_is_plain():
    doc = load_documents("gensim_wiki", "train")[0]
    assert "'''" not in doc and "\n\n\n" not in doc and "#REDIRECT" not in doc


def test_assign_splits_fills_empty_splits():
    out = assign_splits(["0", "1", "2"])
    assert all(out.values()) and sorted(sum(out.values(), [])) == [0, 1, 2]


def test_unknown_source_and_split_and_option():
    with pytest.raises(QatlabError, match=r"data.source='wikipedia' is not known; use one of \['c4', 'gensim_lee'"):
        load_documents("wikipedia", "train")
    with pytest.raises(QatlabError, match=r"split='dev' is not known"):
        load_documents("gensim_wiki", "dev")
    with pytest.raises(QatlabError, match=r"data.source_kwargs has \['pth'\], unknown for source 'local'"):
        load_documents("local", "train", pth="x.txt")


def test_local_txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"document number {i}." for i in range(40)))
    splits = {s: load_documents("local", s, path=str(path)) for s in SPLITS}
    assert sum(len(d) for d in splits.values()) == 40 and all(splits.values())
    assert splits["train"][0].startswith("document number")


def test_local_txt_folder_and_jsonl_and_splits(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"file {i}\n\nsame file, second paragraph")
    docs = load_documents("local", "train", splits={"train": str(tmp_path)})
    assert docs == [f"file {i}\n\nsame file, second paragraph" for i in range(3)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(5)))
    assert load_documents("local", "test", splits={"test": str(jsonl)}, text_field="body") == [
        f"row {i}" for i in range(5)
    ]
    with pytest.raises(QatlabError, match=r"c.jsonl:1 has no field 'text'; set data.source_kwargs.text_field"):
        load_documents("local", "test", splits={"test": str(jsonl)})


def test_local_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(QatlabError, match=r"corpus 'local' split 'train' has no text; "):
        load_documents("local", "train", path=str(empty))
    with pytest.raises(QatlabError, match=r"data.source_kwargs.path='/no/such.txt' does not exist; "):
        load_documents("local", "train", path="/no/such.txt")
    with pytest.raises(QatlabError, match=r"data.source_kwargs.path is missing"):
        load_documents("local", "train")


# ---- packing ------------------------------------------------------------------------------------


def test_pack_exact_tokens_and_dropped_remainder(tok):
    docs = ["Hello world.", "The cat sat on the mat.", "A third, final document!"]
    expected = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    blocks = pack_documents(docs, tok, 4)
    assert blocks.dtype == torch.int64 and blocks.shape == (len(expected) // 4, 4)
    assert blocks.flatten().tolist() == expected[: blocks.numel()]
    with_bos = pack_documents(docs, tok, 4, add_bos=True)
    assert with_bos[:, 0].eq(tok.bos_token_id).all()
    assert with_bos[:, 1:].flatten().tolist() == expected[: with_bos.shape[0] * 3]


def test_per_document_tokenization_equals_joined_string(tok):
    """The documented guarantee for byte-level BPE tokenizers, on real text."""
    docs = load_documents("gensim_wiki", "test")
    ids = packing.tokenize_stream(docs, tok, "\n\n")
    assert ids.tolist() == tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]


def test_tokenizing_without_datasets_gives_the_same_ids(tok, monkeypatch):
    """The GPU machine has no `datasets` (experiments/gpu): the fallback must not change a single id."""
    docs = load_documents("gensim_wiki", "validation")
    expected = packing.tokenize_stream(docs, tok, "\n\n")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    fallback = packing.tokenize_stream(docs, tok, "\n\n")
    assert fallback.dtype == torch.int64 and torch.equal(fallback, expected)


def test_pack_cache_is_reused(tok, tmp_path, monkeypatch):
    docs = ["Some text to pack. " * 20, "And another document."]
    first = pack_documents(docs, tok, 16, cache_dir=str(tmp_path))
    files = list((tmp_path / "blocks").glob("*.safetensors"))
    assert len(files) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(packing, "tokenize_stream", no_tokenizing)
    assert torch.equal(pack_documents(docs, tok, 16, cache_dir=str(tmp_path)), first)
    with pytest.raises(AssertionError):  # another block size is another cache entry
        pack_documents(docs, tok, 8, cache_dir=str(tmp_path))


def test_pack_errors(tok):
    with pytest.raises(QatlabError, match=r"data.block_size=0 must be a positive number"):
        pack_documents(["text"], tok, 0)
    with pytest.raises(QatlabError, match=r"the split has only 2 tokens, fewer than one block of 512; lower data"):
        pack_documents(["Hello world"], tok, 512)


# ---- DataModule ---------------------------------------------------------------------------------


def make_dm(seed: int = 0) -> TextDataModule:
    return TextDataModule(block_size=64, eval_block_size=128, batch_size=4, max_train_blocks=32,
                          max_eval_blocks=3, max_test_blocks=5, seed=seed)


def test_datamodule_batches(tok):
    dm = make_dm()
    dm.set_tokenizer(tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].eq(1).all()
    assert len(dm.train_dataloader()) == 8
    assert [b["input_ids"].shape for b in dm.val_dataloader()] == [(1, 128)] * 3
    assert dm.test_blocks().shape == (5, 128) and dm.num_test_tokens == 640
    uncapped = pack_documents(load_documents("gensim_wiki", "test"), tok, 128)
    assert torch.equal(dm.test_blocks(), uncapped[:5])  # the FIRST n windows


def test_datamodule_shuffle_is_seeded(tok):
    def order(seed):
        dm = make_dm(seed)
        dm.set_tokenizer(tok)
        return torch.cat([b["input_ids"][:, 0] for b in dm.train_dataloader()])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))


def test_datamodule_needs_a_tokenizer():
    with pytest.raises(QatlabError, match=r"call datamodule.set_tokenizer\(tokenizer\) before setup"):
        make_dm().setup("fit")
