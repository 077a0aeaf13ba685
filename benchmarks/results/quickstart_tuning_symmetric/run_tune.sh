#!/usr/bin/env bash
# Tuning stage of benchmarks/results/quickstart_tuning_symmetric/PROTOCOL.md
set -euo pipefail
cd /work/main
R=benchmarks/results/quickstart_tuning_symmetric
S=/tmp/g/sym/start_1x4g2.pkl
COMMON="--p-lr 1e-4 --steps 100 --update-fraction 0.03 --tolerance 0.01 --num-codebooks 1 --group-size 2 --codebook-bits 4 --start-cache $S --seed 101 --seed 102 --seed 103"
PY=.venv/bin/python
pv() { # name v_lr trust decay
  $PY benchmarks/quickstart_tuning_sweep.py $COMMON --modes pv --v-lr $2 --trust-ratio $3 --buffer-decay $4 --out $R/tune_pv_$1.json > /tmp/g/sym/tune_pv_$1.log 2>&1
}
ste() {
  $PY benchmarks/quickstart_tuning_sweep.py $COMMON --modes ste --v-lr 5e-4 --v-lr 7.5e-4 --v-lr 1e-3 --v-lr 1.5e-3 --v-lr 2e-3 --v-lr 3e-3 --out $R/tune_ste.json > /tmp/g/sym/tune_ste.log 2>&1
}
pv lr1e-3_t0.005 1e-3 0.005 0   # builds the start
ste &
pv lr5e-4_t0.005 5e-4 0.005 0
pv lr2e-3_t0.005 2e-3 0.005 0
pv lr1e-3_t0.02 1e-3 0.02 0
pv lr2e-3_t0.02 2e-3 0.02 0
pv lr5e-3_t0.02_d0.1 5e-3 0.02 0.1
wait
echo TUNING DONE
