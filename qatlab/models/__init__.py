"""Model loading (embedded SmolLM2, tiny random Llama, folders, hub ids) and per-family layer maps."""

from qatlab.models.embedded import default_cache_dir, materialize_smollm2
from qatlab.models.layer_maps import LayerMap, decoder_blocks, layer_map_for
from qatlab.models.loading import load_causal_lm

__all__ = ["LayerMap", "decoder_blocks", "default_cache_dir", "layer_map_for", "load_causal_lm", "materialize_smollm2"]
