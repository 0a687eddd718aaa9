#!/usr/bin/env bash
# Issue 17: the paper_table rows whose defaults changed to the reference code's, re-run on the embedded SmolLM2
# (same budgets as before; the 2-core CPU, one run at a time). Rows -> experiments/fidelity/results.jsonl.
#   bash experiments/fidelity/rerun.sh [experiment ...]
set -u
cd "$(dirname "$0")/../.."
STORE=experiments/fidelity/results.jsonl
for e in ${@:-llm_qat_smollm2 bitdistiller_smollm2_w2 onebit_smollm2 zeroquant_smollm2}; do
  echo "== $e $(date)"
  python -m qatlab experiment=$e results_file=$STORE logger=none callbacks=none +trainer.enable_checkpointing=false \
    2>&1 | grep -E "^\| |rror|wall time"
done
