#!/usr/bin/env bash
# After the W2 g64 race: the best recipe (lowest final PPL at 20 CPU-minutes) for 60 CPU-minutes, then W3 g64
# and ternary g64 for the best two at 20 CPU-minutes (issue 16). Reads the race rows from the store.
#   bash experiments/race/queue.sh
set -u
cd "$(dirname "$0")/../.."
best=$(python - <<'PY'
import json
rows = [json.loads(l) for l in open("experiments/race/results.jsonl")]
race = [r for r in rows if r.get("task_name") == "race_w2_g64" and r.get("status") == "ok"
        and r.get("method") not in ("rtn", "gptq")]
best = {}
for r in race:
    best[r["method"]] = min(best.get(r["method"], float("inf")), r["test/ppl_student"])
print(" ".join(sorted(best, key=best.get)[:2]))
PY
)
set -- $best
echo "best two at 20 CPU-minutes: $*"
TERNARY="method.weight.bits=2 ++method.weight.symmetric=true ++method.weight.range=restricted"
BUDGET=60 POINTS=[10,20,30,40,50,60] TASK=race_w2_g64_60min bash experiments/race/run.sh race "$1"
for name in "$@"; do
  EXTRA="method.weight.bits=3" TASK=race_w3_g64 bash experiments/race/run.sh race "$name"
done
for name in "$@"; do
  EXTRA="$TERNARY" TASK=race_ternary_g64 bash experiments/race/run.sh race "$name"
done
