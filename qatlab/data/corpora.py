"""Raw documents per corpus and split, in a fixed order.

Offline sources split BY DOCUMENT with a stable hash (md5 of the title or index, mod 100):
< 80 train, < 90 validation, else test; see `assign_splits`.
"""

from __future__ import annotations

import bz2
import hashlib
import inspect
import itertools
import json
import re
from pathlib import Path

from qatlab.atomic import atomic_write_text
from qatlab.errors import QatlabError, require
from qatlab.models.embedded import default_cache_dir

SPLITS = ("train", "validation", "test")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
WIKI_CACHE = "gensim_wiki-v1.json"  # bump the version when the parsing changes
OFFLINE_HINT = "it needs internet or a populated Hugging Face cache (HF_HOME); offline, use data=wiki"


def load_documents(source: str, split: str, **kwargs) -> list[str]:
    """The documents of one split of `source`; kwargs are the source's options (data.source_kwargs)."""
    require(split in SPLITS, f"split='{split}' is not known; use one of {list(SPLITS)}")
    require(source in SOURCES, f"data.source='{source}' is not known; use one of {sorted(SOURCES)}")
    loader = SOURCES[source]
    allowed = set(inspect.signature(loader).parameters) - {"split"}
    if "cache_dir" not in allowed:  # every source is offered the cache; only some use it
        kwargs.pop("cache_dir", None)
    unknown = sorted(set(kwargs) - allowed)
    require(not unknown, f"data.source_kwargs has {unknown}, unknown for source '{source}'; valid: {sorted(allowed)}")
    docs = [d for d in loader(split, **kwargs) if d.strip()]
    require(docs, f"corpus '{source}' split '{split}' has no text; check its files/options or pick another data.source")
    return docs


# ---- splitting ---------------------------------------------------------------------------------


def hash_bucket(key: str) -> int:
    """0..99, stable across runs, machines and Python versions (unlike hash())."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 100


def assign_splits(keys: list[str]) -> dict[str, list[int]]:
    """Indices of `keys` per split, in the given order. With >= 3 keys no split is empty: an empty split
    takes the last member of the largest one (deterministic, rarely needed)."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, key in enumerate(keys):
        bucket = hash_bucket(key)
        out["train" if bucket < 80 else "validation" if bucket < 90 else "test"].append(i)
    for split in ("test", "validation"):
        donor = max(SPLITS, key=lambda s: len(out[s]))
        if not out[split] and len(out[donor]) > 1:
            out[split].append(out[donor].pop())
    return {s: sorted(idx) for s, idx in out.items()}


def _pick(docs: list[str], keys: list[str], split: str) -> list[str]:
    return [docs[i] for i in assign_splits(keys)[split]]


# ---- gensim test data (offline) -----------------------------------------------------------------


def gensim_test_data() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def load_gensim_wiki(split: str, cache_dir: str | None = None) -> list[str]:
    """~106 real English Wikipedia articles shipped with gensim, sorted by title, split by title hash."""
    articles = _cached_wiki_articles(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    titles = [a["title"] for a in articles]
    return _pick([a["text"] for a in articles], titles, split)


def _cached_wiki_articles(cache_dir: Path) -> list[dict]:
    """[{"title", "text"}] sorted by title; parsed once (~2 s), then read from json."""
    path = cache_dir / "corpora" / WIKI_CACHE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    articles = parse_wiki_dump(gensim_test_data() / WIKI_FILE)
    atomic_write_text(path, json.dumps(articles, ensure_ascii=False))
    return articles


def parse_wiki_dump(path: Path) -> list[dict]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(path) as dump:
        for title, markup, _pageid in extract_pages(dump):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = tidy_wiki_text(filter_wiki(markup))
            if text:
                articles.append({"title": title, "text": text})
    return sorted(articles, key=lambda a: a["title"])


def tidy_wiki_text(text: str) -> str:
    """Plain paragraphs: drop ''italic''/'''bold''' quotes, indents and empty list items; collapse blank lines."""
    text = re.sub(r"'{2,}", "", text)
    lines = [line.strip() for line in text.splitlines()]  # table cells come out indented
    lines = [line for line in lines if not re.fullmatch(r"[*#:;]+", line)]  # bullets whose link was stripped
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def load_gensim_lee(split: str) -> list[str]:
    """Short Australian news articles (one per line) shipped with gensim, split by line-index hash.
    Of the 300 lines 7 are exact repeats; they are dropped (first kept), so no text is in two splits."""
    lines = (gensim_test_data() / LEE_FILE).read_text(encoding="utf-8").splitlines()
    first = {}  # text -> line index of its first occurrence
    for i, line in enumerate(lines):
        first.setdefault(line.strip(), i)
    return _pick(list(first), [str(i) for i in first.values()], split)


# ---- Hugging Face hub (online or HF cache) ------------------------------------------------------


def load_wikitext2(split: str) -> list[str]:
    """WikiText-2 raw, its lines regrouped into articles (an article starts at a ' = Title = ' line)."""
    lines = wikitext2_lines(split)
    articles, current = [], []
    for line in lines:
        if re.fullmatch(r" = [^=].* = \n?", line) and current:
            articles.append("".join(current).strip())
            current = []
        current.append(line)
    articles.append("".join(current).strip())
    return articles


def wikitext2_lines(split: str) -> list[str]:
    """The dataset's rows as they are (GPTQ's testdata['text']): one line each, blank lines as ''."""
    return list(_hub_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=split)["text"])


# GPTQ's C4 files (IST-DASLab/gptq datautils.get_c4): shard 0 of each split, read whole, in file order.
C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def c4_shard_records(split: str) -> list[str]:
    """The texts of GPTQ's C4 shard for `split` (test = validation: C4 has no test split)."""
    hub_split = "train" if split == "train" else "validation"
    rows = _hub_dataset("c4", "allenai/c4", data_files={hub_split: C4_SHARDS[hub_split]}, split=hub_split)
    return list(rows["text"])


def load_c4(split: str, max_documents: int | None = None) -> list[str]:
    """The first `max_documents` of C4-en (streamed); C4 has no test split, so test = validation."""
    hub_split = "train" if split == "train" else "validation"
    n = max_documents or (20000 if split == "train" else 1100)
    stream = _hub_dataset("c4", "allenai/c4", "en", split=hub_split, streaming=True)
    try:
        return [row["text"] for row in itertools.islice(stream, n)]
    except Exception as e:  # streaming fails lazily, on the first read
        raise QatlabError(f"data.source='c4' could not be read ({e}); {OFFLINE_HINT}") from e


def _hub_dataset(source: str, *args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:
        raise QatlabError(f"data.source='{source}' could not be loaded ({e}); {OFFLINE_HINT}") from e


# ---- your own files -----------------------------------------------------------------------------


def load_local(
    split: str, path: str | None = None, text_field: str = "text", splits: dict[str, str] | None = None
) -> list[str]:
    """`splits` ({split: path}) gives each split its own file; else one `path` is split by document-index hash."""
    if splits:
        require(split in splits, f"data.source_kwargs.splits has no '{split}' entry; give a path for each of {SPLITS}")
        return read_local(splits[split], text_field, key=f"data.source_kwargs.splits.{split}")
    require(path is not None, "data.source_kwargs.path is missing; give a .txt/.jsonl file or a folder of .txt files")
    docs = read_local(path, text_field)
    return _pick(docs, [str(i) for i in range(len(docs))], split)


def read_local(path: str, text_field: str = "text", key: str = "data.source_kwargs.path") -> list[str]:
    """A .txt file (documents separated by blank lines), a folder of .txt files (one document each),
    or a .jsonl file (one document per line, in `text_field`)."""
    p = Path(path).expanduser()
    require(p.exists(), f"{key}='{path}' does not exist; give a .txt/.jsonl file or a folder of .txt files")
    if p.is_dir():
        return [read_text(f, key).strip() for f in sorted(p.glob("*.txt"))]
    if p.suffix == ".jsonl":
        return _read_jsonl(p, text_field, key)
    require(p.suffix == ".txt", f"{key}='{path}' is not a .txt or .jsonl file; convert it or pass a folder")
    return [doc.strip() for doc in re.split(r"\n\s*\n", read_text(p, key))]


def read_text(path: Path, key: str) -> str:
    """The file as UTF-8; a byte that is not UTF-8 is an error naming the file, line and byte offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise QatlabError(
            f"{key}: '{path}' is not UTF-8 text (line {line}, byte {e.start}: {data[e.start:e.start + 1]!r} "
            f"{e.reason}); convert it, e.g. iconv -f latin1 -t utf-8 '{path}' > fixed{path.suffix}"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it (universal newlines)


def _read_jsonl(path: Path, text_field: str, key: str = "data.source_kwargs.path") -> list[str]:
    docs = []
    for n, line in enumerate(read_text(path, key).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QatlabError(f"{key}: {path}:{n} is not valid JSON ({e.msg}, column {e.colno}); every line of a "
                              f".jsonl file must be one JSON object like {{\"{text_field}\": \"...\"}}: fix or delete "
                              "that line") from None
        require(isinstance(row, dict), f"{key}: {path}:{n} is a JSON {type(row).__name__}, not an object; every line "
                                       f"must be one JSON object like {{\"{text_field}\": \"...\"}}")
        require(text_field in row, f"{path}:{n} has no field '{text_field}'; set data.source_kwargs.text_field")
        docs.append(str(row[text_field]))
    return docs


# ---- raw records (the papers' evaluation protocols) ---------------------------------------------


def load_records(source: str, split: str, **kwargs) -> list[str]:
    """The split's raw records in their order, nothing dropped or regrouped: what the gptq protocols join or
    sample (qatlab.eval.protocols). wikitext2: the dataset's lines; c4: GPTQ's shard 0; local: the records of
    a file (read_records); the embedded corpora: their documents."""
    require(split in SPLITS, f"split='{split}' is not known; use one of {list(SPLITS)}")
    require(source in SOURCES, f"data.source='{source}' is not known; use one of {sorted(SOURCES)}")
    if source in ("wikitext2", "c4", "local"):
        kwargs.pop("cache_dir", None)
        kwargs.pop("max_documents", None)  # load_c4's option; the protocol reads GPTQ's whole shard
    if source == "wikitext2":
        records = wikitext2_lines(split)
    elif source == "c4":
        records = c4_shard_records(split)
    elif source == "local":
        unknown = sorted(set(kwargs) - {"path", "text_field", "splits"})
        require(not unknown, f"data.source_kwargs has {unknown}, unknown for source 'local'; "
                             "valid: ['path', 'splits', 'text_field']")
        records = local_records(split, **kwargs)
    else:
        records = load_documents(source, split, **kwargs)
    require(any(r.strip() for r in records),
            f"corpus '{source}' split '{split}' has no text; check its files/options or pick another data.source")
    return records


def local_records(split: str, path: str | None = None, text_field: str = "text",
                  splits: dict[str, str] | None = None) -> list[str]:
    """data=local for the gptq protocols: `splits` gives each split its file; one `path` serves every split."""
    if splits:
        require(split in splits, f"data.source_kwargs.splits has no '{split}' entry; give a path for each of {SPLITS}")
        return read_records(splits[split], text_field, key=f"data.source_kwargs.splits.{split}")
    require(path is not None, "data.source_kwargs.path is missing; give a .txt/.jsonl file or a folder of .txt files")
    return read_records(path, text_field)


def read_records(path: str, text_field: str = "text", key: str = "data.source_kwargs.path") -> list[str]:
    """Records in the shape of a Hugging Face text dataset: a .jsonl file gives its `text_field` per line
    (blank values kept); a .txt file gives its lines the way the hub's WikiText builder reads wiki.*.raw
    (each line with its newline; a blank line as ''), so a local copy of WikiText-2 scores exactly like the
    hub's; a folder gives one record per .txt file."""
    p = Path(path).expanduser()
    require(p.exists(), f"{key}='{path}' does not exist; give a .txt/.jsonl file or a folder of .txt files")
    if p.is_dir():
        return [f.read_text(encoding="utf-8") for f in sorted(p.glob("*.txt"))]
    if p.suffix == ".jsonl":
        return _read_jsonl(p, text_field)  # blank texts are kept (load_documents drops them)
    require(p.suffix == ".txt", f"{key}='{path}' is not a .txt or .jsonl file; convert it or pass a folder")
    with open(p, encoding="utf-8", newline="") as f:
        return [line if line.strip() else "" for line in f]


# ---- helpers ------------------------------------------------------------------------------------


SOURCES = {
    "gensim_wiki": load_gensim_wiki,
    "gensim_lee": load_gensim_lee,
    "wikitext2": load_wikitext2,
    "c4": load_c4,
    "local": load_local,
}
