"""qatlab: quantization-aware training experiments for LLMs (Lightning + Hydra)."""

__version__ = "0.1.0"
