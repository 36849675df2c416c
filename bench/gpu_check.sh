#!/usr/bin/env bash
# One-GPU speed and accuracy check, about 9 minutes in all:
#   1. throughput of ResNet-18 at 32 px, batch 512: simclr-kit's batched pipeline with and without
#      torch.compile, and the per-image torchvision + DataLoader pipeline, with the ratio;
#   2. SimCLR pretraining on CIFAR-10 with --time-budget 4 (minutes of training), then the kNN
#      protocol (k=200, cosine, T=0.1) on the test split: seconds per epoch, epochs, kNN top-1;
#   3. photo-shaped data at 224 px, streamed: PHOTOS generated JPEGs (500x375, 375x500, 640x360,
#      400x400; bench/photos.py) stored as whole frames, pretrained with --stream on for
#      PHOTO_MINUTES minutes: decode time, images/s, ms per step.
#
# Usage (from anywhere; runs from the source tree, nothing is installed system-wide):
#   bench/gpu_check.sh CIFAR10_PARQUET_DIR [WHEEL_DIR]
# CIFAR10_PARQUET_DIR holds train.parquet and test.parquet (columns img, label).
#
# Needs python3 with: torch >= 2.4 and torchvision (part 1 needs nothing else), and for part 2
# datasets, pyarrow, safetensors, pyyaml, tqdm (plus what datasets imports: dill, multiprocess,
# pandas, fsspec, huggingface_hub, xxhash). Where some are missing and there is no network, bring
# them as wheels in WHEEL_DIR: they are installed with --no-index into a private folder for this
# run only. For a machine whose image already has the scientific stack but not `datasets`:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d WHEEL_DIR datasets dill multiprocess
# (match --python-version to the GPU machine's python3; name every other missing package too).
#
# Environment: WORK (scratch folder, default /tmp/simclr-gpu-check), BUDGET_MINUTES (default 4),
# RECIPE (default: the package's recipes/cifar10.yaml; --time-budget replaces its epochs, and
# BATCH and IMAGE_SIZE override its batch and size); PHOTOS (default 4000), PHOTO_SIZE (224),
# PHOTO_BATCH (256), PHOTO_MINUTES (1) for part 3. For a dry run of the script on a CPU with
# small data: DEVICE=cpu IMAGE_SIZE=8 BATCH=32 STEPS=2 COMPILE=false BUDGET_MINUTES=0.5
# PHOTOS=32 PHOTO_SIZE=64 PHOTO_BATCH=8 PHOTO_MINUTES=0.2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${1:?usage: bench/gpu_check.sh CIFAR10_PARQUET_DIR [WHEEL_DIR]}"
WHEELS="${2:-}"
DATA="$(cd "$DATA" && pwd)"
WORK="${WORK:-/tmp/simclr-gpu-check}"
BUDGET_MINUTES="${BUDGET_MINUTES:-4}"
RECIPE="${RECIPE:-$ROOT/src/simclr_kit/recipes/cifar10.yaml}"
DEVICE="${DEVICE:-cuda}"
IMAGE_SIZE="${IMAGE_SIZE:-32}"
BATCH="${BATCH:-512}"
STEPS="${STEPS:-30}"
COMPILE="${COMPILE:-false,true}"
PHOTOS="${PHOTOS:-4000}"
PHOTO_SIZE="${PHOTO_SIZE:-224}"
PHOTO_BATCH="${PHOTO_BATCH:-256}"
PHOTO_MINUTES="${PHOTO_MINUTES:-1}"
RUN="$WORK/run"
PHOTO_RUN="$WORK/photo-run"
[ -f "$DATA/train.parquet" ] && [ -f "$DATA/test.parquet" ] \
    || { echo "error: $DATA must hold train.parquet and test.parquet" >&2; exit 2; }
rm -rf "$RUN"
mkdir -p "$WORK"

export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$ROOT/src:$WORK/site${PYTHONPATH#"$ROOT/src"}"
fi
export SIMCLR_KIT_CACHE="$WORK/cache" HF_HOME="$WORK/hf" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
START=$SECONDS

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown); $(date -u)"
MISSING="$(python3 - <<'EOF'
import importlib, sys
need = ["torch", "torchvision", "numpy", "PIL", "datasets", "pyarrow", "safetensors", "yaml", "tqdm"]
missing = []
for name in need:
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')}", file=sys.stderr)
    except Exception as err:  # an ImportError, or a version clash inside the package
        print(f"  {name} MISSING ({type(err).__name__}: {err})", file=sys.stderr)
        missing.append(name)
import torch
print(f"  cuda available: {torch.cuda.is_available()}", file=sys.stderr)
print(" ".join(missing))
EOF
)"

echo "== 1. throughput: ResNet-18, $IMAGE_SIZE px, batch $BATCH (images/s; each image is two views)"
timeout 240 python3 "$ROOT/bench/throughput.py" --backbone resnet18 --image-size "$IMAGE_SIZE" \
    --batch-size "$BATCH" --device "$DEVICE" --compile "$COMPILE" --steps "$STEPS" --warmup 5 \
    || echo "throughput: FAILED or timed out (exit $?)"
echo "part 1 took $((SECONDS - START)) s"

if [ -n "$MISSING" ]; then
    echo "== 2. skipped: missing python packages: $MISSING (pass their wheels as WHEEL_DIR)"
    exit 3
fi

echo "== 2. SimCLR on CIFAR-10 ($(basename "$RECIPE")), --time-budget $BUDGET_MINUTES min, then kNN on the test split"
PART2=$SECONDS
python3 -m simclr_kit pretrain --config "$RECIPE" --data "$DATA" --out "$RUN" \
    --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --device "$DEVICE" \
    --time-budget "$BUDGET_MINUTES" --checkpoint-every 0 --log-every 20
echo "pretraining (decode + training + save) took $((SECONDS - PART2)) s"
python3 -m simclr_kit evaluate "$RUN" --data "$DATA" --protocols knn --device "$DEVICE"
echo "== summary"
python3 "$ROOT/bench/run_summary.py" "$RUN" "$BATCH"
echo "== 3. $PHOTOS photo-shaped JPEGs at $PHOTO_SIZE px, streamed, --time-budget $PHOTO_MINUTES min"
PART3=$SECONDS
rm -rf "$WORK/photos" "$PHOTO_RUN"
python3 "$ROOT/bench/photos.py" data --root "$WORK/photos" --count "$PHOTOS"
echo "generating the JPEGs took $((SECONDS - PART3)) s"
PART3=$SECONDS
# bench/photos.py keeps its caches under its --root; the run uses the same ones.
SIMCLR_KIT_CACHE="$WORK/photos/cache" HF_HOME="$WORK/photos/hf" \
    python3 -m simclr_kit pretrain --data "$WORK/photos/photos" --out "$PHOTO_RUN" \
    --image-size "$PHOTO_SIZE" --batch-size "$PHOTO_BATCH" --device "$DEVICE" --stream on \
    --time-budget "$PHOTO_MINUTES" --epochs 100 --checkpoint-every 0 --log-every 5 \
    || echo "photo run: FAILED (exit $?)"
echo "pretraining (decode + training + save) took $((SECONDS - PART3)) s"
python3 "$ROOT/bench/run_summary.py" "$PHOTO_RUN" "$PHOTO_BATCH" || true
echo "total $((SECONDS - START)) s"
