"""Shipping (issue 18): compressed-tensors, GGUF and hf exports reload in their consumers and hold the student's codes.

References are written here by hand (bit and byte layouts decoded in plain loops / numpy from the formats' specs),
and checked against the consumers' own code (compressed-tensors' compressor, the gguf package's dequantizer,
transformers' loaders). Tolerances, per format, with float32 storage (export_options.dtype=float32):
  hf, compressed_tensors   the same fp32 products as the student: logits within 1e-6 (0 measured)
  gguf                     block scales (and Q4_1's offsets) are fp16 by the format: each weight within
                           2^-11 |scale| |code| (+ 2^-11 |m|) of the student's; logits within 2e-3
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qatlab.errors import QatlabError
from qatlab.export import ship
from qatlab.export.survey import Survey
from qatlab.recipes import compose_recipe
from qatlab.train import make_student, train

F32 = ship.ExportOptions

SYM_FULL_G32 = ("++method.weight.range=full", "method.weight.group_size=32")
ASYM_G32 = ("method.weight.symmetric=false", "method.weight.group_size=32")
SYM8_G32 = ("method.weight.bits=8", "method.weight.group_size=32")
TERNARY = ("method.weight.bits=2", "method.weight.granularity=channel")  # symmetric restricted 2-bit: -1, 0, 1


@pytest.fixture
def wide_llama_model() -> LlamaForCausalLM:
    """1-layer Llama whose widths (256, 512) are multiples of TQ1_0/TQ2_0's 256-column blocks."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def student_of(teacher, *overrides, method="rtn"):
    recipe = compose_recipe(method, list(overrides))
    student = make_student(teacher, recipe, "float32").eval()
    recipe.initialize(student, teacher, [])
    return student


def export(student, path, fmt, **options):
    opts = F32(formats=(fmt,), dtype="float32", **options)
    return ship.write(opts, ship.plan(opts, student), student, path)[fmt]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def weights(student):
    return Survey.of(student).weights  # {layer: QuantizedWeight}: the codes the student computes with


# ---- compressed-tensors ---------------------------------------------------------------------------


def unpack_dense_by_hand(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, n): element i is bits [i b, (i + 1) b) of the row's little-endian bit stream."""
    rows = []
    for row in words.tolist():
        stream = "".join(format(w & 0xFFFFFFFF, "032b")[::-1] for w in row)  # bit 0 of word 0 first
        rows.append([int(stream[i * bits:(i + 1) * bits][::-1], 2) for i in range(n)])
    return torch.tensor(rows)


CT_GRIDS = [SYM_FULL_G32, ASYM_G32, SYM8_G32, ("method.weight.granularity=channel",),
            ("method.weight.bits=3", "method.weight.symmetric=false", "method.weight.group_size=16")]


@pytest.mark.parametrize("overrides", CT_GRIDS, ids=lambda o: " ".join(o))
def test_compressed_tensors_holds_the_students_codes_and_reloads_in_transformers(tmp_path, tiny_llama_model, overrides):
    from safetensors.torch import load_file

    student = student_of(tiny_llama_model, *overrides)
    path = export(student, tmp_path, "compressed_tensors")
    stored = load_file(str(path / "model.safetensors"))
    for name, qw in weights(student).items():
        bits, (out, width) = qw.grid.bits, qw.codes.shape
        signed = qw.codes.long() - (qw.grid.qmin if qw.zero is not None else 0)  # asymmetric 0..2^b-1 -> signed
        signed = signed - (2 ** (bits - 1) if qw.zero is not None else 0)
        got = unpack_dense_by_hand(stored[f"{name}.weight_packed"], bits, width) - 2 ** (bits - 1)
        assert torch.equal(got, signed), name
        if qw.zero is not None:  # zero points packed along the rows (the transposed stream)
            zp = unpack_dense_by_hand(stored[f"{name}.weight_zero_point"].t().contiguous(), bits, out).t()
            assert torch.equal(zp, qw.zero.round().long())
        assert torch.equal(stored[f"{name}.weight_scale"], qw.scale.reshape(out, -1))
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(logits(ship.load("compressed_tensors", path), ids), logits(student, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides", [SYM_FULL_G32, ASYM_G32], ids=["sym", "asym"])
def test_compressed_tensors_own_compressor_writes_the_same_tensors(tmp_path, tiny_llama_model, overrides):
    """compressed-tensors' PackedQuantizationCompressor, given the student's dense values and qparams, re-derives
    exactly the packed words and zero points qatlab wrote from the codes."""
    import json

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    student = student_of(tiny_llama_model, *overrides)
    path = export(student, tmp_path, "compressed_tensors")
    stored = load_file(str(path / "model.safetensors"))
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    for name, qw in weights(student).items():
        state = {"weight": qw.dequantize(), "weight_scale": qw.scale}
        if qw.zero is not None:
            state["weight_zero_point"] = (qw.zero - 2 ** (qw.grid.bits - 1)).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        for key in ("weight_packed", "weight_zero_point"):
            if key in theirs:
                assert torch.equal(theirs[key], stored[f"{name}.{key}"]), (name, key)


# ---- GGUF -----------------------------------------------------------------------------------------


def hf_to_gguf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permute of q/k rows, written out again here."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def decode_blocks_by_hand(kind: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(rows, bytes) uint8 GGUF blocks -> (codes (rows, in), fp16 scales (rows, blocks), Q4_1 offsets or None)."""
    rows = raw.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "TQ2_0": 66, "TQ1_0": 54}[kind]
    b = raw.reshape(rows, -1, size)
    f16 = lambda x: x.copy().view(np.float16)[..., 0].astype(np.float32)  # noqa: E731 - two bytes -> one fp16
    if kind in ("Q4_0", "Q4_1"):
        head = 2 if kind == "Q4_0" else 4
        nib = b[..., head:]
        codes = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.int64)  # byte j: columns j and j + 16
        codes = codes - 8 if kind == "Q4_0" else codes
        return codes.reshape(rows, -1), f16(b[..., 0:2]), None if kind == "Q4_0" else f16(b[..., 2:4])
    if kind == "Q8_0":
        return b[..., 2:].view(np.int8).astype(np.int64).reshape(rows, -1), f16(b[..., 0:2]), None
    if kind == "TQ2_0":  # per 128 columns: byte j holds columns j, j+32, j+64, j+96 in bits 0-1, 2-3, 4-5, 6-7
        qs = b[..., :64].reshape(rows, -1, 2, 32)
        trits = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=-2)  # (rows, nb, 2, 4, 32)
        return trits.reshape(rows, -1).astype(np.int64) - 1, f16(b[..., 64:66]), None
    # TQ1_0: 48 bytes of 5 trits (first trit most significant, as a fraction of 256), then 4 of 4 trits, then d
    def trits_of(byte_block: np.ndarray, count: int) -> np.ndarray:
        out = []
        v = byte_block.astype(np.int64)
        for _ in range(count):
            v = v * 3
            out.append(v >> 8)
            v = v & 255
        return np.stack(out, axis=-2)  # (..., count, bytes)
    qs0 = trits_of(b[..., :32], 5).reshape(rows, b.shape[1], 160)
    qs1 = trits_of(b[..., 32:48], 5).reshape(rows, b.shape[1], 80)
    qh = trits_of(b[..., 48:52], 4).reshape(rows, b.shape[1], 16)
    codes = np.concatenate([qs0, qs1, qh], axis=-1) - 1
    return codes.reshape(rows, -1), f16(b[..., 52:54]), None


GGUF_CASES = [("tiny_llama_model", SYM_FULL_G32, "Q4_0"), ("tiny_llama_model", ASYM_G32, "Q4_1"),
              ("tiny_llama_model", SYM8_G32, "Q8_0"), ("tiny_llama_model", ("method.weight.group_size=32",), "Q4_0"),
              ("wide_llama_model", TERNARY, "TQ2_0"), ("wide_llama_model", TERNARY, "TQ1_0")]


@pytest.mark.parametrize("model, overrides, kind", GGUF_CASES, ids=lambda c: c if isinstance(c, str) else " ".join(c))
def test_gguf_blocks_hold_the_students_codes_and_reload_in_transformers(tmp_path, model, overrides, kind, request):
    import gguf

    teacher = request.getfixturevalue(model)
    student = student_of(teacher, *overrides)
    gguf_type = "auto" if kind in ("Q4_0", "Q4_1", "Q8_0", "TQ2_0") else kind.lower()
    path = export(student, tmp_path, "gguf", gguf_type=gguf_type)
    config = student.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path / "model.gguf")).tensors}
    for name, qw in weights(student).items():
        t = tensors[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == kind, name
        raw = np.asarray(t.data)
        codes, d, m = decode_blocks_by_hand(kind, raw)
        expected = qw.codes.numpy().astype(np.int64)
        student_w = qw.dequantize().numpy()
        block = student_w.shape[1] // d.shape[1]
        scale = qw.scale.numpy().repeat(student_w.shape[1] // qw.scale.shape[1], axis=1)[:, ::block]  # (out, blocks)
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(name.rsplit(".", 1)[1])
        if heads:
            expected, student_w, scale = (hf_to_gguf_rows(a, heads) for a in (expected, student_w, scale))
        assert np.array_equal(codes, expected), name  # the student's own codes, not a re-quantization
        assert np.array_equal(d, scale.astype(np.float16).astype(np.float32)), name  # its scales, rounded once
        theirs = gguf.quants.dequantize(raw, t.tensor_type).reshape(student_w.shape)
        mine = codes * d.repeat(block, axis=1)
        if m is not None:
            mine = mine + m.repeat(block, axis=1)
        assert np.array_equal(theirs, mine.astype(np.float32)), name  # gguf's dequantizer reads what we decode
        bound = 2.0 ** -11 * np.abs(scale.repeat(block, axis=1)) * np.abs(codes) + 1e-7
        if m is not None:
            bound = bound + 2.0 ** -11 * np.abs(m.repeat(block, axis=1))
        assert (np.abs(theirs - student_w) <= bound * 1.01).all(), name
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(logits(ship.load("gguf", path), ids), logits(student, ids), rtol=0, atol=2e-3)


def test_gguf_hyperparameters_are_the_models(tmp_path, tiny_llama_model):
    import gguf

    student = student_of(tiny_llama_model, *SYM_FULL_G32)
    reader = gguf.GGUFReader(str(export(student, tmp_path, "gguf") / "model.gguf"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    c = student.config
    assert field("general.architecture") == "llama" and field("llama.block_count") == c.num_hidden_layers
    assert field("llama.embedding_length") == c.hidden_size and field("llama.attention.head_count_kv") == c.num_key_value_heads
    assert field("llama.feed_forward_length") == c.intermediate_size
    assert math.isclose(field("llama.attention.layer_norm_rms_epsilon"), c.rms_norm_eps, rel_tol=1e-6)


# ---- refusals: before anything is written ------------------------------------------------------------


@pytest.mark.parametrize("fmt, options, overrides, message", [
    ("gguf", {"gguf_type": "q4_0"}, ("method.weight.symmetric=false", "method.weight.group_size=64"),
     r"gguf Q4_0: layer 'model.layers.0.self_attn.q_proj' \(4-bit asym group64\) .*train with method.weight.bits=4 "
     r"method.weight.symmetric=true \+\+method.weight.range=full method.weight.group_size=32"),
    ("gguf", {}, ("method.weight.bits=3", "method.weight.symmetric=false", "method.weight.group_size=16"),
     r"gguf: layer 'model.layers.0.self_attn.q_proj' \(3-bit asym group16\) has no exact GGUF type: its groups of 16"),
    ("gguf", {"gguf_type": "tq2_0"}, TERNARY, r"TQ2_0: layer .* do not fill whole 256-column blocks"),
    ("compressed_tensors", {}, ("method.weight.bits=3", "+method.weight.grid=nf", "method.weight.symmetric=false",
                                "method.weight.group_size=32"), r"compressed_tensors: layer .* normal-float codebook"),
])
def test_a_grid_the_format_cannot_hold_is_refused_before_anything_is_written(tmp_path, tiny_llama_model, fmt, options,
                                                                               overrides, message):
    student = student_of(tiny_llama_model, *overrides)
    opts = F32(formats=("packed", fmt), **options)
    with pytest.raises(QatlabError, match=message) as error:
        ship.write(opts, ship.plan(opts, student), student, tmp_path / "export")
    assert "\n" not in str(error.value) and not (tmp_path / "export").exists()


def test_a_run_refuses_the_format_before_training_and_writes_no_export(tmp_path):
    from tests.test_onebit import make_cfg

    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", "method.weight.symmetric=false",
                   "method.weight.group_size=64", "export=[packed,gguf]", "export_options.gguf_type=q4_0")
    with pytest.raises(QatlabError, match=r"gguf Q4_0: layer '.*' \(4-bit asym group64\)"):
        train(cfg)
    assert not (tmp_path / "export").exists() and not (tmp_path / "checkpoints").exists()  # refused before training


@pytest.mark.parametrize("overrides, message", [
    (("export=onnx",), r"export='onnx' is not a format; use one or a list of packed, hf, compressed_tensors, gguf"),
    (("export=gguf", "eval.exports=[hf]"), r"eval.exports names 'hf', which export=\['gguf'\] does not write"),
    (("export=hf", "eval.packed=true"), r"eval.exports names 'packed' \(eval.packed=true\)"),
    (("export=gguf", "export_options.gguf_type=q2_k"), r"export_options.gguf_type='q2_k' is not known"),
])
def test_export_keys_are_checked_before_any_model_loads(tmp_path, overrides, message):
    from qatlab.validate import validate_config
    from tests.test_onebit import make_cfg

    with pytest.raises(QatlabError, match=message):
        validate_config(make_cfg(tmp_path, "experiment=tiny_smoke", *overrides))


# ---- a run: every format written and scored with the same evaluator ------------------------------------


def test_a_run_ships_every_format_and_scores_each_reloaded_export(tmp_path):
    import json

    from tests.test_onebit import make_cfg

    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", *SYM_FULL_G32, "eval.rtn_baseline=false",
                   "export=[packed,hf,compressed_tensors,gguf]", "export_options.dtype=float32", "eval.exports=true")
    results = train(cfg)
    student = results["test/ppl_student"]
    for fmt in ("packed", "hf", "compressed_tensors"):  # the same fp32 values: the same PPL
        assert math.isclose(results[f"test/ppl_{fmt}"], student, rel_tol=1e-5), fmt
    assert math.isclose(results["test/ppl_gguf"], student, rel_tol=1e-3)  # fp16 block scales
    export_dir = tmp_path / "export"
    assert (export_dir / "qatlab.json").is_file() and (export_dir / "gguf" / "model.gguf").is_file()
    assert (export_dir / "hf" / "README.md").read_text().count("rtn") >= 1
    row = json.loads((tmp_path / "results.json").read_text())
    assert {f"test/ppl_{f}" for f in ship.FORMATS} <= set(row)


def test_llama_cpp_perplexity_follows_the_pinned_protocol(tmp_path, tiny_llama_model, monkeypatch):
    """llama-cpp-python is optional (not installed in CI): a stand-in Llama serving the student's logits checks the
    protocol code (each window alone, tokens 2..T) against qatlab's evaluator on the same windows."""
    import sys
    import types

    from qatlab.eval.perplexity import perplexity
    from qatlab.export import llama_cpp

    student = student_of(tiny_llama_model, *SYM_FULL_G32)

    class FakeLlama:
        def __init__(self, model_path, n_ctx, logits_all, n_threads, verbose):
            assert logits_all and n_ctx == 16
            self.scores = None

        def reset(self):
            self.scores = None

        def eval(self, tokens):
            self.scores = logits(student, torch.tensor([tokens]))[0].numpy()

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    blocks = torch.randint(0, 128, (3, 16))
    assert math.isclose(llama_cpp.perplexity(tmp_path / "model.gguf", blocks), perplexity(student, blocks), rel_tol=1e-6)


def test_a_run_scores_its_gguf_in_llama_cpp_where_installed(tmp_path, monkeypatch, capsys):
    """With llama-cpp-python present, eval.exports also scores the written GGUF file through it: a stand-in Llama
    that reads that very file (transformers' GGUF reader) checks the wiring, the results key and the table row."""
    import sys
    import types

    from qatlab.export import llama_cpp
    from tests.test_onebit import make_cfg

    opened = []

    class GgufFileLlama:
        def __init__(self, model_path, n_ctx, logits_all, n_threads, verbose):
            opened.append(Path(model_path))
            self.model = ship.load("gguf", Path(model_path).parent, dtype="float32")

        def reset(self):
            self.scores = None

        def eval(self, tokens):
            self.scores = logits(self.model, torch.tensor([tokens]))[0].numpy()

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=GgufFileLlama))
    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", *SYM_FULL_G32, "eval.rtn_baseline=false",
                   "export=gguf", "eval.exports=true")
    results = train(cfg)
    assert opened == [tmp_path / "export" / "gguf" / ship.GGUF_FILE]
    assert math.isclose(results["test/ppl_gguf_llama_cpp"], results["test/ppl_gguf"], rel_tol=1e-6)
    assert "rtn (gguf export, llama.cpp)" in capsys.readouterr().out


def test_a_gguf_llama_cpp_refuses_still_writes_the_runs_numbers(tmp_path, monkeypatch, capsys):
    """llama.cpp's score is an optional extra: a stand-in Llama that refuses the file (as llama.cpp does with a
    GGUF it cannot load) leaves the run ok, its other PPLs written and the refusal in the row and the table."""
    import json
    import sys
    import types

    from qatlab.export import llama_cpp
    from tests.test_onebit import make_cfg

    class RefusingLlama:
        def __init__(self, model_path, **kwargs):
            raise ValueError(f"Failed to load model from file: {model_path}")

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=RefusingLlama))
    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    store = tmp_path / "store.jsonl"
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", *SYM_FULL_G32, "eval.rtn_baseline=false",
                   "export=gguf", "eval.exports=true", f"results_file={store}")
    results = train(cfg)
    written = json.loads((tmp_path / "results.json").read_text())
    row = json.loads(store.read_text().splitlines()[-1])
    assert written.get("status", "ok") == row["status"] == "ok" and "test/ppl_gguf_llama_cpp" not in written
    assert math.isfinite(written["test/ppl_gguf"]) and written["test/ppl_gguf"] == results["test/ppl_gguf"]
    assert row["llama_cpp_error"] == written["llama_cpp_error"]
    assert row["llama_cpp_error"].startswith("ValueError: Failed to load model from file:")
    assert "(gguf export, llama.cpp) | W" in capsys.readouterr().out


def test_a_refusal_at_export_time_keeps_the_runs_numbers(tmp_path, monkeypatch):
    """A grid that training moved off the format is refused at the end too, and results.json keeps the PPLs."""
    import json

    from tests.test_onebit import make_cfg

    calls = []
    real_plan = ship.plan

    def plan_refusing_the_second_time(options, student):
        calls.append(1)
        if len(calls) == 2:
            raise QatlabError("gguf: layer 'x' (learned zero points) refused")
        return real_plan(options, student)

    monkeypatch.setattr(ship, "plan", plan_refusing_the_second_time)
    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", *SYM_FULL_G32, "eval.rtn_baseline=false",
                   "export=gguf")
    with pytest.raises(QatlabError, match=r"refused \(nothing was exported; the run's numbers are in .*results.json\)"):
        train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and math.isfinite(saved["test/ppl_student"])
    assert not (tmp_path / "export").exists()
