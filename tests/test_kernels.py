"""Packed GEMV: the torch fallback (CPU), the Triton kernels (CPU interpreter; GPU when present), the benchmark.

Every path is checked against one reference: F.linear with the fake-quant weight (W2) or with
the ±1 sign matrix, g and h (W1). The fallback must match it exactly in fp32 on the CPU; the
kernels accumulate in their own order, so they match to a tolerance.
"""

import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatlab import kernels
from qatlab.errors import QatlabError
from qatlab.export import load_packed
from qatlab.export.bitpack import pack_codes
from qatlab.export import export_packed
from qatlab.export.int_export import pack_codes_layer
from qatlab.export.manifest import grid_from_dict
from qatlab.export.packed_linear import PackedLinear
from qatlab.export.packed_onebit import PackedOneBitLinear
from qatlab.recipes import compose_recipe
from qatlab.quantizers import QuantConfig, fake_quantize
from qatlab.layers import FakeQuantLinear
from qatlab.train import make_student

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
W2 = QuantConfig(bits=2, symmetric=False, group_size=64)
KERNEL_CONFIGS = [W2, QuantConfig(bits=4, symmetric=True, granularity="channel"),
                  QuantConfig(bits=8, symmetric=False, group_size=32),
                  QuantConfig(bits=2, symmetric=True, range="full", group_size=64)]
TILE = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}


def w2_case(cfg=W2, out_features=40, in_features=192, device="cpu"):
    """(fake-quant layer, packed layer): 40 rows and 192 inputs leave ragged N and K tiles."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(device)
    fake = FakeQuantLinear.from_linear(linear, cfg)
    t, entry = pack_codes_layer(fake)
    return fake, PackedLinear(t["qweight"], t["scales"], t.get("zeros"), linear.bias, in_features,
                              grid_from_dict(entry["grid"], "test"), entry["group_size"])


def w1_case(out_features=40, in_features=200, device="cpu", dtype=torch.float32):
    """(sign matrix, packed layer, g, h); 200 inputs: the last word is partly padding."""
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features, device=device)
    g = (torch.rand(in_features, device=device) + 0.5).to(dtype)
    h = (torch.rand(out_features, device=device) + 0.5).to(dtype)
    layer = PackedOneBitLinear(pack_codes((w >= 0).to(torch.uint8), 1), g, h, None, False, 1e-5)
    return torch.where(w >= 0, 1.0, -1.0).to(dtype), layer, g, h


# ---- the torch fallback (every device; CPU here) -----------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 4, 16, 33])
def test_w2_fallback_equals_the_reference_exactly(tokens):
    fake, packed = w2_case()
    x = torch.randn(tokens, 192)
    reference = F.linear(x, fake_quantize(fake.weight, W2), fake.bias)
    with torch.no_grad():
        assert torch.equal(packed(x), reference)
    assert not kernels.use_kernel(x, 192)  # CPU tensors always take the fallback


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_w1_fallback_equals_the_reference_exactly(tokens):
    signs, layer, g, h = w1_case()
    x = torch.randn(tokens, 200)
    assert torch.equal(layer.signs(), signs)
    assert torch.equal(layer.project(x), F.linear(x * g, signs) * h)


# ---- the Triton kernels in the CPU interpreter (TRITON_INTERPRET=1) ---------------------------------


def kernel_module(name: str):
    """qatlab.kernels.<name>, with Triton's interpreter when there is no GPU (skips without Triton)."""
    if not kernels.HAVE_TRITON:
        pytest.skip("triton is not installed (pip install triton, or the .[kernels] extra)")
    if CUDA:
        return importlib.import_module(f"qatlab.kernels.{name}")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates the kernel, i.e. at import
    try:
        return importlib.import_module(f"qatlab.kernels.{name}")
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.mark.skipif(CUDA, reason="the interpreter tests run where there is no GPU")
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("cfg", KERNEL_CONFIGS, ids=lambda c: c.describe())
def test_int_kernel_in_the_interpreter_matches_the_reference(cfg, tokens):
    int_gemv = kernel_module("w2_gemv").int_gemv
    fake, packed = w2_case(cfg)
    x = torch.randn(tokens, 192)
    reference = F.linear(x, fake_quantize(fake.weight, cfg), fake.bias)
    y = int_gemv(x, packed.qweight, packed.scales, packed.zeros, packed.grid.bits, packed.group_size,
                 packed.grid.fixed_zero - packed.grid.qmin, packed.bias, tile=TILE)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="the interpreter tests run where there is no GPU")
@pytest.mark.parametrize("tokens", [1, 7, 16])
def test_sign_kernel_in_the_interpreter_matches_the_reference(tokens):
    sign_gemv = kernel_module("w1_gemv").sign_gemv
    signs, layer, g, h = w1_case()
    x = torch.randn(2, tokens, 200)[:1]  # (1, T, K): leading dims are flattened to tokens
    y = sign_gemv(x, layer.qweight, g, h, tile=TILE)
    assert y.shape == (1, tokens, 40)
    torch.testing.assert_close(y, F.linear(x * g, signs) * h, rtol=1e-5, atol=1e-5)
    with pytest.raises(QatlabError, match="1-16 tokens, not 17"):
        sign_gemv(torch.randn(17, 200), layer.qweight, g, h, tile=TILE)


# ---- on a GPU (bf16; skipped without CUDA) --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not kernels.HAVE_TRITON, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("tokens", [1, 4, 16])
@pytest.mark.parametrize("cfg", KERNEL_CONFIGS, ids=lambda c: c.describe())
def test_int_kernel_on_the_gpu_matches_the_fallback(cfg, tokens):
    fake, packed = w2_case(cfg, out_features=4096 + 8, in_features=1024, device="cuda")
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    packed = packed.to(torch.bfloat16)
    assert kernels.use_kernel(x, 1024)
    with torch.no_grad():
        y = packed(x)
        reference = F.linear(x, packed.dequantized_weight(torch.bfloat16), packed.bias)  # what QATLAB_KERNELS=0 runs
    # the same weight values; only the fp32 accumulation order and where bf16 rounds differ
    torch.testing.assert_close(y, reference, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not kernels.HAVE_TRITON, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("tokens", [1, 16])
def test_sign_kernel_on_the_gpu_matches_the_fallback(tokens):
    signs, layer, g, h = w1_case(4096 + 8, 1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    reference = (F.linear((x * g).float(), signs.float()) * h.float()).to(torch.bfloat16)
    torch.testing.assert_close(layer.project(x), reference, rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not kernels.HAVE_TRITON, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("method_name", ["rtn", "onebit"])
def test_packed_model_on_the_gpu_in_bf16_is_close_to_the_student(tmp_path, tiny_llama_model, method_name):
    """Stated GPU tolerance: bf16 packed logits (kernels for <= 16 tokens) within 0.1 of the fp32 student's."""
    overrides = ["method.weight.bits=2", "method.weight.symmetric=false"] if method_name == "rtn" else []
    recipe = compose_recipe(method_name, overrides)
    student = make_student(tiny_llama_model, recipe, "float32").eval()
    recipe.initialize(student, tiny_llama_model, [])
    packed = load_packed(export_packed(student, tmp_path), dtype="bfloat16", device="cuda")
    ids = torch.randint(0, 128, (1, 16), device="cuda")
    with torch.no_grad():
        a = packed(input_ids=ids).logits.float()
        b = student.cuda()(input_ids=ids).logits.float()
    torch.testing.assert_close(a, b, rtol=0, atol=0.1)


# ---- the benchmark's CPU smoke test ---------------------------------------------------------------------


def test_benchmark_runs_tiny_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("kernel_bench", ROOT / "experiments" / "kernels" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--out", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["tiny"] and {r["kernel"] for r in saved["gemv"]} == {"bf16", "w2", "w1"}
    assert len(result["gemv"]) == 3 * len(bench.TINY_SHAPES) * len(bench.TINY_BATCHES)
    assert all(r["time_us"] > 0 and r["gbs"] >= 0 for r in saved["gemv"])
    decode = {r["model"]: r for r in saved["decode"]}
    assert set(decode) == {"bf16", "w2", "w1"} and decode["w2"]["tokens_per_s"] > 0
    assert decode["w2"]["top1_agreement"] > 0.5 and decode["w2"]["max_abs_logit_diff"] < 0.1
