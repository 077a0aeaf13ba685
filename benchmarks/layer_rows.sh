#!/usr/bin/env bash
# Rows of the README's layer table, each set with the rows it is compared with, in one run on
# one machine: bash benchmarks/layer_rows.sh SET, SET one of spqr, vptq, rotation, kashin, pvq
# (writes benchmarks/results/<SET's folder>/layer_*.json, each with rel_output_error and
# rel_weight_error). Each row is its own process: `seconds` includes compilation,
# `seconds_warm` is a second run in the same process. Kashin and RTN use no data.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=${1:?usage: bash benchmarks/layer_rows.sh spqr|vptq|rotation|kashin|pvq}
row() { name=$1; shift; python benchmarks/quantize_layer.py --problem synthetic "$@" --out "$out/layer_$name.json" | tail -1; }
case "$set_name" in
  spqr)
    out=benchmarks/results/spqr
    row gptq_3bit_g128 --method gptq --bits 3 --group-size 128
    row gptq_4bit_g128 --method gptq --bits 4 --group-size 128
    row spqr_3bit --method spqr --bits 3
    row spqr_4bit --method spqr --bits 4
    row spqr_3bit_paper --method spqr --bits 3 --group-size 16 --stat-group 16 --outlier-threshold 0.2 ;;
  vptq)
    out=benchmarks/results/vptq
    row gptq_2bit_g128 --method gptq --bits 2 --group-size 128
    row aqlm_2x8_g8_beam1 --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8 --beam-size 1
    row aqlm_2x8_g8_beam8 --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8 --beam-size 8
    row vptq_8x8r8 --method vptq
    row vptq_4x8 --method vptq --vector-size 4 --codebook-bits 8 --residual-bits 0 ;;
  rotation)
    out=benchmarks/results/rotations
    for bits in 2 3; do
      row "gptq_${bits}bit_g128" --method gptq --bits "$bits" --group-size 128
      row "gptq_${bits}bit_g128_rot" --method gptq --bits "$bits" --group-size 128 --rotate
    done
    row aqlm_2x8_g8 --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8
    row aqlm_2x8_g8_rot --method aqlm --num-codebooks 2 --codebook-bits 8 --group-size 8 --rotate ;;
  kashin)
    out=benchmarks/results/kashin
    for bits in 2 3 4; do
      row "rtn_${bits}bit_g128" --method rtn --bits "$bits" --group-size 128
      row "gptq_${bits}bit_g128" --method gptq --bits "$bits" --group-size 128
    done
    row kashin_1_1 --method kashin --u-bits 1 --v-bits 1
    row kashin_1_2 --method kashin --u-bits 1 --v-bits 2
    row kashin_2_2 --method kashin --u-bits 2 --v-bits 2 ;;
  pvq)
    out=benchmarks/results/pvq
    row gptq_3bit_g128 --method gptq --bits 3 --group-size 128
    row gptq_4bit_g128 --method gptq --bits 4 --group-size 128
    row pvq_8x14a2 --method pvq
    row pvq_8x14a2_no_rotation --method pvq --rotate none
    row pvq_16x27a3 --method pvq --group-size 16 --pulses 27 --amplitude-bits 3 ;;
  *) echo "unknown set $set_name: spqr, vptq, rotation, kashin or pvq" >&2; exit 2 ;;
esac
