#!/usr/bin/env bash
# The README's commands on one GPU, each figure written to one file: $OUT/gpu_check.txt when OUT is
# set, else ./gpu_check.txt. A failing step is recorded with its exit code and the script goes on.
# About 5-8 minutes on one H100 (most of it torch.compile's first compilations).
#
#   bash benchmarks/gpu_check.sh                       # on the GPU
#   DEVICE=cpu DTYPE=float32 STEPS=4 SHORT=3 TOKENS=20 BUDGET=5 BENCH=tiny COMPILE=0 EVAL_CHARS=2000 \
#     SETS="train.eval_iters=2 train.batch_size=4 model.block_size=32 train.eval_max_chars=2000" \
#       bash benchmarks/gpu_check.sh                   # the commands, checked on a CPU
#
# Settings (environment): DEVICE (cuda), DTYPE for training (bfloat16), STEPS for the two configs'
# runs (300), SHORT for the compiled, deterministic and torchrun runs (100), TOKENS sampled (300),
# BUDGET seconds for the --time-budget run (30), BENCH the config benched beside the run (gpt2_small),
# COMPILE=0 to leave out the torch.compile steps, SETS more "key=value" overrides for every
# training run, EVAL_CHARS for eval --max-chars (unset: the run's own limit), PYTHON (python).
set -u

DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-300}
SHORT=${SHORT:-100}
TOKENS=${TOKENS:-300}
COMPILE=${COMPILE:-1}
BUDGET=${BUDGET:-30}
BENCH=${BENCH:-gpt2_small}
SETS=${SETS:-}
EVAL_CHARS=${EVAL_CHARS:-}
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPORT=${OUT:+$OUT/gpu_check.txt}
REPORT=$(realpath -m "${REPORT:-./gpu_check.txt}")
WORK=$(mktemp -d)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" MINIGPT_CACHE_DIR="$WORK/cache" NO_COLOR=1
cd "$WORK" || exit 1
: > "$REPORT"
FAILED=0

# step NAME COMMAND...: run it, append its output, exit code and seconds to the report.
step() {
    local name=$1 began code ms
    shift
    printf '\n===== %s\n$ %s\n' "$name" "$*" >> "$REPORT"
    began=$(date +%s%N)
    "$@" >> "$REPORT" 2>&1
    code=$?
    ms=$(( ($(date +%s%N) - began) / 1000000 ))
    printf -- '----- %s: exit %d, %d.%03d s\n' "$name" "$code" $((ms / 1000)) $((ms % 1000)) >> "$REPORT"
    [ "$code" -eq 0 ] || FAILED=$((FAILED + 1))
    echo "$name: exit $code"
}

MINIGPT=("$PYTHON" -m minigpt_cli)
TRAIN=(--device "$DEVICE" --set "train.dtype=$DTYPE" --json --quiet)
for item in $SETS; do TRAIN+=(--set "$item"); done
EVAL=(--device "$DEVICE" --json ${EVAL_CHARS:+--max-chars "$EVAL_CHARS"})

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); DEVICE=$DEVICE DTYPE=$DTYPE STEPS=$STEPS"
    echo "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >> "$REPORT"
step environment "$PYTHON" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, 'capability', f'{p.major}.{p.minor}', f'{p.total_memory / 2**30:.1f} GiB',
          'is_bf16_supported', torch.cuda.is_bf16_supported())
from minigpt_cli.device import choose_precision, resolve_device
from minigpt_cli.optim import newton_schulz_dtype
d = resolve_device('$DEVICE').device
for dtype in ('auto', '$DTYPE'):
    print(dtype, '->', choose_precision(d, dtype))
print('newton-schulz', newton_schulz_dtype(d))
"
command -v nvidia-smi > /dev/null && step nvidia-smi nvidia-smi

# Training: the two configs the README trains, then compiled, deterministic, and under torchrun.
step "train default" "${MINIGPT[@]}" train default --out runs/default --set "train.max_iters=$STEPS" "${TRAIN[@]}"
step "train shakespeare_char" "${MINIGPT[@]}" train shakespeare_char --out runs/shakespeare \
    --set "train.max_iters=$STEPS" --set train.eval_interval=100 "${TRAIN[@]}"
if [ "$COMPILE" = 1 ]; then
    step "train default --compile" "${MINIGPT[@]}" train default --out runs/compiled --set "train.max_iters=$SHORT" \
        --set train.compile=true "${TRAIN[@]}"
fi
step "train default --deterministic" "${MINIGPT[@]}" train default --out runs/deterministic --deterministic \
    --set "train.max_iters=$SHORT" "${TRAIN[@]}"
step "torchrun 1 process" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m minigpt_cli train \
    default --out runs/torchrun --set "train.max_iters=$SHORT" "${TRAIN[@]}"
step "train default --time-budget $BUDGET" "${MINIGPT[@]}" train default --out runs/budget --time-budget "$BUDGET" \
    "${TRAIN[@]}"

# Sampling: float32 and bfloat16, with and without the compiled (CUDA-graph) decode step.
for dtype in float32 bfloat16; do
    step "sample $dtype" "${MINIGPT[@]}" sample runs/shakespeare --prompt "ROMEO:" --max-new-tokens "$TOKENS" \
        --seed 1337 --dtype "$dtype" --device "$DEVICE" --json
    step "sample $dtype, 4 samples" "${MINIGPT[@]}" sample runs/shakespeare --prompt "ROMEO:" --num-samples 4 \
        --max-new-tokens "$TOKENS" --seed 1337 --dtype "$dtype" --device "$DEVICE" --json
    if [ "$COMPILE" = 1 ]; then
        step "sample $dtype --compile" "${MINIGPT[@]}" sample runs/shakespeare --prompt "ROMEO:" \
            --max-new-tokens "$TOKENS" --seed 1337 --dtype "$dtype" --compile --device "$DEVICE" --json
    fi
done
step "sample --no-kv-cache" "${MINIGPT[@]}" sample runs/shakespeare --prompt "ROMEO:" --max-new-tokens 100 \
    --seed 1337 --no-kv-cache --device "$DEVICE" --json

# Evaluation, speed, and a look inside.
step "eval" "${MINIGPT[@]}" eval runs/shakespeare "${EVAL[@]}"
step "eval --dtype bfloat16" "${MINIGPT[@]}" eval runs/shakespeare --dtype bfloat16 "${EVAL[@]}"
step "bench default" "${MINIGPT[@]}" bench runs/default --quick --device "$DEVICE" --json --quiet
step "bench $BENCH" "${MINIGPT[@]}" bench "$BENCH" --quick --device "$DEVICE" --json --quiet
step "inspect" "${MINIGPT[@]}" inspect runs/shakespeare
step "runs" "${MINIGPT[@]}" runs

echo "failed steps: $FAILED" >> "$REPORT"
echo "report: $REPORT ($FAILED failed)"
rm -rf "$WORK"
