"""Teacher-generated training text (LLM-QAT data-free, BitDistiller prompted): batched, resumable, sharded.

Each sample starts from one random non-special vocabulary token (prompt_tokens=0, LLM-QAT) or from a
corpus prompt of prompt_tokens tokens (BitDistiller), then the teacher extends it to `length` tokens:
the first `greedy_tokens` new tokens by argmax, the rest sampled from softmax(logits / temperature)
(optionally top-p). There is no stopping: an EOS is just another token, every sample has `length` tokens.

Determinism: sample i draws its randomness from its own generator, seeded from (seed, i), and start
tokens are drawn up front for all samples. So a sample does not depend on the batch it was decoded in,
on the rank that made it, or on an interruption (up to float differences between batch shapes, which
can flip a token only when two candidates tie to the last bit).

Sharding: samples are grouped into shards of `shard_size`; rank r of w makes the shards k with
k % w == r. (LLM-QAT's reference splits the vocabulary of start tokens across GPUs; qatlab splits the
sample index space instead, which gives the same distribution and keeps the dataset deterministic.)
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

FORMAT = "qatlab-generation-v1"  # bump when the decoding changes, so old caches are not reused
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GenerationConfig:
    num_samples: int = 64
    length: int = 512  # tokens per sample, start/prompt tokens included
    batch_size: int = 16  # sequences decoded together; does not change the samples
    greedy_tokens: int = 4  # the first N new tokens are top-1 (LLM-QAT: 3-5)
    temperature: float = 1.0  # LLM-QAT 1.0; BitDistiller 0.7
    top_p: float | None = None
    seed: int = 0
    shard_size: int = 64  # samples per shard file: the unit of resume and of rank sharding
    prompt_tokens: int = 0  # 0 = data-free (one random start token); >0 = corpus prompts of this length

    def __post_init__(self):
        for key in ("num_samples", "length", "batch_size", "shard_size"):
            value = getattr(self, key)
            require(isinstance(value, int) and value > 0, f"generation.{key}={value} must be a positive integer")
        require(
            0 <= self.greedy_tokens < self.length,
            f"generation.greedy_tokens={self.greedy_tokens} must be >= 0 and < generation.length={self.length}",
        )
        require(self.temperature > 0,
                f"generation.temperature={self.temperature} must be > 0 (use greedy_tokens for top-1 tokens)")
        require(self.top_p is None or 0 < self.top_p <= 1, f"generation.top_p={self.top_p} must be in (0, 1] or null")
        require(
            0 <= self.prompt_tokens < self.length,
            f"generation.prompt_tokens={self.prompt_tokens} must be >= 0 and < generation.length={self.length}",
        )

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_rows(self, k: int) -> range:
        """Global sample indices held by shard k."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples))


# ---- the dataset on disk ------------------------------------------------------------------------


def generation_dir(cache_dir, model_id: str, cfg: GenerationConfig, tokenizer=None,
                   prompts: torch.Tensor | None = None) -> Path:
    """<cache_dir>/generated/<hash of model, tokenizer, config, prompts>: different settings never mix.
    batch_size is left out of the key: it does not change the samples, so a resume may use another one."""
    key = json.dumps({
        "format": FORMAT,
        "model": model_id,
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "config": content_fields(cfg),
        "prompts": tensor_digest(prompts),
    }, sort_keys=True)
    return Path(cache_dir).expanduser() / "generated" / hashlib.sha1(key.encode()).hexdigest()[:20]


def generate_dataset(model, tokenizer, out_dir, cfg: GenerationConfig, prompts: torch.Tensor | None = None,
                     rank: int = 0, world_size: int = 1, model_id: str | None = None) -> Path:
    """Write this rank's missing shards under out_dir (existing shards are kept: resume); return out_dir.
    prompts: (n, prompt_tokens) int64 when cfg.prompt_tokens > 0; sample i starts with prompts[i % n]."""
    require(0 <= rank < world_size, f"rank={rank} must be in [0, world_size={world_size})")
    out = Path(out_dir)
    starts = start_sequences(tokenizer, cfg, prompts)  # (num_samples, max(1, prompt_tokens))
    write_manifest(out, manifest(model, tokenizer, cfg, prompts, model_id))
    mine = range(rank, cfg.num_shards, world_size)
    for k in mine:  # a truncated or corrupted shard is generated again
        drop_if_damaged(shard_path(out, k), "generated-data")
    todo = [k for k in mine if not shard_path(out, k).is_file()]
    bar = tqdm(total=sum(len(cfg.shard_rows(k)) for k in todo), desc=f"generate (rank {rank})", unit="sample")
    started, new_tokens, vocab = time.perf_counter(), 0, vocab_size(model, tokenizer)
    with evaluating(model):
        for k in todo:
            pieces = []
            for rows in batches(cfg.shard_rows(k), cfg.batch_size):
                pieces.append(decode(model, starts[rows], cfg, sample_noise(cfg, rows), vocab))
                new_tokens += len(rows) * (cfg.length - starts.shape[1])
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
            save_shard(torch.cat(pieces), shard_path(out, k))
    bar.close()
    return out


def load_generated(out_dir) -> torch.Tensor:
    """(num_samples, length) int64: all shards in order; an error if any shard is still missing."""
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
    for k in range(info["num_shards"]):
        problem = damaged(shard_path(out, k))
        require(problem is None, f"generated-data shard '{shard_path(out, k)}' is damaged ({problem}); run again with "
                                 "data=teacher_generated: it generates that shard again")
    return torch.cat([load_file(shard_path(out, k))["input_ids"] for k in range(info["num_shards"])])


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


def save_shard(ids: torch.Tensor, path: Path) -> None:
    """Temp file in the same folder, then rename: a kill never leaves half a shard under the real name.
    (A kill between the two leaves a hidden .tmp file, which nothing reads.)"""
    save_checked({"input_ids": ids.contiguous()}, path)


def manifest(model, tokenizer, cfg: GenerationConfig, prompts, model_id: str | None) -> dict:
    return {
        "format": FORMAT,
        "config": content_fields(cfg),
        "model": model_identity(model, model_id),
        "tokenizer_vocab_size": len(tokenizer),
        "prompts": tensor_digest(prompts),
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
    """The config fields that decide the samples (batch_size does not)."""
    fields = dataclasses.asdict(cfg)
    fields.pop("batch_size")
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


# ---- start tokens and randomness ----------------------------------------------------------------


def start_sequences(tokenizer, cfg: GenerationConfig, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """(num_samples, s) int64: s = 1 random start token (data-free) or s = prompt_tokens corpus tokens."""
    if cfg.prompt_tokens == 0:
        require(prompts is None, "prompts were given but generation.prompt_tokens=0; set prompt_tokens to their length")
        return start_tokens(tokenizer, cfg.num_samples, cfg.seed)[:, None]
    require(
        prompts is not None and prompts.ndim == 2 and prompts.shape[1] == cfg.prompt_tokens and len(prompts) > 0,
        f"generation.prompt_tokens={cfg.prompt_tokens} needs prompts of shape (n, {cfg.prompt_tokens}); "
        f"got {None if prompts is None else tuple(prompts.shape)}",
    )
    rows = torch.arange(cfg.num_samples) % len(prompts)  # fewer prompts than samples: reuse them in order
    return prompts[rows].to(torch.int64)


def start_tokens(tokenizer, n: int, seed: int) -> torch.Tensor:
    """(n,) ids drawn uniformly from the vocabulary minus special tokens, from a generator seeded by seed."""
    allowed = torch.tensor(sorted(set(range(len(tokenizer))) - special_ids(tokenizer)))
    picks = torch.randint(len(allowed), (n,), generator=torch.Generator().manual_seed(seed))
    return allowed[picks]


def special_ids(tokenizer) -> set[int]:
    """all_special_ids plus added tokens flagged special (SmolLM2 has 17, all_special_ids lists 3)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


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


def decode(model, starts: torch.Tensor, cfg: GenerationConfig, noise: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, s) start ids -> (B, length) ids on the CPU. All rows advance together through the KV cache;
    new token k uses argmax while k < greedy_tokens, else the inverse CDF at noise[:, k]."""
    device = next(model.parameters()).device
    ids = starts.to(device)  # (B, s)
    step_input, past = ids, None
    cache_kw = cache_keyword(model)
    for k in range(cfg.length - starts.shape[1]):
        out = model(input_ids=step_input, use_cache=True, **{cache_kw: past})
        past = getattr(out, cache_kw)
        logits = out.logits[:, -1, :vocab].float()  # (B, V); rows past the tokenizer are padding
        if k < cfg.greedy_tokens:
            nxt = logits.argmax(-1)
        else:
            nxt = sample_token(logits, cfg.temperature, cfg.top_p, noise[:, k].to(device))
        step_input = nxt[:, None]  # (B, 1)
        ids = torch.cat([ids, step_input], dim=1)
    return ids.cpu()


def cache_keyword(model) -> str:
    """The KV-cache argument/output name: `cache` from transformers 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_token(logits: torch.Tensor, temperature: float, top_p: float | None, u: torch.Tensor) -> torch.Tensor:
    """(B, V) logits, (B,) uniforms -> (B,) ids: inverse-CDF sampling from softmax(logits / temperature).
    Inverse CDF (not torch.multinomial) so that each row uses its own uniform: batch-independent."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None:
        probs = nucleus(probs, top_p)
    cdf = probs.double().cumsum(-1)  # (B, V); float64 so the tail of a 50k vocab keeps its mass
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)  # (B, 1), scaled: the nucleus is not renormalized
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


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
