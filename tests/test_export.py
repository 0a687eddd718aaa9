"""Packed export: bit packing, the int layer format, the loader, the manifest, the storage report, a run."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qatlab.errors import QatlabError
from qatlab.export import export_packed, load_packed, storage_report
from qatlab.export.bitpack import codes_per_word, pack_codes, packed_width, unpack_codes
from qatlab.export.hf import export_hf
from qatlab.export.int_export import pack_codes_layer
from qatlab.export.manifest import FORMAT, MANIFEST, WEIGHTS, grid_from_dict
from qatlab.export.packed_linear import PackedLinear
from qatlab.layers import FakeQuantLinear
from qatlab.quantizers import LSQ, SEQ, QuantConfig, minmax
from qatlab.recipes import compose_recipe
from qatlab.train import make_student, train

# ---- bit packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trips_exactly_for_random_rows(bits):
    gen = torch.Generator().manual_seed(bits)
    for trial in range(25):  # property-style: random row counts, lengths (padded or not) and codes
        rows, n = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 100, (1,), generator=gen))
        codes = torch.randint(0, 2**bits, (rows, n), generator=gen, dtype=torch.uint8)
        codes[0, 0] = 2**bits - 1  # the largest code: the top bits of a full word make it negative
        words = pack_codes(codes, bits)
        assert words.dtype == torch.int32 and words.shape == (rows, packed_width(n, bits))
        assert torch.equal(unpack_codes(words, bits, n), codes), (bits, trial, n)


def test_pack_layout_by_hand():
    assert [codes_per_word(b) for b in (1, 2, 3, 4, 8)] == [32, 16, 10, 8, 4]
    # 2-bit: element k sits at bits 2k..2k+1 of the word
    assert pack_codes(torch.tensor([[1, 2, 3]]), 2).tolist() == [[1 + (2 << 2) + (3 << 4)]]
    # 3-bit: 10 codes per word, the 11th starts the next word; the top two bits stay 0
    packed = pack_codes(torch.tensor([7] * 11), 3)
    assert packed.tolist() == [2**30 - 1, 7]
    # 1-bit: element 31 is the sign bit of the int32 word
    assert pack_codes(torch.tensor([0] * 31 + [1]), 1).tolist() == [-(2**31)]
    with pytest.raises(QatlabError, match=r"codes must lie in \[0, 3\]"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(QatlabError, match="pack bits=9"):
        codes_per_word(9)


# ---- one layer: the packed weight is the fake-quant weight, bit for bit -----------------------------

CONFIGS = [
    {"bits": b, "symmetric": s, "granularity": g, "group_size": 16}
    for b in (2, 3, 4, 8) for s in (True, False) for g in ("group", "channel")
] + [
    {"bits": 3, "grid": "nf", "symmetric": False, "group_size": 16},
    {"bits": 4, "grid": "nf", "symmetric": True, "granularity": "channel"},
    {"bits": 1, "symmetric": True, "granularity": "channel"},
    {"bits": 4, "symmetric": False, "granularity": "tensor"},
]


def packed_pair(cfg, act=None, out_features=12, in_features=48, bias=True, quantizer=minmax):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    fake = FakeQuantLinear.from_linear(linear, cfg, act, quantizer=quantizer)
    tensors, entry = pack_codes_layer(fake)
    packed = PackedLinear(tensors["qweight"], tensors["scales"], tensors.get("zeros"), linear.bias, in_features,
                          grid_from_dict(entry["grid"], "test"), entry["group_size"], act)
    return fake, packed, tensors, entry


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: QuantConfig(**o).describe())
def test_packed_layer_equals_the_fake_quant_layer(options):
    cfg = QuantConfig(**options)
    fake, packed, tensors, entry = packed_pair(cfg, act=QuantConfig(bits=8, granularity="token", name="activation"))
    assert torch.equal(packed.dequantized_weight(), fake.quantized_weight())
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        assert torch.equal(packed(x), fake(x))
    assert tensors["qweight"].dtype == torch.int32
    assert tensors["qweight"].shape == (12, packed_width(48, cfg.bits))
    groups = {"group": 3, "channel": 1}.get(cfg.granularity)
    expected_scales = (1, 1) if cfg.granularity == "tensor" else (12, groups)
    assert tensors["scales"].shape == (*expected_scales, 2) if cfg.nf else expected_scales
    assert ("zeros" in tensors) == (not cfg.symmetric and not cfg.nf)
    assert entry["grid"]["bits"] == cfg.bits and entry["act"]["bits"] == 8


LEARNED = {
    "lsq 3-bit full": (QuantConfig(bits=3, range="full", group_size=16), LSQ),
    "lsq 2-bit asym": (QuantConfig(bits=2, symmetric=False, group_size=16),
                       lambda s, w: LSQ(s, w, init="minmax", grad_scale="none", clip_test="rounded")),
    "seq 2-bit": (QuantConfig(bits=2, range="full", granularity="channel"), SEQ),
    "seq ternary": (QuantConfig(bits=2, group_size=16), SEQ),
}


@pytest.mark.parametrize("name", LEARNED)
def test_a_learned_quantizer_ships_its_own_qparams_exactly(name):
    """The exporter asks the quantizer: with learned steps far from MinMax's, the packed layer still equals the student."""
    cfg, quantizer = LEARNED[name]
    fake, _, _, _ = packed_pair(cfg, quantizer=quantizer)
    with torch.no_grad():
        for p in fake.weight_quantizer.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.6, 1.4))
    tensors, entry = pack_codes_layer(fake)
    packed = PackedLinear(tensors["qweight"], tensors["scales"], tensors.get("zeros"), fake.bias, 48,
                          grid_from_dict(entry["grid"], "test"), entry["group_size"])
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert torch.equal(packed(x), fake(x))
        minmax_weight = FakeQuantLinear.from_linear(fake.to_linear(), cfg).quantized_weight()
    assert not torch.equal(packed.dequantized_weight(), minmax_weight)  # a MinMax recompute would be caught


# ---- whole models -------------------------------------------------------------------------------


class Exported:
    """A recipe + student pair with the run's export call."""

    def __init__(self, recipe, student):
        self.recipe, self.student = recipe, student
        self.quantized_layers = recipe.quantized_layers

    def export(self, student, path, dtype="float16"):
        return export_packed(student, path, dtype=dtype, method=self.recipe.name, facts=self.recipe.describe(),
                             kv=self.recipe.kv_config)


def student_of(teacher, method_name="rtn", *overrides):
    recipe = compose_recipe(method_name, list(overrides))
    student = make_student(teacher, recipe, "float32").eval()
    recipe.initialize(student, teacher, [])
    return Exported(recipe, student), student


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


MODEL_OPTIONS = [
    ("rtn", "method.weight.bits=2", "method.weight.symmetric=false", "method.weight.group_size=32"),
    ("rtn", "method.weight.bits=3", "method.weight.symmetric=false", "method.weight.group_size=16"),
    ("rtn", "method.weight.granularity=channel"),
    ("rtn", "method.weight.bits=8", "method.weight.group_size=32"),
    ("rtn", "method.weight.bits=3", "+method.weight.grid=nf", "method.weight.symmetric=false", "method.weight.group_size=32"),
    ("lsq", "method.weight.bits=3", "method.weight.group_size=32"),
    ("efficientqat", "method.weight.group_size=32"),
    ("paretoq",),
    ("paretoq", "method.weight.range=restricted", "method.weight.granularity=group", "+method.weight.group_size=16"),
]


@pytest.mark.parametrize("model", ["tiny_llama_model", "tiny_gpt2_model"])
@pytest.mark.parametrize("options", MODEL_OPTIONS, ids=lambda o: " ".join(o))
def test_packed_model_gives_the_students_logits_exactly(tmp_path, model, options, request):
    teacher = request.getfixturevalue(model)
    method, student = student_of(teacher, *options)
    path = method.export(student, tmp_path, dtype="float32")
    ids = torch.randint(0, 100, (2, 16))
    loaded = load_packed(path)
    assert torch.equal(logits(loaded, ids), logits(student, ids))
    packed = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(method.quantized_layers) and not any(p.requires_grad for p in loaded.parameters())


def test_activation_and_kv_quantizers_travel_in_the_manifest(tmp_path, tiny_llama_model):
    method, student = student_of(tiny_llama_model, "llm_qat")
    path = method.export(student, tmp_path, dtype="float32")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["kv"]["bits"] == 4 and manifest["kv"]["granularity"] == "token"
    assert all(e["act"]["bits"] == 8 for e in manifest["layers"].values())
    loaded = load_packed(path)
    assert manifest["kv"]["position"] == "pre_rope" and loaded.model.layers[0].self_attn.qatlab_kv_hooked
    ids = torch.randint(0, 128, (2, 16))
    assert torch.equal(logits(loaded, ids), logits(student, ids))


def test_a_layer_left_unquantized_by_an_override_ships_dense(tmp_path, tiny_llama_model):
    method, student = student_of(tiny_llama_model, "rtn", "method.weight.bits=2", "method.weight.symmetric=false",
                                 "method.weight.group_size=32", "+method.weight_overrides.self_attn=null")
    path = method.export(student, tmp_path, dtype="float32")
    layers = json.loads((path / MANIFEST).read_text())["layers"]
    assert {e["kind"] for n, e in layers.items() if "self_attn" in n} == {"dense"}
    assert {e["kind"] for n, e in layers.items() if "mlp" in n} == {"codes"}
    ids = torch.randint(0, 128, (2, 16))
    assert torch.equal(logits(load_packed(path), ids), logits(student, ids))


def test_manifest_and_files_hold_no_latent_weights(tmp_path, tiny_llama_model):
    method, student = student_of(tiny_llama_model, "rtn", "method.weight.bits=2", "method.weight.symmetric=false")
    path = method.export(student, tmp_path)  # float16 by default
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["qatlab_version"] and manifest["method"] == "rtn"
    assert manifest["bits"] == 2 and manifest["group_size"] == 64 and manifest["dtype"] == "float16"
    assert sorted(manifest["layers"]) == method.quantized_layers
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert (path / "config.json").is_file()
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.up_proj.zeros").dtype == torch.uint8
    for name in method.quantized_layers:
        assert f"{name}.weight" not in keys and f"{name}.qweight" in keys
    ids = torch.randint(0, 128, (2, 16))
    half = logits(load_packed(path, dtype="float32"), ids)  # fp16 scales and embeddings: close, not exact
    assert torch.allclose(half, logits(student, ids), atol=2e-2)


def test_storage_report_counts_codes_scales_and_zeros(tmp_path, tiny_llama_model):
    method, student = student_of(tiny_llama_model, "rtn", "method.weight.bits=2", "method.weight.symmetric=false")
    report = storage_report(method.export(student, tmp_path))
    assert report["bits_per_weight_linear"] == pytest.approx(2 + 16 / 64 + 8 / 64)  # codes, fp16 scale, uint8 zero
    unique = {p.data_ptr(): p.numel() for p in tiny_llama_model.parameters()}
    assert report["params"] == sum(unique.values())
    assert report["compression_vs_bf16"] > 1 and report["header_bytes"] > 0


def test_clear_errors(tmp_path, tiny_llama_model):
    with pytest.raises(QatlabError, match="has no qatlab.json"):
        load_packed(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(QatlabError, match="re-export it"):
        load_packed(tmp_path)
    with pytest.raises(QatlabError, match="no quantized layers to pack"):
        export_packed(tiny_llama_model, tmp_path / "x")
    method, student = student_of(tiny_llama_model, "rtn", "method.weight.group_size=32")
    with pytest.raises(QatlabError, match="export dtype 'int8' is not known"):
        method.export(student, tmp_path / "y", dtype="int8")


def test_dense_export_is_still_available(tmp_path, tiny_llama_model):
    from transformers import AutoModelForCausalLM

    method, student = student_of(tiny_llama_model, "lsq", "method.weight.bits=3", "method.weight.group_size=32")
    with torch.no_grad():
        for layer in student.modules():
            if isinstance(layer, FakeQuantLinear):
                layer.weight_quantizer.scale.mul_(1.2)  # learned steps: the dense weights must be the quantizer's
    reloaded = AutoModelForCausalLM.from_pretrained(export_hf(student, tmp_path)).eval()
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(logits(reloaded, ids), logits(student, ids), rtol=0, atol=1e-5)


# ---- a run: export=true, and the packed model's PPL from the same evaluator ------------------------


def test_tiny_run_exports_and_evaluates_the_packed_model(tmp_path):
    from tests.test_onebit import make_cfg

    cfg = make_cfg(tmp_path, "experiment=tiny_smoke", "method=rtn", "method.weight.bits=2",
                   "method.weight.symmetric=false", "export=true", "eval.packed=true", "eval.rtn_baseline=false")
    results = train(cfg)
    assert (tmp_path / "export" / MANIFEST).is_file() and results["export_dir"] == str(tmp_path / "export")
    # fp16 storage of scales and embeddings moves the PPL a little, nothing more
    assert math.isclose(results["test/ppl_packed"], results["test/ppl_student"], rel_tol=1e-2)
    assert json.loads((tmp_path / "results.json").read_text())["test/ppl_packed"] == results["test/ppl_packed"]


# ---- a packed folder is checked before anything is built (issue 19: tampered, truncated, incomplete) -----


@pytest.fixture
def packed_dir(tmp_path, tiny_llama_model):
    method, student = student_of(tiny_llama_model, "rtn", "method.weight.group_size=32")
    return method.export(student, tmp_path / "export", dtype="float32")


def edit_manifest(path, change):
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("key, value", [("bits", 2), ("bits", 3), ("qmin", 0), ("fixed_zero", 0.5)])
def test_a_tampered_grid_in_the_manifest_is_refused_naming_layer_and_key(packed_dir, key, value):
    layer = "model.layers.0.mlp.down_proj"
    edit_manifest(packed_dir, lambda m: m["layers"][layer]["grid"].__setitem__(key, value))
    with pytest.raises(QatlabError, match=rf"qatlab.json was changed after export: layers.{layer}.grid.{key} "):
        load_packed(packed_dir)


def test_a_tampered_group_size_is_refused(packed_dir):
    edit_manifest(packed_dir, lambda m: m["layers"]["model.layers.1.self_attn.q_proj"].__setitem__("group_size", 16))
    with pytest.raises(QatlabError, match=r"layers.model.layers.1.self_attn.q_proj.group_size \(16 in qatlab.json, 32 at export\)"):
        load_packed(packed_dir)


def test_a_missing_manifest_key_is_named(packed_dir):
    edit_manifest(packed_dir, lambda m: m.pop("tied"))
    with pytest.raises(QatlabError, match=r"lacks key\(s\) \['tied'\]; re-export"):
        load_packed(packed_dir)
    edit_manifest(packed_dir, lambda m: m.update(tied={}) or m["layers"]["model.layers.0.mlp.up_proj"].pop("grid"))
    with pytest.raises(QatlabError, match=r"layer 'model.layers.0.mlp.up_proj' lacks key\(s\) \['grid'\]"):
        load_packed(packed_dir)


def test_a_truncated_weights_file_is_a_clear_error(packed_dir):
    data = (packed_dir / WEIGHTS).read_bytes()
    (packed_dir / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(QatlabError, match=r"model.safetensors' is not a readable safetensors file .*truncated"):
        load_packed(packed_dir)


def test_a_changed_tensor_fails_its_checksum(packed_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(str(packed_dir / WEIGHTS))
    with safe_open(str(packed_dir / WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    state["model.layers.0.mlp.up_proj.scales"] = state["model.layers.0.mlp.up_proj.scales"] * 2
    save_file(state, str(packed_dir / WEIGHTS), metadata=metadata)
    with pytest.raises(QatlabError, match=r"tensor 'model.layers.0.mlp.up_proj.scales' .* does not match its sha256"):
        load_packed(packed_dir)


def test_plain_from_pretrained_refuses_a_packed_folder_and_names_the_loader(packed_dir):
    """Issue 18/19: from_pretrained used to load this folder with random weights and only a warning."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"qatlab.export.load_packed"):
        AutoModelForCausalLM.from_pretrained(packed_dir)
    assert load_packed(packed_dir) is not None  # qatlab's own loader reads it
