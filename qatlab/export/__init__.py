"""Packed, method-specific export formats and their loaders."""

from qatlab.export.onebit import export_onebit, load_onebit, storage_report

__all__ = ["export_onebit", "load_onebit", "storage_report"]
