"""Teacher-generated training text (LLM-QAT data-free, BitDistiller prompted): batched, resumable, sharded.

The schedule (data-free, prompt_tokens=0), by default the LLM-QAT reference's (facebookresearch/LLM-QAT
generate_data.py, which walks the vocabulary: GPU g takes the start ids g*500 .. g*500+499, and for
j = 3, 4, 5 calls generate(max_length=j, greedy) then generate(max_length=2048, do_sample=True)):
  - start ids: start=vocab walks the vocabulary in chunks of `vocab_chunk` ids; within chunk c, every
    entry of `greedy_tokens` in turn takes every id of the chunk (sample k -> `vocab_walk`). Sample k is
    the reference's k-th line once its per-GPU files are merged in GPU order (merge_gen_data.py);
    num_samples = len(greedy_tokens) x vocabulary covers every (start id, greedy count) pair once, and
    a larger count walks again with other random draws. start=random draws ids uniformly from the
    vocabulary minus special tokens instead (qatlab's earlier schedule).
  - the first greedy_tokens[j] new tokens by argmax (the reference: max_length j = 3, 4, 5 with the start
    token counted, i.e. 2, 3 or 4 greedy tokens); an int gives every sample the same count. A greedy
    EOS ends the greedy part early (HF generate stops there) and sampling continues after it, as the
    reference's second generate call does;
  - the rest sampled from softmax(logits / temperature) restricted to the top_k most likely tokens
    (HF generate's default top_k=50 applied to the reference's call; null = the full softmax), then
    top_p if set (HF's order: temperature, top-k, top-p);
  - stop_at_eos: a sample ends at the model's EOS (kept as its last token), as HF generate does; else
    every sample has `length` tokens (an EOS is just another token).
Samples are stored as token ids (start/prompt included, variable length with stop_at_eos). How they
become train blocks (`retokenize`, `append_eos`: qatlab.data.teacher_generated.pack_samples) is not part
of the samples: the reference writes decoded text (skip_special_tokens) to jsonl and its trainer
tokenizes each line again (BOS per line), concatenates and cuts model_max_length blocks.

Determinism: sample i draws its randomness from its own generator, seeded from (seed, i), and start
tokens are fixed by the schedule up front for all samples. So a sample does not depend on the batch it
was decoded in, on the rank that made it, or on an interruption (up to float differences between
batch shapes, which can flip a token only when two candidates tie to the last bit).

Sharding: samples are grouped into shards of `shard_size`; rank r of w makes the shards k with
k % w == r. (The reference splits the vocabulary of start tokens across GPUs; qatlab splits the
sample index space instead, which makes the same dataset and keeps it deterministic.)
A shard is written atomically once complete, so a killed run resumes at the first missing shard.
Each shard carries the SHA-256 of its data (qatlab.data.shards): loading checks every shard's size and
checksum and names a damaged one; a rerun deletes it (with a warning) and generates it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from qatlab.atomic import atomic_write_text
from qatlab.data.packing import tokenizer_fingerprint
from qatlab.data.shards import damaged, drop_if_damaged, save_checked
from qatlab.errors import QatlabError, require

FORMAT = "qatlab-generation-v2"  # bump when the decoding changes, so old caches are not reused (v2: LLM-QAT schedule)
MANIFEST = "manifest.json"
STARTS = ("vocab", "random")
PACKING_FIELDS = ("batch_size", "retokenize", "append_eos")  # do not change the samples: not in the cache key


@dataclass(frozen=True)
class GenerationConfig:
    num_samples: int = 64
    length: int = 512  # most tokens per sample, start/prompt tokens included (the reference: max_length=2048)
    batch_size: int = 16  # sequences decoded together; does not change the samples
    start: str = "vocab"  # vocab: the reference's vocabulary walk | random: uniform non-special ids
    vocab_chunk: int = 500  # start=vocab: ids per chunk (the reference's n_vocab start tokens per GPU)
    greedy_tokens: int | tuple[int, ...] = (2, 3, 4)  # per chunk pass (the reference: max_length 3, 4, 5); int = fixed
    temperature: float = 1.0  # LLM-QAT 1.0 (HF default); BitDistiller 0.7
    top_k: int | None = 50  # HF generate's default, which the reference's call used; null = the full softmax
    top_p: float | None = None  # null (or 1.0) = off
    stop_at_eos: bool = True  # end a sample at the model's EOS (HF generate); false = always `length` tokens
    seed: int = 0
    shard_size: int = 64  # samples per shard file: the unit of resume and of rank sharding
    prompt_tokens: int = 0  # 0 = data-free (one start token); >0 = corpus prompts of this length (BitDistiller)
    retokenize: bool = True  # train blocks: decode each sample (skip special tokens) and tokenize it again
    append_eos: bool = False  # train blocks: an EOS after each sample (OneBit's and BitDistiller's trainers)

    def __post_init__(self):
        for key in ("num_samples", "length", "batch_size", "shard_size", "vocab_chunk"):
            value = getattr(self, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"generation.{key}={value!r} must be a positive integer")
        require(self.start in STARTS, f"generation.start={self.start!r} is not known; use one of {list(STARTS)}")
        greedy = self.greedy_tokens
        counts = (greedy,) if isinstance(greedy, int) else tuple(greedy)
        require(len(counts) > 0 and all(isinstance(g, int) and not isinstance(g, bool) for g in counts),
                f"generation.greedy_tokens={greedy!r} must be an integer or a non-empty list of integers "
                "(the reference: [2, 3, 4])")
        require(
            all(0 <= g < self.length for g in counts),
            f"generation.greedy_tokens={greedy!r} must be >= 0 and < generation.length={self.length}",
        )
        object.__setattr__(self, "greedy_tokens", greedy if isinstance(greedy, int) else counts)
        require(self.temperature > 0,
                f"generation.temperature={self.temperature} must be > 0 (use greedy_tokens for top-1 tokens)")
        require(self.top_k is None or (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                                       and self.top_k > 0),
                f"generation.top_k={self.top_k!r} must be a positive integer or null (the full softmax)")
        require(self.top_p is None or 0 < self.top_p <= 1, f"generation.top_p={self.top_p} must be in (0, 1] or null")
        require(
            0 <= self.prompt_tokens < self.length,
            f"generation.prompt_tokens={self.prompt_tokens} must be >= 0 and < generation.length={self.length}",
        )
        for key in ("stop_at_eos", "retokenize", "append_eos"):
            require(isinstance(getattr(self, key), bool), f"generation.{key}={getattr(self, key)!r} must be true or false")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    @property
    def greedy_counts(self) -> tuple[int, ...]:
        return (self.greedy_tokens,) if isinstance(self.greedy_tokens, int) else self.greedy_tokens

    @property
    def fixed_length(self) -> bool:
        """Every sample has exactly `length` tokens and is used as one train block as it is."""
        return not (self.stop_at_eos or self.retokenize or self.append_eos)

    def shard_rows(self, k: int) -> range:
        """Global sample indices held by shard k."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples))


# ---- the dataset on disk ------------------------------------------------------------------------


def generation_dir(cache_dir, model_id: str, cfg: GenerationConfig, tokenizer=None,
                   prompts: torch.Tensor | None = None, eos: tuple[int, ...] = ()) -> Path:
    """<cache_dir>/generated/<hash of model, tokenizer, config, prompts, EOS ids>: different settings never mix.
    batch_size and the packing switches are left out of the key: they do not change the samples."""
    key = json.dumps({
        "format": FORMAT,
        "model": model_id,
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "config": content_fields(cfg),
        "prompts": tensor_digest(prompts),
        "eos": list(eos) if cfg.stop_at_eos else [],
    }, sort_keys=True)
    return Path(cache_dir).expanduser() / "generated" / hashlib.sha1(key.encode()).hexdigest()[:20]


def generate_dataset(model, tokenizer, out_dir, cfg: GenerationConfig, prompts: torch.Tensor | None = None,
                     rank: int = 0, world_size: int = 1, model_id: str | None = None) -> Path:
    """Write this rank's missing shards under out_dir (existing shards are kept: resume); return out_dir.
    prompts: (n, prompt_tokens) int64 when cfg.prompt_tokens > 0; sample i starts with prompts[i % n]."""
    require(0 <= rank < world_size, f"rank={rank} must be in [0, world_size={world_size})")
    out = Path(out_dir)
    vocab = vocab_size(model, tokenizer)
    starts, greedy = schedule(tokenizer, cfg, vocab, prompts)  # (num_samples, max(1, prompt_tokens)), (num_samples,)
    eos = eos_token_ids(model, tokenizer) if cfg.stop_at_eos else ()
    write_manifest(out, manifest(model, tokenizer, cfg, prompts, model_id, eos))
    mine = range(rank, cfg.num_shards, world_size)
    for k in mine:  # a truncated or corrupted shard is generated again
        drop_if_damaged(shard_path(out, k), "generated-data")
    todo = [k for k in mine if not shard_path(out, k).is_file()]
    bar = tqdm(total=sum(len(cfg.shard_rows(k)) for k in todo), desc=f"generate (rank {rank})", unit="sample")
    started, new_tokens = time.perf_counter(), 0
    with evaluating(model):
        for k in todo:
            pieces = []
            for rows in batches(cfg.shard_rows(k), cfg.batch_size):
                samples = decode(model, starts[rows], greedy[rows], cfg, sample_noise(cfg, rows), vocab, eos)
                pieces.extend(samples)
                new_tokens += sum(len(s) for s in samples) - len(rows) * starts.shape[1]
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
            save_shard(pieces, shard_path(out, k))
    bar.close()
    return out


def load_samples(out_dir) -> list[torch.Tensor]:
    """Every sample, in order, as a 1-D int64 tensor; an error if any shard is still missing."""
    out = Path(out_dir)
    path = out / MANIFEST
    require(path.is_file(), f"{out} has no {MANIFEST}; generate the dataset first (generate_dataset)")
    info = read_manifest(path)
    missing = [k for k in range(info["num_shards"]) if not shard_path(out, k).is_file()]
    require(
        not missing,
        f"{out} lacks {len(missing)} of {info['num_shards']} shards (first: {missing[:3]}); "
        "rerun the generation (data=teacher_generated resumes it) to finish them",
    )
    samples = []
    for k in range(info["num_shards"]):
        problem = damaged(shard_path(out, k))
        require(problem is None, f"generated-data shard '{shard_path(out, k)}' is damaged ({problem}); run again with "
                                 "data=teacher_generated: it generates that shard again")
        shard = load_file(shard_path(out, k))
        samples.extend(shard["input_ids"].split(shard["lengths"].tolist()))
    return samples


def load_generated(out_dir) -> torch.Tensor:
    """(num_samples, length) int64 for fixed-length samples (stop_at_eos=false); see load_samples otherwise."""
    samples = load_samples(out_dir)
    lengths = {len(s) for s in samples}
    require(len(lengths) == 1, f"{out_dir} holds samples of {len(lengths)} different lengths (stop_at_eos); "
                               "read them with load_samples")
    return torch.stack(samples)


def is_complete(out_dir) -> bool:
    """Every shard is there and whole (a damaged one makes the dataset incomplete: generate_dataset redoes it)."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        return False
    n = read_manifest(out / MANIFEST)["num_shards"]
    return all(shard_path(out, k).is_file() and damaged(shard_path(out, k)) is None for k in range(n))


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QatlabError(f"generated-data manifest '{path}' is not readable JSON ({e}); delete the folder "
                          f"{path.parent} so the next run generates the data again") from None


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard_{k:05d}.safetensors"


def save_shard(samples: list[torch.Tensor], path: Path) -> None:
    """The samples of one shard, concatenated, with their lengths, checksummed (qatlab.data.shards). Temp file in
    the same folder, then rename: a kill never leaves half a shard under the real name (a kill between the two
    leaves a hidden .tmp file, which nothing reads)."""
    flat = torch.cat([s.to(torch.int64) for s in samples]).contiguous()
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.int64)
    save_checked({"input_ids": flat, "lengths": lengths}, path)


def manifest(model, tokenizer, cfg: GenerationConfig, prompts, model_id: str | None,
             eos: tuple[int, ...] = ()) -> dict:
    return {
        "format": FORMAT,
        "config": content_fields(cfg),
        "model": model_identity(model, model_id),
        "tokenizer_vocab_size": len(tokenizer),
        "prompts": tensor_digest(prompts),
        "eos": list(eos),
        "num_samples": cfg.num_samples,
        "num_shards": cfg.num_shards,
    }


def write_manifest(out: Path, info: dict) -> None:
    """Create the manifest, or check that the existing one describes the same dataset."""
    path = out / MANIFEST
    if path.is_file():
        old = read_manifest(path)
        require(
            old == info,
            f"{out} holds samples made with other settings ({MANIFEST} differs); use another out_dir "
            "(generation_dir keys it by model and config) or delete that folder",
        )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True))


def content_fields(cfg: GenerationConfig) -> dict:
    """The config fields that decide the samples (batch_size and the packing switches do not)."""
    fields = dataclasses.asdict(cfg)
    for key in PACKING_FIELDS:
        fields.pop(key)
    fields["greedy_tokens"] = list(cfg.greedy_counts) if not isinstance(cfg.greedy_tokens, int) else cfg.greedy_tokens
    return fields


def model_identity(model, model_id: str | None = None) -> str:
    """'<id>|<dtype>|<digest>': the digest hashes the config and a few weights of every tensor, so two
    random inits or two checkpoints in the same folder never share a cache."""
    name = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
    h = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    for p in model.state_dict().values():
        h.update(p.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return f"{name}|{next(model.parameters()).dtype}|{h.hexdigest()[:16]}"


def tensor_digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha1(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ---- the schedule: start tokens, greedy counts, randomness ---------------------------------------


def schedule(tokenizer, cfg: GenerationConfig, vocab: int,
             prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """((num_samples, s) start ids, (num_samples,) greedy counts): s = 1 start token (data-free) or
    s = prompt_tokens corpus tokens. start=vocab: `vocab_walk`; else a list of greedy counts cycles by
    sample index."""
    n = cfg.num_samples
    counts = cfg.greedy_counts
    cycled = torch.tensor([counts[i % len(counts)] for i in range(n)], dtype=torch.int64)
    if cfg.prompt_tokens == 0:
        require(prompts is None, "prompts were given but generation.prompt_tokens=0; set prompt_tokens to their length")
        if cfg.start == "random":
            return start_tokens(tokenizer, n, cfg.seed)[:, None], cycled
        walk = [vocab_walk(k, vocab, cfg.vocab_chunk, counts) for k in range(n)]
        return (torch.tensor([t for t, _ in walk], dtype=torch.int64)[:, None],
                torch.tensor([g for _, g in walk], dtype=torch.int64))
    require(
        prompts is not None and prompts.ndim == 2 and prompts.shape[1] == cfg.prompt_tokens and len(prompts) > 0,
        f"generation.prompt_tokens={cfg.prompt_tokens} needs prompts of shape (n, {cfg.prompt_tokens}); "
        f"got {None if prompts is None else tuple(prompts.shape)}",
    )
    rows = torch.arange(n) % len(prompts)  # fewer prompts than samples: reuse them in order
    return prompts[rows].to(torch.int64), cycled


def vocab_walk(k: int, vocab: int, chunk: int, greedy: tuple[int, ...]) -> tuple[int, int]:
    """(start id, greedy count) of sample k: the LLM-QAT reference's loops, per chunk c of `chunk` ids
    (its GPU c): for each greedy count g in order, for each id of the chunk. The last chunk may be short;
    past len(greedy) x vocab samples the walk starts again."""
    n = len(greedy)
    k %= n * vocab
    c, r = divmod(k, n * chunk)
    size = min(chunk, vocab - c * chunk)
    j, i = divmod(r, size)
    return c * chunk + i, greedy[j]


def start_tokens(tokenizer, n: int, seed: int) -> torch.Tensor:
    """(n,) ids drawn uniformly from the vocabulary minus special tokens, from a generator seeded by seed
    (start=random)."""
    allowed = torch.tensor(sorted(set(range(len(tokenizer))) - special_ids(tokenizer)))
    picks = torch.randint(len(allowed), (n,), generator=torch.Generator().manual_seed(seed))
    return allowed[picks]


def special_ids(tokenizer) -> set[int]:
    """all_special_ids plus added tokens flagged special (SmolLM2 has 17, all_special_ids lists 3)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


def eos_token_ids(model, tokenizer=None) -> tuple[int, ...]:
    """The ids HF generate stops at: the model's generation_config.eos_token_id (an int or a list), else its
    config's, else the tokenizer's."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return tuple(sorted({eos} if isinstance(eos, int) else set(eos)))
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (eos,)


def sample_noise(cfg: GenerationConfig, rows: range) -> torch.Tensor:
    """(B, length) float64 uniforms in [0, 1); row i comes from the generator of sample i only."""
    return torch.stack([
        torch.rand(cfg.length, generator=torch.Generator().manual_seed(sample_seed(cfg.seed, i)), dtype=torch.float64)
        for i in rows
    ])


def sample_seed(seed: int, i: int) -> int:
    """A well-mixed 63-bit seed per (seed, sample index)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1


def batches(rows: range, batch_size: int) -> list[range]:
    return [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]


# ---- decoding -----------------------------------------------------------------------------------


def decode(model, starts: torch.Tensor, greedy: torch.Tensor | int, cfg: GenerationConfig, noise: torch.Tensor,
           vocab: int, eos: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """(B, s) start ids, (B,) greedy counts -> B samples (1-D ids on the CPU, start included). All rows advance
    together through the KV cache. Row b's new token k is the argmax while it has greedy tokens left (a greedy
    EOS ends its greedy part), else drawn by `sample_token` at noise[b, k]; a sampled EOS ends the row
    (kept as its last token) when eos is given; rows that ended are carried along and trimmed."""
    device = next(model.parameters()).device
    batch, s = starts.shape
    left = (torch.full((batch,), greedy) if isinstance(greedy, int) else greedy.clone()).to(device)
    eos_ids = torch.tensor(list(eos), dtype=torch.int64, device=device)
    lengths = torch.full((batch,), cfg.length, dtype=torch.int64)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    ids = starts.to(device)  # (B, s)
    step_input, past = ids, None
    cache_kw = cache_keyword(model)
    for k in range(cfg.length - s):
        out = model(input_ids=step_input, use_cache=True, **{cache_kw: past})
        past = getattr(out, cache_kw)
        logits = out.logits[:, -1, :vocab].float()  # (B, V); rows past the tokenizer are padding
        use_greedy = left > 0
        nxt = torch.where(use_greedy, logits.argmax(-1),
                          sample_token(logits, cfg.temperature, cfg.top_p, noise[:, k].to(device), cfg.top_k))
        left = left - 1
        if len(eos_ids):
            is_eos = torch.isin(nxt, eos_ids)
            left = torch.where(use_greedy & is_eos, torch.zeros_like(left), left)  # HF's greedy call stops here
            stop = is_eos & ~use_greedy & ~done
            lengths[stop.cpu()] = s + k + 1
            done |= stop
        step_input = nxt[:, None]  # (B, 1)
        ids = torch.cat([ids, step_input], dim=1)
        if bool(done.all()):
            break
    ids = ids.cpu()
    return [ids[b, : lengths[b]].clone() for b in range(batch)]


def cache_keyword(model) -> str:
    """The KV-cache argument/output name: `cache` from transformers 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_token(logits: torch.Tensor, temperature: float, top_p: float | None, u: torch.Tensor,
                 top_k: int | None = None) -> torch.Tensor:
    """(B, V) logits, (B,) uniforms -> (B,) ids: inverse-CDF sampling from softmax(logits / temperature), kept
    to the top_k largest (HF's TopKLogitsWarper: every token tied with the k-th stays), then to the top_p
    nucleus. Inverse CDF (not torch.multinomial) so that each row uses its own uniform: batch-independent."""
    scores = logits / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p is not None and top_p < 1:
        probs = nucleus(probs, top_p)
    cdf = probs.double().cumsum(-1)  # (B, V); float64 so the tail of a 50k vocab keeps its mass
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)  # (B, 1), scaled: the kept mass is not renormalized
    picks = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    # a zero-probability token sits on a flat stretch of the CDF and is never the first index past target
    return picks


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches top_p (the top-1 stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # mass before this token still short of top_p
    return probs * torch.zeros_like(keep).scatter(-1, order, keep)


def vocab_size(model, tokenizer) -> int:
    """Tokens that may be produced: the tokenizer's, when the embedding matrix is padded beyond it."""
    return min(len(tokenizer), model.config.vocab_size)


@contextmanager
def evaluating(model):
    """eval() and no autograd for the duration; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
