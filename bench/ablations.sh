#!/usr/bin/env bash
# The ablation rows of the README's "Model quality" table: one command each, digits, seed 0.
# Usage: bench/ablations.sh [ROW ...]   (no ROW: every row; each takes 4-15 minutes on 2 cores)
# Each row writes runs/ablations/ROW.json (its last line is the bench's JSON object).
# Rows start from the reference recipe (--reference-base: the tiny architecture with the reference
# decisions, batch 64, 600 steps) and name every change, so a row reproduces whatever the presets say.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=runs/ablations
REF="--datasets digits --reference-base"
NOLM="--set mask_ratio=0 --set decoder_input=embeddings"                 # diagnostic: no mask, no LM
STD="--set encoder_output=standardize"
PCA="$STD --set search_space=pca --set latent_dim=16"
C3="$PCA --set mask_ratio_min=0"
C5="$C3 --set batch_size=32 --steps 1200"
C6="$C5 --set decoder_width=256 --set decoder_depth=4 --set decoder_heads=8"
C9="$C6 --set straight_through=soft"
declare -A ROWS=(
  [A0]=""                                                                  # reference recipe
  [A1]="--set encoder_output=unit"
  [A2]="--set search_space=latent --set latent_dim=16"
  [A3]="--set straight_through=soft"
  [D1]="--set mask_ratio=0"
  [D2]="$NOLM"
  [B1]="$STD"
  [B2]="$STD $NOLM"
  [B3]="$STD --set search_space=latent --set latent_dim=16 $NOLM"
  [B4]="$STD --set search_space=pca --set latent_dim=8 $NOLM"
  [B5]="$PCA $NOLM"
  [C1]="$PCA"
  [C2]="$PCA --set mask_ratio=0"
  [C3]="$C3"
  [C4]="$PCA --set mask_warmup_fraction=0.5"
  [C5]="$C5"
  [C6]="$C6"
  [C7]="$C5 --set straight_through=soft"
  [C8]="$C6 --set encoder_width=256 --set encoder_depth=4 --set encoder_heads=8"
  [C9]="$C9"
  [C10]="$C6 --set straight_through=rotation"
  [C11]="$C6 --set search_space=mapped"
  [C12]="$C9 --set latent_dim=32"
  [C13]="$C9 --set usage_weight=0.02"
  [C14]="$C9 --set usage_weight=0.005 --set usage_sample_tokens=256"       # = the tiny preset
  [C15]="$C9 --set usage_weight=0.005 --set usage_sample_tokens=256 --set search_space=mapped"
)
ORDER=(A0 A1 A2 A3 D1 D2 B1 B2 B3 B4 B5 C1 C2 C3 C4 C5 C6 C7 C8 C9 C10 C11 C12 C13 C14 C15)
mkdir -p "$OUT"
for row in "${@:-${ORDER[@]}}"; do
  [[ -v "ROWS[$row]" ]] || { echo "unknown row $row; rows: ${ORDER[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086  # the row's options are meant to split
  "$PY" bench/quality.py $REF ${ROWS[$row]} --out "$OUT/$row" > "$OUT/$row.json"
  tail -n 1 "$OUT/$row.json"
done
