"""Fault injection (issue 19): SIGKILL one run at points in every phase, resume it each time, and check that the
run that finally completes is identical to an uninterrupted one and that no half-written file is ever visible.

One run goes through every phase that writes durable state: teacher generation (data=teacher_generated),
BitDistiller's clip search, training (a checkpoint after every step), evaluation, the packed export and the
results files. The chain kills it 7 times, once per phase plus a torn checkpoint write (half the bytes on
disk, then SIGKILL); each time the next run is the same command with resume=auto. Where in a phase each
kill lands (which decoded shard, which layer, which step) is drawn from SEED, so a failure reproduces.

The runs are children of a forkserver that imported qatlab.train once (the import is most of a tiny run's
cost): each child composes the config and calls train(), exactly what `python -m qatlab` does, in its own
process, so SIGKILL is a real kill. The fault is a wrapper around one function, installed in the child only:
no hook in qatlab.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qatlab.checkpointing import safe_load
from qatlab.data.shards import damaged

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SEED = 19

RUN = [
    "experiment=tiny_smoke", "logger=none", "callbacks=model_checkpoint", "trainer.enable_checkpointing=true",
    "checkpoint.every_minutes=1e-9",  # last.ckpt after every step: a kill in training resumes mid-run
    "trainer.deterministic=true", "trainer.accelerator=cpu", "trainer.max_steps=4",
    "data=teacher_generated", "data.generation.num_samples=8", "data.generation.shard_size=2",
    "data.generation.batch_size=2", "data.block_size=32", "data.max_test_blocks=1", "data.eval_block_size=64",
    "data.max_eval_blocks=1",
    "method=bitdistiller", "init.grid=2", "loss.gamma_batches=2", "init_batches=1",
    "eval.rtn_baseline=false", "export=true",
]


def kill_points(seed: int) -> list[tuple[str, str, str, int]]:
    """(phase, function to wrap, mode, n): the run dies at the n-th call of the function.
    before: on entry; after: once it returned; torn: it wrote its file, which is then cut to half its size."""
    rng = random.Random(seed)
    return [
        ("generation", "qatlab.data.generation:decode", "before", rng.randint(2, 4)),  # 4 shards, one decode each
        ("clip search", "qatlab.inits.clip_search:search_layer_clip", "before", rng.randint(2, 9)),  # 10 layers
        ("checkpoint write", "torch:save", "torn", rng.randint(2, 3)),
        ("training", "qatlab.stages.qat_module:QATModule.training_step", "before", rng.randint(2, 3)),
        ("evaluation", "qatlab.train:perplexity", "before", 2),  # call 1 is the teacher's, 2 the student's
        ("export", "qatlab.export.ship:export_packed", "after", 1),  # written, not yet swapped in
        ("results writing", "qatlab.results:append_row", "before", 1),  # results.json written, the row not yet
    ]


# ---- the child process ----------------------------------------------------------------------------


def install_fault(target: str, mode: str, n: int) -> None:
    module_name, _, attr = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr.split(".")
    for part in parents:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), [0]

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return real(*args, **kwargs)
        if mode == "before":
            die()
        out = real(*args, **kwargs)
        if mode == "torn":  # torch.save(obj, path): the bytes of a write the kill cut short
            path = Path(args[1])
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        die()
        return out

    setattr(owner, name, wrapper)


def child(overrides: list[str], env: dict[str, str], fault: tuple[str, str, int] | None) -> None:
    os.environ.update(env)
    if fault is not None:
        install_fault(*fault)
    from hydra import compose, initialize_config_dir

    from qatlab.train import train

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)


# ---- the parent -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["qatlab.train"])
    return context


def run(context, base: Path, fault=None, resume=False) -> int:
    overrides = [*RUN, f"paths.output_dir={base / 'run'}", f"paths.cache_dir={base / 'cache'}",
                 f"model.cache_dir={os.environ['QATLAB_CACHE']}", f"init.cache_dir={base / 'cache' / 'clip'}",
                 f"results_file={base / 'results.jsonl'}", *(["resume=auto"] if resume else [])]
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads()), "TOKENIZERS_PARALLELISM": "false"}
    process = context.Process(target=child, args=(overrides, env, fault))
    process.start()
    process.join(timeout=600)
    return process.exitcode


def check_every_visible_file_is_whole(base: Path) -> list[Path]:
    """Every file under its real name loads; returns the hidden temp files (where a kill may leave half a write)."""
    temps = []
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(base).parts):
            temps.append(path)
        elif path.suffix == ".safetensors":
            assert damaged(path) is None, path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".ckpt":
            safe_load(path)
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
    return temps


def comparable(base: Path) -> dict:
    results = json.loads((base / "run" / "results.json").read_text())
    return {k: v for k, v in results.items() if k.startswith(("test/", "train/")) or k in ("method", "bits_per_weight")}


def seed_corpus_cache(source: Path, base: Path) -> None:
    """The parsed corpus and its packed blocks (no phase under test) copied in, to spare the time of making them."""
    for name in ("corpora", "blocks"):
        if (source / name).is_dir():
            shutil.copytree(source / name, base / "cache" / name, dirs_exist_ok=True)


def test_a_run_killed_in_every_phase_resumes_to_the_uninterrupted_result(tmp_path, forkserver):
    reference, chain = tmp_path / "reference", tmp_path / "chain"
    seed_corpus_cache(Path(os.environ["QATLAB_CACHE"]), reference)
    assert run(forkserver, reference) == 0  # uninterrupted: generates, searches, trains, evaluates, exports
    seed_corpus_cache(reference / "cache", chain)  # not its generated data nor its clip bounds
    points = kill_points(SEED)
    for i, (phase, target, mode, n) in enumerate(points):
        code = run(forkserver, chain, fault=(target, mode, n), resume=i > 0)
        assert code == -signal.SIGKILL, f"the run was to die in {phase} ({target} call {n}) but exited {code}"
        temps = check_every_visible_file_is_whole(chain)
        if phase == "generation":
            shards = sorted((chain / "cache" / "generated").glob("*/shard_*.safetensors"))
            assert len(shards) == n - 1  # the finished shards are kept
        if mode == "torn":
            torn = [t for t in temps if t.name.startswith(".last.ckpt-")]
            assert torn, "the torn write left no temp file"
            with pytest.raises(Exception):
                torch.load(torn[-1], weights_only=True)  # half a checkpoint: it exists, only under a hidden name
        if phase == "export":
            assert not (chain / "run" / "export").exists()  # the export not yet swapped in: no half of one
        if phase == "results writing":
            assert (chain / "run" / "results.json").is_file() and not (chain / "results.jsonl").exists()
    assert run(forkserver, chain, resume=True) == 0
    check_every_visible_file_is_whole(chain)

    assert comparable(chain) == comparable(reference)
    assert comparable(chain)["train/steps"] == 4
    rows = [json.loads(line) for line in (chain / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"]  # one row: the killed runs wrote none
    # what the interrupted runs wrote piece by piece equals what the uninterrupted one wrote at once
    for folder in ("cache/generated", "cache/clip", "run/export"):
        ours, theirs = (tensors_under(b / folder) for b in (chain, reference))
        assert ours.keys() == theirs.keys() and ours, folder
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (folder, key)
    assert not list((chain / "run" / "checkpoints").glob("last-v*.ckpt"))


def tensors_under(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{path.relative_to(folder)}:{name}": tensor for path in sorted(folder.rglob("*.safetensors"))
            for name, tensor in load_file(path).items()}
