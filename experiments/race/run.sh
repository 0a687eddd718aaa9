#!/usr/bin/env bash
# The W2 g64 race of the recipes on the embedded SmolLM2 (issue 16), one run at a time, every run a row in
# experiments/race/results.jsonl. Budget: process CPU time (qatlab/callbacks/compute_budget.py), 20 CPU-minutes
# (the issue's budget; ~10 wall-minutes on the idle 2-core machine, 2 threads); PPL on the pinned 8 test windows at the
# points; lr cosine over the budget. Then: python -m qatlab.report --results experiments/race/results.jsonl
#   bash experiments/race/run.sh refs            # RTN and GPTQ at W2 g64: the reference lines
#   bash experiments/race/run.sh race kd lsq ... # recipes at 20 CPU-minutes
#   BUDGET=60 POINTS=[10,20,30,40,50,60] bash experiments/race/run.sh race <best>
set -u
cd "$(dirname "$0")/../.."
STORE=${STORE:-experiments/race/results.jsonl}
BUDGET=${BUDGET:-20}
POINTS=${POINTS:-[5,10,15,20]}
EXTRA=${EXTRA:-}
TASK=${TASK:-race_w2_g64}
COMMON="results_file=$STORE logger=none callbacks=none +trainer.enable_checkpointing=false task_name=$TASK"
B="budget.cpu_minutes=$BUDGET budget.points=$POINTS budget.schedule=cosine scheduler=constant trainer.max_steps=1000000 \
   +trainer.limit_val_batches=0"
declare -A RECIPE=(
  [kd]="experiment=kd_smollm2_w2 method.weight.group_size=64 optimizer.lr=5e-4"
  [bitdistiller]="experiment=bitdistiller_smollm2_w2"
  [lsq]="experiment=lsq_smollm2_w2"
  [efficientqat]="experiment=efficientqat_smollm2_w2"
  [paretoq]="experiment=paretoq_smollm2_w2"
)
case "$1" in
  refs)
    python -m qatlab method=rtn method.weight.bits=2 method.weight.symmetric=false $COMMON
    python -m qatlab method=rtn method.weight.bits=2 +method.weight.range=full $COMMON
    python -m qatlab experiment=gptq_smollm2_w4 method.weight.bits=2 init_batches=64 $COMMON task_name=$TASK ;;
  race)
    shift
    for name in "$@"; do
      echo "== $name (${BUDGET} CPU-minutes) $(date)"
      python -m qatlab ${RECIPE[$name]} $B $COMMON $EXTRA 2>&1 | grep -E "^\| |budget:|rror"
    done ;;
esac
