"""Shared tiny models for fast CPU tests (random weights, no downloads)."""

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


@pytest.fixture
def tiny_llama_model() -> LlamaForCausalLM:
    """2-layer Llama, hidden 64, tied embeddings; eval mode, seeded."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_gpt2_model() -> GPT2LMHeadModel:
    """1-layer GPT-2 (Conv1D projections), hidden 32; eval mode, seeded."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


# ---- shared cache for qatlab.models / qatlab.data tests ----------------------------------------


def pytest_configure(config):
    """One cache per checkout (git-ignored .cache/): SmolLM2 is dequantized once, corpora packed once."""
    os.environ.setdefault("QATLAB_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "qatlab"))
    # Runs made by tests append their rows to a throwaway store, not the user's outputs/results.jsonl.
    os.environ.setdefault("QATLAB_RESULTS", str(Path(__file__).resolve().parent.parent / ".cache" / "test_results.jsonl"))


# ---- only GPU tests may skip on a CPU machine ----------------------------------------------------
# A test skipped because a package is missing hides a broken install (the dev extra must bring
# everything the suite needs): on a machine without CUDA, a skip outside @pytest.mark.gpu fails.
# Tests that need an optional extra beyond dev carry @pytest.mark.extra("<name>") and may skip.

def _skip_allowed(item) -> bool:
    import torch

    return torch.cuda.is_available() or any(item.get_closest_marker(m) for m in ("gpu", "extra"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and not _skip_allowed(item):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} was skipped ({reason}) but is not marked gpu: on a CPU machine only GPU "
                           "tests may skip; install what it needs through the dev extra (pip install -e '.[dev]')")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:  # a module-level importorskip: the whole file would vanish from the run
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} was skipped at collection ({report.longrepr}); the dev extra must "
                           "install what every test module imports")
