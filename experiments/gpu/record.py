"""Merge what a GPU lease brought back into experiments/gpu/results-<date>.json, and print the summary.

    python experiments/gpu/record.py <files_at of call 1> <files_at of call 2> [...]
    python experiments/gpu/record.py OUT1 OUT2 --out /tmp/dry.json          # a dry run (tests): never into the repo

Each argument is a folder holding <call>.json (a device run's files_at) or such a file. A call that
came back twice (e.g. call 2 after a relay) keeps its later run under `calls` and the earlier ones under
`earlier_runs`. The summary block holds every figure the issue asks for, with the goal beside it; the
printed markdown is what the READMEs quote (with the command: `commands` in each part of the calls).
--logs also copies each <call>.log into experiments/gpu/logs-<date>/ (plain text, progress bars stripped).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALL_ORDER = ("call1", "relay", "call2", "call3")


def load_calls(paths: list[Path]) -> list[tuple[dict, Path]]:
    found = []
    for path in paths:
        files = [path] if path.is_file() else sorted(path.glob("*.json"))
        for f in files:
            data = json.loads(f.read_text())
            if data.get("kit") == "qatlab GPU kit" and "call" in data:
                found.append((data, f))
    if not found:
        sys.exit(f"record: no <call>.json of the kit under {[str(p) for p in paths]}")
    return sorted(found, key=lambda cf: cf[0].get("started", ""))


def part(calls: dict, name: str) -> dict | None:
    for call in calls.values():
        if name in call.get("parts", {}):
            return call["parts"][name]
    return None


def result(calls: dict, name: str) -> dict:
    p = part(calls, name)
    return (p or {}).get("result") or {}


def status(calls: dict, name: str) -> str:
    p = part(calls, name)
    return "not run" if p is None else p.get("status", "?")


def summarize(calls: dict) -> dict:
    s: dict = {}
    probe = result(calls, "probe")
    s["machine"] = {"gpu": probe.get("gpu"), "versions": probe.get("versions"), "ceilings": probe.get("ceilings")}
    r = result(calls, "pytest_gpu")
    s["pytest_gpu"] = {"status": status(calls, "pytest_gpu"),
                       **{k: r.get(k) for k in ("tests", "passed", "failures", "errors", "skipped", "problems")}}
    for name in ("scale_1b", "scale_7b"):
        r = result(calls, name)
        s[name] = {"status": status(calls, name), "qatlab": r.get("qatlab"), "reference": r.get("reference"),
                   "estimate_gib": r.get("estimate_gib"), "estimate_vs_measured": r.get("estimate_vs_measured"),
                   "goals": r.get("goals")}
    r = result(calls, "kernels_gemv")
    s["kernels_gemv"] = {"status": status(calls, "kernels_gemv"), "goals": r.get("goals"),
                         "one_token_4096x11008": [row for row in r.get("gemv", [])
                                                  if row["batch"] == 1 and row["shape"] == "4096x11008"]}
    r = result(calls, "kernels_decode")
    s["kernels_decode"] = {"status": status(calls, "kernels_decode"), "decode": r.get("decode")}
    r = result(calls, "experiments")
    s["experiments"] = {"status": status(calls, "experiments"), "overrides": r.get("overrides"),
                        "runs": {n: {k: v for k, v in e.items() if k != "run_dir"}
                                 for n, e in (r.get("experiments") or {}).items()}}
    r = result(calls, "fsdp")
    s["fsdp"] = {"status": status(calls, "fsdp"), **{k: r.get(k) for k in ("experiment", "loss_first", "loss_last",
                                                                             "loss_falls", "test/ppl_student", "checkpoints",
                                                                             "error")}}
    r = result(calls, "race")
    s["race"] = {"status": status(calls, "race"), "seconds_each": r.get("seconds_each"), "ranking": r.get("ranking")}
    return s


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def markdown(s: dict, date_str: str, dry: bool) -> str:
    lines = [f"GPU kit results {date_str}{' (DRY RUN on the CPU: not measurements)' if dry else ''}; "
             f"GPU: {fmt((s['machine'].get('gpu') or {}).get('name'))}; ceilings: {s['machine'].get('ceilings')}", ""]
    p = s["pytest_gpu"]
    lines.append(f"pytest -m gpu: {p['status']}, {fmt(p.get('passed'))} passed / {fmt(p.get('tests'))} "
                 f"({fmt(p.get('failures'))} failed, {fmt(p.get('errors'))} errors, {fmt(p.get('skipped'))} skipped)")
    lines += ["", "| step | tokens/s | MFU | peak alloc GiB | peak reserved GiB | estimate GiB | goal |", "|---|---|---|---|---|---|---|"]
    for name in ("scale_1b", "scale_7b"):
        r = s[name]
        goals = r.get("goals") or {}
        for who in ("qatlab", "reference"):
            m = r.get(who)
            if m:
                goal = (f"speedup {fmt(goals.get('speedup_vs_reference'))} (>= 1.5), MFU >= 0.40: {goals.get('mfu_met')}"
                        if name == "scale_1b" and who == "qatlab" else
                        f"fits 80 GB: {goals.get('fits_80gb')}" if name == "scale_7b" else "")
                lines.append(f"| {name} {who} | {fmt(m.get('tokens_per_s'))} | {fmt(m.get('mfu'))} | {fmt(m.get('peak_gib'))} "
                             f"| {fmt(m.get('peak_reserved_gib'))} | {fmt(r.get('estimate_gib')) if who == 'qatlab' else ''} "
                             f"| {goal} |")
    lines += ["", "| GEMV 4096x11008, 1 token | us | GB/s | % of peak | x bf16 | impl |", "|---|---|---|---|---|---|"]
    for row in s["kernels_gemv"]["one_token_4096x11008"]:
        lines.append(f"| {row['kernel']} | {row['time_us']} | {row['gbs']} | {row['pct_peak']} | {row['speedup_vs_bf16']} "
                     f"| {row['impl']} |")
    lines.append(f"kernel goals (>= 4x bf16, >= 60 % of peak): {s['kernels_gemv'].get('goals')}")
    if s["kernels_decode"].get("decode"):
        lines.append("decode: " + "; ".join(f"{d['model']} {d['tokens_per_s']} tok/s" for d in s["kernels_decode"]["decode"]))
    lines += ["", "| experiment | status | loss first -> last | test PPL teacher / rtn / student | wall s |",
              "|---|---|---|---|---|"]
    for name, e in s["experiments"]["runs"].items():
        loss = f"{fmt(e.get('loss_first'))} -> {fmt(e.get('loss_last'))}" if e.get("loss_points") else "-"
        ppl = " / ".join(fmt(e.get(k), 4) for k in ("test/ppl_teacher", "test/ppl_rtn", "test/ppl_student"))
        lines.append(f"| {name} | {e['status'] if e['status'] == 'ok' else e['status'] + ': ' + str(e.get('error', ''))[:120]} "
                     f"| {loss} | {ppl} | {fmt(e.get('time/wall_s'))} |")
    f = s["fsdp"]
    lines.append(f"\nfsdp ({f.get('experiment')}): {f['status']}, loss {fmt(f.get('loss_first'))} -> {fmt(f.get('loss_last'))}, "
                 f"checkpoints {f.get('checkpoints')}")
    if s["race"].get("ranking"):
        lines.append(f"race ({s['race']['seconds_each']} s each): " + ", ".join(
            f"{r['recipe']} {fmt(r['test/ppl_student'], 4)}" for r in s["race"]["ranking"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default experiments/gpu/results-<date>.json")
    p.add_argument("--date", default=date.today().isoformat())
    p.add_argument("--logs", action="store_true", help="copy each <call>.log into experiments/gpu/logs-<date>/")
    a = p.parse_args(argv)
    found = load_calls(a.paths)
    dry = {bool(c.get("dry_run")) for c, _ in found}
    if len(dry) > 1:
        sys.exit("record: these mix dry runs and real runs; record them separately")
    dry_run = dry.pop()
    if dry_run and a.out is None:
        sys.exit("record: a dry run is not a measurement; give --out outside the repo")
    calls: dict = {}
    earlier: list = []
    for call, _ in found:  # oldest first: a later run of the same call replaces the earlier one
        if call["call"] in calls:
            earlier.append(calls[call["call"]])
        calls[call["call"]] = call
    calls = {k: calls[k] for k in sorted(calls, key=lambda c: CALL_ORDER.index(c) if c in CALL_ORDER else 99)}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    summary = summarize(calls)
    record = {"date": a.date, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dry_run": dry_run, "commit_when_recorded": commit,
              "how": "bash experiments/gpu/run<N>.sh on the GPU machine (experiments/gpu/README.md); "
                     "python experiments/gpu/record.py <their files_at folders>",
              "summary": summary, "calls": calls, "earlier_runs": earlier}
    out = a.out or HERE / f"results-{a.date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if a.logs:
        logs = HERE / f"logs-{a.date}"
        logs.mkdir(exist_ok=True)
        for _, f in found:
            log = f.with_suffix(".log")
            if log.is_file():
                shutil.copyfile(log, logs / log.name)
    print(markdown(summary, a.date, dry_run))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
