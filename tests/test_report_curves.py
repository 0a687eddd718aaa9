"""PPL-vs-compute curves (qatlab/report_curves.py): one line per run, none silently dropped."""

from qatlab.report_curves import curve_series, curve_table


def run(method, task, ppls, status="ok"):
    curve = [{"cpu_minutes": 5.0 * (i + 1), "steps": 10 * (i + 1), "tokens": 512 * (i + 1), "ppl": p}
             for i, p in enumerate(ppls)]
    return {"method": method, "task_name": task, "status": status, "curve": curve}


def test_a_method_raced_on_two_tasks_is_two_lines():
    rows = [run("kd", "race_w3", [60.0, 40.0]), run("kd", "race_ternary", [5000.0, 2600.0])]
    series = curve_series(rows)
    assert set(series) == {"kd (race_w3)", "kd (race_ternary)"}
    assert [p["ppl"] for p in series["kd (race_ternary)"]] == [5000.0, 2600.0]
    table = curve_table(rows)
    assert "| kd (race_w3) | 10.0 | 20 | 1024 | 40.00 |" in table and "kd (race_ternary)" in table


def test_within_one_task_a_rerun_replaces_the_first_run_and_failures_are_left_out():
    rows = [run("paretoq", "race", [7000.0]), run("paretoq", "race", [1500.0]), run("lsq", "race", [1.0], "failed")]
    assert curve_series(rows) == {"paretoq": rows[1]["curve"]}


def test_points_with_a_non_finite_ppl_are_dropped():
    rows = [run("kd", "race", [float("nan"), 300.0])]
    assert [p["ppl"] for p in curve_series(rows)["kd"]] == [300.0]
