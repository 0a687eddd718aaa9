#!/usr/bin/env bash
# The LLM-QAT study on the embedded SmolLM2-135M (CPU budget; see README.md for the numbers).
# Each run prints teacher / RTN-at-the-same-bits / LLM-QAT PPL and writes results.json.
set -euo pipefail
OUT=${OUT:-/tmp/llm_qat}
STEPS=${STEPS:-60}
common="experiment=llm_qat_smollm2 data.generation.num_samples=64 trainer.max_steps=$STEPS logger=csv callbacks=none"
python -m qatlab $common hydra.run.dir=$OUT/w4a8kv4
python -m qatlab $common method.activation=null method.kv=null hydra.run.dir=$OUT/w4a16kv16
python -m qatlab $common method.weight.bits=8 method.kv.bits=8 hydra.run.dir=$OUT/w8a8kv8
