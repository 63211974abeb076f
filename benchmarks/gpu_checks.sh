#!/usr/bin/env bash
# The GPU measurements of GPT-2 small in one call, most important first (about 6-8 minutes on an
# H100 once JAX is up): cuDNN attention variants alone, then the train step's MFU with the dense
# segment mask (today's default), with model.cudnn_segments=1 (and its profile's 25 longest
# kernels), at batch 32, without Triton GEMMs, with the loss in chunks, with XLA attention. Each
# step has its own time limit and a failure does not stop the rest.
#
#   bash benchmarks/gpu_checks.sh [PROFILE_DIR]
#   BASELINE=.baseline bash benchmarks/gpu_checks.sh   # also time an older tree first, e.g. from
#                                 # `mkdir .baseline && git archive REV | tar -x -C .baseline`
#
# A machine without ml-collections (a bare accelerator image) installs it from wheels in $WHEELS
# (default .whl; `pip download --no-deps -d .whl ml-collections` beforehand, where PyPI is reachable).
set -u
cd "$(dirname "$0")/.."
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/lmlab_site "${WHEELS:-.whl}"/*.whl
  export PYTHONPATH=/tmp/lmlab_site:${PYTHONPATH:-}
fi
PROFILE=${1:-/tmp/gpu_checks_profile}
LOG=${OUT:-/tmp}/gpu_checks.log  # the device tool's $OUT comes back even when its time runs out
mkdir -p "$(dirname "$LOG")" && exec > >(tee -a "$LOG") 2>&1
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'

step() {  # step SECONDS LABEL COMMAND...: one measurement, labelled, within its time limit
  local limit=$1 label=$2; shift 2
  echo "=== $label"
  timeout "$limit" "$@" 2>&1 | grep -vE '^(I|W)[0-9]{4} ' | tail -n 40
}

TRAIN=(python3 benchmarks/train_throughput.py --config=experiments/gpt2_small.py --steps=20)

step 150 'cuDNN attention variants (fwd+bwd, errors against the f32 oracle)' \
  python3 benchmarks/cudnn_attention.py
if [ -n "${BASELINE:-}" ]; then
  step 120 "GPT-2 small, the tree in $BASELINE (before)" \
    env -C "$BASELINE" PYTHONPATH="$(cd "$BASELINE" && pwd):${PYTHONPATH:-}" "${TRAIN[@]}"
fi
step 120 'GPT-2 small, cudnn, dense segment mask' "${TRAIN[@]}"
step 180 'GPT-2 small, cudnn_segments=1, then a profile (25 longest kernels)' \
  "${TRAIN[@]}" --config.model.cudnn_segments=1 --profile="$PROFILE"
step 150 'GPT-2 small, cudnn_segments=1, batch 32' \
  "${TRAIN[@]}" --config.model.cudnn_segments=1 --config.train.batch_size=32
step 120 'GPT-2 small, cudnn_segments=1, Triton GEMMs off' \
  env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false "${TRAIN[@]}" --config.model.cudnn_segments=1
step 120 'GPT-2 small, cudnn_segments=1, loss in chunks of 256 positions per row' \
  "${TRAIN[@]}" --config.model.cudnn_segments=1 --config.train.loss_chunk=256
step 120 'GPT-2 small, xla attention' "${TRAIN[@]}" --config.model.attention=xla
