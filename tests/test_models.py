import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import qatlab.models.loading as loading
from qatlab.data import load_documents, pack_documents
from qatlab.errors import QatlabError
from qatlab.models import decoder_blocks, default_cache_dir, layer_map_for, load_causal_lm, materialize_smollm2
from qatlab.models.layer_maps import LAYER_MAPS


def test_tiny_llama_shape_and_tokenizer():
    model, tok = load_causal_lm("tiny-llama")
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok) == 49152
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert not model.training
    assert tok.pad_token is not None
    assert len(decoder_blocks(model)) == 2


def test_tiny_llama_is_deterministic_per_seed():
    a, _ = load_causal_lm("tiny-llama")
    b, _ = load_causal_lm("tiny-llama:0")
    c, _ = load_causal_lm("tiny-llama:1")
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_tiny_llama_dtype():
    model, _ = load_causal_lm("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_dtype_is_named():
    with pytest.raises(QatlabError, match=r"model.dtype='fp8' is not known; use one of \['bfloat16', 'float16'"):
        load_causal_lm("tiny-llama", dtype="fp8")


def test_bad_tiny_seed_is_named():
    with pytest.raises(QatlabError, match=r"model.name_or_path='tiny-llama:x' has a bad seed"):
        load_causal_lm("tiny-llama:x")


@pytest.mark.parametrize("path", ["/no/such/model", "./no_such_model", "~/no_such_model_qatlab", "a/b/c"])
def test_missing_local_path_is_named(path):
    with pytest.raises(QatlabError, match=rf"model.name_or_path='{path}' does not exist; .*model=smollm2_135m"):
        load_causal_lm(path)


def test_hub_failure_becomes_one_clear_line(monkeypatch):
    class Offline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading, "AutoModelForCausalLM", Offline)
    with pytest.raises(QatlabError, match=r"model.name_or_path='someorg/some-model' could not be loaded .*HF_HOME"):
        load_causal_lm("someorg/some-model")


def test_local_folder_roundtrip(tmp_path):
    model, tok = load_causal_lm("tiny-llama:3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_causal_lm(str(tmp_path))
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)
    assert len(tok2) == len(tok)


def test_embedded_cache_is_dense_and_complete():
    folder = materialize_smollm2()
    assert folder.parent == default_cache_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30


def test_unknown_model_type_lists_known_ones():
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=4, vocab_size=64)
    )
    with pytest.raises(QatlabError, match=r"model_type 'bloom' has no layer map; known: .*llama.*LAYER_MAPS"):
        layer_map_for(model)


def tiny_of(model_type: str):
    """A 2-block random model of a family, small enough to build in milliseconds."""
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if model_type == "opt":
        kwargs |= dict(ffn_dim=64, word_embed_proj_dim=32)
    if model_type.startswith("gemma"):
        kwargs |= dict(head_dim=8)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))


@pytest.mark.parametrize("model_type", sorted(LAYER_MAPS))
def test_layer_maps_match_real_modules(model_type):
    """Every map points at a real ModuleList, a real attention module, and each regex finds linears."""
    model = tiny_of(model_type)
    lmap = layer_map_for(model)
    block = decoder_blocks(model)[0]
    assert len(decoder_blocks(model)) == 2
    block.get_submodule(lmap.attention)
    names = [n for n, m in block.named_modules() if getattr(m, "weight", None) is not None and m.weight.ndim == 2]
    for pattern in lmap.linears:
        assert any(re.fullmatch(pattern, n) for n in names), (pattern, names)


def perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean NLL of tokens 2..T), fp32 log-softmax, over (n, T) blocks."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in blocks:
            logits = model(ids[None]).logits[0, :-1].float()  # (T-1, V)
            nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def test_embedded_smollm2_perplexity_on_wiki_test():
    model, tok = load_causal_lm("embedded:smollm2-135m")
    blocks = pack_documents(load_documents("gensim_wiki", "test"), tok, 1024, cache_dir=str(default_cache_dir()))
    ppl = perplexity(model, blocks[:4])
    print(f"SmolLM2-135M (dequantized Q4_1) PPL on the first 4 x 1024 gensim_wiki test tokens: {ppl:.2f}")
    assert math.isfinite(ppl) and ppl < 50
