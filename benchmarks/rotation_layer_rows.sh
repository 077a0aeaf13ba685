#!/usr/bin/env bash
# The rotation rows of the README's layer table: GPTQ at 2 and 3 bits and AQLM 2x8, each
# with and without a random Hadamard rotation, in one run on one machine:
# bash benchmarks/rotation_layer_rows.sh (writes benchmarks/results/rotations/layer_*.json).
# Each row is its own process: `seconds` includes compilation, `seconds_warm` is a second
# run in the same process.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/rotations
row() { name=$1; shift; python benchmarks/quantize_layer.py --problem synthetic "$@" --out "$out/layer_$name.json" | tail -1; }
for bits in 2 3; do
  row "gptq_${bits}bit_g128" --method gptq --bits "$bits" --group-size 128
  row "gptq_${bits}bit_g128_rot" --method gptq --bits "$bits" --group-size 128 --rotate
done
row aqlm_2x8_g8 --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8
row aqlm_2x8_g8_rot --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8 --rotate
