"""PPL-vs-compute curves from the results store: the race of recipes at equal CPU budget.

Every run with a `curve` (budget.cpu_minutes, qatlab/callbacks/compute_budget.py) is one line: test PPL
against CPU-minutes (left) and tokens seen (right), log PPL. Runs of recipes that do not train (RTN,
GPTQ) and every run's own RTN baseline at the same bits are horizontal reference lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatlab.report import finite, save_figure, teacher_ppl

REFERENCE_METHODS = ("rtn", "gptq")


def curve_series(rows: list[dict[str, Any]], by: str = "method") -> dict[str, list[dict[str, Any]]]:
    """{label: curve points} for every successful run with a curve. The label is the run's `by` value, and its
    task_name too when the runs span several tasks (a method raced on two grids is two lines); a label's latest
    run wins (a rerun replaces its first run)."""
    runs = [r for r in rows if r.get("status", "ok") == "ok" and r.get("curve")]
    several_tasks = by != "task_name" and len({r.get("task_name") for r in runs}) > 1
    series: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        label = f"{r.get(by)} ({r.get('task_name')})" if several_tasks else str(r.get(by))
        series[label] = [p for p in r["curve"] if finite(p.get("ppl"))]
    return series


def reference_lines(rows: list[dict[str, Any]]) -> dict[str, float]:
    """{label: PPL} of the non-training baselines: RTN / GPTQ runs and the curve runs' own RTN rows."""
    lines: dict[str, float] = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        bits = f"W{r.get('w_bits_label', r.get('w_bits'))} g{r.get('group_size')}"
        if r.get("method") in REFERENCE_METHODS and finite(r.get("test/ppl_student")):
            lines[f"{r['method']} {bits}"] = float(r["test/ppl_student"])
        elif r.get("curve") and finite(r.get("test/ppl_rtn")):
            lines.setdefault(f"rtn {bits} ({r.get('w_grid', '')})", float(r["test/ppl_rtn"]))
    return lines


def plot_curves(rows: list[dict[str, Any]], path: str | Path, by: str = "method") -> Path | None:
    """Write ppl_vs_compute.png; None when no run has a curve."""
    series = curve_series(rows, by)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120, sharey=True)
    for (x_key, x_label), ax in zip((("cpu_minutes", "CPU-minutes (process CPU time: init + training)"),
                                     ("tokens", "training tokens seen")), axes):
        for label, points in series.items():
            ax.plot([p[x_key] for p in points], [p["ppl"] for p in points], marker="o", label=label)
        for i, (label, ppl) in enumerate(sorted(reference_lines(rows).items())):
            ax.axhline(ppl, linestyle="--", color=f"C{(len(series) + i) % 10}", alpha=0.7, label=f"{label}: {ppl:.1f}")
        if teacher_ppl(rows) is not None:
            ax.axhline(teacher_ppl(rows), color="black", linestyle=":", label="teacher")
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test perplexity (log)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("PPL vs compute")
    return save_figure(fig, path)


def curve_table(rows: list[dict[str, Any]], by: str = "method") -> str:
    """Markdown: each curve's PPL at each recorded point (CPU-minutes / tokens / PPL)."""
    from qatlab.eval.table import markdown_table

    table = [[label, f"{p['cpu_minutes']:.1f}", p["steps"], p["tokens"], f"{p['ppl']:.2f}"]
             for label, points in curve_series(rows, by).items() for p in points]
    return markdown_table(["run", "CPU-min", "steps", "tokens", "test PPL"], table) if table else ""
