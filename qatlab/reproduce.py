"""`python -m qatlab.reproduce <card> [overrides]`: run a recipe card and set its number beside the published one.

A card is an experiment (conf/experiment/<card>.yaml) with a `card:` block: the paper and its reference code,
the reference hyperparameters (config key -> value, checked by tests/test_cards.py), the data, the evaluation
protocol (qatlab.eval.protocols.NAMED), the published metric with a tolerance and the hardware it needs. The
run ignores the block; this command reads it:

    python -m qatlab.reproduce bitdistiller_llama2_7b_w2                 # on the hardware the card names
    python -m qatlab.reproduce onebit_llama7b trainer.max_steps=100      # any override of the experiment
    python -m qatlab.reproduce llm_qat_llama7b --dry-run                 # print the card and the composed values
    python -m qatlab.reproduce efficientqat_llama2_7b_w2g64 --tiny       # 2 steps on tiny_llama, CPU, offline

It refuses up front, in one line, when the card's hardware is absent (CUDA GPUs and their memory) or a value the
card needs is missing, unless --tiny or --dry-run is given; runs the experiment through qatlab.train.train; prints
measured vs published +- tolerance (met / not met); and appends a `status: reproduce` row with those fields to the
results store (results_file, as every run's own row). --tiny swaps in the tiny random Llama, a small local text
in WikiText-2's raw shape (written from the embedded corpus) and tiny counts, and keeps everything else of the
card (method, data path, eval protocol, stages): a wiring check, whose number is not compared.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qatlab.errors import QatlabError, require

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CARD_KEYS = ("paper", "arxiv", "reference", "model", "data", "protocol", "metric", "metric_name", "published",
             "published_in", "tolerance", "higher_is_better", "hardware", "reference_hparams", "deviations")
TINY_FILE = "tiny_wikitext.txt"


# ---- cards ---------------------------------------------------------------------------------------


def card_names() -> list[str]:
    """Experiments that carry a `card:` block."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                  if "\ncard:" in p.read_text(encoding="utf-8"))


def compose_card(name: str, overrides: list[str] = (), tiny: bool = False, output_dir: str | None = None) -> DictConfig:
    """The config `python -m qatlab experiment=<name> <overrides>` runs (with --tiny: plus `tiny_overrides`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    require(name in card_names(), f"card '{name}' is not known; cards (conf/experiment/ with a card: block): "
                                  f"{', '.join(card_names())}")
    out = output_dir or str(Path("outputs") / "reproduce" / name / time.strftime("%Y-%m-%d_%H-%M-%S"))
    base = [f"experiment={name}", f"paths.output_dir={out}", *overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=base)
            if tiny:  # the card's own overrides last: they win over the tiny ones
                cfg = compose("train", overrides=[*base[:2], *tiny_overrides(cfg), *base[2:]])
    except (HydraException, OmegaConfBaseException) as e:
        raise QatlabError(f"card '{name}' with overrides {list(overrides)} does not compose: "
                          f"{str(e).strip().splitlines()[0]}") from None
    return cfg


def tiny_overrides(cfg: DictConfig) -> list[str]:
    """Overrides that shrink a card to seconds on a CPU and keep its wiring: tiny_llama, a tiny WikiText-shaped
    local file for every corpus, 2 steps, small generation/stage/init counts, groups of 32, CPU precision, offline
    zero-shot (the `analogies` task)."""
    text = tiny_corpus(cfg.paths.cache_dir)
    out = ["model=tiny_llama", "model.name_or_path=tiny-llama", "trainer=cpu", "trainer.devices=1",
           "trainer.max_steps=2", "trainer.val_check_interval=1", "++trainer.limit_val_batches=1",
           "trainer.accumulate_grad_batches=1", "logger=none", "callbacks=none", "init_batches=2",
           "data.source=local", f"++data.source_kwargs.path={text}", "data.block_size=16", "data.eval_block_size=32",
           "data.batch_size=2", "data.max_train_blocks=8", "data.max_eval_blocks=1", "data.max_test_blocks=2",
           "data.eval_windows=2"]
    if cfg.data.get("eval_source"):
        out += ["data.eval_source=local", f"++data.eval_source_kwargs.path={text}"]
    generation = cfg.data.get("generation")
    if generation is not None:
        out += ["data.generation.num_samples=6", "data.generation.length=16", "data.generation.batch_size=6",
                "data.generation.shard_size=3"]
        if generation.get("prompt_tokens"):
            out.append("data.generation.prompt_tokens=4")
    weight = cfg.method.get("weight") or {}
    if weight.get("group_size") and weight.get("group_size") > 32:  # tiny_llama is 64 wide (MLP 128)
        out.append("method.weight.group_size=32")
    if not str(cfg.optimizer.get("_target_", "")).startswith("torch."):  # bitsandbytes optimizers need CUDA
        out.append("optimizer=adamw")
    for name, stage in (cfg.get("stages") or {}).items():
        if stage is not None and "steps" in stage and "samples" in stage:  # a blockwise stage
            out += [f"stages.{name}.steps=2", f"stages.{name}.samples=2", f"stages.{name}.batch_size=1",
                    f"stages.{name}.precision=32-true", f"stages.{name}.accelerator=cpu"]
    if cfg.get("init") is not None and "tokens" in cfg.init:
        out.append("init.tokens=64")
    if cfg.get("loss") is not None and "gamma_batches" in cfg.loss:
        out.append("loss.gamma_batches=1")
    if (cfg.eval.get("zero_shot") or {}).get("tasks"):
        out += ["eval.zero_shot.tasks=[analogies]", "eval.zero_shot.limit=4", "eval.zero_shot.batch_size=2"]
    return out


def tiny_corpus(cache_dir: str) -> Path:
    """A small text in the shape of WikiText-2's raw files (" = Title = " lines, blank lines, paragraph lines),
    written once from the embedded corpus's test articles."""
    from qatlab.atomic import atomic_write_text
    from qatlab.data.corpora import load_documents

    path = Path(cache_dir).expanduser() / "reproduce" / TINY_FILE
    if not path.is_file():
        lines = []
        for article in load_documents("gensim_wiki", "test", cache_dir=cache_dir)[:6]:
            title, *paragraphs = [p.strip() for p in article.split("\n") if p.strip()]
            lines += [" \n", f" = {title} = \n", " \n"] + [f" {p} \n" for p in paragraphs[:20]]
        atomic_write_text(path, "".join(lines))
    return path


# ---- checks before running ------------------------------------------------------------------------


def check_hardware(name: str, card: DictConfig) -> None:
    """One line when the machine lacks the card's CUDA GPUs (count, and memory per GPU)."""
    import torch

    need = card.get("hardware") or {}
    gpus, memory = int(need.get("gpus", 0) or 0), need.get("gpu_memory_gb")
    if gpus == 0:
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sizes = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(have)]
    enough = [s for s in sizes if memory is None or s >= 0.9 * memory]
    what = f"{gpus} CUDA GPU{'s' if gpus > 1 else ''}" + (f" with >= {memory} GB each" if memory else "")
    found = f"{have} ({', '.join(f'{s:.0f} GB' for s in sizes)})" if have else "none"
    require(len(enough) >= gpus, f"card '{name}' needs {what} (card.hardware); this machine has {found}; run it "
                                 "there, or use --tiny (2 steps on tiny_llama, CPU) or --dry-run (print the card)")


def check_complete(name: str, cfg: DictConfig) -> None:
    """One line naming the values the card leaves for the user (??? in the experiment)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    require(not missing, f"card '{name}' needs {', '.join(missing)} (??? in conf/experiment/{name}.yaml); pass "
                         f"them: python -m qatlab.reproduce {name} " + " ".join(f"{k}=..." for k in missing))


# ---- measuring and comparing ----------------------------------------------------------------------


def measure(card: DictConfig, results: dict[str, Any], tasks: list[str] | None = None) -> float | None:
    """The card's metric from a run's results: a results key, or zero_shot_avg (mean acc over tasks, percent)."""
    metric = card.metric
    if metric == "zero_shot_avg":
        tasks = list(tasks if tasks is not None else card.tasks)
        scores = [results.get(f"test/{t}/acc") for t in tasks]
        require(all(isinstance(s, (int, float)) for s in scores),
                f"card.metric=zero_shot_avg needs test/<task>/acc for {tasks}; the run has "
                f"{sorted(k for k in results if k.endswith('/acc'))}")
        return 100 * sum(scores) / len(scores)
    value = results.get(metric)
    require(isinstance(value, (int, float)), f"card.metric='{metric}' is not in the run's results; it has "
                                             f"{sorted(k for k in results if k.startswith('test/'))}")
    return float(value)


def compare(measured: float | None, card: DictConfig) -> tuple[bool | None, str]:
    """(met, verdict): met = |measured - published| <= tolerance; None when the card has no published number."""
    published, tolerance = card.get("published"), card.get("tolerance")
    if published is None or measured is None or tolerance is None:
        return None, "no published number to compare with"
    if not math.isfinite(measured):
        return False, "not met (the measured value is not finite)"
    diff = measured - published
    if abs(diff) <= tolerance:
        return True, "met"
    better = diff > 0 if card.get("higher_is_better") else diff < 0
    return False, f"not met ({'better' if better else 'worse'} by {abs(diff):.3g}" + (
        "; check the protocol)" if better else ")")


def report_line(name: str, card: DictConfig, measured: float | None, verdict: str, tiny: bool) -> str:
    shown = "n/a" if measured is None else f"{measured:.4g}"
    if tiny:
        return (f"{name} (--tiny wiring check): {card.metric_name}: measured {shown}; the published "
                f"{card.get('published')} belongs to the full card and is not compared")
    published = card.get("published")
    target = "no published number" if published is None else f"published {published} +- {card.get('tolerance')}"
    return f"{name}: {card.metric_name}: measured {shown} vs {target} ({card.get('published_in')}): {verdict}"


def reproduce_row(name: str, card: DictConfig, measured: float | None, met: bool | None, tiny: bool,
                  results: dict[str, Any], cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    from qatlab.train import git_commit

    import torch

    row = {"status": "reproduce", "card": name, "paper": card.get("paper"), "arxiv": card.get("arxiv"),
           "metric": card.metric, "metric_name": card.get("metric_name"), "protocol": card.get("protocol"),
           "measured": measured, "published": card.get("published"), "tolerance": card.get("tolerance"),
           "higher_is_better": card.get("higher_is_better"), "met": met, "tiny": tiny,
           "task_name": cfg.task_name, "model": cfg.model.name_or_path, "overrides": " ".join(overrides),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "git_commit": git_commit(), "output_dir": str(cfg.paths.output_dir),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    row.update({k: v for k, v in results.items() if k.startswith("test/ppl")})
    return row


def describe(name: str, cfg: DictConfig) -> str:
    """The card and, for each reference hyperparameter, the composed value beside it (--dry-run)."""
    card = cfg.card
    lines = [f"card {name}: {card.get('paper')} (arXiv {card.get('arxiv')})", f"  reference: {card.get('reference')}",
             f"  model: {card.get('model')}  bits: {card.get('bits')}", f"  data: {card.get('data')}",
             f"  protocol: {card.get('protocol')}  metric: {card.get('metric_name')} ({card.metric})",
             f"  published: {card.get('published')} +- {card.get('tolerance')} ({card.get('published_in')})",
             f"  hardware: {OmegaConf.to_container(card.get('hardware') or {})}", "  reference hyperparameters:"]
    for key, value in (card.get("reference_hparams") or {}).items():
        have = OmegaConf.select(cfg, key, default="<absent>")
        have = OmegaConf.to_container(have) if OmegaConf.is_config(have) else have
        want = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        lines.append(f"    {key} = {have}" + ("" if have == want else f"   (card: {want})"))
    for title in ("deviations", "open"):
        for item in card.get(title) or []:
            lines.append(f"  {title[:-1] if title == 'deviations' else 'open'}: {item}")
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------


def run_card(name: str, overrides: list[str] = (), tiny: bool = False, dry_run: bool = False,
             output_dir: str | None = None) -> dict[str, Any]:
    """Compose, check, run, compare, record; returns the reproduce row (dry run: {"status": "dry-run"})."""
    overrides = list(overrides)
    cfg = compose_card(name, overrides, tiny=tiny, output_dir=output_dir)
    card = cfg.card
    if dry_run:
        print(describe(name, cfg))
        return {"status": "dry-run", "card": name}
    if not tiny:
        check_hardware(name, card)
    check_complete(name, cfg)
    for item in card.get("open") or []:
        logging.getLogger("qatlab").warning("card %s, open: %s", name, item)
    from qatlab.results import append_row
    from qatlab.train import train

    results = train(cfg)
    tasks = list(cfg.eval.zero_shot.tasks) if tiny and card.metric == "zero_shot_avg" else None
    measured = measure(card, results, tasks)
    met, verdict = compare(measured, card) if not tiny else (None, "tiny: not compared")
    print(report_line(name, card, measured, verdict, tiny))
    row = reproduce_row(name, card, measured, met, tiny, results, cfg, overrides)
    if cfg.get("results_file"):
        append_row(cfg.results_file, row)
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qatlab.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("card", help=f"one of: {', '.join(card_names())}")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment (key=value)")
    p.add_argument("--tiny", action="store_true", help="2 steps on tiny_llama with tiny local data (CPU, offline)")
    p.add_argument("--dry-run", action="store_true", help="print the card and the composed values; run nothing")
    p.add_argument("--output-dir", default=None, help="the run dir (default outputs/reproduce/<card>/<time>)")
    return p.parse_intermixed_args(argv)  # options may come after the overrides


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parse_args(argv)
    from qatlab.__main__ import user_error

    try:
        run_card(args.card, args.overrides, tiny=args.tiny, dry_run=args.dry_run, output_dir=args.output_dir)
    except Exception as exc:  # noqa: BLE001 - known user errors as one clear line
        err = user_error(exc)
        if err is None:
            raise
        print(f"qatlab.reproduce: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
