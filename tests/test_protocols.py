"""The papers' perplexity protocols (qatlab.eval.protocols), offline: a local file in WikiText-2's raw shape, a
character tokenizer whose ids are hand-computable, and GPTQ's C4 sampling loop restated from its datautils."""

import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import qatlab.data.corpora as corpora
from qatlab.data import TextDataModule, load_documents, pack_documents
from qatlab.data.corpora import load_records, read_records
from qatlab.errors import QatlabError
from qatlab.eval.protocols import NAMED, gptq_c4_windows, gptq_windows, protocol_facts, protocol_windows
from qatlab.models import load_causal_lm

CONF = Path(__file__).resolve().parent.parent / "conf"

# The shape of the hub's wikitext-2-raw-v1 rows (wiki.test.raw read line by line): a title line, blank lines
# (rows ''), paragraph lines ending in "\n"; a section heading. load_wikitext2 regroups these into articles;
# the gptq protocol must not.
WIKITEXT_RAW = (
    " \n"
    " = Robert Boulter = \n"
    " \n"
    " Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role on the "
    "television series The Bill in 2000 .\n"
    " \n"
    " = = Career = = \n"
    " \n"
    " In 2006 , Boulter starred alongside Whishaw in the play Citizenship written by Mark Ravenhill .\n"
    " \n"
)


class CharTokenizer:
    """ids = [1 (BOS)] + [ord(c) for c in text] with the default special tokens, like LLaMA's one BOS per call."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def get_vocab(self):
        return {chr(i): i for i in range(32, 127)}


@pytest.fixture
def raw_file(tmp_path):
    path = tmp_path / "wiki.test.raw.txt"
    path.write_text(WIKITEXT_RAW, encoding="utf-8")
    return path


def test_a_raw_txt_file_reads_like_the_hubs_wikitext_rows(raw_file):
    records = read_records(str(raw_file))
    assert records[:4] == ["", " = Robert Boulter = \n", "", records[3]] and records[3].endswith("actor . He had a "
                                                                                                 "guest @-@ starring "
                                                                                                 "role on the "
                                                                                                 "television series "
                                                                                                 "The Bill in 2000 .\n")
    assert len(records) == 9 and records[-1] == ""
    assert load_records("local", "test", path=str(raw_file)) == records


def test_gptq_windows_by_hand():
    """GPTQ get_wikitext2 + llama_eval: "\\n\\n".join(rows) tokenized ONCE (one BOS, at the start of the stream),
    windows ids[i*T:(i+1)*T] for i < len // T. Rows ["ab\\n", "", "c\\n"] join to "ab\\n" "\\n\\n" "" "\\n\\n" "c\\n"
    = a b and five newlines, c, newline (9 characters): BOS + 9 ids, two windows of 4, [c, newline] dropped."""
    windows = gptq_windows(["ab\n", "", "c\n"], CharTokenizer(), 4)
    nl = ord("\n")
    assert windows.tolist() == [[1, ord("a"), ord("b"), nl], [nl, nl, nl, nl]]
    assert gptq_windows(["ab\n", "", "c\n"], CharTokenizer(), 3).tolist() == [[1, 97, 98], [nl] * 3, [nl, nl, 99]]
    assert windows.dtype == torch.int64


def test_gptq_differs_from_the_pinned_protocol_on_wikitext_rows(raw_file):
    tok = load_causal_lm("tiny-llama")[1]
    records = read_records(str(raw_file))
    gptq = gptq_windows(records, tok, 8)
    assert gptq.flatten().tolist() == tok("\n\n".join(records))["input_ids"][: gptq.numel()]
    pinned = pack_documents(load_documents("local", "test", splits={"test": str(raw_file)}), tok, 8)
    assert not torch.equal(gptq[: len(pinned)], pinned[: len(gptq)])  # blank rows and the join differ


def reference_c4(records, tokenizer, seqlen, n=256, longer=False):
    """GPTQ datautils.get_c4's validation loop, restated (OneBit's copy tests `>= seqlen + 1`)."""
    random.seed(0)
    valenc = []
    for _ in range(n):
        while True:
            i = random.randint(0, len(records) - 1)
            tmp = tokenizer(records[i])["input_ids"]
            if len(tmp) >= seqlen + (1 if longer else 0):
                break
        i = random.randint(0, len(tmp) - seqlen - 1)
        valenc.append(tmp[i : i + seqlen])
    return valenc


def test_gptq_c4_windows_are_the_references_draws():
    records = [f"document {k} " + "word " * (k % 7) * 3 for k in range(40)]  # 11 to 101 characters
    tok = CharTokenizer()
    windows = gptq_c4_windows(records, tok, 32, n=12)
    assert windows.shape == (12, 32)
    assert windows.tolist() == reference_c4(records, tok, 32, n=12)
    onebit = gptq_c4_windows(records, tok, 32, n=12, min_tokens=33)
    assert onebit.tolist() == reference_c4(records, tok, 32, n=12, longer=True)
    assert gptq_c4_windows(records, tok, 32, n=12, seed=1).tolist() != windows.tolist()


def test_gptq_c4_fails_where_the_reference_would():
    # a record of exactly T tokens passes `>= T`, then randint(0, -1) raises in GPTQ: a clear line here instead
    with pytest.raises(QatlabError, match=r"drew a record of exactly 4 tokens.*set data.eval_min_tokens=5"):
        gptq_c4_windows(["abc"], CharTokenizer(), 4, n=1)  # BOS + 3 characters
    with pytest.raises(QatlabError, match=r"drew 50 records without finding 1 of >= 100 tokens"):
        gptq_c4_windows(["abc"], CharTokenizer(), 100, n=1, max_draws=50)


def test_protocol_windows_are_cached(tmp_path, monkeypatch):
    import qatlab.eval.protocols as protocols

    tok = load_causal_lm("tiny-llama")[1]
    records = ["First record of text here.\n", "", "Second one follows it.\n"] * 5
    first = protocol_windows("gptq", records, tok, 8, cache_dir=str(tmp_path))
    monkeypatch.setattr(protocols, "gptq_windows", None)
    assert torch.equal(protocol_windows("gptq", records, tok, 8, cache_dir=str(tmp_path)), first)


def test_c4_records_are_gptqs_validation_shard(monkeypatch):
    calls = []
    monkeypatch.setattr(corpora, "_hub_dataset", lambda *a, **k: calls.append((a, k)) or {"text": ["x"]})
    assert load_records("c4", "test") == ["x"]
    assert calls == [(("c4", "allenai/c4"), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                             "split": "validation"})]
    calls.clear()
    assert load_records("wikitext2", "test") == ["x"]
    assert calls == [(("wikitext2", "wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


# ---- the DataModule and the configs ---------------------------------------------------------------


def test_datamodule_scores_the_eval_source_with_its_protocol(raw_file, tmp_path):
    tok = load_causal_lm("tiny-llama")[1]
    splits = {"validation": str(raw_file), "test": str(raw_file)}
    dm = TextDataModule(block_size=64, eval_block_size=16, max_train_blocks=4, cache_dir=str(tmp_path),
                        eval_source="local", eval_source_kwargs={"splits": splits}, eval_protocol="gptq")
    dm.set_tokenizer(tok)
    assert torch.equal(dm.test_blocks(), gptq_windows(read_records(str(raw_file)), tok, 16))
    assert torch.equal(dm.blocks("train"), pack_documents(load_documents("gensim_wiki", "train"), tok, 64)[:4])
    with pytest.raises(QatlabError, match=r"data.eval_protocol='wiki' is not known; use one of \['pinned', 'gptq'"):
        TextDataModule(eval_protocol="wiki")


def make_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def test_data_options_name_the_papers_protocols(tmp_path):
    assert protocol_facts(make_cfg(tmp_path, "data=wikitext2").data) == {
        **NAMED["wikitext2-gptq-2048"], "eval_windows": 256, "eval_seed": 0}
    assert protocol_facts(make_cfg(tmp_path, "data=c4").data) == NAMED["c4-gptq-2048"]
    wiki = make_cfg(tmp_path).data  # the embedded corpus keeps the pinned protocol
    assert (wiki.eval_protocol, wiki.eval_block_size, wiki.eval_source) == ("pinned", 1024, None)


def test_a_wikitext_shaped_local_file_runs_end_to_end_under_gptq(raw_file, tmp_path):
    from qatlab.train import train

    longer = raw_file.parent / "longer.txt"
    longer.write_text(WIKITEXT_RAW * 6, encoding="utf-8")
    splits = f"{{validation:{longer},test:{longer}}}"
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "trainer.max_steps=2", "data.eval_source=local",
                   f"+data.eval_source_kwargs.splits={splits}", "data.eval_protocol=gptq", "data.eval_block_size=32",
                   "data.max_test_blocks=null", f"results_file={tmp_path}/r.jsonl")
    results = train(cfg)
    tok = load_causal_lm("tiny-llama")[1]
    assert results["test/windows"] == len(gptq_windows(read_records(str(longer)), tok, 32))
    with pytest.raises(QatlabError, match=r"data.eval_source='wt2' is not known"):
        train(make_cfg(tmp_path, "experiment=tiny_smoke", "data.eval_source=wt2"))
