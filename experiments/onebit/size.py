"""Stored size of the packed OneBit SmolLM2 against its bf16 checkpoint (bits per weight, all included).

    python experiments/onebit/size.py [EXPORT_DIR]

EXPORT_DIR: a folder written by `export=true` (<run dir>/export). Without it, the SVID-initialized
OneBit student of the embedded SmolLM2 is packed into a temporary folder: the size does not depend
on training. The bf16 reference is the teacher saved with save_pretrained in bfloat16.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from qatlab.export import load_packed, storage_report
from qatlab.export import export_packed
from qatlab.recipes import compose_recipe
from qatlab.models import load_causal_lm
from qatlab.train import make_student


def folder_bytes(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def main() -> None:
    teacher, _ = load_causal_lm("embedded:smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if len(sys.argv) > 1:
            export = Path(sys.argv[1])
        else:
            method = compose_recipe("onebit")
            student = make_student(teacher, method, "float32")
            method.initialize(student, teacher, [])
            export = export_packed(student, tmp / "onebit", method="onebit")
        teacher.to(torch.bfloat16).save_pretrained(tmp / "bf16")
        bf16_file = folder_bytes(tmp / "bf16", "*.safetensors")
        report = storage_report(export)
        loaded = load_packed(export, dtype="float32")
        assert loaded(input_ids=torch.arange(16)[None]).logits.isfinite().all()

    print(f"export: {export}")
    print(f"parameters (tied counted once):   {report['params']:,}")
    print(f"bf16 checkpoint (safetensors):    {bf16_file / 2**20:8.2f} MiB  (2 x params = {report['bf16_bytes'] / 2**20:.2f} MiB)")
    print(f"OneBit packed (model.safetensors):  {report['file_bytes'] / 2**20:6.2f} MiB")
    print(f"compression vs the bf16 file:     {bf16_file / report['file_bytes']:.2f}x")
    print(f"bits per weight, all included:    {report['bits_per_weight_all']:.3f}")
    print(f"bits per weight, OneBit layers:   {report['bits_per_weight_linear']:.3f}  (signs 32 per int32 + g + h + norm, no bias)")


if __name__ == "__main__":
    main()
