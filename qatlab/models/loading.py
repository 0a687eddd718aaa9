"""One entry point for every model source: the embedded SmolLM2, a tiny random Llama, a folder, a hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qatlab.data.shards import damaged
from qatlab.errors import QatlabError, require
from qatlab.models.embedded import materialize_smollm2
from qatlab.models.tiny import build_tiny_llama

EMBEDDED = "embedded:smollm2-135m"
TINY = "tiny-llama"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    cache_dir: str | None = None,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer with a pad token). `tokenizer` overrides where the tokenizer comes from."""
    require(dtype in DTYPES, f"model.dtype='{dtype}' is not known; use one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if name_or_path == EMBEDDED:
        folder = str(materialize_smollm2(cache_dir))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tok = _load_tokenizer(tokenizer or folder)
    elif name_or_path == TINY or name_or_path.startswith(TINY + ":"):
        seed = _tiny_seed(name_or_path)
        tok = _load_tokenizer(tokenizer or str(materialize_smollm2(cache_dir)))
        model = build_tiny_llama(tok, seed).to(torch_dtype)
    else:
        model, tok = _load_pretrained(name_or_path, torch_dtype, tokenizer, gguf_file, revision, trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _tiny_seed(name: str) -> int:
    """'tiny-llama' -> 0, 'tiny-llama:7' -> 7."""
    seed = name.partition(":")[2] or "0"
    require(seed.isdigit(), f"model.name_or_path='{name}' has a bad seed; use tiny-llama or tiny-llama:<int>")
    return int(seed)


def _load_pretrained(name, torch_dtype, tokenizer, gguf_file, revision, trust_remote_code):
    """A local folder or a hub id; a GGUF file is dequantized because QAT needs dense latent weights."""
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    model_kw = {"dtype": torch_dtype, **common}
    if gguf_file:
        model_kw |= {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    model = _from_pretrained(AutoModelForCausalLM, name, "model.name_or_path", **model_kw)
    if tokenizer:
        return model, _from_pretrained(AutoTokenizer, tokenizer, "model.tokenizer", **common)
    tok_kw = {"gguf_file": gguf_file, **common} if gguf_file else common
    return model, _from_pretrained(AutoTokenizer, name, "model.name_or_path", **tok_kw)


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return _from_pretrained(AutoTokenizer, name, "model.tokenizer")


def _from_pretrained(auto_class, name: str, key: str, **kwargs):
    """auto_class.from_pretrained on a folder or hub id; failures become one actionable line naming `key`."""
    source = _resolve_local(name, key, kwargs.get("gguf_file"))
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except SafetensorError as e:  # a damaged weights file that slipped past check_local_model (e.g. from the hub cache)
        raise QatlabError(f"{key}='{name}' has a damaged weights file ({str(e).splitlines()[0]}); download or save "
                          "the model again") from e
    except OSError as e:  # transformers raises OSError for missing files, no network, gated repos
        raise QatlabError(
            f"{key}='{name}' could not be loaded ({str(e).splitlines()[0]}); offline, download it first "
            "(hf download <id>), point HF_HOME at a cache that has it, or give a local folder"
        ) from e


def _resolve_local(name: str, key: str, gguf_file: str | None = None) -> str:
    """An existing folder as an absolute path; a hub id unchanged; a missing local path is an error."""
    path = Path(name).expanduser()
    check_local_model(name, key, tokenizer=key == "model.tokenizer", gguf_file=gguf_file)
    if path.is_dir():
        return str(path.resolve())
    return name


def check_local_model(name: str, key: str = "model.name_or_path", tokenizer: bool = False,
                      gguf_file: str | None = None) -> None:
    """A local model path that cannot load says why in one line, before anything loads: missing, a file instead of
    a folder, a folder without config.json, a weights file that is cut short. Hub ids and built-in names pass."""
    if name == EMBEDDED or name == TINY or name.startswith(TINY + ":"):
        return
    path = Path(name).expanduser()
    if path.is_file():
        hint = (f"for a GGUF file set {key}=<its folder> and model.gguf_file={path.name}" if path.suffix == ".gguf"
                else "give the folder that holds config.json and the weights (what save_pretrained writes)")
        raise QatlabError(f"{key}='{name}' is a file, not a model folder; {hint}")
    if not path.is_dir():
        require(not _looks_local(name), f"{key}='{name}' does not exist; give an existing folder with config.json, "
                                        "a Hugging Face hub id, or use model=smollm2_135m")
        return
    if tokenizer:
        return
    if gguf_file:
        require((path / gguf_file).is_file(), f"model.gguf_file='{gguf_file}' is not in {key}='{name}'; "
                                              f"give the name of a .gguf file in that folder")
        return
    entries = sorted(p.name for p in path.iterdir())
    require("config.json" in entries,
            f"{key}='{name}' has no config.json ({'the folder is empty' if not entries else 'it holds ' + ', '.join(entries[:5])}); "
            "give a folder written by save_pretrained (config.json + weights), or a Hugging Face hub id")
    for weights in sorted(path.glob("*.safetensors")):
        problem = damaged(weights, verify_checksum=False)
        require(problem is None, f"{key}='{name}': weights file '{weights}' is damaged ({problem}); download or save "
                                 "the model again")


def _looks_local(name: str) -> bool:
    """Paths like /x, ./x, ~/x, a/b/c or existing_dir/x; 'org/model' is read as a hub id."""
    if name.startswith(("/", "./", "../", "~")):
        return True
    parts = name.split(os.sep)
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())
