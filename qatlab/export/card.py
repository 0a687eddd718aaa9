"""The model card (README.md) every shipped folder carries: what was trained, at which bits, and its PPL."""

from __future__ import annotations

from typing import Any


def model_card(fmt: str, results: dict[str, Any], note: str = "") -> str:
    """Markdown for folder README.md: method, bits, grid, the student's test PPL and the windows it was scored on."""
    ppl = results.get("test/ppl_student")
    lines = [
        f"# {results.get('method', 'qatlab')} student ({fmt} export)",
        "",
        "Written by qatlab (a QAT framework for LLMs) from the student's own quantized codes.",
        "",
        f"- base model: {results.get('model', 'unknown')}",
        f"- method: {results.get('method')}; weights: {results.get('w_bits')} bits, grid {results.get('w_grid')}, "
        f"group size {results.get('group_size')}",
        f"- activations: {results.get('a_bits', 16)} bits; K/V: {results.get('kv_bits', 16)} bits",
        f"- student test PPL (qatlab's pinned evaluator): {ppl if ppl is None else round(float(ppl), 4)} on "
        f"{results.get('test/windows')} windows of the test split",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"
