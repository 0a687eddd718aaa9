"""Export: qatlab's packed format (every method), its loader and storage report, and the engines' formats.

export_packed(student, path) writes the checkpoint (layout: qatlab.export.manifest); load_packed(path)
rebuilds an inference model from it; storage_report(path) measures it. qatlab.export.ship plans, writes and
reloads every format `export=` chooses: packed, hf, compressed_tensors (compressed_tensors.py), gguf (gguf.py).
"""

from qatlab.export.loader import load_packed
from qatlab.export.storage import storage_report
from qatlab.export.writer import export_packed

__all__ = ["export_packed", "load_packed", "storage_report"]
