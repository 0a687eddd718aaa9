"""Copy the comparable rows of a results store (the full 8 test windows, no probes) into
experiments/report/results.jsonl; the report is then drawn from that file:

    python experiments/report/select.py outputs/results.jsonl
    python -m qatlab.report --results experiments/report/results.jsonl --out experiments/report
"""

import sys
from pathlib import Path

from qatlab.results import append_row, read_rows

HERE = Path(__file__).resolve().parent


def comparable(row: dict) -> bool:
    # bits_per_weight 16 on a quantized run = a row written before its method reported its own
    # storage (OneBit's first run): its x would be wrong, so it is left out.
    stale = row.get("w_bits", 16) < 16 and row.get("bits_per_weight", 0) >= 16
    return (row.get("status") == "ok" and row.get("test/windows") == 8 and not stale
            and "probe" not in str(row.get("output_dir", "")))


def main(source: str) -> None:
    target = HERE / "results.jsonl"
    target.unlink(missing_ok=True)
    rows = [r for r in read_rows(source) if comparable(r)]
    for row in rows:
        append_row(target, row)
    print(f"{len(rows)} comparable rows -> {target}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/results.jsonl")
