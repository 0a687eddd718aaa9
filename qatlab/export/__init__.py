"""Packed low-bit export (one format for every method), its loader and its storage report.

export_packed(student, path) writes the checkpoint (layout: qatlab.export.manifest); load_packed(path)
rebuilds an inference model from it; storage_report(path) measures it.
"""

from qatlab.export.loader import load_packed
from qatlab.export.storage import storage_report
from qatlab.export.writer import export_packed

__all__ = ["export_packed", "load_packed", "storage_report"]
