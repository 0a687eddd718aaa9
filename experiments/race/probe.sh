#!/usr/bin/env bash
# Learning-rate probes for the W2 g64 race (2.5 CPU-minutes each, cosine over the budget); rows go to probe.jsonl.
#   bash experiments/race/probe.sh
set -u
cd "$(dirname "$0")/../.."
STORE=${STORE:-experiments/race/probe.jsonl}
B="budget.cpu_minutes=2.5 budget.points=[2.5] budget.schedule=cosine scheduler=constant trainer.max_steps=100000 \
   trainer.val_check_interval=100000 logger=none callbacks=none eval.rtn_baseline=false results_file=$STORE"
run() { python -m qatlab "$@" $B task_name=race_probe 2>&1 | grep -E "^\| |budget:" ; }
for lr in 2e-4 1e-3; do run experiment=lsq_smollm2_w2 optimizer.lr=$lr; done
for lr in 1e-4 5e-4 2e-3; do run experiment=paretoq_smollm2_w2 optimizer.lr=$lr; done
for lr in 1e-4 1e-3; do run experiment=kd_smollm2_w2 method.weight.group_size=64 optimizer.lr=$lr; done
