"""Corpora (offline gensim data, hub datasets, local files), the packing protocol, the DataModule."""

from qatlab.data.corpora import load_documents
from qatlab.data.datamodule import TextDataModule
from qatlab.data.generation import GenerationConfig, generate_dataset, load_generated
from qatlab.data.packing import pack_documents
from qatlab.data.teacher_generated import TeacherGeneratedDataModule

__all__ = ["TextDataModule", "load_documents", "pack_documents"]
__all__ += ["GenerationConfig", "TeacherGeneratedDataModule", "generate_dataset", "load_generated"]
