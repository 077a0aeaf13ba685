#!/usr/bin/env bash
# The PVQ rows of the README's layer table, with the GPTQ rows they are compared with, in
# one run on one machine: bash benchmarks/pvq_layer_rows.sh
# (writes benchmarks/results/pvq/layer_*.json). Each row is its own process: `seconds`
# includes compilation, `seconds_warm` is a second run in the same process.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/pvq
row() { name=$1; shift; python benchmarks/quantize_layer.py --problem synthetic "$@" --out "$out/layer_$name.json" | tail -1; }
row gptq_3bit_g128 --method gptq --bits 3 --group-size 128
row gptq_4bit_g128 --method gptq --bits 4 --group-size 128
row pvq_8x14a2 --method pvq
row pvq_8x14a2_no_rotation --method pvq --rotate none
row pvq_16x27a3 --method pvq --group-size 16 --pulses 27 --amplitude-bits 3
