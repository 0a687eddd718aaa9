"""What the machine is, and (--ceilings) the two ceilings every figure is read against.

    python experiments/gpu/probe.py --out probe.json [--ceilings]

Versions of what qatlab imports (and whether each imports at all: the carried wheels are checked
here first), the GPU, and with --ceilings: a device-to-device copy (bytes read + written / time) and
a bf16 matrix product on random data (2 n^3 / time), medians of CUDA-event timings after warm-up.
On the CPU (the kit's dry run) the ceilings run at toy sizes, timed by the wall clock.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from pathlib import Path

MODULES = {  # import name -> distribution name
    "torch": "torch", "lightning": "lightning", "transformers": "transformers", "triton": "triton",
    "torchmetrics": "torchmetrics", "safetensors": "safetensors", "accelerate": "accelerate",
    "tokenizers": "tokenizers", "numpy": "numpy", "hydra": "hydra-core", "omegaconf": "omegaconf",
    "gguf": "gguf", "bitsandbytes": "bitsandbytes", "pytest": "pytest",
}


def versions() -> dict:
    out = {}
    for module, dist in MODULES.items():
        try:
            importlib.import_module(module)
            out[dist] = importlib.metadata.version(dist)
        except Exception as e:  # noqa: BLE001 - a missing or broken package is a finding, not a crash
            out[dist] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return out


def gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    p = torch.cuda.get_device_properties(0)
    return {"cuda": True, "name": p.name, "torch_cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 2),
            "device_count": torch.cuda.device_count()}


def time_ms(fn, cuda: bool, reps: int) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ceilings() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n_copy = 2**30 if cuda else 2**24  # bytes: 1 GiB on the GPU (many times the 60 MB L2)
    src = torch.randn(n_copy // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), cuda, 20 if cuda else 5)
    n = 8192 if cuda else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, cuda, 20 if cuda else 3)
    return {"copy_bytes": 2 * n_copy, "copy_gbs": round(2 * n_copy / copy_ms / 1e6, 1),
            "matmul_n": n, "bf16_matmul_tflops": round(2 * n**3 / mm_ms / 1e9, 1),
            "timing": "CUDA events, median of 20 after 3 warm-ups" if cuda else "wall clock (CPU, toy sizes)"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ceilings", action="store_true")
    a = p.parse_args(argv)
    result = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
              "versions": versions(), "gpu": gpu()}
    if a.ceilings:
        result["ceilings"] = ceilings()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
