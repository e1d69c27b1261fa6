#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the few wheels the GPU acceptance machine lacks for `make gpu-check`:
# pydantic and its dependencies (pipeline.config) and tqdm (pipeline.data.prepare), for CPython 3.12 on
# x86_64 manylinux. The versions are requirements.txt's, so the check runs what the pipeline is locked to.
# Needs a package registry; the GPU machine has none. ~3 MB in all. Usage:
#   bench/fetch_gpu_wheels.sh            # download into .whl/
#   bench/fetch_gpu_wheels.sh --print    # print the pinned requirements only
# Override the target with GPU_PY_VERSION (3.12), GPU_PLATFORM (manylinux_2_17_x86_64), WHEEL_DIR (.whl).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=${PYTHON:-.venv/bin/python}
names=(pydantic pydantic-core annotated-types typing-extensions typing-inspection tqdm)
pins=()
for name in "${names[@]}"; do
  # requirements.txt spells names as pip freeze does (pydantic_core, typing_extensions): compare normalised.
  pin=$(awk -v want="$name" '{
          line = $0; sub(/[ \t]*#.*/, "", line); split(line, a, "==");
          n = tolower(a[1]); gsub(/[-_.]+/, "-", n);
          if (n == want && a[2] != "") { print want "==" a[2]; exit } }' requirements.txt)
  if [[ -z "$pin" ]]; then
    echo "fetch_gpu_wheels: $name has no == pin in requirements.txt" >&2
    exit 1
  fi
  pins+=("$pin")
done
if [[ "${1:-}" == "--print" ]]; then
  printf '%s\n' "${pins[@]}"
  exit 0
fi
dest=${WHEEL_DIR:-.whl}
mkdir -p "$dest"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "${GPU_PY_VERSION:-3.12}" --implementation cp --platform "${GPU_PLATFORM:-manylinux_2_17_x86_64}" \
  -d "$dest" "${pins[@]}"
ls -l "$dest"/*.whl
echo "fetch_gpu_wheels: $(du -ch "$dest"/*.whl | tail -1 | cut -f1) in $dest; carry it with the working tree" >&2
