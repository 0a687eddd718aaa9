"""The results store and `python -m qatlab.report`: rows in, table and PNG out."""

import json
import subprocess
import sys

import pytest

from qatlab.errors import QatlabError
from qatlab.quantizers import QuantConfig
from qatlab.report import plot_series, results_table, write_report
from qatlab.results import append_row, failed_row, read_rows, run_row


def row(method, bits, ppl, rtn=None, **extra):
    results = {"method": method, "model": "embedded:smollm2-135m", "w_bits": bits, "a_bits": 16, "kv_bits": 16,
               "group_size": 64, "bits_per_weight": bits + 0.5, "test/ppl_teacher": 23.49,
               "test/ppl_student": ppl, "train/steps": 60, "time/wall_s": 100.0, **extra}
    if rtn is not None:
        results["test/ppl_rtn"] = rtn
    return run_row(results, task_name="t", device="cpu", tokens_seen=60 * 512)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, row("kd", 4, 29.07, rtn=36.50))
    append_row(path, row("kd", 2, 159.5, rtn=338948.0, **{"test/analogies/acc": 0.41}))
    append_row(path, row("rtn", 8, 23.6))
    append_row(path, failed_row(QatlabError("weight.bits=9 is out of range"), task_name="t", overrides="w=9"))
    return path


def test_rows_round_trip_and_a_torn_line_is_skipped(store):
    with open(store, "a") as f:
        f.write('{"status": "ok", "method": "kd"')  # a writer killed mid-line (not qatlab's own writes)
    rows = read_rows(store)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert rows[0]["steps"] == 60 and rows[0]["tokens_seen"] == 30720


def test_table_lists_runs_by_bits_then_the_failures(store):
    text = results_table(read_rows(store))
    lines = text.splitlines()
    assert lines[0].startswith("| method | model | bits |") and "analogies" in lines[0]
    methods = [line.split("|")[1].strip() for line in lines[2:5]]
    assert methods == ["rtn", "kd", "kd"]  # 8.5, 4.5, 2.5 bits per weight
    assert "| W2A16 g64 |" in lines[4] and "| 0.41 |" in lines[4] and "3.39e+05" in lines[4]
    assert "Failed runs:" in text and "bits=9 is out of range" in text


def test_plot_series_puts_every_runs_rtn_baseline_on_the_rtn_line(store):
    append_row(store, row("kd", 2, 4011.0))  # a worse run at the same bits (e.g. init only): not the line's point
    series = plot_series(read_rows(store))
    assert series["kd"] == [(2.5, 159.5), (4.5, 29.07)]
    assert series["rtn"] == [(2.5, 338948.0), (4.5, 36.5), (8.5, 23.6)]


def test_report_cli_writes_markdown_and_png(store, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "qatlab.report", "--results", str(store), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = (out / "ppl_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "![PPL vs bits per weight](ppl_vs_bits.png)" in (out / "report.md").read_text()


def test_report_without_results_says_what_to_do(tmp_path):
    with pytest.raises(QatlabError, match="run `python -m qatlab"):
        write_report(tmp_path / "none.jsonl", tmp_path / "out")


@pytest.mark.parametrize(
    ("cfg", "rows", "width", "bits_per_weight"),
    [
        (dict(bits=4, symmetric=True, granularity="group", group_size=64), 8, 128, 4 + 16 / 64),
        (dict(bits=2, symmetric=False, granularity="group", group_size=64), 8, 128, 2 + 32 / 64),
        (dict(bits=8, symmetric=True, granularity="channel"), 8, 128, 8 + 16 / 128),
        (dict(bits=4, symmetric=True, granularity="tensor"), 8, 128, 4 + 16 / (8 * 128)),
    ],
)
def test_storage_bits_count_codes_and_fp16_scales(cfg, rows, width, bits_per_weight):
    config = QuantConfig(**cfg, name="weight")
    assert config.storage_bits(rows, width) / (rows * width) == pytest.approx(bits_per_weight)


def test_notebook_reads_the_store(store, tmp_path):
    """Run the notebook in a real Jupyter kernel (nbclient), from notebooks/ beside an outputs/ store."""
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "read_results.ipynb", as_version=4)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "results.jsonl").write_text(store.read_text())
    (tmp_path / "notebooks").mkdir()
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path / "notebooks")}}).execute()
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.outputs[-1]["data"]["text/plain"] == "4"  # len(rows): the store's 4 rows
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("text/markdown" in o.get("data", {}) for o in outputs)  # the table
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot, shown inline
    assert (tmp_path / "outputs" / "report" / "ppl_vs_bits.png").exists()
