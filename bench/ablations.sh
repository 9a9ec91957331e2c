#!/usr/bin/env bash
# The ablation rows of the README's "Model quality" table: one command each, digits, seed 0.
# Usage: bench/ablations.sh [ROW ...]   (no ROW: every row; each takes 4-15 minutes on 2 cores)
# Each row writes runs/ablations/ROW.json (its last line is the bench's JSON object).
# Rows A-D start from the reference recipe (--reference-base: the tiny architecture with the reference
# decisions, batch 64, 600 steps), the other rows from the tiny preset with every field they depend on named (E0: the
# preset before round two, F3 that of round three), on the data sets named;
# every row names every change, so it reproduces whatever the presets say now.
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
R3="--set straight_through=soft --set usage_weight=0.005 --set usage_sample_tokens=256 --set decoder_lm_zero_init=false --set mask_ratio=0.5 --set mask_ratio_min=0 --set crop_scale_min=0.2"  # rounds two to five
E0="$R3 --set search_space=pca --set latent_dim=16 --set decoder_input=lm --set decoder_head=linear --set global_tokens=0"
E6="$R3 --set search_space=uniform --set latent_dim=6 --set decoder_input=lm_search --set decoder_reads_masked=false --set decoder_head=linear --set global_tokens=0"
E7="$R3 --set search_space=uniform --set latent_dim=6 --set decoder_input=lm_search --set decoder_reads_masked=false --set decoder_head=conv --set global_tokens=0"
F1="$E7 --set global_tokens=4 --set decoder_reads_masked=true"
F3="$F1 --set global_tokens=8"                                            # the tiny preset of round three
H1="$F3 --set search_space=grid"
K1="$H1 --set straight_through=none --set usage_weight=0"
L1="$K1 --set decoder_lm_zero_init=true"                                  # the tiny preset of round four
T1="$L1 --set mask_ratio=0 --set mask_ratio_min=null"                     # round six: no mask
V1="$T1 --set crop_scale_min=0.4"                                         # the tiny preset of round six
SHAPES="--datasets shapes --peers="
DIGITS="--datasets digits --peers="
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
  [E0]="$E0"                                                               # previous tiny (C14), 4 sets, FSQ peers
  [E1]="$E0 $SHAPES --set decoder_head=conv --no-probe"
  [E2]="$E0 $SHAPES --set mask_cooldown_fraction=0.3 --no-probe"
  [E3]="$E0 $SHAPES --set latent_dim=8 --no-probe"
  [E4]="$E0 $DIGITS --set decoder_input=lm_search --set decoder_reads_masked=false --no-probe"
  [E5]="$E0 $DIGITS --set search_space=uniform --set latent_dim=6 --no-probe"
  [E6]="$E6 $DIGITS --no-probe"
  [E7]="$E7"                                                               # tiny without global tokens, 4 sets, FSQ peers
  [E8]="$E7 --peers= --set global_tokens=4"                               # = the tiny preset, 4 sets
  [G2]="$E7 $DIGITS --set global_tokens=4 --set global_vocab_size=16"
  [E9]="$E7 --datasets digits,shapes --peers= --no-probe --set llm_vocab=tiktoken:cl100k_base"
  [G1]="$E0 $DIGITS --set global_tokens=4 --set global_balance=centre"
  [F1]="$F1 --datasets digits,shapes --peers="                            # E8 + the decoder reads the masked codes too
  [F2]="$F1 --datasets digits,shapes --peers= --set latent_dim=5"
  [G3]="$F1 $DIGITS --set global_tokens=8"
  [F3]="$F1 --set global_tokens=8"                                         # = the tiny preset, 4 sets, FSQ peers
  [G4]="$F1 $DIGITS --set global_tokens=16"
  [X3]="$F1 $DIGITS --no-probe --set global_tokens=8 --set mask_ratio=0"  # diagnostic: the tiny preset without the mask
  [X4]="$F3 $DIGITS --no-probe --set decoder_input=search --set mask_ratio=0"  # diagnostic: F3, no LM read, no mask
  [H1]="$H1 $DIGITS --no-probe"                                            # F3 + the word grid
  [H2]="$F3 $DIGITS --no-probe --set usage_weight=0"
  [H3]="$H1 $DIGITS --no-probe --set straight_through=none"
  [H4]="$H1 $DIGITS --no-probe --set usage_weight=0"
  [K1]="$K1 --datasets digits,shapes --peers="
  [L1]="$L1 --peers="                                                      # = the tiny preset, 4 sets
  [Q1]="$L1 $DIGITS --set global_queue=512"
  [X5]="$L1 $DIGITS --no-probe --set decoder_input=search --set mask_ratio=0"  # diagnostic: L1, no LM read, no mask
  [N1]="$L1 $DIGITS --no-probe --set commitment_weight=0"
  [M1]="$L1 --peers= --set latent_dim=5"                                   # a 5-d grid, 8x7x7x7x7 cells, 4 sets
  [G0]="$L1 --datasets digits,photos,shapes --peers= --set global_tokens=0"  # L1 without its global tokens
  [O1]="$L1 $DIGITS --no-probe --set encoder_output=linear"                # no standardisation before the grid
  [S1]="$L1 --datasets digits,shapes --peers= --no-probe --set standardize_running=true"
  [P1]="$L1 --peers= --set decoder_reads_global=false"                     # the decoder skips the global positions, 4 sets
  [T1]="$T1 --peers="                                                      # L1 without the mask, 4 sets
  [U1]="$T1 --datasets digits,photos --peers= --set decoder_reads_global=false"
  [V1]="$V1"                                                               # = the tiny preset, 4 sets, FSQ peers (same crops)
  [W0]="$V1 --datasets digits,photos,shapes --peers= --no-probe --set global_tokens=0"  # the tiny preset without its global tokens
  [Y1]="$V1 --datasets shapes --peers= --set latent_dim=7"                     # the tiny preset on a 7-d grid (5x4x4x4x4x4x4 cells)
  [X1]="$E0 $DIGITS --no-probe --set mask_ratio=0 --set decoder_input=search"          # diagnostic: decoder reads PCA-16 search vectors, no LM
  [X2]="$E0 $DIGITS --no-probe --set mask_ratio=0 --set decoder_input=search --set search_space=uniform --set latent_dim=6"
)
ORDER=(A0 A1 A2 A3 D1 D2 B1 B2 B3 B4 B5 C1 C2 C3 C4 C5 C6 C7 C8 C9 C10 C11 C12 C13 C14 C15
       E0 E1 E2 E3 E4 E5 E6 E7 E8 E9 F1 F2 G1 G2 G3 F3 G4 X1 X2 X3 X4 H1 H2 H3 H4 K1 L1 Q1 X5 N1 M1 G0 O1 S1 P1 T1 U1 V1 W0 Y1)
mkdir -p "$OUT"
for row in "${@:-${ORDER[@]}}"; do
  [[ -v "ROWS[$row]" ]] || { echo "unknown row $row; rows: ${ORDER[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086  # the row's options are meant to split
  base=""; [[ $row == [A-D]* ]] && base=$REF
  "$PY" bench/quality.py $base ${ROWS[$row]} --out "$OUT/$row" > "$OUT/$row.json"
  tail -n 1 "$OUT/$row.json"
done
