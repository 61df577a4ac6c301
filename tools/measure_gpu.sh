#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one script for a short slot
# on a GPU machine that has JAX's CUDA build but no TensorFlow and no network.
#
#   bash tools/measure_gpu.sh prepare FETCH_WHEELS   # here: with TensorFlow and pip
#   bash tools/measure_gpu.sh run [OUT]              # there: from the repository root
#
# `prepare` puts in .gpu/ (ignored by git, carried to the GPU machine): the
# wheels et_flax needs beyond JAX, flax, optax and orbax (FETCH_WHEELS is a
# script that downloads them into the folder it is given, e.g. the machine's
# fetch_wheels.sh), pytest's, and the digits prepared and decoded at 8x8 and
# 16x16 (the tests' and the quickstart's), so that nothing there needs
# TensorFlow. `run` installs the wheels into /tmp/site and writes to OUT
# (default .gpu/out): versions, `pytest -m gpu`, the benchmark of plain E.T.
# at batch 128 (steps and a device-resident epoch of 100,000 images, bare and
# through the training loop) in bfloat16 and float32, deterministic and not,
# the quickstart's wall time and `reproduce --estimate` for the whole sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=.gpu/data

prepare() {
  local fetch=${1:?usage: measure_gpu.sh prepare FETCH_WHEELS}
  mkdir -p .gpu/wheels "$DATA"
  bash "$fetch" .gpu/wheels
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform any -d .gpu/wheels \
      pytest pluggy iniconfig
  python - "$DATA" <<'EOF'
import sys
from et_flax.data import input_pipeline
for size in (8, 16):
  info = input_pipeline.get_dataset_info(
      {'name': 'digits', 'data_dir': sys.argv[1], 'image_size': size, 'classes': 0})
  for split in ('train', 'val', 'test'):
    input_pipeline.load_split(info, split)
EOF
  du -sh .gpu
}

run() {
  local out=${1:-${OUT:-.gpu/out}}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD ET_FLAX_TEST_DATA_DIR=$PWD/$DATA
  export TF_CPP_MIN_LOG_LEVEL=2
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    python3 -c 'import sys, jax, jaxlib, flax, optax, orbax.checkpoint as ocp
print(sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "flax", flax.__version__, "optax", optax.__version__, "orbax", ocp.__version__)
print(jax.devices(), jax.devices()[0].compute_capability)'
  } > "$out/versions.txt" 2>&1
  # No pytest-xdist there: setup.cfg's addopts are replaced.
  timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts='-ra --durations=10' \
      > "$out/pytest_gpu.txt" 2>&1 || true
  for dtype in auto float32; do
    for det in auto false; do
      timeout 120 python3 -m et_flax.benchmark --config=configs/default.py \
          --config.batch_size=128 --config.augment.preset=none --keras=false \
          --pipeline_images=0 --epoch_images=100000 --steps=50 --warmup=5 \
          --config.compute_dtype=$dtype --deterministic=$det \
          --json="$out/benchmark_${dtype}_deterministic_${det}.json" \
          > "$out/benchmark_${dtype}_deterministic_${det}.txt" 2>&1 || true
    done
  done
  local start=$SECONDS
  timeout 300 python3 -m et_flax.main --config=configs/quickstart.py \
      --workdir="$out/quickstart" --config.data.data_dir="$PWD/$DATA" \
      > "$out/quickstart.txt" 2>&1 || true
  echo "quickstart wall seconds: $((SECONDS - start))" >> "$out/quickstart.txt"
  timeout 300 python3 -m et_flax.reproduce --estimate \
      > "$out/estimate.txt" 2>&1 || true
  tail -n 3 "$out"/*.txt
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: measure_gpu.sh prepare FETCH_WHEELS | run [OUT]" >&2; exit 2 ;;
esac
