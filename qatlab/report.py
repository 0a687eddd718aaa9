"""`python -m qatlab.report`: the results store -> a markdown table and a PPL-vs-bits plot.

    python -m qatlab.report                                  # outputs/results.jsonl -> outputs/report/
    python -m qatlab.report --results runs.jsonl --out report/ --by task_name

The plot has one line per method (or per --by column): test PPL against stored bits per weight
of the quantized layers, log scale, the teacher as a dashed reference line. Every run's RTN
baseline (`test/ppl_rtn`, same bits) is drawn as the `rtn` line, so RTN sits beside every
QAT method without extra runs. Failed sweep jobs are listed under the table.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from qatlab.eval.table import markdown_table
from qatlab.results import read_rows

DEFAULT_RESULTS = "outputs/results.jsonl"


def bits_label(row: dict[str, Any]) -> str:
    """'W2A16 g64', 'W4A8KV4', ... as in the tables the runs print."""
    kv = f"KV{row['kv_bits']}" if row.get("kv_bits", 16) < 16 else ""
    group = f" g{row['group_size']}" if row.get("group_size") else ""
    group += " ternary" if "ternary" in str(row.get("w_grid", "")) else ""  # symmetric restricted 2-bit: 3 levels
    return f"W{row.get('w_bits', '?')}A{row.get('a_bits', '?')}{kv}{group}"


def zero_shot_columns(rows: list[dict[str, Any]]) -> list[str]:
    """`test/<task>/acc` keys present in any row, in a stable order."""
    keys = {k for row in rows for k in row if k.startswith("test/") and k.endswith("/acc")}
    return sorted(keys)


def results_table(rows: list[dict[str, Any]]) -> str:
    """One line per successful run, sorted by model, then bits per weight, then method."""
    ok = sorted(
        (r for r in rows if r.get("status", "ok") == "ok"),
        key=lambda r: (str(r.get("model")), -float(r.get("bits_per_weight") or 16), str(r.get("method"))),
    )
    shots = zero_shot_columns(ok)
    header = ["method", "model", "bits", "bits/weight", "steps", "tokens", "teacher PPL", "RTN PPL",
              "student PPL", *[k.split("/")[1] for k in shots], "wall s", "device", "overrides"]
    table = [
        [r.get("method"), Path(str(r.get("model"))).name, bits_label(r), _num(r.get("bits_per_weight")),
         r.get("steps", 0), r.get("tokens_seen", 0), _num(r.get("test/ppl_teacher")), _num(r.get("test/ppl_rtn")),
         _num(r.get("test/ppl_student")), *[_num(r.get(k)) for k in shots], _num(r.get("time/wall_s")),
         r.get("device", ""), _short(r.get("overrides", ""))]
        for r in ok
    ]
    text = markdown_table(header, table)
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        text += "\n\nFailed runs:\n" + "\n".join(
            f"- {r.get('task_name', '?')} {r.get('overrides', '')}: {r.get('error', '')}" for r in failed
        )
    return text


def _short(overrides: str, width: int = 80) -> str:
    """The overrides that tell runs apart (logging/output plumbing dropped), `|`-safe for markdown."""
    noise = ("logger=", "callbacks=", "hydra.", "+trainer.limit_val_batches", "results_file=")
    kept = " ".join(o for o in str(overrides).split() if not o.startswith(noise)).replace("|", "/")
    return kept if len(kept) <= width else kept[: width - 3] + "..."


def _num(value: Any) -> Any:
    return "" if value is None else value


def plot_series(rows: list[dict[str, Any]], by: str = "method") -> dict[str, list[tuple[float, float]]]:
    """{line label: [(bits per weight, PPL), ...] sorted by bits}: each line's best run at each
    bits per weight (the usual paper plot; the table lists every run, ablations included)."""
    points: dict[str, dict[float, float]] = defaultdict(dict)

    def add(label: str, x: float, ppl: float) -> None:
        points[label][x] = min(ppl, points[label].get(x, math.inf))

    for r in rows:
        x = r.get("bits_per_weight")
        if r.get("status", "ok") != "ok" or x is None:
            continue
        if finite(r.get("test/ppl_student")):
            add(str(r.get(by)), float(x), float(r["test/ppl_student"]))
        if finite(r.get("test/ppl_rtn")) and r.get("method") != "rtn":
            add("rtn", float(x), float(r["test/ppl_rtn"]))
    return {label: sorted(xy.items()) for label, xy in sorted(points.items())}


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def teacher_ppl(rows: list[dict[str, Any]]) -> float | None:
    values = sorted(r["test/ppl_teacher"] for r in rows if finite(r.get("test/ppl_teacher")))
    return values[len(values) // 2] if values else None


def plot(rows: list[dict[str, Any]], path: str | Path, by: str = "method") -> Path:
    """Write the PPL-vs-bits PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, xy in plot_series(rows, by).items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o", label=label, linestyle="--" if label == "rtn" else "-")
    teacher = teacher_ppl(rows)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle=":", label=f"teacher ({teacher:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers, incl. scales)")
    ax.set_ylabel("test perplexity (log)")
    models = sorted({Path(str(r.get("model"))).name for r in rows if r.get("model")})
    ax.set_title(f"PPL vs bits: {', '.join(models) or 'no runs'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """tight_layout, write (making the folder), close; the report's plots all end so."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: str | Path, out: str | Path, by: str = "method",
                 tasks: list[str] | None = None) -> tuple[Path, Path]:
    """results.jsonl -> <out>/report.md (table + plot links), <out>/ppl_vs_bits.png and, when runs carry
    compute curves (budget.cpu_minutes), <out>/ppl_vs_compute.png. tasks: keep only these task_names."""
    from qatlab.errors import require
    from qatlab.report_curves import curve_table, plot_curves

    results = Path(results)
    require(results.exists(), f"no results file at {results}; run `python -m qatlab ...` first, "
                              "or pass --results <path to results.jsonl>")
    rows = read_rows(results)
    if tasks:
        rows = [r for r in rows if r.get("task_name") in tasks]
    require(rows, f"{results} holds no runs{' of task ' + ', '.join(tasks) if tasks else ''} yet; finish a run first")
    out = Path(out)
    png = plot(rows, out / "ppl_vs_bits.png", by)
    curves = plot_curves(rows, out / "ppl_vs_compute.png", by)
    md = out / "report.md"
    text = f"# qatlab report\n\nFrom `{results}` ({len(rows)} runs).\n\n{results_table(rows)}\n\n"
    text += f"![PPL vs bits per weight]({png.name})\n"
    if curves is not None:
        text += f"\n## PPL vs compute\n\n{curve_table(rows, by)}\n\n![PPL vs compute]({curves.name})\n"
    md.write_text(text)
    return md, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qatlab.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="the results store (JSON lines)")
    parser.add_argument("--out", default="outputs/report", help="folder for report.md and ppl_vs_bits.png")
    parser.add_argument("--by", default="method", help="row key that names a plot line (method, task_name, ...)")
    parser.add_argument("--task", action="append", help="keep only runs of this task_name (repeatable)")
    args = parser.parse_args(argv)
    from qatlab.errors import QatlabError

    try:
        md, png = write_report(args.results, args.out, args.by, args.task)
    except QatlabError as err:
        raise SystemExit(f"qatlab.report: error: {err}") from None
    print(md.read_text())
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
