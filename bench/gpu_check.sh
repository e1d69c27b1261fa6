#!/usr/bin/env bash
# `make gpu-check` without make: runs bench.gpu_check with GPU_PYTHON (default: the venv's Python, else python3).
# On the GPU acceptance machine (no venv, no package registry) the wheels that bench/fetch_gpu_wheels.sh put in
# .whl/ are installed into GPU_SITE first, when that Python lacks them, and put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${GPU_PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then GPU_PYTHON=.venv/bin/python; else GPU_PYTHON=python3; fi
fi
GPU_SITE=${GPU_SITE:-/tmp/resnet-gpu-site}
# What bench.gpu_check imports beyond torch/torchvision/numpy/Pillow (pyarrow: shards; pipeline.config: pydantic;
# pipeline.data.prepare: tqdm).
NEEDED="import pydantic, yaml, tqdm, pyarrow, pyarrow.parquet; assert int(pydantic.VERSION.split('.')[0]) >= 2, 'pydantic ' + pydantic.VERSION + ' < 2'"
shopt -s nullglob
wheels=(.whl/*.whl)
if ! "$GPU_PYTHON" -c "$NEEDED" 2>/dev/null && ((${#wheels[@]})); then
  echo "[gpu-check] installing ${#wheels[@]} wheel(s) from .whl/ into $GPU_SITE" >&2
  mkdir -p "$GPU_SITE"
  if "$GPU_PYTHON" -m pip --version >/dev/null 2>&1; then
    PIP_ROOT_USER_ACTION=ignore "$GPU_PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade \
      --target "$GPU_SITE" "${wheels[@]}"
  else  # no pip: a wheel is a zip of its site-packages files (these have no scripts or data to place)
    for w in "${wheels[@]}"; do "$GPU_PYTHON" -m zipfile -e "$w" "$GPU_SITE"; done
  fi
fi
if [[ -d "$GPU_SITE" ]]; then
  export PYTHONPATH="$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! missing=$("$GPU_PYTHON" -c "$NEEDED" 2>&1); then
  echo "[gpu-check] $GPU_PYTHON: ${missing##*$'\n'}" >&2
  echo "[gpu-check] it needs pydantic, yaml, tqdm and pyarrow: run bench/fetch_gpu_wheels.sh on a machine with a package" \
       "registry and carry .whl/ along (docs/gpu-check.md)" >&2
  exit 2
fi
# The ROI JPEG decoder (pipeline/data/jpeg.py), where it is not built and this machine can build it: the CPU decode
# it is compared with should be the one training uses. Without a compiler or libjpeg headers the CPU path decodes
# whole images (the records say which: "train_decoder").
so=pipeline/data/native/_roijpeg.so
if [[ ! -e $so || $so -ot pipeline/data/native/roijpeg.c ]] && command -v cc >/dev/null && [[ -e /usr/include/jpeglib.h ]]; then
  cc -O2 -shared -fPIC -o "$so" pipeline/data/native/roijpeg.c -ljpeg || echo "[gpu-check] roijpeg: not built" >&2
fi
export PYTHONUNBUFFERED=1
exec "$GPU_PYTHON" -m bench.gpu_check "$@"
