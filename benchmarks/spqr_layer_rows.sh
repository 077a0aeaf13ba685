#!/usr/bin/env bash
# The SpQR rows of the README's layer table, with the GPTQ rows they are compared with,
# in one run: bash benchmarks/spqr_layer_rows.sh (writes benchmarks/results/spqr/layer_*.json).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/spqr
row() { name=$1; shift; python benchmarks/quantize_layer.py --problem synthetic "$@" --out "$out/layer_$name.json" | tail -1; }
row gptq_3bit_g128 --method gptq --bits 3 --group-size 128
row gptq_4bit_g128 --method gptq --bits 4 --group-size 128
row spqr_3bit --method spqr --bits 3
row spqr_4bit --method spqr --bits 4
row spqr_3bit_paper --method spqr --bits 3 --group-size 16 --stat-group 16 --outlier-threshold 0.2
