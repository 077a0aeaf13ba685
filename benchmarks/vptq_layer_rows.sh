#!/usr/bin/env bash
# The VPTQ rows of the README's layer table, with the GPTQ 2-bit and AQLM 2x8 rows they are
# compared with, in one run on one machine: bash benchmarks/vptq_layer_rows.sh
# (writes benchmarks/results/vptq/layer_*.json). Each row is its own process: `seconds`
# includes compilation, `seconds_warm` is a second run in the same process.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/vptq
row() { name=$1; shift; python benchmarks/quantize_layer.py --problem synthetic "$@" --out "$out/layer_$name.json" | tail -1; }
row gptq_2bit_g128 --method gptq --bits 2 --group-size 128
row aqlm_2x8_g8_beam1 --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8 --beam-size 1
row aqlm_2x8_g8_beam8 --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8 --beam-size 8
row vptq_8x8r8 --method vptq
row vptq_4x8 --method vptq --vector-size 4 --codebook-bits 8 --residual-bits 0
