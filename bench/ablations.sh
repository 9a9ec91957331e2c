#!/usr/bin/env bash
# Ablation rows of docs/results.md that run on today's code: one command each, seed 0.
# Usage: bench/ablations.sh [ROW ...]   (no ROW: every row; each takes 4-15 minutes on 2 cores)
# Each row writes runs/ablations/ROW.json (its last line is the bench's JSON object).
# The rows of rounds one to six that name options removed since (A1-A3, B*, C*, E*, F*, G1-G4, H*, K1,
# L1, M1, N1, O1, P1, Q1, S1, T1, U1, X1-X5) ran on commit ddb493b: `git checkout ddb493b` and run
# that commit's bench/ablations.sh to repeat one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=runs/ablations
declare -A ROWS=(
  [A0]="--datasets digits --reference-base"                          # the reference decisions on the tiny architecture
  [D1]="--datasets digits --reference-base --set mask.ratio=0"       # diagnostic: the reference without its mask
  [V1]=""                                                            # = the tiny preset, 4 sets, FSQ peers
  [W0]="--datasets digits,photos,shapes --peers= --no-probe --set global_tokens=0"  # the tiny preset without its global words
  [Y1]="--datasets shapes --peers= --set grid_dim=7"                 # a 7-d grid (5x4x4x4x4x4x4 cells)
  [X6]="--datasets digits --peers= --no-probe --set decoder_input=search"  # diagnostic: no LM read (round six's X5 on V1)
)
ORDER=(A0 D1 V1 W0 Y1 X6)
mkdir -p "$OUT"
for row in "${@:-${ORDER[@]}}"; do
  [[ -v "ROWS[$row]" ]] || { echo "unknown row $row; rows: ${ORDER[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086  # the row's options are meant to split
  "$PY" bench/quality.py ${ROWS[$row]} --out "$OUT/$row" > "$OUT/$row.json"
  tail -n 1 "$OUT/$row.json"
done
