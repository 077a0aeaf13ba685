#!/usr/bin/env bash
# The Kashin rows of the README's layer table, with the RTN and GPTQ rows they are compared
# with, in one run on one machine: bash benchmarks/kashin_layer_rows.sh
# (writes benchmarks/results/kashin/layer_*.json; each holds rel_weight_error and
# rel_output_error). Kashin and RTN use no data; GPTQ uses the problem's XᵀX.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/kashin
row() { name=$1; shift; python benchmarks/quantize_layer.py --problem synthetic "$@" --out "$out/layer_$name.json" | tail -1; }
for bits in 2 3 4; do
  row "rtn_${bits}bit_g128" --method rtn --bits "$bits" --group-size 128
  row "gptq_${bits}bit_g128" --method gptq --bits "$bits" --group-size 128
done
row kashin_1_1 --method kashin --u-bits 1 --v-bits 1
row kashin_1_2 --method kashin --u-bits 1 --v-bits 2
row kashin_2_2 --method kashin --u-bits 2 --v-bits 2
