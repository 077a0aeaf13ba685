#!/usr/bin/env bash
# Evaluation stage of benchmarks/results/quickstart_tuning_symmetric/PROTOCOL.md (settings from choice.json)
set -euo pipefail
cd /work/main
R=benchmarks/results/quickstart_tuning_symmetric
S=/tmp/g/sym/start_1x4g2.pkl
SEEDS="--seed 201 --seed 202 --seed 203 --seed 204 --seed 205 --seed 206 --seed 207 --seed 208 --seed 209 --seed 210"
COMMON="--p-lr 1e-4 --steps 100 --update-fraction 0.03 --tolerance 0.01 --num-codebooks 1 --group-size 2 --codebook-bits 4 --start-cache $S $SEEDS"
PY=.venv/bin/python
$PY benchmarks/quickstart_tuning_sweep.py $COMMON --modes pv --v-lr 1e-3 --trust-ratio 0.02 --out $R/heldout_pv.json > /tmp/g/sym/heldout_pv.log 2>&1 &
$PY benchmarks/quickstart_tuning_sweep.py $COMMON --modes ste --v-lr 1e-3 --out $R/heldout_ste.json > /tmp/g/sym/heldout_ste.log 2>&1
wait
echo EVAL DONE
